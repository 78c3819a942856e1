"""Test double of Huawei's `npu_device` (CANN TensorFlow adapter); not the real package.

It mirrors the names and signatures of the real API that faceid_keras uses and records every call,
in order, in `CALLS` as (name, details) pairs, so tests can check what a placement does on an
Ascend NPU without one. Only for tests: put tests/fake_npu_device on sys.path to import it.
Behaviour kept from the real API: `global_options()` returns an options object on which setting an
unknown field raises ValueError; `open(device_id).as_default()`; `distribute.*` and
`train.optimizer.NpuLossScaleOptimizer` (a subclass of Keras 2's LossScaleOptimizer). RANK_SIZE /
RANK_ID are read from the environment like the real adapter, and like it this package exists for
tf.keras (Keras 2) only: under Keras 3 it does not import.
"""
import keras

if int(keras.__version__.split(".")[0]) >= 3:
    raise ImportError("npu_device supports tf.keras (Keras 2) only; this is Keras " + keras.__version__)

from npu_device import distribute, train  # noqa: E402

CALLS: list[tuple[str, dict]] = []

_OPTION_FIELDS = (
    "precision_mode",
    "op_select_implmode",
    "optypelist_for_implmode",
    "graph_run_mode",
    "op_debug_level",
    "variable_memory_max_size",
    "graph_memory_max_size",
    "mix_compile_mode",
    "dump_config",
    "profiling_config",
)


def reset() -> None:
    """Forget the recorded calls and the options set so far."""
    CALLS.clear()
    _OPTIONS.__dict__.update({field: None for field in _OPTION_FIELDS})


def record(name: str, **details) -> None:
    CALLS.append((name, details))


class NpuOptions:
    """Global NPU options; like the real one, only known fields can be set."""

    def __init__(self):
        for field in _OPTION_FIELDS:
            object.__setattr__(self, field, None)

    def __setattr__(self, name, value):
        if name not in _OPTION_FIELDS:
            raise ValueError(f"Unknown NPU option {name!r}")
        record("global_options.set", field=name, value=value)
        object.__setattr__(self, name, value)


_OPTIONS = NpuOptions()


def global_options() -> NpuOptions:
    record("global_options")
    return _OPTIONS


class NpuDevice:
    def __init__(self, device_id):
        self.device_id = device_id

    def as_default(self) -> "NpuDevice":
        record("as_default", device_id=self.device_id)
        return self


def open(device_id=None) -> NpuDevice:  # noqa: A001  (the real API's name)
    record("open", device_id=device_id)
    return NpuDevice(device_id)


__all__ = ["CALLS", "distribute", "global_options", "open", "reset", "train"]
