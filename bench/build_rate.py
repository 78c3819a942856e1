"""Build rate of `ms1m_arcface` against plain sequential reading of the same `.rec`.

Writes a synthetic insightface folder, then in the same run measures (1) a plain read of the whole
`train.rec`, (2) `tfds_ms1m.recordio.iter_images` over every image record, and (3) the tfds build of
the `train` config (the same work as `tfds build`, minus interpreter start-up), and prints images/s,
MB/s and the ratios. The `.rec` is in the page cache for all three, so the ratios show the CPU cost
the build adds on top of reading.

    python bench/build_rate.py --identities 100 --images 40 --image_size 112
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow_datasets as tfds  # noqa: E402

import tfds_ms1m  # noqa: E402,F401  (registers ms1m_arcface)
from tfds_ms1m import recordio, synthetic  # noqa: E402


def _rate(label: str, seconds: float, images: int, nbytes: int) -> float:
    print(f"{label:<34} {seconds:7.2f} s  {images / seconds:9.0f} img/s  {nbytes / seconds / 1e6:8.1f} MB/s")
    return seconds


def main() -> None:
    """Run the three measurements and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--images", type=int, default=40, help="images per identity")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--workdir", default=None, help="folder for the data (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        folder = os.path.join(work, "src")
        start = time.perf_counter()
        synthetic.write_dataset(folder, args.identities, args.images, image_size=args.image_size, targets=())
        n = args.identities * args.images
        rec = os.path.join(folder, "train.rec")
        size = os.path.getsize(rec)
        print(f"wrote {n} images ({size / 1e6:.1f} MB .rec) in {time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        with open(rec, "rb") as f:
            while f.read(8 << 20):
                pass
        plain = _rate("plain read of train.rec", time.perf_counter() - start, n, size)

        start = time.perf_counter()
        count = sum(1 for _ in recordio.iter_images(folder))
        assert count == n, (count, n)
        records = _rate("recordio.iter_images", time.perf_counter() - start, n, size)

        # Warm-up: the first build in a process pays TensorFlow's one-off start-up; keep it out.
        tiny = synthetic.write_dataset(os.path.join(work, "tiny"), 2, 1, image_size=8, targets=())
        tfds.builder("ms1m_arcface/train", data_dir=os.path.join(work, "warm")).download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(tiny)),
        )
        builder = tfds.builder("ms1m_arcface/train", data_dir=os.path.join(work, "tfds"))
        start = time.perf_counter()
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=folder),
        )
        build = _rate("tfds build (ms1m_arcface/train)", time.perf_counter() - start, n, size)

    print(f"build time / plain read time:          {build / plain:8.1f}x")
    print(f"build time / iter_images time:         {build / records:8.1f}x")
    print(f"iter_images time / plain read time:    {records / plain:8.1f}x")


if __name__ == "__main__":
    main()
