"""Shared test setup: quiet TensorFlow and the Keras TensorFlow backend before anything imports them."""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import pytest


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory):
    """A tiny insightface folder: 8 identities x 6 images of 32x32, lfw/cfp_fp/agedb_30 with 40 pairs."""
    from tfds_ms1m import synthetic

    folder = tmp_path_factory.mktemp("synthetic_ms1m")
    synthetic.write_dataset(folder, 8, 6, image_size=32, pairs_per_target=40, seed=0)
    return folder


@pytest.fixture(scope="session")
def tfds_data_dir(synthetic_folder, tmp_path_factory):
    """`synthetic_folder` built with tfds (configs train and verification) into a fresh data dir."""
    import tensorflow_datasets as tfds

    import tfds_ms1m  # noqa: F401  (registers the ms1m_arcface builder)

    data_dir = tmp_path_factory.mktemp("tfds_data")
    config = tfds.download.DownloadConfig(manual_dir=str(synthetic_folder))
    for name in ("train", "verification"):
        builder = tfds.builder(f"ms1m_arcface/{name}", data_dir=str(data_dir))
        builder.download_and_prepare(download_config=config)
    return data_dir


@pytest.fixture(scope="session")
def synthetic_image_tree(synthetic_folder, tmp_path_factory):
    """`synthetic_folder`'s training images as files: <tree>/id_<label>/<key>.jpg (8 x 6, 32x32 JPEG)."""
    from tfds_ms1m import insightface_folder

    tree = tmp_path_factory.mktemp("image_tree")
    for key, label, image in insightface_folder.iter_images(synthetic_folder):
        folder = tree / f"id_{label}"
        folder.mkdir(exist_ok=True)
        (folder / f"{key:03d}.jpg").write_bytes(image)
    return tree
