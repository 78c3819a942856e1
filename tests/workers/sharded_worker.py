"""Two epochs of an ArcFaceModel with sharded (`python sharded_worker.py OUT 1`, one worker of a
TF_CONFIG cluster) or unsharded centres (`OUT 0`, a single process); saves the whole centres to
OUT.npy, the model to OUT_model/ and the losses to OUT.json."""
import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from faceid_keras.model import ArcFaceModel
from faceid_keras.placement import Placement


def main() -> None:
    out, shard = sys.argv[1], sys.argv[2] == "1"
    placement = Placement.create("cpu")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (24, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 7, 24).astype("int32")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8).with_options(options)
    with placement.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        backbone = keras.Model(inputs, keras.layers.Dense(8)(keras.layers.Flatten()(inputs)))
        model = ArcFaceModel(backbone, num_classes=7, scale=8.0, weight_decay=5e-4, shard_centres=shard)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=False)
    start = os.path.join(os.path.dirname(out), "start.npy")
    if shard:
        model.head.assign_shards(model.head.centres, np.load(start))
    else:
        np.save(start, model.head.centres.numpy())
    history = model.fit(dataset, epochs=2, verbose=0).history
    with placement.output_dir(out + "_model") as folder:  # a collective op: every worker saves
        model.save(os.path.join(folder, "model.keras"))
    np.save(out + ".npy", model.head.gather_shards(model.head.centres) if shard else model.head.centres.numpy())
    with open(out + ".json", "w") as f:
        json.dump({"loss": history["loss"], "replicas": placement.num_replicas_in_sync}, f)


if __name__ == "__main__":
    main()
