"""Partial FC: step time and peak memory of the margin head, sampled (sample_rate 0.1) vs full (1.0).

One head step is the forward and backward pass of MarginHead plus softmax cross-entropy, with
gradients with respect to the embeddings and the centres (dense for the full head, a
tf.IndexedSlices over the sampled rows for Partial FC), as in ArcFaceModel.train_step. Every
configuration runs in its own subprocess so peaks do not mix. Memory is the growth over the steps,
measured after the centres exist (their size is listed separately) in two ways: TensorFlow's
allocator peak (tf.config.experimental.get_memory_info on the GPU, or on the CPU where the
allocator keeps statistics, as with oneDNN), and the process's resident high-water mark (reset
through /proc/self/clear_refs). The second understates: TensorFlow's pooling CPU allocator keeps
the buffers that initialised the centres resident and reuses them for the step.

    python bench/partial_fc.py [--classes 100000,1000000] [--rates 1.0,0.1] [--batch 128]
                               [--dim 512] [--steps 1] [--replicas 2]

With `--replicas R` (> 1) it also lists, per class count, the bytes of class centres plus their
SGD momentum that one replica holds under MirroredStrategy over R logical CPUs: mirrored (every
replica a full copy, momentum from keras SGD) against `shard_centres=True` (each replica its
shard), read from the variables' per-replica components.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def _rss_high_water_bytes() -> int:
    """Peak resident set size of this process since start or the last reset."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def measure(num_classes: int, sample_rate: float, batch: int, dim: int, steps: int) -> dict:
    """Runs one configuration in this process; returns its timings and memory."""
    import numpy as np
    import tensorflow as tf

    from faceid_keras.heads import MarginHead

    gpu = bool(tf.config.list_physical_devices("GPU"))
    head = MarginHead(num_classes, sample_rate=sample_rate)
    head.build((None, dim))
    rng = np.random.default_rng(0)
    embeddings = tf.constant(rng.normal(size=(batch, dim)).astype("float32"))
    labels = tf.constant(rng.integers(0, num_classes, size=batch).astype("int32"))

    @tf.function
    def step(embeddings, labels, iteration):
        centres = head.centres.value
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            if head.sampling:
                index, targets = head.sample(labels, iteration)
                cosine = head.cosine(embeddings, tf.gather(centres, index))
            else:
                targets = labels
                cosine = head.cosine(embeddings)
            logits = head.margin_logits(cosine, targets)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits))
        grad_embeddings, grad_centres = tape.gradient(loss, [embeddings, centres])
        if isinstance(grad_centres, tf.IndexedSlices):
            checksum = tf.reduce_sum(grad_centres.values)
        else:
            checksum = tf.reduce_sum(grad_centres)
        return loss, tf.reduce_sum(grad_embeddings) + checksum

    # Baselines after the centres exist, before the first (tracing) step.
    device = "GPU:0" if gpu else "CPU:0"
    try:
        tf.config.experimental.reset_memory_stats(device)
        allocator_base = tf.config.experimental.get_memory_info(device)["current"]
    except (ValueError, RuntimeError):
        allocator_base = None
    rss_base = _rss_bytes()
    reset = _reset_high_water()
    step(embeddings, labels, tf.constant(0, tf.int64))[0].numpy()  # trace and warm up
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(embeddings, labels, tf.constant(i + 1, tf.int64))[0].numpy()
        times.append(time.perf_counter() - start)
    allocator_peak = None
    if allocator_base is not None:
        allocator_peak = tf.config.experimental.get_memory_info(device)["peak"] - allocator_base
    return {
        "classes": num_classes,
        "rate": sample_rate,
        "sampled": head.num_sample if head.sampling else num_classes,
        "step_s": min(times),
        "peak_bytes": allocator_peak,
        "rss_bytes": _rss_high_water_bytes() - rss_base if reset else None,
        "centres_bytes": num_classes * dim * 4,
        "device": device,
    }


def measure_replica_bytes(num_classes: int, dim: int, replicas: int) -> dict:
    """Centre + momentum bytes on replica 0, mirrored vs sharded, on `replicas` logical CPUs."""
    import keras
    import tensorflow as tf

    from faceid_keras.heads import MarginHead

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])

    def replica0_bytes(variables):
        first = [strategy.experimental_local_results(v.value)[0] for v in variables]
        return sum(v.shape.num_elements() * v.dtype.size for v in first)

    with strategy.scope():
        mirrored = MarginHead(num_classes)
        mirrored.build((None, dim))
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
        optimizer.build([mirrored.centres])
        sharded = MarginHead(num_classes, shard_centres=True)
        sharded.build((None, dim))
    return {
        "classes": num_classes,
        "replicas": replicas,
        "mirrored_bytes": replica0_bytes([mirrored.centres, *optimizer.momentums]),
        "sharded_bytes": replica0_bytes([sharded.centres, sharded.momentum]),
    }


def run_config(num_classes: int, rate: float, args: argparse.Namespace) -> dict:
    """Measures one configuration in a fresh interpreter."""
    command = [sys.executable, os.path.abspath(__file__), "--one", f"{num_classes}:{rate}",
               "--batch", str(args.batch), "--dim", str(args.dim), "--steps", str(args.steps)]
    return _run(command, f"configuration {num_classes} classes, rate {rate}")


def run_replica_bytes(num_classes: int, args: argparse.Namespace) -> dict:
    """Measures the per-replica centre memory of one class count in a fresh interpreter."""
    command = [sys.executable, os.path.abspath(__file__), "--bytes", str(num_classes),
               "--dim", str(args.dim), "--replicas", str(args.replicas)]
    return _run(command, f"per-replica bytes of {num_classes} classes")


def _run(command: list[str], what: str) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="100000,1000000")
    parser.add_argument("--rates", default="1.0,0.1")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    parser.add_argument("--replicas", type=int, default=2,
                        help="logical CPUs of the per-replica memory rows; 1 skips them")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bytes:
        print("RESULT " + json.dumps(measure_replica_bytes(args.bytes, args.dim, args.replicas)))
        return
    if args.one:
        classes, rate = args.one.split(":")
        print("RESULT " + json.dumps(measure(int(classes), float(rate), args.batch, args.dim, args.steps)))
        return
    classes = [int(c) for c in args.classes.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    print(f"MarginHead step (forward + backward + cross-entropy), batch {args.batch}, embedding "
          f"{args.dim}, best of {args.steps} steps, one subprocess per row")
    print(f"{'classes':>9} {'rate':>5} {'sampled':>8} {'step ms':>9} {'tf peak MiB':>12} "
          f"{'rss growth MiB':>15} {'centres MiB':>12}")
    results = {}

    def mib(value):
        return "n/a" if value is None else f"{value / 2**20:.1f}"

    for c in classes:
        for r in rates:
            row = run_config(c, r, args)
            results[c, r] = row
            print(f"{c:>9} {r:>5} {row['sampled']:>8} {1000 * row['step_s']:>9.1f} "
                  f"{mib(row['peak_bytes']):>12} {mib(row['rss_bytes']):>15} "
                  f"{mib(row['centres_bytes']):>12}", flush=True)
    full = max(rates)
    for c in classes:
        for r in rates:
            if r == full:
                continue
            a, b = results[c, r], results[c, full]
            memory = "n/a" if a["peak_bytes"] is None else f"x{a['peak_bytes'] / max(b['peak_bytes'], 1):.3f}"
            print(f"{c} classes, rate {r} vs {full}: step time x{a['step_s'] / b['step_s']:.3f}, "
                  f"tf peak memory {memory}")
    if args.replicas > 1:
        print(f"Centres + momentum held by one replica of {args.replicas} (MirroredStrategy, "
              f"logical CPUs), embedding {args.dim}")
        print(f"{'classes':>9} {'mirrored MiB':>13} {'sharded MiB':>12} {'ratio':>7}")
        for c in classes:
            row = run_replica_bytes(c, args)
            print(f"{c:>9} {mib(row['mirrored_bytes']):>13} {mib(row['sharded_bytes']):>12} "
                  f"x{row['sharded_bytes'] / row['mirrored_bytes']:.3f}", flush=True)


if __name__ == "__main__":
    main()
