"""`faceid demo`: the whole workflow in a few minutes on synthetic faces.

Writes a small synthetic dataset in insightface's format, builds it with the `ms1m_arcface` tfds
builder, trains a small backbone with `faceid_keras.training.train` (what `faceid train` runs)
while verifying on lfw / cfp_fp / agedb_30 after every epoch, then reloads the saved embedding model with
`keras.models.load_model` and compares a few faces with it.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from faceid_keras import backbones

# Sizes measured on two CPU cores: iresnet18 at 32x32 passes 0.95 lfw accuracy on these faces
# by the second or third epoch; verification on three targets costs about as much as training.
FULL = {"identities": 32, "images_per_identity": 12, "image_size": 32, "pairs": 120, "epochs": 4}
QUICK = {"identities": 8, "images_per_identity": 8, "image_size": 32, "pairs": 40, "epochs": 2}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers the `demo` subcommand on a `faceid` subparsers object."""
    parser = subparsers.add_parser(
        "demo",
        help="generate synthetic faces, build them with tfds, train, verify and embed",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("--workdir", default=None,
                        help="folder for the dataset and the model (default: a new temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (32x32 images, two short epochs) that only checks the workflow")
    parser.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    parser.add_argument("--backbone", choices=list(backbones.BACKBONES), default="iresnet18", help="backbone to train (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the training")
    parser.set_defaults(func=run)
    return parser


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def run(args: argparse.Namespace) -> int:
    """Runs the demo end to end and prints what each stage produced."""
    import keras

    from faceid_keras import embedding, packs, prepare, training
    from tfds_ms1m import synthetic

    started = time.perf_counter()
    sizes = dict(QUICK if args.quick else FULL)
    if args.epochs is not None:
        sizes["epochs"] = args.epochs
    workdir = args.workdir or tempfile.mkdtemp(prefix="faceid-demo-")
    folder = os.path.join(workdir, "faces_synthetic")
    data_dir = os.path.join(workdir, "tensorflow_datasets")
    model_dir = os.path.join(workdir, "model")

    print(f"[1/4] Writing {sizes['identities']} synthetic identities x {sizes['images_per_identity']} "
          f"images ({sizes['image_size']}x{sizes['image_size']}) in insightface format to {folder}")
    if not os.path.exists(os.path.join(folder, "train.rec")):
        synthetic.write_dataset(
            folder,
            sizes["identities"],
            sizes["images_per_identity"],
            image_size=sizes["image_size"],
            pairs_per_target=sizes["pairs"],
            seed=args.seed,
        )
    print(f"[2/4] Building it with tfds (ms1m_arcface/train and /verification) into {data_dir}")
    prepare.prepare_tfds(folder, data_dir)

    print(f"[3/4] Training {args.backbone} for {sizes['epochs']} epochs (faceid train)")
    result = training.train(training.TrainConfig(
        data_path=data_dir,
        model_dir=model_dir,
        backbone=args.backbone,
        embedding_size=128,
        train_epochs=sizes["epochs"],
        batch_size=32,
        lr=0.1,
        warmup_epochs=1,
        shuffle_buffer=5000,
        seed=args.seed,
        steps=3 if args.quick else 0,
    ))
    if result.stopped_at is not None:
        return 1
    lfw = result.history.get("lfw_accuracy", [])
    print("lfw verification accuracy by epoch: " + ", ".join(f"{a:.3f}" for a in lfw))

    print(f"[4/4] Reloading {result.embedding_path} with keras.models.load_model and embedding faces")
    model = keras.models.load_model(result.embedding_path)
    images, issame = packs.load_bin(os.path.join(folder, "lfw.bin"))
    same = int(np.flatnonzero(issame)[0])
    different = int(np.flatnonzero(~issame)[0])
    faces = np.concatenate([images[2 * same : 2 * same + 2], images[2 * different : 2 * different + 2]])
    embeddings = embedding.embed(model, faces)
    print(f"Embedding shape: {embeddings.shape}")
    print(f"Cosine similarity, same identity: {_cosine(embeddings[0], embeddings[1]):.3f}")
    print(f"Cosine similarity, different identities: {_cosine(embeddings[2], embeddings[3]):.3f}")
    final = result.summary["lfw"] if "lfw" in result.summary else float("nan")
    print(f"Demo finished in {time.perf_counter() - started:.0f} s: final lfw accuracy {final:.3f}; "
          f"model in {model_dir}")
    return 0
