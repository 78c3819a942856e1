"""`faceid eval`: a saved model evaluated on .bin packs or a tfds data dir, table and ROC plot."""
import argparse
import io
import re
import zipfile

import keras
import numpy as np
import pytest
from PIL import Image

from faceid_keras import ArcFaceModel, evaluate
from helpers import run_faceid
from tfds_ms1m.binpack import write_bin


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    backbone = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(), keras.layers.Dense(8)])
    path = tmp_path_factory.mktemp("model") / "arcface.keras"
    ArcFaceModel(backbone=backbone, num_classes=4).save(path)
    return path


@pytest.fixture(scope="module")
def pack_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packs")
    rng = np.random.default_rng(0)
    for name in ("lfw", "cfp_fp"):
        encoded = []
        for image in rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        write_bin(folder / f"{name}.bin", encoded, np.arange(30) % 2 == 0)
    return folder


def test_eval_prints_aligned_table_and_plots_roc(saved_model, pack_folder, tmp_path, capsys):
    plot = tmp_path / "roc.png"
    results = run_faceid(
        ["eval", str(saved_model), "--data_path", str(pack_folder), "--targets", "lfw,cfp_fp",
         "--batch_size", "7", "--roc_plot", str(plot)]
    )
    assert list(results) == ["lfw", "cfp_fp"]
    lines = capsys.readouterr().out.splitlines()
    assert re.match(r"target\s+pairs\s+accuracy\s+VAL@FAR=1e-3\s+FAR\s+AUC$", lines[0])
    for name, line in zip(("lfw", "cfp_fp"), lines[1:3]):
        result = results[name]
        assert line.split()[:5] == [name, "30", f"{result['accuracy']:.5f}", "+-", f"{result['accuracy_std']:.5f}"]
        assert line.endswith(f"{result['auc']:.5f}")
    assert len({len(line) for line in lines[:3]}) == 1  # aligned columns
    assert lines[-1] == f"ROC curves written to {plot}"
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 300


def test_eval_missing_target_names_file_and_lists_found(saved_model, pack_folder):
    with pytest.raises(FileNotFoundError, match=r"agedb_30\.bin does not exist; targets found: cfp_fp, lfw"):
        run_faceid(["eval", str(saved_model), "--data_path", str(pack_folder)])


def test_eval_on_tfds_data_dir(saved_model, tfds_data_dir, capsys):
    results = run_faceid(["eval", str(saved_model), "--data_path", str(tfds_data_dir), "--targets", "lfw"])
    assert results["lfw"]["pairs"] == 40  # the 32x32 synthetic images are resized to the model's 16x16
    assert capsys.readouterr().out.splitlines()[1].startswith("lfw ")


def test_add_parser_registers_eval_subcommand(saved_model):
    parser = argparse.ArgumentParser(prog="faceid")
    evaluate.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", str(saved_model), "--data_path", "/data", "--batch_size", "32"])
    assert args.func is evaluate.run
    assert (args.model, args.data_path, args.targets, args.batch_size, args.roc_plot) == (
        str(saved_model), "/data", "lfw,cfp_fp,agedb_30", 32, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", str(saved_model), "--data_path", "/data", "--batch_size", "0"])


def _without_config(saved_model, path):
    with zipfile.ZipFile(saved_model) as source, zipfile.ZipFile(path, "w") as target:
        for name in source.namelist():
            if name != "config.json":
                target.writestr(name, source.read(name))


@pytest.mark.parametrize("damage, pattern", [
    ("no_config", r"broken\.keras: not a Keras model archive: it holds no config\.json"),
    ("corrupt_h5", r"broken\.h5: cannot load this HDF5 \(\.h5\) model: OSError"),
    ("truncated", r"broken\.keras: not a \.keras model archive \(zip\)"),
    ("junk", r"broken\.keras: neither a \.keras archive \(zip\) nor an \.h5 file"),
    ("missing", r"broken\.keras: no such model file"),
])
def test_eval_broken_model_file_names_it(saved_model, pack_folder, tmp_path, damage, pattern):
    from faceid_keras.model_file import ModelFileError

    path = tmp_path / ("broken.h5" if damage == "corrupt_h5" else "broken.keras")
    if damage == "no_config":
        _without_config(saved_model, path)
    elif damage == "corrupt_h5":
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    elif damage == "truncated":
        path.write_bytes(saved_model.read_bytes()[:300])
    elif damage == "junk":
        path.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError, match=pattern):
        run_faceid(["eval", str(path), "--data_path", str(pack_folder), "--targets", "lfw"])
