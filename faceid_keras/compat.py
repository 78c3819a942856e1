"""The places where the two supported stacks differ: TF 2.16+ with Keras 3, and TF 2.13 with
Keras 2.13 (tf.keras), the stack Huawei's `npu_device` runs on. Everything else is written once,
in TensorFlow ops and the Keras API both stacks share.

Loss scaling is the main difference. Keras 3's `LossScaleOptimizer` scales with `scale_loss`,
unscales and skips non-finite steps in `apply`, keeps the scale in `dynamic_scale`, and does not
advance `iterations` on a skipped step. Keras 2's scales with `get_scaled_loss`, unscales with
`get_unscaled_gradients`, skips in `apply_gradients`, keeps the scale in `loss_scale`, and does
advance `iterations` on a skipped step.
"""
from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

KERAS_3: bool = int(keras.__version__.split(".")[0]) >= 3

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"faceid_keras runs on Keras's TensorFlow backend; this process uses {keras.backend.backend()!r} "
        "(from KERAS_BACKEND or ~/.keras/keras.json). Set KERAS_BACKEND=tensorflow."
    )

# `add_weight` keyword that keeps a variable float32 when read under a mixed precision policy.
NO_AUTOCAST: dict[str, bool] = {"autocast": False} if KERAS_3 else {"experimental_autocast": False}

# `add_weight` aggregation of model state every replica assigns the same value in replica context.
ONLY_FIRST_REPLICA = "only_first_replica" if KERAS_3 else tf.VariableAggregation.ONLY_FIRST_REPLICA


def to_numpy(value) -> np.ndarray:
    """A tensor or variable of either stack as a NumPy array (reads the variable's value)."""
    if KERAS_3:
        return keras.ops.convert_to_numpy(value)
    return np.asarray(tf.convert_to_tensor(value))


def dtype_policy_name(dtype) -> str:
    """The name of the dtype policy `dtype` (a name, a policy, or a serialized policy) stands for."""
    if KERAS_3:
        return keras.dtype_policies.get(dtype).name
    if isinstance(dtype, keras.mixed_precision.Policy):
        return dtype.name
    if isinstance(dtype, dict):  # a serialized Policy
        dtype = dtype["config"]["name"]
    return keras.mixed_precision.Policy(tf.as_dtype(dtype).name if isinstance(dtype, tf.DType) else dtype).name


def variable_tensor(variable):
    """The `tf.Variable` behind a Keras variable: gathering rows from it gives sparse gradients."""
    return variable.value if KERAS_3 else variable


def build_optimizer(optimizer, variables) -> None:
    """Creates the optimizer's state for `variables` (e.g. before loading a backup into it), once."""
    if not KERAS_3 or not optimizer.built:  # Keras 2 optimizers build only once by themselves
        optimizer.build(variables)


WEIGHTS_SUFFIX: str = ".weights.h5" if KERAS_3 else ".ckpt"
"""Suffix of `save_weights` files that hold the model and its optimizer state. Keras 2.13 loads
`.weights.h5` files wrongly into tf.distribute's sync-on-read variables (it divides the h5 dataset
object itself), so on Keras 2 they are TensorFlow checkpoints (`<path>.index` + data files)."""


def weights_exist(path: str) -> bool:
    """Whether `save_weights(path)` with a `WEIGHTS_SUFFIX` path has written its files."""
    return os.path.exists(path if KERAS_3 else path + ".index")


def is_loss_scale_optimizer(optimizer) -> bool:
    """Whether `optimizer` is a dynamic loss-scale optimizer of this stack (NPU's included)."""
    return isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer)


def scale_loss(optimizer, loss):
    """The loss to differentiate: multiplied by the loss scale when `optimizer` scales losses."""
    if KERAS_3:
        return optimizer.scale_loss(loss)
    if is_loss_scale_optimizer(optimizer):
        return optimizer.get_scaled_loss(loss)
    return loss


def apply_gradients(optimizer, gradients, variables) -> None:
    """Applies gradients of a `scale_loss`-scaled loss: unscaled, and skipped when not finite."""
    if KERAS_3:
        optimizer.apply(gradients, variables)
        return
    if is_loss_scale_optimizer(optimizer):
        gradients = optimizer.get_unscaled_gradients(gradients)
    optimizer.apply_gradients(zip(gradients, variables))


def loss_scale(optimizer) -> float:
    """The current loss scale of a loss-scale optimizer of this stack (NPU's included)."""
    if not KERAS_3:
        return float(to_numpy(optimizer.loss_scale))
    return float(to_numpy(optimizer.dynamic_scale)) if optimizer.built else float(optimizer.initial_scale)


SKIPPED_STEPS_ADVANCE_ITERATIONS: bool = not KERAS_3
"""Keras 2 loss-scale optimizers count a skipped (non-finite) step in `iterations`; Keras 3's do not."""


def per_replica_logs(logs: dict) -> dict:
    """Train/test step logs shaped for the multi-worker reduction of this stack's `fit`.

    Keras 3 (3.15) reduces each log over workers with strategy.reduce("MEAN", axis=0), which needs
    an axis (tensorflow/tensorflow#72388), so each value gets one; Keras 2 takes the first replica.
    """
    strategy = tf.distribute.get_strategy()
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    if KERAS_3 and multi_worker and strategy.extended._in_multi_worker_mode():
        return {name: tf.reshape(value, (1,)) for name, value in logs.items()}
    return logs


def export_onnx(model, path: str, input_name: str, opset: int) -> None:
    """Writes `model` (one float32 input, dynamic batch) as ONNX through tf2onnx.

    Keras 3 has `Model.export(format="onnx")`, which adapts tf2onnx to NumPy 2; Keras 2.13 has no
    ONNX export, so there tf2onnx converts a tf.function of the model directly.
    """
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name=input_name)
    if KERAS_3:
        model.export(path, format="onnx", input_signature=[spec], opset_version=opset, verbose=False)
        return
    import tf2onnx

    function = tf.function(lambda images: model(images, training=False), input_signature=[spec])
    tf2onnx.convert.from_function(function, input_signature=[spec], opset=opset, output_path=path)


class BuiltInInitModel(keras.Model):
    """A keras.Model whose variables and metrics are all built in `__init__`: `fit`/`evaluate` then
    build only the optimizer before the first step (Keras 3's private `_maybe_symbolic_build`).

    Keras 3.15's own version reduces the first (images, labels) batch across replicas to trace the
    model, which fails under MultiWorkerMirroredStrategy (a nested batch cannot be all-reduced).
    Keras 2 never calls this method. tests/test_compat.py pins the private names used here.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        compiled_extras = self._compile_loss is not None or self._compile_metrics is not None
        if self._distribute_strategy is None or compiled_extras:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        with self.distribute_strategy.scope():
            self._symbolic_build()


def uses_weight_decay(optimizer, variable) -> bool:
    """Whether `optimizer` decays `variable` (Keras 3's private `_use_weight_decay`, which applies
    `exclude_from_weight_decay`)."""
    return optimizer._use_weight_decay(variable)
