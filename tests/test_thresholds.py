"""Decision thresholds at a FAR: the protocol function on hand-made pairs, `faceid eval`'s table and
`faceid calibrate`'s threshold file."""
import json
import re

import keras
import numpy as np
import pytest

from faceid_keras import ArcFaceModel, calibrate, evaluate, verification
from helpers import run_faceid


def _pairs(same_cosines, different_cosines):
    cosines = np.concatenate([same_cosines, different_cosines])
    issame = np.r_[np.ones(len(same_cosines), bool), np.zeros(len(different_cosines), bool)]
    return 2.0 - 2.0 * cosines, issame  # squared distance of unit vectors


def test_threshold_at_far_hand_made():
    # 200 different pairs at cosines 0.000, 0.004, ..., 0.796; FAR 1e-2 allows 2 of them above.
    different = np.arange(200) * 0.004
    same = np.array([0.9, 0.79, 0.789, 0.7, 0.5])
    dist, issame = _pairs(same, different)
    decision = verification.threshold_at_far(dist, issame, 1e-2)
    assert decision["too_small"] is False
    assert decision["cosine"] == pytest.approx(0.788)  # third largest different cosine
    assert decision["squared_distance"] == pytest.approx(2 - 2 * 0.788)
    assert decision["far"] == pytest.approx(2 / 200)  # 0.792 and 0.796 accepted
    assert decision["tar"] == pytest.approx(3 / 5)  # 0.9, 0.79, 0.789 above 0.788
    # The same decision by squared distance, as insightface states it ("same" when dist < thr).
    assert np.sum((dist < decision["squared_distance"]) & ~issame) == 2


def test_threshold_needs_enough_different_pairs():
    dist, issame = _pairs(np.full(10, 0.9), np.linspace(0, 0.5, 999))
    decisions = verification.decision_thresholds(dist, issame)
    assert [d["too_small"] for d in decisions] == [False, True, True]
    assert decisions[1]["needed_different_pairs"] == 1000 and decisions[1]["different_pairs"] == 999
    assert decisions[0]["far"] <= 1e-2 and decisions[0]["tar"] == 1.0
    with pytest.raises(ValueError, match="far must be in"):
        verification.threshold_at_far(dist, issame, 0.0)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    backbone = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(8)])
    path = tmp_path_factory.mktemp("model") / "arcface.keras"
    ArcFaceModel(backbone=backbone, num_classes=4).save(path)
    return path


def test_eval_prints_decisions_and_calibrate_stores_threshold(saved_model, synthetic_folder, capsys):
    results = run_faceid(["eval", str(saved_model), "--data_path", str(synthetic_folder), "--targets", "lfw"])
    out = capsys.readouterr().out
    decisions = results["lfw"]["decisions"]
    assert [d["too_small"] for d in decisions] == [True, True, True]  # 20 different pairs
    assert re.search(r"^lfw\s+0\.01\s+set too small: 20 different pairs, needs 100$", out, re.M)
    assert re.search(r"^lfw\s+0\.0001\s+set too small: 20 different pairs, needs 10000$", out, re.M)

    decision = run_faceid(["calibrate", str(saved_model), "--data_path", str(synthetic_folder), "--far", "0.05"])
    out = capsys.readouterr().out
    record = json.loads((saved_model.parent / "arcface.keras.threshold.json").read_text())
    assert record["targets"] == ["agedb_30", "cfp_fp", "lfw"] and record["different_pairs"] == 60
    assert record["far"] == 0.05 and record["far_measured"] <= 0.05
    assert record["cosine"] == pytest.approx(decision["cosine"])
    assert record["squared_distance"] == pytest.approx(2 - 2 * record["cosine"])
    assert calibrate.read_threshold(saved_model)["cosine"] == record["cosine"]
    assert f"cosine > {record['cosine']:.5f}" in out

    with pytest.raises(SystemExit, match="FAR 0.001 needs at least 1000"):
        run_faceid(["calibrate", str(saved_model), "--data_path", str(synthetic_folder), "--far", "1e-3"])


def test_decision_table_lists_thresholds_and_too_small_sets():
    rng = np.random.default_rng(0)
    dist, issame = _pairs(rng.uniform(0.4, 1.0, 500), rng.uniform(-0.3, 0.6, 1500))
    table = evaluate.format_decisions({"big": verification.evaluate_distances(dist, issame)})
    lines = table.splitlines()
    assert lines[0].split() == ["target", "FAR", "cosine", ">", "sq.", "distance", "<", "TAR", "FAR", "measured"]
    decision = verification.threshold_at_far(dist, issame, 1e-3)
    assert lines[2].split() == ["big", "0.001", f"{decision['cosine']:.5f}", f"{decision['squared_distance']:.5f}",
                                f"{decision['tar']:.5f}", f"{decision['far']:.6f}"]
    assert lines[3].split()[2:] == ["set", "too", "small:", "1500", "different", "pairs,", "needs", "10000"]
    assert len(lines[1]) == len(lines[2])  # aligned columns
