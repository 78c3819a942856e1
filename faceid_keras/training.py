"""Training runs: `TrainConfig` says what to train, `train(config)` trains (or resumes) it with
plain `compile` + `fit` and saves the models. `faceid train`'s flags only build a `TrainConfig`.

    from faceid_keras.training import TrainConfig, train
    result = train(TrainConfig(data_path="~/tensorflow_datasets", train_epochs=5, batch_size=16))

`data_path` is a tfds data dir holding a built `ms1m_arcface`, or an insightface folder (one with
`train.rec`), which is first built with tfds into `tfds_data_dir` (default `<model_dir>/tfds`;
reused once built). Each epoch trains on a fresh shuffle seeded by `seed` and the epoch number, so
a run killed at any point and started again with the same config resumes from its last backup
(`<model_dir>/backup`, every `backup_steps` steps and at each epoch end) at the exact batch, and
ends with the same number of steps as a run that was never interrupted. The run writes
`model.keras` (training model), `embedding.keras` (images -> embeddings, for deployment),
`training_log.csv` and TensorBoard logs (`logs/`) into `model_dir`, and prints a final
`Final summary:` line of key=value pairs that scripts parse.

Several workers (TF_CONFIG set, MultiWorkerMirroredStrategy) run the same config with the same
`model_dir` and data paths on a shared filesystem. Only the chief builds an insightface
`data_path` (the others wait for it) and writes into `model_dir`; every worker reads and decodes
its own share of the records, for its part of each global batch, and a rerun resumes every worker
from the chief's backup at the same step.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import sys
import time
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from callbacks import StopOnNaN, ThroughputLogger, VerificationCallback, for_placement
from faceid_keras import data, finetune, packs, prepare, schedules
from faceid_keras.backup import TrainingBackup
from faceid_keras.model import ArcFaceModel
from faceid_keras.placement import Placement, StrategyPlacement

MODEL_FILE = "model.keras"
EMBEDDING_FILE = "embedding.keras"
CSV_FILE = "training_log.csv"
JIT_COMPILE = {"auto": "auto", "true": True, "false": False}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; the defaults are insightface's ArcFace recipe.

    Data: `data_path` (tfds data dir or insightface folder), `tfds_data_dir`, `data_timeout`
    (seconds other workers wait for the chief's build), `image_size` (None: the data's),
    `shuffle_buffer`. Model: `backbone`, `embedding_size`, `norm`, `dropout`, `margin`, `scale`,
    `subcenters` (sub-center ArcFace), `interclass_filtering` (a cosine threshold, 0: off),
    `sample_rate` (Partial FC), `shard_centres`. Fine-tuning: `init_from` (a saved .keras whose
    backbone starts the run; centres start at each identity's mean embedding), `freeze_bn`,
    `freeze_backbone_epochs`. Optimisation: `train_epochs`, `batch_size` (per replica), `steps` (cap
    per epoch, 0 for full epochs), SGD `lr`/`momentum`/`weight_decay`, `lr_schedule` ("poly" or
    "step"), `warmup_epochs`, `lr_steps` (epochs), `lr_decay`. Run: `model_dir`, `device`,
    `precision` (None: the device's default), `targets` (verified after each epoch), `backup_steps`,
    `seed`, `jit_compile` ("auto", "true", "false"), `verbose` (None: 1 on a terminal, else 2).
    """

    data_path: str
    tfds_data_dir: str | None = None
    data_timeout: float = 6 * 3600.0
    image_size: int | None = None
    shuffle_buffer: int = data.DEFAULT_SHUFFLE_BUFFER
    backbone: str = "iresnet50"
    embedding_size: int = 512
    norm: str = "batch"
    dropout: float = 0.0
    margin: str | tuple[float, float, float] = "arcface"
    scale: float = 64.0
    subcenters: int = 1
    interclass_filtering: float = 0.0
    sample_rate: float = 1.0
    shard_centres: bool = False
    init_from: str | None = None
    freeze_bn: bool = False
    freeze_backbone_epochs: int = 0
    train_epochs: int = 20
    batch_size: int = 128
    steps: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "poly"
    warmup_epochs: float = 0.0
    lr_steps: tuple[float, ...] = (10.0, 16.0)
    lr_decay: float = 0.1
    model_dir: str = os.path.join("runs", "faceid")
    device: str = "auto"
    precision: str | None = None
    targets: tuple[str, ...] = packs.DEFAULT_TARGETS
    backup_steps: int = 1000
    seed: int = 0
    jit_compile: str = "auto"
    verbose: int | None = None

    def __post_init__(self):
        if self.lr_schedule not in ("poly", "step"):
            raise ValueError(f"lr_schedule must be 'poly' or 'step', got {self.lr_schedule!r}.")
        if self.jit_compile not in JIT_COMPILE:
            raise ValueError(f"jit_compile must be one of {tuple(JIT_COMPILE)}, got {self.jit_compile!r}.")
        if min(self.train_epochs, self.batch_size, self.backup_steps) < 1:
            raise ValueError("train_epochs, batch_size and backup_steps must be at least 1.")


def load_verification_targets(
    sources: Sequence[str], names: Sequence[str], image_size: tuple[int, int]
) -> dict:
    """Loads the named targets from the first source that has them; warns about and skips the rest."""
    targets = {}
    missing = list(names)
    for source in sources:
        if not missing or not os.path.isdir(source):
            continue
        found = set(packs.available_targets(source))
        present = [name for name in missing if name in found]
        if present:
            targets.update(packs.load_targets(source, present, image_size))
            missing = [name for name in missing if name not in found]
    for name in missing:
        print(f"Warning: verification target {name!r} not found in {' or '.join(sources)}; skipping it.")
    return targets


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**31 - 1)


def epoch_stream(
    dataset_kwargs: dict, seed: int, first_epoch: int, last_epoch: int, steps_per_epoch: int, skip: int = 0
):
    """Batches of epochs [first_epoch, last_epoch): `steps_per_epoch` of each, the first `skip` left out.

    Every epoch is its own pass over the data (`faceid_keras.data.train_dataset(**dataset_kwargs)`),
    shuffled by a seed made of `seed` and the epoch number, so the batches of an epoch do not depend
    on where a run started. Skipped batches are read (to fill the shuffle) but not decoded.

    Several workers (MultiWorkerMirroredStrategy, NPU ranks) each read their own share of the
    records (`Placement.distribute_dataset`), so each decodes only the images it trains on; every
    worker's share holds at least `steps_per_epoch` batches of its part of the global batch.
    """
    parts = []
    for epoch in range(first_epoch, last_epoch):
        skipped = skip if epoch == first_epoch else 0
        dataset = data.train_dataset(seed=_epoch_seed(seed, epoch), skip_batches=skipped, **dataset_kwargs)
        parts.append(dataset.take(steps_per_epoch - skipped))
    return functools.reduce(lambda a, b: a.concatenate(b), parts)


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int):
    """Warmup then polynomial or step decay over the run's steps, per the --lr* flags."""
    total = config.train_epochs * steps_per_epoch
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total - 1)
    if config.lr_schedule == "poly":
        return schedules.WarmupPolynomialDecay(config.lr, total_steps=total, warmup_steps=warmup)
    boundaries = [round(e * steps_per_epoch) for e in config.lr_steps]
    boundaries = sorted(set(b for b in boundaries if warmup <= b < total))
    return schedules.WarmupStepDecay(config.lr, boundaries, warmup_steps=warmup, factor=config.lr_decay)


@dataclasses.dataclass
class TrainResult:
    """What a training run produced: the model, the per-epoch logs and the final summary."""

    model: keras.Model
    history: dict[str, list]
    summary: dict[str, float]
    model_path: str | None
    embedding_path: str | None
    stopped_at: dict | None


def _fit_segments(step: int, steps_per_epoch: int, epochs: int) -> list[tuple[int, int, int, int]]:
    """(first epoch, end epoch, steps per epoch, batches to skip) of the `fit` calls that finish a run.

    A run resumed inside an epoch first finishes that epoch with a `fit` of its remaining steps,
    then trains the other epochs with a second `fit`.
    """
    epoch, done = divmod(step, steps_per_epoch)
    segments = []
    if done:
        segments.append((epoch, epoch + 1, steps_per_epoch - done, done))
        epoch += 1
    if epoch < epochs:
        segments.append((epoch, epochs, steps_per_epoch, 0))
    return segments


def _log_writers(model_dir: str, append: bool) -> list[keras.callbacks.Callback]:
    """CSVLogger and TensorBoard into `model_dir` (the chief's alone: they only write files)."""
    writers: list[keras.callbacks.Callback] = [
        keras.callbacks.CSVLogger(os.path.join(model_dir, CSV_FILE), append=append)
    ]
    if importlib.util.find_spec("tensorboard") is not None:
        writers.append(keras.callbacks.TensorBoard(log_dir=os.path.join(model_dir, "logs")))
    else:
        print("Warning: the tensorboard package is not installed; no TensorBoard logs (pip install tensorboard).")
    return writers


def _check_same_step(placement: Placement, step: int, backup_dir: str) -> None:
    """Raises unless every replica is about to restore the same step (one collective op on
    tf.distribute lanes; run it before restoring, whose collective ops depend on the backup).

    A worker that cannot see the chief's backup folder would start over while the others resume,
    and their collective ops would no longer match; this stops every worker with a clear error.
    """
    if not isinstance(placement, StrategyPlacement):
        return
    strategy = placement.strategy
    value = tf.constant([1.0, step, float(step) ** 2], tf.float64)
    count, total, squares = strategy.reduce("SUM", strategy.run(lambda: value), axis=None).numpy()
    if total != count * step or squares != count * float(step) ** 2:
        raise RuntimeError(
            f"Workers would resume at different steps (this one: step {step} from {backup_dir}; mean "
            f"over all: {total / count:g}). Every worker must see the chief's --model_dir on a shared "
            "filesystem."
        )


def _format_summary(summary: dict[str, float]) -> str:
    return " ".join(
        f"{key}={value}" if isinstance(value, int) else f"{key}={value:.6g}" for key, value in summary.items()
    )


def train(config: TrainConfig) -> TrainResult:
    """Trains (or resumes) the run `config` describes, saves the models and returns what it produced."""
    # First: MultiWorkerMirroredStrategy configures collective ops, which fails ("must be configured
    # at program startup") once any TensorFlow op has run, such as reading the dataset.
    placement = Placement.create(config.device, config.precision)
    keras.utils.set_random_seed(config.seed)
    model_dir = config.model_dir
    if placement.is_chief:
        os.makedirs(model_dir, exist_ok=True)
    data_dir = prepare.resolve_data_dir(
        config.data_path,
        config.tfds_data_dir or os.path.join(model_dir, "tfds"),
        build=placement.is_chief,
        timeout=config.data_timeout,
    )
    num_classes, shape = data.dataset_info(data_dir)
    image_size = (config.image_size, config.image_size) if config.image_size else tuple(shape[:2])
    num_examples = data.builder(data_dir).info.splits["train"].num_examples

    global_batch = config.batch_size * placement.num_replicas_in_sync
    full_steps = num_examples // global_batch
    if full_steps == 0:
        raise ValueError(
            f"{data_dir}: {num_examples} training images are fewer than one batch of {global_batch}; "
            "lower --batch_size."
        )
    steps_per_epoch = min(config.steps, full_steps) if config.steps else full_steps
    epochs = config.train_epochs
    print(
        f"Training {config.backbone} ({config.embedding_size}-d, {placement.precision}) on {num_examples} images "
        f"of {num_classes} identities at {image_size[0]}x{image_size[1]}: {epochs} epochs x "
        f"{steps_per_epoch} steps of {global_batch} images, {placement}"
    )

    with placement.scope():
        backbone = config.backbone
        if config.init_from:
            backbone = finetune.load_backbone(config.init_from)
            finetune.check_image_size(backbone, image_size, config.init_from)
        model = ArcFaceModel(
            backbone=backbone,
            num_classes=num_classes,
            embedding_size=config.embedding_size,
            margin=config.margin,
            scale=config.scale,
            input_shape=(*image_size, 3),
            norm=config.norm,
            dropout=config.dropout,
            weight_decay=config.weight_decay,
            sample_rate=config.sample_rate,
            shard_centres=config.shard_centres,
            subcenters=config.subcenters,
            interclass_filtering_threshold=config.interclass_filtering,
        )
        if config.freeze_bn:
            finetune.freeze_batch_norm(model.backbone)
        schedule = learning_rate_schedule(config, steps_per_epoch)
        optimizer = placement.wrap_optimizer(keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum))
        model.compile(optimizer=optimizer, jit_compile=JIT_COMPILE[config.jit_compile])

    backup = TrainingBackup(
        os.path.join(model_dir, "backup"), steps_per_epoch, epochs, config.backup_steps, chief=placement.is_chief
    )
    state = backup.read_state()
    if config.init_from and not state:
        print(f"Initialised {finetune.init_centres(model, data_dir, image_size, config.batch_size)} class "
              f"centres from {config.init_from}")
    _check_same_step(placement, state["step"] if state else 0, backup.backup_dir)
    step = backup.restore(model)
    if step:
        epoch, done = divmod(step, steps_per_epoch)
        print(
            f"Resuming from epoch {epoch + 1} step {done} (global step {step} of "
            f"{epochs * steps_per_epoch}) from {backup.backup_dir}"
        )

    sources = list(dict.fromkeys([data_dir, config.data_path]))
    targets = load_verification_targets(sources, config.targets, image_size) if config.targets else {}

    stop_on_nan = StopOnNaN(steps_per_epoch, backup.global_step)
    callbacks = [backup.global_step, *for_placement(placement), stop_on_nan, ThroughputLogger(global_batch)]
    if config.freeze_backbone_epochs:
        callbacks.append(finetune.FreezeBackbone(config.freeze_backbone_epochs, config.freeze_bn))
    if targets:
        callbacks.append(VerificationCallback(targets))
    if placement.is_chief:
        callbacks.extend(_log_writers(model_dir, append=bool(step)))
    callbacks.append(backup)
    dataset_kwargs = {
        "data_dir": data_dir,
        "batch_size": global_batch,
        "shuffle_buffer": config.shuffle_buffer,
        "image_size": image_size,
        "placement": placement,
    }
    verbose = config.verbose if config.verbose is not None else (1 if sys.stdout.isatty() else 2)
    history: dict[str, list] = {}
    started = time.perf_counter()
    for first, end, steps, skip in _fit_segments(step, steps_per_epoch, epochs):
        dataset = epoch_stream(dataset_kwargs, config.seed, first, end, steps_per_epoch, skip)
        segment = model.fit(
            dataset,
            epochs=end,
            initial_epoch=first,
            steps_per_epoch=steps,
            shuffle=False,  # each epoch's dataset is shuffled by its own seed
            callbacks=callbacks,
            verbose=verbose,
        )
        for key, values in segment.history.items():
            history.setdefault(key, []).extend(values)
        if model.stop_training:
            break
    train_seconds = time.perf_counter() - started

    last = {key: values[-1] for key, values in history.items() if values}
    summary: dict[str, float] = {
        "epochs": epochs,
        "steps": backup.step,
        "batch_size": global_batch,
        "images_per_sec": float(np.mean(history.get("images_per_second", [0.0]))),
        "train_time_sec": train_seconds,
        "loss": float(last.get("loss", math.nan)),
        "accuracy": float(last.get("accuracy", math.nan)),
        "verification_accuracy": float(last.get("verification_accuracy", math.nan)),
    }
    for name in targets:
        summary[name] = float(last.get(f"{name}_accuracy", math.nan))

    model_path = embedding_path = None
    if stop_on_nan.stopped_at is None:
        with placement.output_dir(model_dir) as folder:  # every worker saves; only the chief keeps it
            model.save(os.path.join(folder, MODEL_FILE))
            model.embedding_model().save(os.path.join(folder, EMBEDDING_FILE))
        if placement.is_chief:
            model_path = os.path.join(model_dir, MODEL_FILE)
            embedding_path = os.path.join(model_dir, EMBEDDING_FILE)
            print(f"Saved {model_path} and {embedding_path}")
    else:
        print(
            f"Not saving the model: the loss is not finite. The last good state is kept in "
            f"{backup.backup_dir}; rerun with a lower --lr (or --precision fp32) to resume from it."
        )
    print(f"Final summary: {_format_summary(summary)}")
    return TrainResult(model, history, summary, model_path, embedding_path, stop_on_nan.stopped_at)
