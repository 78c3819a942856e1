"""Pins every framework private name faceid_keras.compat uses, so an upgrade that moves one fails
here, by name, instead of deep inside a training run."""
import inspect

import keras
import pytest
import tensorflow as tf

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
