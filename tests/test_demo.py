"""`faceid demo`: the whole workflow runs and prints what each stage produced."""
import re

import pytest

from faceid_keras import cli


def _run_demo(tmp_path, capsys, *flags):
    status = cli.main(["demo", "--workdir", str(tmp_path), *flags])
    out = capsys.readouterr().out
    assert status == 0
    for expected in ("[1/4] Writing", "[2/4] Building", "[3/4] Training", "[4/4] Reloading",
                     "[lfw][epoch 1] accuracy", "Final summary:"):
        assert expected in out, expected
    assert (tmp_path / "faces_synthetic" / "train.rec").exists()
    assert (tmp_path / "tensorflow_datasets" / "ms1m_arcface").exists()
    assert (tmp_path / "model" / "embedding.keras").exists()
    same = float(re.search(r"Cosine similarity, same identity: (-?[0-9.]+)", out).group(1))
    different = float(re.search(r"Cosine similarity, different identities: (-?[0-9.]+)", out).group(1))
    lfw = [float(a) for a in re.search(r"lfw verification accuracy by epoch: (.*)", out).group(1).split(", ")]
    assert re.search(r"Embedding shape: \(4, 128\)", out)
    return same, different, lfw


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    import keras
    import numpy as np

    from faceid_keras import embedding, packs

    same, different, lfw = _run_demo(tmp_path, capsys, "--quick")
    assert len(lfw) == 2
    # The similarities printed are the reloaded model's on lfw's first same and different pairs.
    model = keras.models.load_model(tmp_path / "model" / "embedding.keras")
    images, issame = packs.load_bin(tmp_path / "faces_synthetic" / "lfw.bin")
    first_same, first_different = int(np.flatnonzero(issame)[0]), int(np.flatnonzero(~issame)[0])
    faces = np.concatenate([images[2 * first_same:2 * first_same + 2],
                            images[2 * first_different:2 * first_different + 2]])
    embeddings = embedding.embed(model, faces)
    assert same == pytest.approx(float(embeddings[0] @ embeddings[1]), abs=1e-3)
    assert different == pytest.approx(float(embeddings[2] @ embeddings[3]), abs=1e-3)


@pytest.mark.slow
def test_full_demo_learns_to_verify(tmp_path, capsys):
    same, different, lfw = _run_demo(tmp_path, capsys)
    assert lfw[-1] > 0.8
    assert same > different
