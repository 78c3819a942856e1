"""Input pipeline: the tfds-backed training dataset, determinism, sharding hook."""
import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from faceid_keras import data

NUM_IMAGES = 8 * 6  # the tfds_data_dir fixture: 8 identities x 6 images of 32x32


def _reference(tfds_data_dir):
    """(images uint8, labels) of the train split in file order, decoded independently."""
    records = tfds.builder("ms1m_arcface", data_dir=str(tfds_data_dir)).as_dataset(split="train")
    pairs = [(r["image"].numpy(), int(r["label"])) for r in records]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def _collect(dataset):
    batches = [(x.numpy(), y.numpy()) for x, y in dataset]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]), batches


def test_dataset_info_gives_classes_and_image_shape(tfds_data_dir):
    assert data.dataset_info(str(tfds_data_dir)) == (8, (32, 32, 3))


def test_batches_have_the_right_types_and_shapes_and_drop_the_remainder(tfds_data_dir):
    dataset = data.train_dataset(str(tfds_data_dir), batch_size=5, seed=1)
    assert dataset.element_spec == (
        tf.TensorSpec((5, 32, 32, 3), tf.uint8),
        tf.TensorSpec((5,), tf.int32),
    )
    images, labels, batches = _collect(dataset)
    assert len(batches) == NUM_IMAGES // 5
    assert images.dtype == np.uint8 and images.max() > images.min()


def test_pipeline_images_are_the_decoded_records_maybe_mirrored(tfds_data_dir):
    reference, reference_labels = _reference(tfds_data_dir)
    dataset = data.train_dataset(str(tfds_data_dir), batch_size=8, shuffle_buffer=0, seed=3)
    images, labels, _ = _collect(dataset)
    assert len(images) == NUM_IMAGES
    # With one file and no shuffle buffer the order is the file order.
    assert labels.tolist() == reference_labels
    mirrored = [bool(np.array_equal(a, e[:, ::-1])) for a, e in zip(images, reference)]
    plain = [bool(np.array_equal(a, e)) for a, e in zip(images, reference)]
    assert all(m or p for m, p in zip(mirrored, plain))
    assert 0 < sum(mirrored) < NUM_IMAGES


def test_shuffled_epoch_holds_every_example_once(tfds_data_dir):
    _, reference_labels = _reference(tfds_data_dir)
    _, labels, _ = _collect(data.train_dataset(str(tfds_data_dir), batch_size=8, shuffle_buffer=100))
    assert collections.Counter(labels.tolist()) == collections.Counter(reference_labels)
    assert labels.tolist() != reference_labels


def test_flips_do_not_follow_the_shuffle(tfds_data_dir):
    """Whether an image is mirrored must not depend on which record the shuffle picked (a flip
    stream seeded like the shuffle replays its random numbers: a correlation near 0.3 here)."""
    reference, _ = _reference(tfds_data_dir)
    index = {e.tobytes(): (i, False) for i, e in enumerate(reference)}
    index.update({e[:, ::-1].tobytes(): (i, True) for i, e in enumerate(reference)})
    records, flips = [], []
    for seed in range(20):
        images, _, _ = _collect(data.train_dataset(str(tfds_data_dir), batch_size=8, shuffle_buffer=100, seed=seed))
        for image in images:
            record, flipped = index[image.tobytes()]
            records.append(record)
            flips.append(flipped)
    assert 0.4 < np.mean(flips) < 0.6
    for feature in (np.array(records) % 2, np.array(records) >= NUM_IMAGES // 2):
        assert abs(np.corrcoef(flips, feature)[0, 1]) < 0.12


def test_same_seed_same_batches_and_each_epoch_reshuffles(tfds_data_dir):
    first = data.train_dataset(str(tfds_data_dir), batch_size=8, shuffle_buffer=100, seed=7)
    second = data.train_dataset(str(tfds_data_dir), batch_size=8, shuffle_buffer=100, seed=7)
    other = data.train_dataset(str(tfds_data_dir), batch_size=8, shuffle_buffer=100, seed=8)
    images_a, labels_a, _ = _collect(first)
    images_b, labels_b, _ = _collect(second)
    np.testing.assert_array_equal(images_a, images_b)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert not np.array_equal(_collect(other)[1], labels_a)
    images_next, labels_next, _ = _collect(first)
    assert not (np.array_equal(labels_next, labels_a) and np.array_equal(images_next, images_a))
    np.testing.assert_array_equal(_collect(second)[0], images_next)


@pytest.mark.parametrize("skip", [1, 3])
def test_skip_batches_gives_the_tail_of_the_unskipped_pass(tfds_data_dir, skip):
    full = data.train_dataset(str(tfds_data_dir), batch_size=8, shuffle_buffer=100, seed=5)
    _, _, full_batches = _collect(full)
    resumed = data.train_dataset(
        str(tfds_data_dir), batch_size=8, shuffle_buffer=100, seed=5, skip_batches=skip
    )
    _, _, resumed_batches = _collect(resumed)
    assert len(resumed_batches) == len(full_batches) - skip
    for (images, labels), (expected_images, expected_labels) in zip(
        resumed_batches, full_batches[skip:]
    ):
        np.testing.assert_array_equal(labels, expected_labels)
        np.testing.assert_array_equal(images, expected_images)
    # Resuming past the end of the pass yields nothing rather than failing.
    past_end = data.train_dataset(str(tfds_data_dir), batch_size=8, seed=5, skip_batches=100)
    assert sum(1 for _ in past_end) == 0


def test_image_size_resizes(tfds_data_dir):
    dataset = data.train_dataset(str(tfds_data_dir), batch_size=4, image_size=(16, 20), seed=0)
    assert dataset.element_spec[0].shape == (4, 16, 20, 3)
    images, _, _ = _collect(dataset)
    assert images.shape == (NUM_IMAGES, 16, 20, 3)


class HalfShard:
    """A placement stand-in for two processes: keeps every second record, halves the batch."""

    def distribute_dataset(self, dataset, global_batch_size):
        return dataset.shard(2, 1), global_batch_size // 2


def test_placement_shards_records_and_sets_the_local_batch(tfds_data_dir):
    _, reference_labels = _reference(tfds_data_dir)
    dataset = data.train_dataset(
        str(tfds_data_dir), batch_size=8, shuffle_buffer=0, seed=0, placement=HalfShard()
    )
    _, labels, batches = _collect(dataset)
    assert {len(b[1]) for b in batches} == {4}
    assert labels.tolist() == reference_labels[1::2][: len(labels)]
    assert len(labels) == (NUM_IMAGES // 2) // 4 * 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "validation"},
        {"batch_size": 0},
        {"shuffle_buffer": -1},
        {"image_size": (16,)},
        {"skip_batches": -1},
    ],
)
def test_bad_arguments_raise(tfds_data_dir, kwargs):
    arguments = {"batch_size": 4, **kwargs}
    with pytest.raises(ValueError):
        data.train_dataset(str(tfds_data_dir), **arguments)
