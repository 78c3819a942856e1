"""Build rate of `ms1m_arcface` against plain sequential reading of the same `.rec`.

Writes a synthetic insightface folder, then in the same run measures, best of `--rounds`: (1) a
plain sequential read of the whole `train.rec` (8 MB reads), (2) `insightface_folder.iter_images`
over every image record (our reader, the same block reads the builder uses), (3) the tfds build of
the `train` config in this process (what `tfds build` does, minus interpreter start-up; wall and
CPU time), and once (4) the same build as a Beam pipeline on `--beam_workers` local worker
processes. It prints images/s, MB/s and each rate as a fraction of the plain read, then the share
of each step of one single-process build under cProfile (which slows Python-heavy code most, so
shares are approximate), so the step that bounds the build is visible. The `.rec` is in the page
cache throughout, so the ratios show the CPU cost each stage adds on top of reading. Timings on a
shared machine are noisy: the CPU column is steadier than wall time.

    python bench/build_rate.py --identities 100 --images 150 --image_size 112
"""

import argparse
import cProfile
import os
import pstats
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow_datasets as tfds  # noqa: E402

import tfds_ms1m  # noqa: E402,F401  (registers ms1m_arcface)
from tfds_ms1m import insightface_folder, synthetic  # noqa: E402


def _best(fn, rounds: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of `rounds` calls of `fn`."""
    best = (float("inf"), float("inf"))
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def _build(folder: str, data_dir: str, beam_options=None) -> None:
    builder = tfds.builder("ms1m_arcface/train", data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=folder, beam_options=beam_options)
    )


# Steps of the single-process build, as (file name, function) in tfds 4.9 and in our builder.
_STEPS = [
    ("our records: read + check (builder)", "ms1m_arcface_dataset_builder.py", "_generate_train"),
    ("FeaturesDict.encode_example", "features_dict.py", "encode_example"),
    ("ExampleSerializer.serialize_example", "example_serializer.py", "serialize_example"),
    ("Shuffler.add (hash key, buffer)", "shuffle.py", "add"),
    ("Writer.finalize (sort, write shards)", "writer.py", "finalize"),
]


def _profile_build(folder: str, data_dir: str) -> tuple[float, list[tuple[str, float]]]:
    """Build once under cProfile: (total seconds, [(step, share of the total)]) for `_STEPS`."""
    profile = cProfile.Profile()
    profile.runcall(_build, folder, data_dir)
    stats = pstats.Stats(profile).stats
    total = max(cumulative for _, _, _, cumulative, _ in stats.values())
    shares = []
    for name, file_name, function in _STEPS:
        # The outermost match: shuffle.py also has a nested `add` (its on-disk buckets).
        cumulative = max(
            (entry[3] for (path, _, func), entry in stats.items()
             if func == function and os.path.basename(path) == file_name),
            default=0.0,
        )
        shares.append((name, cumulative / total))
    return total, shares


def main() -> None:
    """Run the measurements and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--images", type=int, default=150, help="images per identity")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--rounds", type=int, default=3, help="repeats of each timing; best is kept")
    parser.add_argument("--beam_workers", type=int, default=2, help="0 skips the Beam build")
    parser.add_argument("--workdir", default=None, help="folder for the data (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        folder = os.path.join(work, "src")
        start = time.perf_counter()
        synthetic.write_dataset(folder, args.identities, args.images, image_size=args.image_size, targets=())
        n = args.identities * args.images
        rec = os.path.join(folder, "train.rec")
        size = os.path.getsize(rec)
        print(f"wrote {n} images ({size / 1e6:.1f} MB .rec, {size / n:.0f} B/image) in "
              f"{time.perf_counter() - start:.1f} s; best of {args.rounds} rounds")

        def plain_read() -> None:
            with open(rec, "rb") as f:
                while f.read(8 << 20):
                    pass

        def reader() -> None:
            count = sum(1 for _ in insightface_folder.iter_images(folder))
            assert count == n, (count, n)

        builds = iter(range(args.rounds))
        # Warm-up: the first build in a process pays TensorFlow's one-off start-up; keep it out.
        tiny = os.fspath(synthetic.write_dataset(os.path.join(work, "tiny"), 2, 1, image_size=8, targets=()))
        _build(tiny, os.path.join(work, "warm"))
        rows = [
            ("plain sequential read of train.rec", _best(plain_read, args.rounds)),
            ("iter_images (our reader)", _best(reader, args.rounds)),
            ("tfds build, 1 process", _best(
                lambda: _build(folder, os.path.join(work, f"build{next(builds)}")), args.rounds)),
        ]
        if args.beam_workers:
            import apache_beam as beam

            options = beam.options.pipeline_options.PipelineOptions([
                "--runner=FnApiRunner", f"--direct_num_workers={args.beam_workers}",
                "--direct_running_mode=multi_processing",
            ])
            start = time.perf_counter()
            _build(folder, os.path.join(work, "beam"), options)
            rows.append((f"tfds build, Beam {args.beam_workers} workers (once)",
                         (time.perf_counter() - start, float("nan"))))

        read_wall = rows[0][1][0]
        print(f"\n{'':<40} {'wall s':>7} {'CPU s':>7} {'img/s':>9} {'MB/s':>8} {'/ read rate':>11}")
        for name, (wall, cpu) in rows:
            print(f"{name:<40} {wall:7.2f} {cpu:7.2f} {n / wall:9.0f} {size / wall / 1e6:8.1f} "
                  f"{read_wall / wall:11.3f}")
        reader_wall, build_wall = rows[1][1][0], rows[2][1][0]
        build_cpu = rows[2][1][1]
        print(f"\nbuild (1 process) time / plain read time:  {build_wall / read_wall:8.1f}x")
        print(f"build (1 process) time / our reader time:  {build_wall / reader_wall:8.1f}x")
        print(f"our reader time / plain read time:         {reader_wall / read_wall:8.1f}x")
        if args.beam_workers:
            print(f"Beam build time / 1-process build time:    {rows[3][1][0] / build_wall:8.1f}x")

        total, shares = _profile_build(folder, os.path.join(work, "profiled"))
        print(f"\nshare of each step in one 1-process build under cProfile ({total:.2f} s profiled; "
              f"us/image = share x the unprofiled {build_cpu / n * 1e6:.1f} CPU us/image):")
        for name, share in shares:
            print(f"  {name:<40} {share:6.0%} {share * build_cpu / n * 1e6:7.1f} us")
        rest = 1 - sum(share for _, share in shares)
        print(f"  {'rest (progress bars, loop, set-up, info)':<40} {rest:6.0%} {rest * build_cpu / n * 1e6:7.1f} us")

if __name__ == "__main__":
    main()
