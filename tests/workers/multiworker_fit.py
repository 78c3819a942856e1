"""Two epochs of an ArcFaceModel fit (Partial FC, momentum, weight decay) on in-memory global
batches, as `python multiworker_fit.py OUT RESULT`. Run by each worker of a cluster (TF_CONFIG set)
and once by a single process as the reference: writes weights to RESULT (.npz) and a JSON summary,
logs and checkpoints into OUT on the chief only."""
import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from faceid_keras.model import ArcFaceModel
from faceid_keras.placement import Placement


def main(out: str, result: str) -> None:
    placement = Placement.create("cpu")

    # One deterministic dataset of global batches, the same in every process. Its examples come
    # from memory (no files), so it is sharded by DATA: each worker reads it all and keeps its
    # part of every global batch; AUTO would try FILE sharding first and fall back with a warning.
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (24, 8, 8, 3)).astype("float32")
    labels = (np.arange(24) % 12).astype("int32")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8).with_options(options)

    with placement.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
        x = keras.layers.Dense(8)(keras.layers.Flatten()(x))
        model = ArcFaceModel(keras.Model(inputs, x), num_classes=12, scale=8.0, weight_decay=5e-4,
                             sample_rate=0.5)
        model.compile(optimizer=placement.wrap_optimizer(keras.optimizers.SGD(0.1, momentum=0.9)),
                      jit_compile=False)
    start = [w.numpy() for w in model.weights]
    callbacks = [keras.callbacks.CSVLogger(os.path.join(out, "log.csv"))] if placement.is_chief else []
    with placement.output_dir(os.path.join(out, "checkpoints")) as folder:
        callbacks.append(keras.callbacks.ModelCheckpoint(
            os.path.join(folder, "epoch{epoch}.weights.h5"), save_weights_only=True))
        history = model.fit(dataset, epochs=2, verbose=0, callbacks=callbacks).history
        worker_folder = folder
    with placement.output_dir(out) as folder:
        model.save_weights(os.path.join(folder, "final.weights.h5"))
    np.savez(result, *[w.numpy() for w in model.weights])
    with open(result + ".json", "w") as f:
        json.dump({
            "task": list(placement.task), "chief": placement.is_chief,
            "replicas": placement.num_replicas_in_sync, "loss": history["loss"],
            "worker_folder": worker_folder,
            "update": max(float(np.abs(w.numpy() - s).max()) for w, s in zip(model.weights, start)),
        }, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
