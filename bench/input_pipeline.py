"""Input pipeline speed: faceid_keras.data.train_dataset vs bare JPEG decoding of the same images.

Writes a synthetic MS1M-style folder (112x112 JPEGs), builds it with tfds in a temporary data dir,
then times, in the same run, (a) the full training pipeline (read, shuffle, parse, decode, flip,
batch; uint8 pixels out, as `ArcFaceModel` normalises on the device) and (b) tf.data decoding
only, over the same JPEG bytes held in memory. Prints both rates and their ratio; the target is a
ratio of at least 0.9. Each side is also timed in process CPU time (images per CPU-second), which
other jobs on a shared machine disturb far less than wall-clock rates.

    python bench/input_pipeline.py [--identities 400] [--per_identity 30] [--batch_size 64]
                                   [--rounds 5] [--shuffle_buffer N]
    python bench/input_pipeline.py --epochs 10   # memory: RSS after each epoch, growth bounded

With `--epochs N` it instead runs N passes of one `train_dataset` and prints the resident memory
after each; it fails if the peak RSS of the second half of the epochs exceeds the peak of the
first half by more than `--max_growth` (default 5%). The allocator's arenas fill over the first
few epochs and then fluctuate by a few percent; a leak keeps growing and fails the bound.

The 12,000 images keep each pass long enough that starting it (the first batch waits for the
shuffle buffer and its own decoding) is a small part of it, as in a real epoch; on 3,000 images
the start-up alone cost the pipeline ~10% of its wall-clock rate. The shuffle buffer defaults to
a quarter of the data for the same reason: like the 20,000-record buffer on MS1M's 5.8M images,
filling it is a small part of an epoch (a buffer as large as the data would read every record,
on one thread, before the first batch).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from faceid_keras import data  # noqa: E402
from tfds_ms1m import synthetic  # noqa: E402


def epoch_rate(dataset: tf.data.Dataset, batch_size: int) -> tuple[float, float]:
    """(images per second, images per CPU-second of this process) of one full pass over `dataset`."""
    start, start_cpu = time.perf_counter(), time.process_time()
    images = sum(1 for _ in dataset) * batch_size
    return images / (time.perf_counter() - start), images / (time.process_time() - start_cpu)


def compare(ours: tf.data.Dataset, reference: tf.data.Dataset, batch_size: int, rounds: int):
    """Best (wall, CPU) rates of each over `rounds` alternating passes (after a warm-up pass of
    each), so that both see the same machine load."""
    epoch_rate(ours, batch_size)
    epoch_rate(reference, batch_size)
    best_ours = best_reference = (0.0, 0.0)
    for _ in range(rounds):
        best_ours = tuple(map(max, best_ours, epoch_rate(ours, batch_size)))
        best_reference = tuple(map(max, best_reference, epoch_rate(reference, batch_size)))
    return best_ours, best_reference


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def epoch_memory(dataset: tf.data.Dataset, epochs: int) -> list[float]:
    """RSS after each full pass over `dataset` (each pass is a fresh, reshuffled epoch)."""
    sizes = []
    for epoch in range(1, epochs + 1):
        batches = sum(1 for _ in dataset)
        sizes.append(rss_mib())
        print(f"epoch {epoch}: {batches} batches, RSS {sizes[-1]:8.1f} MiB", flush=True)
    return sizes


def decode_only(jpegs: list[bytes], batch_size: int) -> tf.data.Dataset:
    """The reference: in-memory JPEG bytes, parallel decode, batch; nothing else."""
    return (
        tf.data.Dataset.from_tensor_slices(tf.constant(jpegs))
        .map(lambda b: tf.io.decode_jpeg(b, channels=3), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=400)
    parser.add_argument("--per_identity", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shuffle_buffer", type=int, default=None,
                        help="records (default: a quarter of the images, at most the pipeline default)")
    parser.add_argument("--epochs", type=int, default=0, help="memory mode: passes to run (>= 4)")
    parser.add_argument("--max_growth", type=float, default=0.05, help="memory mode: allowed RSS growth")
    args = parser.parse_args()
    if args.shuffle_buffer is None:
        args.shuffle_buffer = min(data.DEFAULT_SHUFFLE_BUFFER, args.identities * args.per_identity // 4)
    if args.epochs and args.epochs < 4:
        parser.error("--epochs must be >= 4 (the second half of the epochs is compared with the first)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "faces")
        data_dir = os.path.join(tmp, "tfds")
        synthetic.write_dataset(folder, args.identities, args.per_identity, image_size=112, targets=())
        builder = tfds.builder("ms1m_arcface", data_dir=data_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=folder))
        if args.epochs:
            pipeline = data.train_dataset(data_dir, args.batch_size, shuffle_buffer=args.shuffle_buffer, seed=0)
            sizes = epoch_memory(pipeline, args.epochs)
            half = args.epochs // 2
            growth = max(sizes[half:]) / max(sizes[:half]) - 1
            print(f"peak RSS of epochs {half + 1}-{args.epochs} vs epochs 1-{half}: {100 * growth:+.2f}% "
                  f"(bound {100 * args.max_growth:.0f}%)")
            if growth > args.max_growth:
                raise SystemExit(f"input pipeline memory grew {100 * growth:.2f}% over {args.epochs - 2} epochs")
            return
        records = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
        jpegs = [r["image"].numpy() for r in records]
        reference = decode_only(jpegs, args.batch_size)
        pipeline = data.train_dataset(data_dir, args.batch_size, shuffle_buffer=args.shuffle_buffer)
        ours, bare = compare(pipeline, reference, args.batch_size, args.rounds)
    allocator = "BFC" if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() in ("1", "true") else "default"
    print(f"images: {len(jpegs)} at 112x112, batch {args.batch_size}, shuffle buffer {args.shuffle_buffer}, "
          f"{os.cpu_count()} cores, {allocator} CPU allocator")
    print(f"decode only (in memory): {bare[0]:8.1f} images/s {bare[1]:8.1f} images/CPU-s")
    print(f"train_dataset:           {ours[0]:8.1f} images/s {ours[1]:8.1f} images/CPU-s")
    print(f"ratio: {ours[0] / bare[0]:.2f} wall, {ours[1] / bare[1]:.2f} CPU (target >= 0.90)")


if __name__ == "__main__":
    main()
