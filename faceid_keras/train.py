"""`faceid train`: train an ArcFaceModel on ms1m_arcface with plain `compile` + `fit`.

    faceid train --data_path ~/tensorflow_datasets --train_epochs 5 --batch_size 16

`--data_path` is a tfds data dir holding a built `ms1m_arcface`, or an insightface folder (one with
`train.rec`), which is first built with tfds into `--tfds_data_dir` (default `<model_dir>/tfds`;
reused once built). Each epoch trains on a fresh shuffle seeded by `--seed` and the epoch number, so
a run killed at any point and started again with the same command resumes from its last backup
(`<model_dir>/backup`, every `--backup_steps` steps and at each epoch end) at the exact batch, and
ends with the same number of steps as a run that was never interrupted. The run writes
`model.keras` (training model), `embedding.keras` (images -> embeddings, for deployment),
`training_log.csv` and TensorBoard logs (`logs/`) into `--model_dir`, and prints a final
`Final summary:` line of key=value pairs that scripts parse.

Several workers (TF_CONFIG set, MultiWorkerMirroredStrategy) run the same command with the same
`--model_dir` and data paths on a shared filesystem. Only the chief builds an insightface
`--data_path` (the others wait for it) and writes into `--model_dir`; every worker reads and
decodes its own share of the records, for its part of each global batch, and a rerun resumes every
worker from the chief's backup at the same step.
"""
from __future__ import annotations

import argparse
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
import tensorflow_datasets as tfds

import tfds_ms1m
from callbacks import ThroughputLogger, VerificationCallback
from faceid_keras import backbones, data, schedules, verification
from faceid_keras.backup import TrainingBackup
from faceid_keras.cli import positive_int
from faceid_keras.model import ArcFaceModel
from faceid_keras.placement import DEVICES, PRECISIONS, Placement
from tfds_ms1m.binpack import VERIFICATION_TARGETS

DEFAULT_TARGETS = ",".join(verification.DEFAULT_TARGETS)
MODEL_FILE = "model.keras"
EMBEDDING_FILE = "embedding.keras"
CSV_FILE = "training_log.csv"
JIT_COMPILE = {"auto": "auto", "true": True, "false": False}
DATA_POLL_SECONDS = 2.0


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def _margin(text: str) -> str | tuple[float, float, float]:
    if text in ("arcface", "cosface", "arcface_torch", "adaface"):
        return text
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(
            f"must be arcface, cosface, arcface_torch, adaface or m1,m2,m3, got {text!r}"
        )
    return values


def _fraction_or_zero(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _epoch_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated epochs, got {text!r}") from None
    if any(b <= a for a, b in zip(values, values[1:])) or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be positive and increasing, got {text!r}")
    return values


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the training flags to a parser and makes `run` its handler."""
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", required=True,
                      help="tfds data dir with ms1m_arcface built in it, or an insightface folder "
                      "(train.rec, train.idx, property, *.bin) to build first")
    data.add_argument("--tfds_data_dir", default=None,
                      help="where an insightface --data_path is built (default: <model_dir>/tfds). "
                      "With several workers only the chief builds it; it must be on a filesystem "
                      "all workers share")
    data.add_argument("--data_timeout", type=_non_negative_float, default=6 * 3600.0,
                      help="seconds the other workers wait for the chief to build an insightface "
                      "--data_path before giving up (default: %(default)s); a prebuilt tfds "
                      "--data_path needs no wait")
    data.add_argument("--image_size", type=positive_int, default=None,
                      help="train and verify at this square size (default: the dataset's size)")
    data.add_argument("--shuffle_buffer", type=_non_negative_int, default=20_000,
                      help="examples in the shuffle buffer (default: %(default)s)")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=list(backbones.BACKBONES), default="iresnet50")
    model.add_argument("--embedding_size", type=positive_int, default=512)
    model.add_argument("--norm", choices=list(backbones.NORMS), default="batch", help="backbone normalisation")
    model.add_argument("--dropout", type=_non_negative_float, default=0.0, help="dropout before the embedding")
    model.add_argument("--margin", type=_margin, default="arcface",
                       help="arcface, cosface, arcface_torch (insightface's since Dec 2022), adaface, "
                       "or m1,m2,m3 of cos(m1*theta+m2)-m3 (default: arcface)")
    model.add_argument("--subcenters", type=positive_int, default=1,
                       help="sub-center ArcFace: centres per class, a class's cosine is their max (default: 1)")
    model.add_argument("--interclass_filtering", type=_fraction_or_zero, default=0.0,
                       help="Partial FC's inter-class filtering: non-target cosines above T count as 0 "
                       "(default: 0, off)")
    model.add_argument("--scale", type=float, default=64.0, help="logit scale s (default: 64)")
    model.add_argument("--sample_rate", type=_fraction, default=1.0,
                       help="Partial FC: fraction of class centres sampled each step (default: 1, all)")
    model.add_argument("--shard_centres", action="store_true",
                       help="hold each replica's 1/R of the class centres and their momentum "
                       "(model parallel, as insightface's partial_fc_v2); needs SGD and Keras 3")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_epochs", type=positive_int, default=20)
    optim.add_argument("--batch_size", type=positive_int, default=128, help="batch size per replica")
    optim.add_argument("--steps", type=_non_negative_int, default=0,
                       help="cap on the steps of each epoch; 0 trains full epochs (default)")
    optim.add_argument("--lr", type=_non_negative_float, default=0.1, help="peak learning rate of SGD")
    optim.add_argument("--momentum", type=_non_negative_float, default=0.9)
    optim.add_argument("--weight_decay", type=_non_negative_float, default=5e-4)
    optim.add_argument("--lr_schedule", choices=("poly", "step"), default="poly",
                       help="after warmup: polynomial decay (power 2) to 0, or step decay (default: poly)")
    optim.add_argument("--warmup_epochs", type=_non_negative_float, default=0.0,
                       help="linear warmup from 0, in epochs (may be fractional)")
    optim.add_argument("--lr_steps", type=_epoch_list, default=(10.0, 16.0),
                       help="epochs at which the step schedule multiplies the rate by --lr_decay "
                       "(default: 10,16)")
    optim.add_argument("--lr_decay", type=_non_negative_float, default=0.1)
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--model_dir", default=os.path.join("runs", "faceid"),
                           help="output folder (default: %(default)s)")
    run_group.add_argument("--device", choices=DEVICES, default="auto")
    run_group.add_argument("--precision", choices=PRECISIONS, default=None,
                           help="default: mixed_float16 on an Ascend NPU (precision_mode "
                           "allow_mix_precision, as the ModelZoo scripts), fp32 elsewhere")
    run_group.add_argument("--targets", default=DEFAULT_TARGETS,
                           help="comma-separated verification targets run after each epoch; missing "
                           "ones are skipped with a warning; 'none' turns verification off "
                           "(default: %(default)s)")
    run_group.add_argument("--backup_steps", type=positive_int, default=1000,
                           help="back up the training state every this many steps (default: %(default)s)")
    run_group.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    run_group.add_argument("--jit_compile", choices=tuple(JIT_COMPILE), default="auto",
                           help="XLA-compile the train step; auto is Keras's choice: on for GPUs, off "
                           "on CPUs, where it measured slower for small inputs (default: auto)")
    run_group.add_argument("--verbose", type=int, choices=(0, 1, 2), default=None,
                           help="Keras fit verbosity (default: 1 on a terminal, else 2)")
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers the `train` subcommand on a `faceid` subparsers object."""
    return configure(
        subparsers.add_parser(
            "train",
            help="train an ArcFace model on ms1m_arcface",
            description="Trains an ArcFace model with Keras fit; resumes killed runs.",
        )
    )


def build_parser() -> argparse.ArgumentParser:
    """The standalone `faceid train` parser."""
    return configure(argparse.ArgumentParser(prog="faceid train", description=__doc__.split("\n")[0]))


def prepare_tfds(folder: str, data_dir: str) -> str:
    """Builds the `train` and `verification` configs of an insightface folder into a tfds data dir.

    Configs already built there are reused; `verification` is skipped when there is no `.bin` pack.
    Returns `data_dir`.
    """
    config = tfds.download.DownloadConfig(manual_dir=folder)
    has_packs = any(os.path.exists(os.path.join(folder, f"{t}.bin")) for t in VERIFICATION_TARGETS)
    for name in ("train", "verification"):
        builder = tfds.builder(f"{tfds_ms1m.Builder.name}/{name}", data_dir=data_dir)
        if builder.is_prepared():
            print(f"Using ms1m_arcface/{name} already built in {data_dir}")
            continue
        if name == "verification" and not has_packs:
            continue
        print(f"Building ms1m_arcface/{name} from {folder} into {data_dir}")
        builder.download_and_prepare(download_config=config)
    return data_dir


def wait_for_tfds(folder: str, data_dir: str, timeout: float) -> str:
    """Waits until another process (the chief) has built `folder` into `data_dir`; returns `data_dir`.

    tfds builds a config in a temporary folder and renames it into place when complete, so a config
    counts as built once `is_prepared()`. Raises TimeoutError after `timeout` seconds.
    """
    has_packs = any(os.path.exists(os.path.join(folder, f"{t}.bin")) for t in VERIFICATION_TARGETS)
    names = ("train", "verification") if has_packs else ("train",)
    pending = [tfds.builder(f"{tfds_ms1m.Builder.name}/{name}", data_dir=data_dir) for name in names]
    deadline = time.monotonic() + timeout
    print(f"Waiting for the chief to build ms1m_arcface from {folder} into {data_dir}")
    while True:
        pending = [builder for builder in pending if not builder.is_prepared()]
        if not pending:
            return data_dir
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{pending[0].data_path}: not built by the chief within --data_timeout {timeout:g} s. "
                "The tfds data dir must be on a filesystem every worker shares; or build it once "
                f"(tfds build ms1m_arcface --imports tfds_ms1m --manual_dir {folder} --data_dir DIR) "
                "and pass DIR as --data_path."
            )
        time.sleep(DATA_POLL_SECONDS)


def resolve_data_dir(data_path: str, tfds_data_dir: str, build: bool = True, timeout: float = 0.0) -> str:
    """The tfds data dir to train from: `data_path` itself, or `tfds_data_dir` built from it.

    With `build=False` (a worker other than the chief) an insightface `data_path` is not built
    here: this waits up to `timeout` seconds for the chief to build it.
    """
    if os.path.exists(os.path.join(data_path, "train.rec")):
        if not build:
            return wait_for_tfds(data_path, tfds_data_dir, timeout)
        return prepare_tfds(data_path, tfds_data_dir)
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"--data_path {data_path}: no such directory.")
    if not data.builder(data_path).is_prepared():
        raise FileNotFoundError(
            f"--data_path {data_path}: neither an insightface folder (no train.rec) nor a tfds data "
            "dir with ms1m_arcface built in it. Build one with: tfds build ms1m_arcface "
            f"--imports tfds_ms1m --manual_dir FOLDER --data_dir {data_path}"
        )
    return data_path


def load_verification_targets(
    sources: Sequence[str], names: Sequence[str], image_size: tuple[int, int]
) -> dict:
    """Loads the named targets from the first source that has them; warns about and skips the rest."""
    targets = {}
    missing = list(names)
    for source in sources:
        if not missing or not os.path.isdir(source):
            continue
        found = set(verification.available_targets(source))
        present = [name for name in missing if name in found]
        if present:
            targets.update(verification.load_targets(source, present, image_size))
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


def learning_rate_schedule(args: argparse.Namespace, steps_per_epoch: int):
    """Warmup then polynomial or step decay over the run's steps, per the --lr* flags."""
    total = args.train_epochs * steps_per_epoch
    warmup = min(round(args.warmup_epochs * steps_per_epoch), total - 1)
    if args.lr_schedule == "poly":
        return schedules.WarmupPolynomialDecay(args.lr, total_steps=total, warmup_steps=warmup)
    boundaries = [round(e * steps_per_epoch) for e in args.lr_steps]
    boundaries = sorted(set(b for b in boundaries if warmup <= b < total))
    return schedules.WarmupStepDecay(args.lr, boundaries, warmup_steps=warmup, factor=args.lr_decay)


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """TerminateOnNaN that also says in which epoch, batch and global step the loss stopped being finite."""

    def __init__(self, steps_per_epoch: int, first_step: int = 0):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.step = first_step
        self.stopped_at: dict | None = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step += 1
        super().on_train_batch_end(batch, logs)
        loss = (logs or {}).get("loss")
        if self.stopped_at is None and loss is not None and not np.isfinite(loss):
            epoch, in_epoch = divmod(self.step - 1, self.steps_per_epoch)
            self.stopped_at = {"epoch": epoch + 1, "batch": in_epoch + 1, "step": self.step}
            print(
                f"Loss became {float(loss)} in epoch {epoch + 1}, batch {in_epoch + 1} of "
                f"{self.steps_per_epoch} (global step {self.step}): training stopped."
            )


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
    strategy = placement.strategy
    if strategy is None:
        return
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


def train(args: argparse.Namespace) -> TrainResult:
    """Trains (or resumes) the run `args` describe, saves the models and returns what it produced."""
    # First: MultiWorkerMirroredStrategy configures collective ops, which fails ("must be configured
    # at program startup") once any TensorFlow op has run, such as reading the dataset.
    placement = Placement.create(args.device, args.precision)
    keras.utils.set_random_seed(args.seed)
    model_dir = args.model_dir
    if placement.is_chief:
        os.makedirs(model_dir, exist_ok=True)
    data_dir = resolve_data_dir(
        args.data_path,
        args.tfds_data_dir or os.path.join(model_dir, "tfds"),
        build=placement.is_chief,
        timeout=args.data_timeout,
    )
    num_classes, shape = data.dataset_info(data_dir)
    image_size = (args.image_size, args.image_size) if args.image_size else tuple(shape[:2])
    num_examples = data.builder(data_dir).info.splits["train"].num_examples

    global_batch = args.batch_size * placement.num_replicas_in_sync
    full_steps = num_examples // global_batch
    if full_steps == 0:
        raise ValueError(
            f"{data_dir}: {num_examples} training images are fewer than one batch of {global_batch}; "
            "lower --batch_size."
        )
    steps_per_epoch = min(args.steps, full_steps) if args.steps else full_steps
    epochs = args.train_epochs
    print(
        f"Training {args.backbone} ({args.embedding_size}-d, {placement.precision}) on {num_examples} images "
        f"of {num_classes} identities at {image_size[0]}x{image_size[1]}: {epochs} epochs x "
        f"{steps_per_epoch} steps of {global_batch} images, {placement}"
    )

    with placement.scope():
        model = ArcFaceModel(
            backbone=args.backbone,
            num_classes=num_classes,
            embedding_size=args.embedding_size,
            margin=args.margin,
            scale=args.scale,
            input_shape=(*image_size, 3),
            norm=args.norm,
            dropout=args.dropout,
            weight_decay=args.weight_decay,
            sample_rate=args.sample_rate,
            shard_centres=args.shard_centres,
            subcenters=args.subcenters,
            interclass_filtering_threshold=args.interclass_filtering,
        )
        schedule = learning_rate_schedule(args, steps_per_epoch)
        optimizer = placement.wrap_optimizer(keras.optimizers.SGD(learning_rate=schedule, momentum=args.momentum))
        model.compile(optimizer=optimizer, jit_compile=JIT_COMPILE[args.jit_compile])

    backup = TrainingBackup(
        os.path.join(model_dir, "backup"), steps_per_epoch, epochs, args.backup_steps, chief=placement.is_chief
    )
    state = backup.read_state()
    _check_same_step(placement, state["step"] if state else 0, backup.backup_dir)
    step = backup.restore(model)
    if step:
        epoch, done = divmod(step, steps_per_epoch)
        print(
            f"Resuming from epoch {epoch + 1} step {done} (global step {step} of "
            f"{epochs * steps_per_epoch}) from {backup.backup_dir}"
        )

    names = [] if args.targets.strip().lower() == "none" else [n for n in args.targets.split(",") if n]
    sources = list(dict.fromkeys([data_dir, args.data_path]))
    targets = load_verification_targets(sources, names, image_size) if names else {}

    stop_on_nan = StopOnNaN(steps_per_epoch, first_step=step)
    callbacks = [*placement.callbacks(), stop_on_nan, ThroughputLogger(global_batch)]
    if targets:
        callbacks.append(VerificationCallback(targets))
    if placement.is_chief:
        callbacks.extend(_log_writers(model_dir, append=bool(step)))
    callbacks.append(backup)
    dataset_kwargs = {
        "data_dir": data_dir,
        "batch_size": global_batch,
        "shuffle_buffer": args.shuffle_buffer,
        "image_size": image_size,
        "placement": placement,
    }
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)
    history: dict[str, list] = {}
    started = time.perf_counter()
    for first, end, steps, skip in _fit_segments(step, steps_per_epoch, epochs):
        dataset = epoch_stream(dataset_kwargs, args.seed, first, end, steps_per_epoch, skip)
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


def run(args: argparse.Namespace) -> int:
    """`faceid train`: trains and returns the exit status (1 when the loss went NaN)."""
    return 1 if train(args).stopped_at is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m faceid_keras.train --data_path DIR ...`."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
