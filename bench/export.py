"""Times each export beside Keras `predict` on the same images, and each one's accuracy on a synthetic pack.

Exports one embedding model with `faceid_keras.export` to a SavedModel, ONNX (NHWC) and TFLite
(none, float16, dynamic_int8), then measures latency at batch 1 (median of --repeats calls) and
throughput at batch 64 of Keras `predict`, the SavedModel's serving_default, onnxruntime and the
LiteRT interpreter, printing each as a ratio to Keras, with the verification accuracy of every
runtime on a synthetic lfw pack (a briefly trained model, so accuracy is above chance).

    python bench/export.py --backbone iresnet18 --image_size 64
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def _timed(run, images, repeats):
    """Median seconds of `repeats` calls after one warm-up call."""
    run(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="iresnet18")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--embedding_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2, help="training epochs on the synthetic faces")
    args = parser.parse_args()

    from faceid_keras import cli, export, exporters, parity, prepare, train, training
    from tfds_ms1m import synthetic

    work = tempfile.mkdtemp(prefix="bench-export-")
    folder = os.path.join(work, "faces")
    synthetic.write_dataset(folder, 16, 8, image_size=args.image_size, pairs_per_target=200,
                            targets=("lfw",), seed=0)
    data_dir = os.path.join(work, "tfds")
    prepare.prepare_tfds(folder, data_dir)
    result = training.train(train.config_from_args(cli.build_parser().parse_args([
        "train", "--data_path", data_dir, "--model_dir", os.path.join(work, "model"), "--backbone", args.backbone,
        "--embedding_size", str(args.embedding_size), "--train_epochs", str(args.epochs), "--batch_size", "32",
        "--lr", "0.1", "--warmup_epochs", "1", "--targets", "lfw",
    ])))
    model_path = result.embedding_path

    import keras

    model = keras.models.load_model(model_path)
    runtimes = {"keras predict": lambda x: model.predict(x, batch_size=64, verbose=0)}
    accuracy = {}
    for name, fmt, quantize, load in (
        ("saved_model", "saved_model", "none", exporters.load_saved_model),
        ("onnxruntime", "onnx", "none", lambda p: exporters.load_onnx(p, "nhwc")),
        ("litert", "tflite", "none", exporters.load_tflite),
        ("litert float16", "tflite", "float16", exporters.load_tflite),
        ("litert dynamic_int8", "tflite", "dynamic_int8", exporters.load_tflite),
    ):
        path = os.path.join(work, name.replace(" ", "_") + {"onnx": ".onnx", "tflite": ".tflite"}.get(fmt, ""))
        report = export.export(model_path, fmt, path, quantize=quantize, data_path=folder, targets=["lfw"])
        accuracy[name] = report["targets"]["lfw"]["export"]
        accuracy["keras predict"] = report["targets"]["lfw"]["keras"]
        runtimes[name] = load(path)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, args.image_size, args.image_size, 3)).astype(np.float32)
    rows = []
    for name, run in runtimes.items():
        parity.normalised_embeddings(run, images)  # warm-up at both batch sizes
        latency = _timed(run, images[:1], args.repeats)
        throughput = 64 / _timed(run, images, max(3, args.repeats // 4))
        rows.append((name, latency, throughput))
    keras_latency, keras_throughput = rows[0][1], rows[0][2]
    print(f"\n{args.backbone} {args.image_size}x{args.image_size}, embedding {args.embedding_size}")
    print(f"{'runtime':<22}{'batch-1 ms':>11}{'x Keras':>9}{'batch-64 img/s':>16}{'x Keras':>9}{'lfw acc':>9}")
    for name, latency, throughput in rows:
        print(f"{name:<22}{latency * 1e3:>11.2f}{keras_latency / latency:>9.2f}{throughput:>16.1f}"
              f"{throughput / keras_throughput:>9.2f}{accuracy[name]:>9.4f}")


if __name__ == "__main__":
    main()
