"""`faceid train`: the command line of `faceid_keras.training.train`; its flags build a `TrainConfig`.

    faceid train --data_path ~/tensorflow_datasets --train_epochs 5 --batch_size 16

Each flag is the `TrainConfig` field of the same name (see `faceid_keras.training` for what a run
does, writes and how it resumes: run the same command again after a kill).
"""
from __future__ import annotations

import argparse
import dataclasses

from faceid_keras import backbones, training
from faceid_keras.argtypes import fraction, non_negative_float, non_negative_int, positive_int
from faceid_keras.placement import DEVICES, PRECISIONS


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


def _threshold(text: str) -> float:
    """A cosine threshold in [0, 1): 0 turns the filtering off."""
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


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers the `train` subcommand on a `faceid` subparsers object; its defaults are `TrainConfig`'s."""
    parser = subparsers.add_parser(
        "train",
        help="train an ArcFace model on ms1m_arcface",
        description="Trains an ArcFace model with Keras fit; resumes killed runs.",
    )
    data_group = parser.add_argument_group("data")
    data_group.add_argument("--data_path", required=True,
                      help="tfds data dir with ms1m_arcface built in it, or an insightface folder "
                      "(train.rec, train.idx, property, *.bin) to build first")
    data_group.add_argument("--tfds_data_dir",
                      help="where an insightface --data_path is built (default: <model_dir>/tfds). "
                      "With several workers only the chief builds it; it must be on a filesystem "
                      "all workers share")
    data_group.add_argument("--data_timeout", type=non_negative_float,
                      help="seconds the other workers wait for the chief to build an insightface "
                      "--data_path before giving up (default: %(default)s); a prebuilt tfds "
                      "--data_path needs no wait")
    data_group.add_argument("--image_size", type=positive_int,
                      help="train and verify at this square size (default: the dataset's size)")
    data_group.add_argument("--shuffle_buffer", type=non_negative_int,
                      help="examples in the shuffle buffer (default: %(default)s)")
    model_group = parser.add_argument_group("model")
    model_group.add_argument("--backbone", choices=list(backbones.BACKBONES))
    model_group.add_argument("--embedding_size", type=positive_int)
    model_group.add_argument("--norm", choices=list(backbones.NORMS), help="backbone normalisation")
    model_group.add_argument("--dropout", type=non_negative_float, help="dropout before the embedding")
    model_group.add_argument("--margin", type=_margin,
                             help="arcface, cosface, arcface_torch (insightface's since Dec 2022), adaface, "
                             "or m1,m2,m3 of cos(m1*theta+m2)-m3 (default: arcface)")
    model_group.add_argument("--subcenters", type=positive_int,
                             help="sub-center ArcFace: centres per class, a class's cosine is their max "
                             "(default: 1)")
    model_group.add_argument("--interclass_filtering", type=_threshold,
                             help="Partial FC's inter-class filtering: non-target cosines above T count as 0 "
                             "(default: 0, off)")
    model_group.add_argument("--scale", type=float, help="logit scale s (default: 64)")
    model_group.add_argument("--sample_rate", type=fraction,
                       help="Partial FC: fraction of class centres sampled each step (default: 1, all)")
    model_group.add_argument("--shard_centres", action="store_true",
                       help="hold each replica's 1/R of the class centres and their momentum "
                       "(model parallel, as insightface's partial_fc_v2); needs SGD and Keras 3")
    tune = parser.add_argument_group("fine-tuning")
    tune.add_argument("--init_from", metavar="MODEL",
                      help="start from the backbone of this saved .keras (ArcFaceModel or embedding model); "
                      "class centres start at each identity's mean embedding")
    tune.add_argument("--freeze_bn", action="store_true", help="keep the backbone's BatchNorm layers fixed")
    tune.add_argument("--freeze_backbone_epochs", type=non_negative_int,
                      help="train the margin head alone for this many first epochs (default: 0)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_epochs", type=positive_int)
    optim.add_argument("--batch_size", type=positive_int, help="batch size per replica")
    optim.add_argument("--steps", type=non_negative_int,
                       help="cap on the steps of each epoch; 0 trains full epochs (default)")
    optim.add_argument("--lr", type=non_negative_float, help="peak learning rate of SGD")
    optim.add_argument("--momentum", type=non_negative_float)
    optim.add_argument("--weight_decay", type=non_negative_float)
    optim.add_argument("--lr_schedule", choices=("poly", "step"),
                       help="after warmup: polynomial decay (power 2) to 0, or step decay (default: poly)")
    optim.add_argument("--warmup_epochs", type=non_negative_float,
                       help="linear warmup from 0, in epochs (may be fractional)")
    optim.add_argument("--lr_steps", type=_epoch_list,
                       help="epochs at which the step schedule multiplies the rate by --lr_decay "
                       "(default: 10,16)")
    optim.add_argument("--lr_decay", type=non_negative_float)
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--model_dir",
                           help="output folder (default: %(default)s)")
    run_group.add_argument("--device", choices=DEVICES)
    run_group.add_argument("--precision", choices=PRECISIONS,
                           help="default: mixed_float16 on an Ascend NPU (precision_mode "
                           "allow_mix_precision, as the ModelZoo scripts), fp32 elsewhere")
    run_group.add_argument("--targets", type=_targets,
                           help="comma-separated verification targets run after each epoch; missing "
                           "ones are skipped with a warning; 'none' turns verification off "
                           "(default: lfw,cfp_fp,agedb_30)")
    run_group.add_argument("--backup_steps", type=positive_int,
                           help="back up the training state every this many steps (default: %(default)s)")
    run_group.add_argument("--seed", type=int, help="seed of initialisation and data order")
    run_group.add_argument("--jit_compile", choices=tuple(training.JIT_COMPILE),
                           help="XLA-compile the train step; auto is Keras's choice: on for GPUs, off "
                           "on CPUs, where it measured slower for small inputs (default: auto)")
    run_group.add_argument("--verbose", type=int, choices=(0, 1, 2),
                           help="Keras fit verbosity (default: 1 on a terminal, else 2)")
    parser.set_defaults(func=run, **{field.name: field.default for field in dataclasses.fields(training.TrainConfig)
                                     if field.default is not dataclasses.MISSING})
    return parser


def _targets(text: str) -> tuple[str, ...]:
    """Comma-separated verification target names; "none" for no verification."""
    return () if text.strip().lower() == "none" else tuple(name for name in text.split(",") if name)


def config_from_args(args: argparse.Namespace) -> training.TrainConfig:
    """The `TrainConfig` that parsed `faceid train` flags describe."""
    return training.TrainConfig(**{field.name: getattr(args, field.name)
                                   for field in dataclasses.fields(training.TrainConfig)})


def run(args: argparse.Namespace) -> int:
    """`faceid train`: trains and returns the exit status (1 when the loss went NaN)."""
    return 1 if training.train(config_from_args(args)).stopped_at is not None else 0
