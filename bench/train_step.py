"""Training-step speed: ArcFaceModel.fit against the same backbone with a plain softmax head.

In one process, builds (A) `ArcFaceModel` (margin head, custom train_step) and (B) the same
backbone -> Dense(num_classes) trained by stock `model.fit` with SparseCategoricalCrossentropy
(from_logits=True), both with SGD(0.1, momentum 0.9) and weight decay 5e-4 (A: coupled L2 in its
train_step, B: the optimizer's weight_decay). Batches are one synthetic (images, labels) batch
repeated, so the input pipeline costs nothing. Timed windows alternate A B A B to cancel load
drift. Prints images/s, the overhead of A over B, the FLOPs counted per image and the achieved
GFLOP/s against a large tf.matmul timed in the same process, the first-step (trace + compile)
time and peak host memory.

    python bench/train_step.py --backbone iresnet50 --batch_size 16 --steps 2
    python bench/train_step.py --backbone mobilefacenet --image_size 32 --steps 4    # quick
    python bench/train_step.py --compare onednn,jit,onednn+jit,onednn+steps_per_execution
    python bench/train_step.py --backbone mobilefacenet --image_size 32 --num_classes 20000 \
        --models arcface,arcface_torch,adaface,subcenters3,interclass_filtering    # head variants

`--compare` runs the base configuration and each variant (tokens joined by "+": onednn, no_onednn,
jit, no_jit, steps_per_execution, mixed_float16, mixed_bfloat16, prefetch_to_device) in its own
subprocess, since TF_ENABLE_ONEDNN_OPTS only takes effect before TensorFlow is imported, and prints
images/s per variant relative to the base.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANT_TOKENS = (
    "onednn",
    "no_onednn",
    "jit",
    "no_jit",
    "steps_per_execution",
    "mixed_float16",
    "mixed_bfloat16",
    "prefetch_to_device",
)
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# ArcFaceModel head variants timed against plain "arcface" (their head overhead): ArcFaceModel keywords.
HEAD_VARIANTS: dict[str, dict] = {
    "arcface_torch": {"margin": "arcface_torch"},
    "adaface": {"margin": "adaface"},
    "subcenters3": {"subcenters": 3},
    "interclass_filtering": {"interclass_filtering_threshold": 0.3},
}
MODELS = ("arcface", "softmax", *HEAD_VARIANTS)


def parse_bool(text: str) -> bool:
    """'true'/'false' (also 1/0, yes/no) for flags that must be settable both ways."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags; the defaults finish in a few minutes on a 2-core CPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="iresnet50")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed window")
    parser.add_argument("--rounds", type=int, default=3, help="timed A/B window pairs")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--embedding_size", type=int, default=512)
    parser.add_argument("--precision", choices=PRECISIONS, default="float32")
    parser.add_argument("--jit_compile", type=parse_bool, default=False)
    parser.add_argument("--steps_per_execution", type=int, default=1)
    parser.add_argument(
        "--onednn",
        choices=("default", "0", "1"),
        default="default",
        help="TF_ENABLE_ONEDNN_OPTS before TensorFlow imports; 'default' leaves the environment alone",
    )
    parser.add_argument(
        "--prefetch_to_device",
        type=parse_bool,
        default=False,
        help="prefetch batches onto the first GPU (no effect without one)",
    )
    parser.add_argument("--models", default="arcface,softmax",
                        help=f"comma list of {', '.join(MODELS)} (the last ones: head variants vs arcface)")
    parser.add_argument("--matmul_size", type=int, default=2048)
    parser.add_argument(
        "--compare",
        default="",
        help="comma list of variants, each tokens joined by '+' from: " + ", ".join(VARIANT_TOKENS),
    )
    parser.add_argument(
        "--compare_steps_per_execution",
        type=int,
        default=4,
        help="steps_per_execution used by the steps_per_execution variant token",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line with the results last")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Argument validation with messages naming the flag."""
    for name in ("image_size", "batch_size", "steps", "rounds", "num_classes", "steps_per_execution"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in MODELS for m in models):
        raise SystemExit(f"--models must be a comma list of {MODELS}, got {args.models!r}")
    for variant in filter(None, args.compare.split(",")):
        for token in variant.split("+"):
            if token not in VARIANT_TOKENS:
                raise SystemExit(f"--compare: unknown token {token!r} in {variant!r}; known: {VARIANT_TOKENS}")


# ---------------------------------------------------------------------------------------------
# Variant comparison (no TensorFlow in this process: each configuration runs in a subprocess).


def variant_argv(args: argparse.Namespace, variant: str) -> list[str]:
    """The flags of the base configuration with the variant's tokens applied on top."""
    settings = {
        "--backbone": args.backbone,
        "--image_size": str(args.image_size),
        "--batch_size": str(args.batch_size),
        "--steps": str(args.steps),
        "--rounds": str(args.rounds),
        "--num_classes": str(args.num_classes),
        "--embedding_size": str(args.embedding_size),
        "--precision": args.precision,
        "--jit_compile": str(args.jit_compile).lower(),
        "--steps_per_execution": str(args.steps_per_execution),
        "--onednn": args.onednn,
        "--prefetch_to_device": str(args.prefetch_to_device).lower(),
        "--models": args.models,
        "--matmul_size": str(args.matmul_size),
    }
    overrides = {
        "onednn": ("--onednn", "1"),
        "no_onednn": ("--onednn", "0"),
        "jit": ("--jit_compile", "true"),
        "no_jit": ("--jit_compile", "false"),
        "steps_per_execution": ("--steps_per_execution", str(args.compare_steps_per_execution)),
        "mixed_float16": ("--precision", "mixed_float16"),
        "mixed_bfloat16": ("--precision", "mixed_bfloat16"),
        "prefetch_to_device": ("--prefetch_to_device", "true"),
    }
    for token in filter(None, variant.split("+")):
        flag, value = overrides[token]
        settings[flag] = value
    argv = [sys.executable, os.path.abspath(__file__), "--json"]
    for flag, value in settings.items():
        argv += [flag, value]
    return argv


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """Runs one configuration in a fresh interpreter and returns its JSON results."""
    argv = variant_argv(args, variant)
    print(f"[{variant or 'base'}] {' '.join(argv[2:])}", flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"variant {variant or 'base'!r} failed with exit code {proc.returncode}")
    print(proc.stdout.rstrip().rsplit("\n", 1)[0], flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> None:
    """Base then each variant in subprocesses; a table of images/s relative to the base."""
    variants = [""] + [v for v in args.compare.split(",") if v]
    results = [run_variant(args, v) for v in variants]
    models = [m for m in args.models.split(",") if m]
    base = results[0]
    print()
    print(f"== {args.backbone} {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{base['cpu_count']} cores, base: {base['config']}")
    header = f"{'variant':<40}" + "".join(f"{m + ' img/s':>16}{'x base':>8}" for m in models)
    header += f"{'1st step s':>12}{'GFLOP/s':>10}{'%matmul':>9}{'peak MiB':>10}"
    print(header)
    for variant, result in zip(variants, results):
        row = f"{variant or 'base':<40}"
        for m in models:
            rate = result["models"][m]["images_per_s"]
            row += f"{rate:>16.2f}{rate / base['models'][m]['images_per_s']:>8.2f}"
        first = result["models"][models[0]]
        row += f"{first['first_call_s']:>12.1f}{first['gflops_per_s']:>10.1f}"
        row += f"{100 * first['gflops_per_s'] / result['matmul_gflops_per_s']:>8.1f}%"
        row += f"{result['peak_rss_mib']:>10.0f}"
        print(row)
    if "arcface" in models and "softmax" in models:
        print("arcface overhead over softmax (softmax img/s / arcface img/s - 1), per variant:")
        for variant, result in zip(variants, results):
            print(f"  {variant or 'base':<38} {100 * result['arcface_overhead']:+6.1f}%")


# ---------------------------------------------------------------------------------------------
# One configuration (TensorFlow imported after the environment is set).


def forward_flops(model) -> tuple[int, dict]:
    """Forward FLOPs per image of a functional model: convs 2*Ho*Wo*K*K*Cin*Cout/groups, dense 2*in*out.

    Counts multiply-adds of Conv2D, DepthwiseConv2D, GroupedConv2D and Dense layers (nested models included);
    normalisation, activations and additions are left out, as the usual FLOP figures do.
    """
    import keras

    from faceid_keras.backbones.layers import GroupedConv2D

    totals: dict[str, int] = {}

    def visit(layer) -> None:
        if isinstance(layer, keras.Model):
            for inner in layer.layers:
                visit(inner)
            return
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, GroupedConv2D)):
            _, in_h, in_w, cin = layer.input.shape
            _, out_h, out_w, cout = layer.output.shape
            kh, kw = layer.kernel_size if not isinstance(layer, GroupedConv2D) else (layer.kernel_size,) * 2
            groups = cin if isinstance(layer, keras.layers.DepthwiseConv2D) else layer.groups
            flops = 2 * out_h * out_w * kh * kw * cin * cout // groups
            kind = "depthwise" if groups == cin and groups > 1 else "conv"
        elif isinstance(layer, keras.layers.Dense):
            flops = 2 * int(layer.input.shape[-1]) * layer.units
            kind = "dense"
        else:
            return
        totals[kind] = totals.get(kind, 0) + int(flops)

    visit(model)
    return sum(totals.values()), totals


def configure(args: argparse.Namespace):
    """Sets the oneDNN environment, imports TensorFlow/Keras and sets the dtype policy."""
    if args.onednn != "default":
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = args.onednn
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(args.precision)
    return tf, keras


def matmul_rate(tf, size: int, dtype, min_seconds: float = 1.0) -> float:
    """GFLOP/s of a size x size x size tf.matmul in `dtype`, on the default device."""
    a = tf.random.uniform((size, size), dtype=tf.float32)
    b = tf.random.uniform((size, size), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(b, dtype)
    product = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.matmul(x, y)[:1, :1], tf.float32)))
    product(a, b).numpy()
    calls, start = 0, time.perf_counter()
    while True:
        result = product(a, b)
        calls += 1
        if calls % 4 == 0:
            result.numpy()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return 2.0 * size**3 * calls / elapsed / 1e9


def build_models(args: argparse.Namespace, keras) -> dict:
    """The ArcFaceModel and the softmax reference, each compiled with the same settings."""
    from faceid_keras import backbones
    from faceid_keras.model import ArcFaceModel

    shape = (args.image_size, args.image_size, 3)
    models = {}
    wanted = [m for m in args.models.split(",") if m]
    for name in ("arcface", *HEAD_VARIANTS):
        if name not in wanted:
            continue
        model = ArcFaceModel(args.backbone, num_classes=args.num_classes, embedding_size=args.embedding_size,
                             input_shape=shape, **HEAD_VARIANTS.get(name, {}))
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
            jit_compile=args.jit_compile,
            steps_per_execution=args.steps_per_execution,
        )
        models[name] = model
    if "softmax" in wanted:
        backbone = backbones.build(args.backbone, shape, args.embedding_size)
        images = keras.Input(shape, name="images")
        pixels = keras.layers.Rescaling(2.0 / 255.0, offset=-1.0, name="pixel_scaling")(images)
        logits = keras.layers.Dense(args.num_classes, dtype="float32", name="softmax_head")(backbone(pixels))
        softmax = keras.Model(images, logits, name="softmax_reference")
        softmax.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, weight_decay=5e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=args.jit_compile,
            steps_per_execution=args.steps_per_execution,
        )
        models["softmax"] = softmax
    return models


def synthetic_batches(args: argparse.Namespace, tf):
    """One random batch of uint8 pixel images and labels, repeated forever (optionally prefetched
    to GPU)."""
    generator = tf.random.Generator.from_seed(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    images = tf.cast(generator.uniform(shape, 0, 256, dtype=tf.int32), tf.uint8)
    labels = generator.uniform((args.batch_size,), 0, args.num_classes, dtype=tf.int32)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    gpus = tf.config.list_logical_devices("GPU")
    if args.prefetch_to_device and gpus:
        return dataset.apply(tf.data.experimental.prefetch_to_device(gpus[0].name, buffer_size=2))
    return dataset.prefetch(2)


def timed_fit(model, dataset, steps: int) -> float:
    """Seconds of one `fit` call of `steps` steps (metrics read back, so the work is finished)."""
    start = time.perf_counter()
    history = model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    float(history.history["loss"][-1])
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    """Builds both models, times alternating windows and returns the results as a dict."""
    tf, keras = configure(args)
    from tensorflow.python.util import _pywrap_util_port

    compute_dtype = keras.mixed_precision.global_policy().compute_dtype
    models = build_models(args, keras)
    dataset = synthetic_batches(args, tf)
    execution = args.steps_per_execution
    window = -(-args.steps // execution) * execution
    first_call = {name: timed_fit(model, dataset, execution) for name, model in models.items()}
    for model in models.values():
        timed_fit(model, dataset, execution)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            seconds[name].append(timed_fit(model, dataset, window))
    matmul = matmul_rate(tf, args.matmul_size, compute_dtype)
    results: dict = {
        "config": (
            f"precision={args.precision} jit_compile={args.jit_compile} "
            f"steps_per_execution={execution} onednn={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}"
            f"{' prefetch_to_device' if args.prefetch_to_device else ''}"
        ),
        "onednn_enabled": bool(_pywrap_util_port.IsMklEnabled()),
        "image_data_format": keras.config.image_data_format(),
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "cpu_count": os.cpu_count(),
        "window_steps": window,
        "matmul_gflops_per_s": matmul,
        "models": {},
    }
    for name, model in models.items():
        step = statistics.median(seconds[name]) / window
        backbone = model.layers[2] if name == "softmax" else model.backbone
        backbone_flops, kinds = forward_flops(backbone)
        head_flops = 2 * args.embedding_size * args.num_classes * HEAD_VARIANTS.get(name, {}).get("subcenters", 1)
        train_flops = 3 * (backbone_flops + head_flops)
        rate = args.batch_size / step
        results["models"][name] = {
            "images_per_s": rate,
            "window_images_per_s": [args.batch_size * window / s for s in seconds[name]],
            "step_s": step,
            "first_call_s": first_call[name],
            "first_step_overhead_s": first_call[name] - execution * step,
            "backbone_forward_flops": backbone_flops,
            "backbone_flops_by_kind": kinds,
            "head_forward_flops": head_flops,
            "train_flops_per_image": train_flops,
            "gflops_per_s": rate * train_flops / 1e9,
        }
    if "arcface" in results["models"] and "softmax" in results["models"]:
        results["arcface_overhead"] = (
            results["models"]["softmax"]["images_per_s"] / results["models"]["arcface"]["images_per_s"] - 1
        )
    if "arcface" in results["models"]:
        arcface_rate = results["models"]["arcface"]["images_per_s"]
        results["head_overhead"] = {name: arcface_rate / results["models"][name]["images_per_s"] - 1
                                    for name in HEAD_VARIANTS if name in results["models"]}
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def report(args: argparse.Namespace, results: dict) -> None:
    """The human-readable table of one configuration."""
    print(f"{args.backbone} {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{results['cpu_count']} cores, {results['config']}")
    print(f"oneDNN enabled: {results['onednn_enabled']}; image_data_format: {results['image_data_format']}; "
          f"devices: {', '.join(results['devices'])}")
    any_model = next(iter(results["models"].values()))
    kinds = ", ".join(f"{k} {v / 1e9:.3f}" for k, v in sorted(any_model["backbone_flops_by_kind"].items()))
    print(f"FLOPs per image: backbone forward {any_model['backbone_forward_flops'] / 1e9:.3f} G ({kinds}), "
          f"head forward {any_model['head_forward_flops'] / 1e9:.4f} G; "
          f"training = 3 x forward = {any_model['train_flops_per_image'] / 1e9:.3f} G")
    print(f"matmul {args.matmul_size}^3 ({args.precision}): {results['matmul_gflops_per_s']:.1f} GFLOP/s")
    print(f"{'model':<10}{'img/s':>10}{'step s':>9}{'GFLOP/s':>10}{'%matmul':>9}{'1st call s':>12}"
          f"{'compile s':>11}  windows img/s ({args.rounds} x {results['window_steps']} steps, alternating)")
    for name, r in results["models"].items():
        windows = " ".join(f"{w:.2f}" for w in r["window_images_per_s"])
        print(f"{name:<10}{r['images_per_s']:>10.2f}{r['step_s']:>9.3f}{r['gflops_per_s']:>10.1f}"
              f"{100 * r['gflops_per_s'] / results['matmul_gflops_per_s']:>8.1f}%{r['first_call_s']:>12.1f}"
              f"{r['first_step_overhead_s']:>11.1f}  {windows}")
    if "arcface_overhead" in results:
        print(f"arcface overhead over softmax: {100 * results['arcface_overhead']:+.1f}% (target <= +5%)")
    for name, overhead in results.get("head_overhead", {}).items():
        print(f"{name} step overhead over arcface (arcface img/s / {name} img/s - 1): {100 * overhead:+.1f}%")
    print(f"peak host memory (ru_maxrss): {results['peak_rss_mib']:.0f} MiB")


def main() -> None:
    args = build_parser().parse_args()
    check_args(args)
    if args.compare:
        compare(args)
        return
    results = run(args)
    report(args, results)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
