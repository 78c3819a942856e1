"""Sharded against unsharded centres on two logical CPUs (MirroredStrategy): trains both, saves and
reloads across replica counts, and writes the numbers the tests check to results.npz and
results.json in the working folder."""
import json

import keras
import numpy as np
import tensorflow as tf

from faceid_keras import ArcFaceModel


def main() -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out, info = {}, {}
    rng = np.random.default_rng(0)
    C = 7  # two shards of S = 4 rows; the last row of shard 1 is padding
    images = rng.uniform(0, 255, size=(24, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, C, size=24).astype("int32")

    def backbone():
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
        return keras.Model(inputs, keras.layers.Dense(8)(keras.layers.Flatten()(x)))

    def make(strategy, shard, num_classes=C, sample_rate=1.0, momentum=0.9, decoupled=1e-3):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = ArcFaceModel(backbone(), num_classes=num_classes, scale=8.0, weight_decay=0.05,
                                 shard_centres=shard, sample_rate=sample_rate)
            schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=1, decay_rate=0.8)
            model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=momentum, weight_decay=decoupled),
                          jit_compile=False)
        return model

    def full(model, name="centres"):
        return model.head.gather_shards(getattr(model.head, name))

    # 3. Per-replica shards: S rows on each replica, different initial values, N(0, 0.01) overall.
    big = make(mirrored, True, num_classes=999)
    components = mirrored.experimental_local_results(big.head.centres.value)
    info["component_shapes"] = [list(c.shape) for c in components]
    out["component0"], out["component1"] = (c.numpy() for c in components)
    out["init_full"] = full(big)

    # 1. Two replicas sharded == one replica unsharded, with the same start.
    plain = make(one_device, False)
    sharded = make(mirrored, True)
    sharded.head.assign_shards(sharded.head.centres, plain.head.centres.numpy())
    for a, b in zip(plain.backbone.weights, sharded.backbone.weights):
        b.assign(a.numpy())
    out["start_centres"] = plain.head.centres.numpy()
    histories = [m.fit(images, labels, batch_size=12, epochs=2, shuffle=False, verbose=0).history
                 for m in (plain, sharded)]
    info["plain_history"], info["sharded_history"] = histories
    out["plain_centres"], out["sharded_centres"] = plain.head.centres.numpy(), full(sharded)
    out["plain_momentum"] = [v for v in plain.optimizer.variables if "centres" in v.path][0].numpy()
    out["sharded_momentum"] = full(sharded, "momentum")
    for i, (a, b) in enumerate(zip(plain.backbone.weights, sharded.backbone.weights)):
        out[f"plain_backbone{i}"], out[f"sharded_backbone{i}"] = a.numpy(), b.numpy()
    info["plain_eval"] = plain.evaluate(images, labels, batch_size=24, verbose=0, return_dict=True)
    info["sharded_eval"] = sharded.evaluate(images, labels, batch_size=24, verbose=0, return_dict=True)

    # 4. Save on two replicas; load on one device (no strategy) and back on two.
    sharded.save("sharded.keras")
    sharded.save_weights("sharded.weights.h5")
    embeddings = sharded.predict(images, verbose=0)
    out["embeddings"], out["logits"] = embeddings, sharded.head(embeddings).numpy()
    out["plain_logits"] = plain.head(embeddings).numpy()
    halves = mirrored.experimental_distribute_values_from_function(
        lambda context: embeddings[12 * context.replica_id_in_sync_group:][:12])
    in_replicas = tf.function(lambda e: mirrored.gather(mirrored.run(sharded.head, args=(e,)), axis=0))
    out["replica_logits"] = in_replicas(halves).numpy()
    single = keras.models.load_model("sharded.keras")
    info["single_shards"] = single.head.num_shards
    out["single_embeddings"] = single.predict(images, verbose=0)
    out["single_logits"] = single.head(embeddings).numpy()
    out["single_centres"], out["single_momentum"] = full(single), full(single, "momentum")
    info["single_iterations"] = int(single.optimizer.iterations)
    resumed = make(mirrored, True)
    with mirrored.scope():
        resumed.optimizer.build(resumed.trainable_variables)
    resumed.load_weights("sharded.weights.h5")
    out["resumed_centres"], out["resumed_momentum"] = full(resumed), full(resumed, "momentum")
    for model, name in ((sharded, "continued"), (resumed, "resumed")):
        info[name + "_history"] = model.fit(images, labels, batch_size=12, epochs=1, shuffle=False, verbose=0).history
        out[name + "_after"] = full(model)
        out[name + "_kernel"] = model.backbone.weights[-2].numpy()
    # One device -> two replicas, through .weights.h5 and .keras.
    single.fit(images, labels, batch_size=24, epochs=1, verbose=0)
    single.save_weights("single.weights.h5")
    single.save("single.keras")
    out["single_trained"] = full(single)
    spread = make(mirrored, True)
    with mirrored.scope():
        spread.optimizer.build(spread.trainable_variables)
    spread.load_weights("single.weights.h5")
    out["spread_centres"] = full(spread)
    with mirrored.scope():
        spread_model = keras.models.load_model("single.keras")
    info["spread_model_shards"] = spread_model.head.num_shards
    out["spread_model_centres"] = full(spread_model)
    out["spread_model_momentum"] = full(spread_model, "momentum")
    out["single_trained_momentum"] = full(single, "momentum")

    # 2. Sampling within shards (momentum 0): only the sampled rows of each shard move.
    sampled = make(mirrored, True, num_classes=40, sample_rate=0.25, momentum=0.0, decoupled=None)
    sample_labels = np.array([0, 1, 2, 3, 5, 5, 8, 9, 25, 30, 31, 39], "int32")
    sample_images = images[:12]
    head = sampled.head
    for step in range(2):
        before = full(sampled)
        logs = sampled.train_on_batch(sample_images, sample_labels, return_dict=True)
        changed = np.flatnonzero(np.any(full(sampled) != before, axis=1))
        expected = []
        for replica in range(2):
            first = replica * head.shard_size
            local = tf.constant(sample_labels - first)
            owned = (local >= 0) & (local < head.shard_size)
            rows = head._sample_shard(local, owned, head.shard_size, step, replica).numpy()
            expected.extend((rows + first).tolist())
        info[f"sample{step}"] = {"changed": changed.tolist(), "expected": expected, "loss": logs["loss"]}
    info["shard_size_40"] = head.shard_size

    np.savez("results.npz", **out)
    with open("results.json", "w") as f:
        json.dump(info, f)
    print("done")


if __name__ == "__main__":
    main()
