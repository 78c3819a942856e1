"""One SGD step of an ArcFaceModel on two logical CPUs, and on one device with the same global
batch and start weights; prints `RESULT {json}` with both updates' size and their difference."""
import json

import tensorflow as tf


def backbone():
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, strides=2)(inputs)
    x = keras.layers.GroupNormalization(groups=2)(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(8)(x))


def train_one_step(placement, images, labels, weights):
    import keras

    from faceid_keras.model import ArcFaceModel

    with placement.scope():
        model = ArcFaceModel(backbone(), num_classes=5, weight_decay=5e-4)
        if weights is not None:
            model.set_weights(weights)
        start = model.get_weights()
        model.compile(optimizer=placement.wrap_optimizer(keras.optimizers.SGD(0.01, momentum=0.9)))
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(len(labels))
    model.fit(dataset, epochs=1, verbose=0)
    return start, model.get_weights()


def main() -> None:
    # Logical devices must be configured before TensorFlow's runtime starts.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np

    from faceid_keras.placement import Placement

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 5, 8).astype("int32")
    two = Placement.create("cpu", devices=["/cpu:0", "/cpu:1"])
    one = Placement.create("cpu")
    start, after_two = train_one_step(two, images, labels, None)
    _, after_one = train_one_step(one, images, labels, start)
    print("RESULT " + json.dumps({
        "replicas": [two.num_replicas_in_sync, one.num_replicas_in_sync],
        "devices": list(two.device_names),
        "update": max(float(np.max(np.abs(a - s))) for a, s in zip(after_one, start)),
        "diff": max(float(np.max(np.abs(a - b))) for a, b in zip(after_two, after_one)),
    }))


if __name__ == "__main__":
    main()
