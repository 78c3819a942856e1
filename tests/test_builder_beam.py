"""The `ms1m_arcface` train split built as an Apache Beam pipeline: in process, and on 2 worker
processes through `tfds build --beam_pipeline_options` (the FnApiRunner, the engine of Beam's
DirectRunner, named directly so Beam does not try to fetch its Prism runner), example for example
the same dataset as the plain build (same keys, bytes, labels and order); bad records fail with the
same messages."""

import subprocess
import sys

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import hashing

# The TF 2.13 (Ascend) lane installs no Beam: building datasets does not depend on the training stack.
beam = pytest.importorskip("apache_beam", reason="Apache Beam is not installed (the TF 2.13 lane)")
from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # noqa: E402

import tfds_ms1m  # noqa: E402
from tfds_ms1m import insightface_folder, recordio, synthetic  # noqa: E402
from helpers import repo_env  # noqa: E402
from test_builder import _rewrite_train  # noqa: E402



def _in_process_options():
    return beam.options.pipeline_options.PipelineOptions(["--runner=FnApiRunner"])


class _CountingRunner(FnApiRunner):
    """The in-process FnApiRunner, counting the pipelines it runs."""

    runs = 0

    def run_pipeline(self, pipeline, options):
        type(self).runs += 1
        return super().run_pipeline(pipeline, options)


def _build(folder, data_dir, beam_options=None, beam_runner=None):
    builder = tfds.builder("ms1m_arcface", data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(folder), beam_options=beam_options, beam_runner=beam_runner
        )
    )
    return builder


def _stored_train(data_dir):
    """(image bytes, label) of the built train split in stored order, and its shard lengths."""
    ds = tfds.load(
        "ms1m_arcface", split="train", data_dir=str(data_dir), shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    examples = [(ex["image"], int(ex["label"])) for ex in ds.as_numpy_iterator()]
    info = tfds.builder("ms1m_arcface", data_dir=str(data_dir)).info
    return examples, list(info.splits["train"].shard_lengths)


def _source_in_key_hash_order(folder):
    """The folder's images in the order tfds stores examples keyed by their record key."""
    hasher = hashing.Hasher("train")
    records = sorted(insightface_folder.iter_images(folder), key=lambda r: hasher.hash_key(r[0]))
    return [(jpeg, label) for _, label, jpeg in records]


def test_in_process_beam_build_matches_plain_build(synthetic_folder, tfds_data_dir, tmp_path):
    expected = _source_in_key_hash_order(synthetic_folder)
    plain, plain_shards = _stored_train(tfds_data_dir)
    assert plain == expected
    # A runner without options is enough to select the Beam build.
    _CountingRunner.runs = 0
    builder = _build(synthetic_folder, tmp_path / "beam", beam_runner=_CountingRunner())
    assert _CountingRunner.runs == 1
    assert builder.info.features["label"].num_classes == 8
    assert _stored_train(tmp_path / "beam") == (plain, plain_shards)


def test_beam_build_two_processes_command_line(synthetic_folder, tfds_data_dir, tmp_path):
    out = tmp_path / "beam2"
    result = subprocess.run(
        [sys.executable, "-m", "tensorflow_datasets.scripts.cli.main", "build", "ms1m_arcface/train",
         "--imports", "tfds_ms1m", "--manual_dir", str(synthetic_folder), "--data_dir", str(out),
         "--beam_pipeline_options",
         "runner=FnApiRunner,direct_num_workers=2,direct_running_mode=multi_processing"],
        capture_output=True, text=True, env=repo_env(), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The multi-process pipeline really ran (the plain build starts no Beam workers).
    assert "sdk_worker" in result.stderr
    assert _stored_train(out) == _stored_train(tfds_data_dir)
    assert _stored_train(out)[0] == _source_in_key_hash_order(synthetic_folder)
    assert tfds.builder("ms1m_arcface", data_dir=str(out)).info.features["label"].num_classes == 8


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda key, p: p[:-20] if key == 7 else p, r"train\.rec: record key 7: corrupt JPEG"),
        (lambda key, p: recordio.pack_record(9.0, p[24:]) if key == 3 else p,
         r"train\.rec: record key 3: label 9 outside \[0, 4\) given by .*bad/property"),
    ],
    ids=["corrupt_jpeg", "label_outside_property"],
)
def test_beam_build_reports_bad_records_like_plain_build(tmp_path, mutate, pattern):
    folder = synthetic.write_dataset(tmp_path / "bad", 4, 3, image_size=8, pairs_per_target=20,
                                     targets=("lfw",))
    _rewrite_train(folder, mutate)
    for name, options in (("plain", None), ("beam", _in_process_options())):
        data_dir = tmp_path / name
        with pytest.raises(Exception, match=pattern):
            _build(folder, data_dir, options)
        assert not tfds.builder("ms1m_arcface", data_dir=str(data_dir)).is_prepared()
