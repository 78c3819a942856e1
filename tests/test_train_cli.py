"""`faceid train`: flags, learning-rate schedule, NaN stop, backups, a real run and the ModelZoo script."""
import csv
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from callbacks import StopOnNaN, ThroughputLogger
from faceid_keras import cli, compat, prepare, schedules, train, training
from faceid_keras.backup import GlobalStep, TrainingBackup
from helpers import REPO

TINY = ["--backbone", "iresnet18", "--embedding_size", "16", "--batch_size", "8", "--verbose", "2"]


def _parse(*argv):
    return cli.build_parser().parse_args(["train", "--data_path", "/data", *argv])


def _config(*argv) -> training.TrainConfig:
    return train.config_from_args(_parse(*argv))


def test_parser_takes_the_seed_flags_and_defaults():
    args = _parse("--train_epochs", "5", "--batch_size", "16")
    assert (args.train_epochs, args.batch_size, args.steps) == (5, 16, 0)
    assert args.backbone == "iresnet50" and args.margin == "arcface" and args.lr_schedule == "poly"
    assert args.device == "auto" and args.precision is None and args.targets == ("lfw", "cfp_fp", "agedb_30")
    assert _parse("--targets", "none").targets == () and _parse("--targets", "lfw").targets == ("lfw",)
    assert train.config_from_args(args) == training.TrainConfig("/data", train_epochs=5, batch_size=16)
    assert args.func is train.run
    assert _parse("--margin", "1,0,0.35").margin == (1.0, 0.0, 0.35)
    assert _parse("--lr_steps", "2,4.5").lr_steps == (2.0, 4.5)
    assert (args.sample_rate, args.jit_compile) == (1.0, "auto")


@pytest.mark.parametrize(
    "argv",
    [["--margin", "sphere"], ["--batch_size", "0"], ["--steps", "-1"], ["--lr_steps", "4,2"], ["--precision", "fp8"],
     ["--sample_rate", "0"], ["--sample_rate", "1.5"], ["--jit_compile", "yes"]],
)
def test_parser_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit):
        _parse(*argv)
    assert "error" in capsys.readouterr().err


def test_cli_registers_all_subcommands():
    parser = cli.build_parser()
    assert parser.parse_args(["train", "--data_path", "d"]).func is train.run
    assert parser.parse_args(["demo", "--quick"]).quick
    assert parser.parse_args(["eval", "m.keras", "--data_path", "d"]).model == "m.keras"


def test_fit_segments_finish_an_interrupted_epoch_first():
    assert training._fit_segments(0, 4, 3) == [(0, 3, 4, 0)]
    assert training._fit_segments(4, 4, 3) == [(1, 3, 4, 0)]
    assert training._fit_segments(6, 4, 3) == [(1, 2, 2, 2), (2, 3, 4, 0)]
    assert training._fit_segments(11, 4, 3) == [(2, 3, 1, 3)]


def test_learning_rate_schedules_follow_the_flags():
    poly = training.learning_rate_schedule(_config("--lr", "0.2", "--warmup_epochs", "1", "--train_epochs", "4"), 10)
    assert isinstance(poly, schedules.WarmupPolynomialDecay)
    assert (poly.total_steps, poly.warmup_steps) == (40, 10)
    assert float(poly(5)) == pytest.approx(0.1) and float(poly(40)) == pytest.approx(0.0)
    step = training.learning_rate_schedule(
        _config("--lr_schedule", "step", "--lr_steps", "2,3", "--train_epochs", "4", "--lr_decay", "0.5"), 10
    )
    assert step.boundaries == [20, 30]
    assert [float(step(s)) for s in (19, 20, 30)] == pytest.approx([0.1, 0.05, 0.025])


def _toy_model(steps_per_execution=1):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "mse", steps_per_execution=steps_per_execution)
    return model


def test_stop_on_nan_names_epoch_batch_and_step(capsys):
    x = np.ones((8, 4), "float32")
    x[6] = np.nan  # batch 3 of epoch 2 (batches of 2, 4 per epoch)
    model = _toy_model()
    step = GlobalStep(4)
    guard = StopOnNaN(steps_per_epoch=4, global_step=step)
    model.fit(x, np.ones((8, 2)), batch_size=2, epochs=2, initial_epoch=1, shuffle=False,
              callbacks=[step, guard], verbose=0)
    assert guard.stopped_at == {"epoch": 2, "batch": 4, "step": 8}
    assert "in epoch 2, batch 4 of 4 (global step 8)" in capsys.readouterr().out


def test_backup_restores_weights_optimizer_and_step(tmp_path):
    model = _toy_model()
    backup = TrainingBackup(tmp_path / "backup", steps_per_epoch=4, epochs=3, save_freq=3)
    model.fit(np.ones((16, 4)), np.ones((16, 2)), batch_size=2, epochs=1, steps_per_epoch=7,
              callbacks=[backup.global_step, backup], verbose=0)
    state = backup.read_state()
    assert (state["step"], state["epoch"], state["batch"]) == (7, 1, 3)  # saved at steps 3, 6 and 7
    files = sorted(os.listdir(tmp_path / "backup"))
    assert "state.json" in files and all(f.startswith("step-000000007") for f in files if f.startswith("step-"))
    assert backup.read_state()["weights"] == str(tmp_path / "backup" / f"step-000000007{compat.WEIGHTS_SUFFIX}")
    saved = [w.numpy() for w in model.weights]

    fresh = _toy_model()
    assert TrainingBackup(tmp_path / "backup", 4, 3, 3).restore(fresh) == 7
    assert int(fresh.optimizer.iterations) == 7
    for restored, expected in zip(fresh.weights, saved):
        np.testing.assert_array_equal(restored.numpy(), expected)
    momentum = [v for v in fresh.optimizer.variables if len(v.shape)]  # the slots, not the step counter
    assert momentum and any(np.any(v.numpy() != 0) for v in momentum)
    with pytest.raises(ValueError, match="different --train_epochs, --batch_size or --steps"):
        TrainingBackup(tmp_path / "backup", 5, 3, 3).restore(_toy_model())


def test_one_global_step_counts_batches_under_steps_per_execution(tmp_path):
    # Calls of 3 batches over epochs of 4: batches end at steps 3, 4 | 7, 8. A count per call
    # would say 4; a backup every 2 steps is due at 3 (2 was crossed) and 7, and at each epoch end.
    model = _toy_model(steps_per_execution=3)
    backup = TrainingBackup(tmp_path / "backup", steps_per_epoch=4, epochs=3, save_freq=2)
    seen = []
    log = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(backup.step))
    throughput = ThroughputLogger(batch_size=2, print_fn=lambda text: None)
    model.fit(np.ones((8, 4)), np.ones((8, 2)), batch_size=2, epochs=2,
              callbacks=[backup.global_step, log, throughput, backup], verbose=0)
    assert seen == [3, 4, 7, 8] and throughput.summary["images"] == 16
    assert backup.read_state()["step"] == 8 and int(model.optimizer.iterations) == 8
    with pytest.raises(ValueError, match="global_step"):
        _toy_model().fit(np.ones((4, 4)), np.ones((4, 2)), batch_size=2, callbacks=[backup], verbose=0)


def test_backup_of_a_non_chief_worker_restores_but_never_writes(tmp_path):
    chief = _toy_model()
    backup = TrainingBackup(tmp_path / "backup", steps_per_epoch=4, epochs=3, save_freq=3)
    chief.fit(np.ones((10, 4)), np.ones((10, 2)), batch_size=2, epochs=1, verbose=0,
              callbacks=[backup.global_step, backup])
    worker = _toy_model()
    other = TrainingBackup(tmp_path / "backup", 4, 3, 3, chief=False)
    assert other.restore(worker) == 5
    for restored, expected in zip(worker.weights, chief.weights):
        np.testing.assert_array_equal(restored.numpy(), expected.numpy())
    before = sorted(os.listdir(tmp_path / "backup"))
    # A chief would back up at steps 6 and 9 and delete the folder at the end (step 12).
    worker.fit(np.ones((14, 4)), np.ones((14, 2)), batch_size=2, epochs=1, callbacks=[other.global_step, other],
               verbose=0)
    assert other.step == other.total_steps == 12
    assert sorted(os.listdir(tmp_path / "backup")) == before and other.read_state()["step"] == 5
    empty = TrainingBackup(tmp_path / "none", 4, 3, 3, chief=False)
    assert empty.restore(_toy_model()) == 0 and not os.path.exists(tmp_path / "none")


def test_waiting_for_the_chief_to_build_times_out_with_advice(synthetic_folder, tmp_path, capsys):
    with pytest.raises(TimeoutError, match=r"train/1\.0\.0: not built by the chief within --data_timeout 0 s"):
        prepare.resolve_data_dir(str(synthetic_folder), str(tmp_path / "tfds"), build=False, timeout=0)
    assert "Waiting for the chief to build" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "tfds" / "ms1m_arcface")


def _summary(text):
    line = [l for l in text.splitlines() if l.startswith("Final summary:")][-1]
    return dict(item.split("=") for item in line.split()[2:])


def test_train_end_to_end_saves_models_logs_and_summary(tfds_data_dir, tmp_path, capsys):
    model_dir = tmp_path / "run"
    status = cli.main(["train", "--data_path", str(tfds_data_dir), "--model_dir", str(model_dir),
                       "--train_epochs", "2", "--steps", "2", "--targets", "lfw,calfw",
                       "--sample_rate", "0.5", "--jit_compile", "false", *TINY])
    out = capsys.readouterr().out
    assert status == 0
    assert "Warning: verification target 'calfw' not found" in out
    assert "[lfw][epoch 2] accuracy" in out
    summary = _summary(out)
    assert summary["steps"] == "4" and summary["epochs"] == "2"
    for key in ("images_per_sec", "train_time_sec", "loss", "accuracy", "verification_accuracy", "lfw"):
        assert np.isfinite(float(summary[key])), key
    assert float(summary["images_per_sec"]) > 0

    with open(model_dir / training.CSV_FILE) as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert "lfw_accuracy" in rows[0] and "images_per_second" in rows[0]
    assert os.listdir(model_dir / "logs")
    assert not os.path.exists(model_dir / "backup")

    model = keras.models.load_model(model_dir / training.MODEL_FILE)
    assert int(model.optimizer.iterations) == 4
    assert model.sample_rate == 0.5 and model.head.sample_rate == 0.5
    embedder = keras.models.load_model(model_dir / training.EMBEDDING_FILE)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    embeddings = embedder.predict(images, verbose=0)
    assert embeddings.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(embeddings, model.predict(images, verbose=0), atol=1e-5)


def test_train_rejects_a_folder_that_is_no_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an insightface folder"):
        prepare.resolve_data_dir(str(tmp_path), str(tmp_path / "tfds"))


def test_performance_script_prints_modelzoo_lines(synthetic_folder, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, ASCEND_DEVICE_ID="0")
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "train_performance_1p.sh"), f"--data_path={synthetic_folder}",
         f"--output_path={tmp_path}", "--batch_size=8", "--steps=3", "--backbone=iresnet18",
         "--embedding_size=16"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    number = r"[0-9]+(\.[0-9]+)?(e[-+]?[0-9]+)?"
    for label in ("Final Performance images/sec", "Final Train Accuracy", "E2E Training Duration sec",
                  "ActualFPS", "TrainingTime", "ActualLoss"):
        assert re.search(rf"^{re.escape(label)} : {number}$", result.stdout, re.M), label
    assert os.path.exists(tmp_path / "train_0.log")
    assert _summary(result.stdout)["steps"] == "3"
    assert os.path.exists(tmp_path / "tfds" / "ms1m_arcface")  # the insightface folder was built
