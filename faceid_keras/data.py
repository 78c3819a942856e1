"""tf.data input pipeline from the `ms1m_arcface` tfds training split to (images, labels) batches.

The split's TFRecord shards are read directly (no per-example tfds decoding layer) and records
are shuffled and batched while still serialized. One parallel map per batch then parses the
records and decodes and flips each JPEG. Images come out as uint8 pixels, labels as int32:
`ArcFaceModel` applies (x/255 - 0.5)/0.5 itself on the device, so batches carry a quarter of the
bytes of float32 images and the pipeline's cost is little more than the JPEG decoding.
"""
from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import tfds_ms1m  # noqa: F401  (registers the ms1m_arcface builder)

DATASET_NAME = "ms1m_arcface"
DEFAULT_SHUFFLE_BUFFER = 20_000
# tfds's own interleave of shard files (tfds.ReadConfig defaults), kept so record order matches.
_INTERLEAVE_CYCLE = 16
_INTERLEAVE_BLOCK = 16
# One reading thread passes ~100k records/s, ~17 cores' worth of JPEG decoding; parallel reads cost
# about twice the CPU per record, so they only pay off on machines with more cores than that.
_PARALLEL_READ_CORES = 16


class DatasetDistributor(Protocol):
    """What `train_dataset` needs from a placement: shard the record stream, give the batch size."""

    def distribute_dataset(
        self, dataset: tf.data.Dataset, global_batch_size: int
    ) -> tuple[tf.data.Dataset, int]: ...


def builder(data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The `ms1m_arcface` builder (default `train` config) over a built tfds data dir."""
    return tfds.builder(DATASET_NAME, data_dir=data_dir)


def dataset_info(data_dir: str | None) -> tuple[int, tuple[int, int, int]]:
    """(number of classes, image shape (H, W, 3)) of the built training data, to size the model."""
    dataset_builder = builder(data_dir)
    num_classes = dataset_builder.info.features["label"].num_classes
    shape = tuple(dataset_builder.info.features["image"].shape)
    if None not in shape:
        return num_classes, shape
    split = next(iter(dataset_builder.info.splits))
    first = dataset_builder.as_dataset(
        split=split, decoders={"image": tfds.decode.SkipDecoding()}
    ).take(1)
    for example in first:
        image = decode_image(example["image"])
        return num_classes, tuple(int(d) for d in image.shape)
    raise ValueError(f"{DATASET_NAME} in {data_dir}: split {split!r} has no examples.")


def decode_image(
    image_bytes: tf.Tensor, image_size: tuple[int, int] | None = None
) -> tf.Tensor:
    """Decode JPEG bytes to a uint8 (H, W, 3) image, resized to `image_size` if given."""
    image = tf.io.decode_jpeg(image_bytes, channels=3)
    if image_size is not None:
        resized = tf.image.resize(image, image_size, method="bilinear")
        image = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
    return image


def _records(
    dataset_builder: tfds.core.DatasetBuilder, split: str, seed: int | None
) -> tuple[tf.data.Dataset, bool]:
    """The split's records with undecoded JPEGs, shard order shuffled (by `seed`) on every pass.

    TFRecord shards are read directly and give serialized tf.train.Example strings (returns True);
    other tfds file formats are read by tfds and give {"image", "label"} dicts (returns False).
    """
    if dataset_builder.info.file_format != tfds.core.FileFormat.TFRECORD:
        records = dataset_builder.as_dataset(
            split=split,
            decoders={"image": tfds.decode.SkipDecoding()},
            shuffle_files=True,
            read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
        )
        return records, False
    instructions = dataset_builder.info.splits[split].file_instructions
    files = tf.data.Dataset.from_tensor_slices(
        (
            [i.filename for i in instructions],
            tf.constant([i.skip for i in instructions], tf.int64),
            tf.constant([-1 if i.take is None else i.take for i in instructions], tf.int64),
        )
    )
    if len(instructions) > 1:
        files = files.shuffle(len(instructions), seed=seed, reshuffle_each_iteration=True)
    whole_files = all(
        i.skip == 0 and (i.take is None or i.take < 0 or i.take == i.examples_in_shard)
        for i in instructions
    )

    def read(name: tf.Tensor, skip: tf.Tensor, take: tf.Tensor) -> tf.data.Dataset:
        shard = tf.data.TFRecordDataset(name)
        return shard if whole_files else shard.skip(skip).take(take)

    parallel = (os.cpu_count() or 1) > _PARALLEL_READ_CORES
    records = files.interleave(
        read,
        cycle_length=min(_INTERLEAVE_CYCLE, len(instructions)),
        block_length=_INTERLEAVE_BLOCK,
        num_parallel_calls=tf.data.AUTOTUNE if parallel else None,
        deterministic=True if parallel else None,
    )
    return records, True


def train_dataset(
    data_dir: str | None,
    batch_size: int,
    split: str = "train",
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    seed: int | None = None,
    image_size: tuple[int, int] | None = None,
    placement: DatasetDistributor | None = None,
    skip_batches: int = 0,
) -> tf.data.Dataset:
    """One epoch of (images uint8 [B, H, W, 3], labels int32 [B]) batches from a tfds split.

    `batch_size` is the global batch. With a `placement`, its `distribute_dataset` shards the
    record stream for this process (NPU ranks, multi-worker tf.distribute) and gives the
    per-process batch size; tf.data auto-sharding is then off.
    With `seed`, the file order, shuffle and flips are fixed, and the same seed yields identical
    batches; each new iteration (epoch) is reshuffled either way. The last partial batch is dropped.
    `skip_batches` leaves out the first batches of the pass before any image is decoded, so a
    resumed epoch yields exactly the batches an unbroken one yields after that point.
    Without `image_size`, every image must have the shape `dataset_info` reports.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    if shuffle_buffer < 0:
        raise ValueError(f"`shuffle_buffer` must be >= 0, got {shuffle_buffer}.")
    if skip_batches < 0:
        raise ValueError(f"`skip_batches` must be >= 0, got {skip_batches}.")
    if image_size is None:
        _, shape = dataset_info(data_dir)
        static_shape = shape
    else:
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"`image_size` must be (height, width), got {image_size!r}.")
        static_shape = (int(image_size[0]), int(image_size[1]), 3)
    dataset_builder = builder(data_dir)
    if split not in dataset_builder.info.splits:
        raise ValueError(
            f"{DATASET_NAME} in {data_dir}: no split {split!r}; "
            f"available: {sorted(dataset_builder.info.splits)}."
        )
    records, serialized = _records(dataset_builder, split, seed)
    local_batch_size = batch_size
    if placement is not None:
        records, local_batch_size = placement.distribute_dataset(records, batch_size)
    if shuffle_buffer > 1:
        records = records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    # One random int64 per example, drawn in stream order: its lowest bit decides the flip, so
    # flips depend on the seed and the example's position only, never on thread timing. The
    # stream gets its own seed: seeded with `seed` it would replay the shuffle's random numbers,
    # and the flips would follow which record the shuffle picked.
    flip_seed = None if seed is None else int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
    flip_keys = tf.data.Dataset.random(seed=flip_seed, rerandomize_each_iteration=True)
    batches = tf.data.Dataset.zip(records, flip_keys).batch(local_batch_size, drop_remainder=True)
    if skip_batches:
        batches = batches.skip(skip_batches)
    features = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }

    def decode_and_flip(example: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
        image_bytes, flip = example
        image = tf.ensure_shape(decode_image(image_bytes, image_size), static_shape)
        return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)

    def to_batch(batch, keys: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if serialized:
            batch = tf.io.parse_example(batch, features)
        flips = tf.equal(tf.bitwise.bitwise_and(keys, 1), 1)
        # One image after another within a batch: the parallel map runs batches side by side,
        # and a parallel loop inside each only adds thread hand-offs.
        images = tf.map_fn(
            decode_and_flip,
            (batch["image"], flips),
            fn_output_signature=tf.TensorSpec(static_shape, tf.uint8),
            parallel_iterations=1,
        )
        return images, tf.cast(batch["label"], tf.int32)

    dataset = batches.map(
        to_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=seed is not None
    )
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = seed is not None
    if placement is not None:
        # The placement has given this process its share of the records already; tf.data's
        # auto-sharding in a multi-worker `fit` would shard it a second time.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)
