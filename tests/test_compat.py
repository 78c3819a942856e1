"""Pins every framework private name faceid_keras.compat and tfds_ms1m.compat use, so an upgrade
that moves one fails here, by name, instead of deep inside a training run or a dataset build."""
import dataclasses
import inspect

import keras
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import tfds_ms1m
from faceid_keras import compat

needs_keras3 = pytest.mark.skipif(not compat.KERAS_3, reason="Keras 3 private API")


@needs_keras3
def test_symbolic_build_hook_and_the_attributes_it_reads():
    parameters = inspect.signature(keras.Model._maybe_symbolic_build).parameters
    assert list(parameters) == ["self", "iterator", "data_batch"]
    assert callable(keras.Model._symbolic_build)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd")
    assert model._compile_loss is None and model._compile_metrics is None
    assert model._distribute_strategy is None
    model.compile(optimizer="sgd", loss="mse")
    assert model._compile_loss is not None


@needs_keras3
def test_uses_weight_decay_follows_exclusions():
    kept, excluded = keras.Variable([1.0], name="kept"), keras.Variable([1.0], name="bias")
    optimizer = keras.optimizers.SGD(0.1, weight_decay=1e-4)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    assert compat.uses_weight_decay(optimizer, kept) is True
    assert compat.uses_weight_decay(optimizer, excluded) is False


def test_multi_worker_mode_is_known_to_strategies():
    assert tf.distribute.get_strategy().extended._in_multi_worker_mode() is False
    assert compat.per_replica_logs({"loss": tf.constant(1.0)})["loss"].shape == ()


def test_tfds_build_hook_and_the_beam_fields_it_reads():
    parameters = inspect.signature(tfds.core.GeneratorBasedBuilder._download_and_prepare).parameters
    assert list(parameters) == ["self", "dl_manager", "download_config"]
    fields = {field.name for field in dataclasses.fields(tfds.download.DownloadConfig)}
    assert {"beam_options", "beam_runner"} <= fields


@pytest.mark.parametrize("beam_runner, beam_build", [(None, False), (object(), True)])
def test_download_and_prepare_runs_the_hook_with_the_build_config(monkeypatch, tmp_path, beam_runner, beam_build):
    seen = []
    monkeypatch.setattr(tfds.core.GeneratorBasedBuilder, "_download_and_prepare",
                        lambda self, dl_manager, download_config: seen.append(self.beam_build))
    builder = tfds_ms1m.Builder(data_dir=str(tmp_path))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path),
                                                                              beam_runner=beam_runner))
    assert seen == [beam_build] and builder.beam_build is False
