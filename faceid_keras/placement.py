"""Where training runs: one object that picks the devices, the precision and the loss scaling.

`Placement.create(device="auto", precision=None)` chooses, in order: an Ascend NPU when the
CANN adapter `npu_device` imports; tf.distribute over the visible GPUs (MultiWorkerMirroredStrategy
when TF_CONFIG names several workers, MirroredStrategy for several GPUs, OneDeviceStrategy for
one); else the CPU. Usage, the same on every device:

    placement = Placement.create(precision="mixed_float16")   # before building the model
    with placement.scope():
        model = ArcFaceModel(...)
        model.compile(optimizer=placement.wrap_optimizer(keras.optimizers.SGD(0.1)))
    dataset = faceid_keras.data.train_dataset(data_dir, global_batch, placement=placement)
    model.fit(dataset, callbacks=callbacks.for_placement(placement))

Datasets: `distribute_dataset` gives each process its own share of the records and its part of
the global batch: each NPU rank (one process per device, no strategy; the optimizer all-reduces
gradients) and each MultiWorkerMirroredStrategy worker, so a worker reads and decodes only its
share. Within one process, Keras `fit` splits each batch across the local replicas.

Several processes (MultiWorkerMirroredStrategy from TF_CONFIG, or NPU ranks): every process runs
the same `fit`, and only the chief (`is_chief`: the TF_CONFIG task of type "chief", or worker 0
when the cluster has no chief; NPU rank 0) may write shared files. Keras 3 callbacks do not know
about workers (ModelCheckpoint, BackupAndRestore, CSVLogger and TensorBoard write from every
process to the same path), so give the pure writers (CSVLogger, TensorBoard) to the chief only.
On Keras 3, saving an ArcFaceModel (`save`, `save_weights`) reads only mirrored variables, with
no collective op, unless its centres are sharded (`shard_centres=True`: saving all-gathers the
shards); on Keras 2, BatchNormalization's statistics are sync-on-read variables, whose reading is
a collective op every worker must join. So a callback that every worker must keep (a
checkpoint callback) or a save writes into `output_dir(path)` on every worker: the path itself on
the chief, a private temporary folder, deleted afterwards, elsewhere.

Two implementations share this interface: `StrategyPlacement` (tf.distribute: CPU, GPUs, workers)
and `AscendPlacement` (one process per NPU, no strategy). The callbacks a placement needs in `fit`
(weight broadcast, loss-scale logging) come from `callbacks.for_placement(placement)`.

Precision: "fp32", "mixed_float16" or "mixed_bfloat16". On tf.distribute devices it is the Keras
dtype policy (float32 / mixed_float16 / mixed_bfloat16) inside `scope()`, so build and compile the
model there; outside it the process's global policy is left as it was. float16 gets dynamic loss scaling: `wrap_optimizer` wraps the optimizer in Keras's
`LossScaleOptimizer` (Keras 3 or Keras 2, see `faceid_keras.compat`), and `compile` keeps an
optimizer that is already one (it only wraps plain optimizers under mixed_float16), so the object
returned is the one the model uses.
On NPU the Keras policy stays float32 and the NPU graph compiler does the mixing, by
`precision_mode` (see `NPU_PRECISION_MODES`); float16 there is loss-scaled by
`npu_device.train.optimizer.NpuLossScaleOptimizer`.
"""
from __future__ import annotations

import abc
import contextlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import keras
import tensorflow as tf

from faceid_keras import compat

DEVICES = ("auto", "npu", "gpu", "cpu")
PRECISIONS = ("fp32", "mixed_float16", "mixed_bfloat16")
KERAS_POLICIES = {"fp32": "float32", "mixed_float16": "mixed_float16", "mixed_bfloat16": "mixed_bfloat16"}
# NPU graph precision per flag. force_fp32 keeps float32 wherever the operator supports it;
# allow_mix_precision lowers the operators on CANN's float16 list and needs loss scaling;
# allow_mix_precision_bf16 does the same in bfloat16 (Atlas A2 and later), no loss scaling.
NPU_PRECISION_MODES = {
    "fp32": "force_fp32",
    "mixed_float16": "allow_mix_precision",
    "mixed_bfloat16": "allow_mix_precision_bf16",
}
NPU_DEFAULT_PRECISION = "mixed_float16"


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"Environment variable {name}={raw!r} is not an integer.") from None
    if value < minimum:
        raise ValueError(f"Environment variable {name}={value} must be >= {minimum}.")
    return value


def _tf_config_workers() -> int:
    """Training processes TF_CONFIG names: its chief plus its workers (0 without TF_CONFIG)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"Environment variable TF_CONFIG is not valid JSON: {error}.") from None
    cluster = config.get("cluster", {})
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def _import_npu_device():
    try:
        return importlib.import_module("npu_device")
    except ImportError:
        return None


class Placement(abc.ABC):
    """A distribution-like context: devices (a strategy or an NPU process), dtype policy and loss
    scaling. Build one with `Placement.create`; the subclasses say how each kind of device works."""

    device: str

    def __init__(self, precision: str, dtype_policy: dict[str, str]):
        """`dtype_policy` maps each precision to the Keras policy this kind of device uses."""
        if precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}.")
        self.precision = precision
        self.dtype_policy = keras.mixed_precision.Policy(dtype_policy[precision])
        self._wrapped: list = []

    @classmethod
    def create(
        cls,
        device: str = "auto",
        precision: str | None = None,
        devices: Sequence[str] | None = None,
    ) -> "Placement":
        """Pick the placement by name or automatically ("auto": NPU, else GPUs, else CPU).

        `precision` None is the device's default: "mixed_float16" on the NPU (precision_mode
        allow_mix_precision, as Ascend's ModelZoo scripts train), "fp32" elsewhere.
        `devices` names tf.distribute devices explicitly (e.g. ["/cpu:0", "/cpu:1"] for logical
        CPUs); several make a MirroredStrategy over them. It does not apply to the NPU.
        """
        if device not in DEVICES:
            raise ValueError(f"`device` must be one of {DEVICES}, got {device!r}.")
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}.")
        if device in ("auto", "npu"):
            npu = _import_npu_device()
            if npu is not None:
                if devices:
                    raise ValueError("`devices` does not apply to the NPU: use ASCEND_DEVICE_ID.")
                return AscendPlacement(npu, precision or NPU_DEFAULT_PRECISION)
            if device == "npu":
                raise RuntimeError(
                    "device='npu' but `npu_device` does not import: install the CANN TensorFlow "
                    "adapter (TF 2.13 / tf.keras) and source the CANN environment."
                )
        # Physical devices: listing them leaves the runtime uninitialised, which
        # MultiWorkerMirroredStrategy needs (it configures collective ops at startup).
        gpus = tf.config.list_physical_devices("GPU")
        if device == "gpu" and not gpus and not devices:
            raise RuntimeError("device='gpu' but TensorFlow sees no GPU.")
        kind = "gpu" if device == "gpu" or (device == "auto" and gpus) else "cpu"
        return StrategyPlacement(kind, precision or "fp32", strategy=_make_strategy(kind, devices))

    @property
    @abc.abstractmethod
    def num_replicas_in_sync(self) -> int:
        """Replicas that share one global batch."""

    @property
    @abc.abstractmethod
    def task(self) -> tuple[str, int]:
        """(task type, index) of this process."""

    @property
    @abc.abstractmethod
    def worker_count(self) -> int:
        """Processes that train together."""

    @property
    @abc.abstractmethod
    def worker_index(self) -> int:
        """This process's position among `worker_count`: the chief first, then the workers."""

    @property
    @abc.abstractmethod
    def device_names(self) -> tuple[str, ...]:
        """The devices this process trains on, for logs."""

    @property
    def broadcasts_initial_weights(self) -> bool:
        """Whether `fit` must start by copying the chief's weights to every process."""
        return False

    @property
    def is_chief(self) -> bool:
        """Whether this process writes checkpoints and logs. A single process is always the chief."""
        return self.task == ("worker", 0)

    @contextlib.contextmanager
    def output_dir(self, path: str | os.PathLike) -> Iterator[str]:
        """Folder for a write every process must run in step: `path` (created) on the chief, a
        fresh private temporary folder elsewhere, removed with its contents when the block ends.

            with placement.output_dir(model_dir) as folder:
                model.save(os.path.join(folder, "model.keras"))
        """
        if self.is_chief:
            os.makedirs(path, exist_ok=True)
            yield os.fspath(path)
            return
        task_type, task_id = self.task
        folder = tempfile.mkdtemp(prefix=f"faceid-{task_type}{task_id}-")
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @property
    def loss_scaling(self) -> bool:
        """Whether training uses dynamic loss scaling (float16 mixed precision)."""
        return self.precision == "mixed_float16"

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Context to build and compile the model in: the devices' scope with this placement's
        dtype policy, which is put back as it was when the block ends."""
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.dtype_policy)
        try:
            with self._device_scope():
                yield
        finally:
            keras.mixed_precision.set_global_policy(previous)

    @abc.abstractmethod
    def _device_scope(self) -> contextlib.AbstractContextManager:
        """The context that places variables and computation on this placement's devices."""

    def distribute_dataset(
        self, dataset: tf.data.Dataset, global_batch_size: int
    ) -> tuple[tf.data.Dataset, int]:
        """Shard an unbatched record stream for this process; returns it and the batch to use.

        Each of several processes keeps its own share of the records and global_batch_size /
        processes (give the result to `fit` with auto-sharding off, as
        `faceid_keras.data.train_dataset` does: Keras splits each process's batch across its local
        replicas). One process: unchanged, with the global batch size.
        """
        if global_batch_size % self.num_replicas_in_sync:
            raise ValueError(
                f"Global batch size {global_batch_size} is not divisible by the "
                f"{self.num_replicas_in_sync} replicas of this placement."
            )
        if self.worker_count > 1:
            return self._shard(dataset, global_batch_size)
        return dataset, global_batch_size

    def _shard(self, dataset: tf.data.Dataset, global_batch_size: int) -> tuple[tf.data.Dataset, int]:
        """This process's share of the records (every worker_count-th) and its part of the batch."""
        return dataset.shard(self.worker_count, self.worker_index), global_batch_size // self.worker_count

    def wrap_optimizer(self, optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
        """The optimizer to compile with: loss-scaled for float16, all-reducing across processes
        where the device needs it. Idempotent: an optimizer this placement returned comes back
        unchanged, so nothing is wrapped twice."""
        if any(optimizer is done for done in self._wrapped):
            return optimizer
        optimizer = self._wrap(optimizer)
        self._wrapped.append(optimizer)
        return optimizer

    @abc.abstractmethod
    def _wrap(self, optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
        """This device's optimizer wrapping."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(device={self.device!r}, precision={self.precision!r}, "
            f"replicas={self.num_replicas_in_sync}, policy={self.dtype_policy.name!r})"
        )


def _make_strategy(kind: str, devices: Sequence[str] | None) -> tf.distribute.Strategy:
    """The tf.distribute strategy for `kind` ("cpu"/"gpu"), explicit `devices`, or TF_CONFIG."""
    if _tf_config_workers() > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if devices:
        devices = list(devices)
        if len(devices) > 1:
            return tf.distribute.MirroredStrategy(devices)
        return tf.distribute.OneDeviceStrategy(devices[0])
    if kind == "gpu":
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy([gpu.name for gpu in gpus])
        return tf.distribute.OneDeviceStrategy(gpus[0].name)
    return tf.distribute.get_strategy()


class StrategyPlacement(Placement):
    """CPU, GPUs or a TF_CONFIG cluster through a tf.distribute strategy (the default one if none)."""

    def __init__(self, device: str, precision: str = "fp32", strategy: tf.distribute.Strategy | None = None):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"`device` must be 'cpu' or 'gpu', got {device!r}.")
        super().__init__(precision, KERAS_POLICIES)
        self.device = device
        self.strategy = strategy or tf.distribute.get_strategy()

    @property
    def num_replicas_in_sync(self) -> int:
        return self.strategy.num_replicas_in_sync

    def _cluster_resolver(self):
        """The strategy's cluster resolver when it spans a TF_CONFIG cluster, else None."""
        resolver = getattr(self.strategy, "cluster_resolver", None)
        if resolver is None or not resolver.cluster_spec().jobs:
            return None
        return resolver

    @property
    def task(self) -> tuple[str, int]:
        """From TF_CONFIG under MultiWorkerMirroredStrategy, else ("worker", 0)."""
        resolver = self._cluster_resolver()
        if resolver is None:
            return "worker", 0
        return resolver.task_type or "worker", int(resolver.task_id or 0)

    @property
    def is_chief(self) -> bool:
        """Task "chief", or worker 0 when the cluster has no chief."""
        task_type, task_id = self.task
        if task_type == "chief":
            return True
        if task_type != "worker" or task_id != 0:
            return False
        resolver = self._cluster_resolver()
        return resolver is None or "chief" not in resolver.cluster_spec().jobs

    @property
    def worker_count(self) -> int:
        """The chief and workers of TF_CONFIG (1 without a cluster)."""
        resolver = self._cluster_resolver()
        if resolver is None:
            return 1
        jobs = resolver.cluster_spec().as_dict()
        return len(jobs.get("chief", [])) + len(jobs.get("worker", []))

    @property
    def worker_index(self) -> int:
        task_type, task_id = self.task
        if task_type == "chief":
            return task_id
        resolver = self._cluster_resolver()
        has_chief = resolver is not None and "chief" in resolver.cluster_spec().jobs
        return task_id + (1 if has_chief else 0)

    def _device_scope(self) -> contextlib.AbstractContextManager:
        return self.strategy.scope()

    def _wrap(self, optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
        """Keras's LossScaleOptimizer for float16 (an optimizer that already is one stays)."""
        if self.loss_scaling and not compat.is_loss_scale_optimizer(optimizer):
            return keras.mixed_precision.LossScaleOptimizer(optimizer)
        return optimizer

    @property
    def device_names(self) -> tuple[str, ...]:
        try:
            return tuple(self.strategy.extended.worker_devices)
        except RuntimeError:  # the default strategy: TensorFlow's own placement on this host
            return (f"/{self.device}:0",)


class AscendPlacement(Placement):
    """One Ascend NPU per process through `npu_device` (CANN's TF adapter); RANK_SIZE processes
    train together, RANK_ID is this one. The Keras policy stays float32: the NPU graph compiler
    mixes precision by `precision_mode` (see `NPU_PRECISION_MODES`)."""

    device = "npu"

    def __init__(self, npu, precision: str = NPU_DEFAULT_PRECISION):
        super().__init__(precision, dict.fromkeys(PRECISIONS, "float32"))
        self._npu = npu
        self.device_id = _env_int("ASCEND_DEVICE_ID", 0, 0)
        self.rank_size = _env_int("RANK_SIZE", 1, 1)
        self.rank_id = _env_int("RANK_ID", 0, 0)
        if self.rank_id >= self.rank_size:
            raise ValueError(f"RANK_ID={self.rank_id} must be below RANK_SIZE={self.rank_size}.")
        options = npu.global_options()
        options.precision_mode = NPU_PRECISION_MODES[precision]
        npu.open(self.device_id).as_default()

    @property
    def num_replicas_in_sync(self) -> int:
        """One replica per NPU process: RANK_SIZE."""
        return self.rank_size

    @property
    def task(self) -> tuple[str, int]:
        return "worker", self.rank_id

    @property
    def worker_count(self) -> int:
        return self.rank_size

    @property
    def worker_index(self) -> int:
        return self.rank_id

    @property
    def broadcasts_initial_weights(self) -> bool:
        """Each rank initialises its own model, so several ranks start from rank 0's weights."""
        return self.rank_size > 1

    def _device_scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # `npu_device.open().as_default()` already placed everything

    def _shard(self, dataset: tf.data.Dataset, global_batch_size: int) -> tuple[tf.data.Dataset, int]:
        """`npu_device.distribute.shard_and_rebatch_dataset`: this rank's share and its batch."""
        return self._npu.distribute.shard_and_rebatch_dataset(dataset, global_batch_size)

    def _wrap(self, optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
        """NpuLossScaleOptimizer for float16; the NPU gradient all-reduce for several ranks."""
        npu_lso = self._npu.train.optimizer.NpuLossScaleOptimizer
        if self.loss_scaling and not isinstance(optimizer, npu_lso):
            optimizer = npu_lso(optimizer, dynamic=True)
        if self.rank_size > 1:
            optimizer = self._npu.distribute.npu_distributed_keras_optimizer_wrapper(optimizer)
        return optimizer

    @property
    def device_names(self) -> tuple[str, ...]:
        return (f"npu:{self.device_id}",)
