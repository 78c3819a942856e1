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
    same, different, lfw = _run_demo(tmp_path, capsys, "--quick")
    assert len(lfw) == 2
    assert -1 <= different <= 1 and -1 <= same <= 1


@pytest.mark.slow
def test_full_demo_learns_to_verify(tmp_path, capsys):
    same, different, lfw = _run_demo(tmp_path, capsys)
    assert lfw[-1] > 0.8
    assert same > different
