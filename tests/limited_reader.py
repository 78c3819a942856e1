"""Runs reader cases, or a hypothesis fuzz campaign, in this process under memory and CPU limits.

Started by tests/test_hostile_input.py as a subprocess, so that a reader that tries to allocate
without bound hits RLIMIT_AS (MemoryError, reported as a crash) and one that spins hits RLIMIT_CPU,
instead of taking the machine down. Every case must end in a clean error of ours or a result.

    python tests/limited_reader.py --cases CASES.json [--fuzz WORKDIR --examples 30 --models]

Output: one JSON object per line: {"id", "outcome": "ok" | "error" | "crash", "type", "message"}.
"""
import argparse
import json
import os
import resource
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Address space allowed beyond what the imports use, and CPU seconds for the whole run.
MEMORY_HEADROOM = 1 << 30
CPU_SECONDS = 900


def _limit(memory_headroom: int, cpu_seconds: int) -> None:
    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm_size + memory_headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))


def _clean_errors():
    from faceid_keras.model_file import ModelFileError
    from tfds_ms1m.binpack import BinPackError
    from tfds_ms1m.recordio import RecordIOError

    return (BinPackError, RecordIOError, ModelFileError, FileNotFoundError)


def _summary(result):
    import numpy as np

    if isinstance(result, tuple):
        return [_summary(r) for r in result]
    if isinstance(result, np.ndarray):
        return {"shape": list(result.shape), "dtype": str(result.dtype), "sum": int(result.sum())}
    if isinstance(result, list):
        return {"len": len(result), "bytes": sum(len(x) for x in result if isinstance(x, bytes)),
                "distinct": len({id(x) for x in result})}
    return repr(result)[:200]


def read(reader: str, path: str, **kwargs):
    """Run one reader on `path` and return its result."""
    if reader == "read_bin":
        from tfds_ms1m import binpack

        images, issame = binpack.read_bin(path)
        assert all(isinstance(x, bytes) for x in images) and issame.dtype == bool
        assert len(images) == 2 * len(issame)
        return images, issame
    if reader == "load_bin":
        from faceid_keras import packs

        images, issame = packs.load_bin(path, **kwargs)
        assert images.dtype == "uint8" and images.ndim == 4 and len(images) == 2 * len(issame)
        return images, issame
    if reader == "iter_images":
        from tfds_ms1m import insightface_folder

        records = list(insightface_folder.iter_images(path))
        assert all(isinstance(k, int) and isinstance(c, int) and isinstance(b, bytes) for k, c, b in records)
        return [b for _, _, b in records]
    if reader == "read_property":
        from tfds_ms1m import insightface_folder

        return insightface_folder.read_property(path)
    if reader == "check_train_folder":
        from tfds_ms1m.ms1m_arcface import ms1m_arcface_dataset_builder as builder

        return builder.check_train_folder(path)
    if reader == "load_model":
        from faceid_keras import model_file

        return model_file.load_model(path)
    raise ValueError(f"unknown reader {reader}")


def run_case(case: dict, errors) -> dict:
    """Run one case; 'error' only for our error types, 'crash' for anything else."""
    outcome = {"id": case["id"]}
    started = time.process_time()
    try:
        result = read(case["reader"], case["path"], **case.get("kwargs", {}))
        outcome.update(outcome="ok", result=_summary(result))
    except errors as err:
        outcome.update(outcome="error", type=type(err).__name__, message=str(err)[:1000])
    except BaseException as err:  # the point: report anything unclean instead of dying
        outcome.update(outcome="crash", type=type(err).__name__, message=str(err)[:300],
                       traceback=traceback.format_exc()[-3000:])
    outcome["cpu_seconds"] = round(time.process_time() - started, 2)
    return outcome


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", help="JSON list of {id, reader, path, kwargs} to run")
    parser.add_argument("--fuzz", metavar="WORKDIR", help="run the hypothesis properties here")
    parser.add_argument("--examples", type=int, default=30, help="examples per property")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: derandomized)")
    parser.add_argument("--models", action="store_true", help="fuzz the .keras reader too")
    args = parser.parse_args(argv)
    started = time.process_time()
    errors = _clean_errors()
    cases = []
    if args.cases:
        with open(args.cases) as f:
            cases = json.load(f)
    fuzz = None
    if args.fuzz:
        import fuzz_readers

        fuzz = fuzz_readers.Campaign(args.fuzz, args.models, errors)
    if args.models or any(c["reader"] == "load_model" for c in cases):
        import keras  # noqa: F401  (imported before the limit: its address space is not the reader's)
    _limit(MEMORY_HEADROOM, CPU_SECONDS)
    print(json.dumps({"id": "imports", "cpu_seconds": round(time.process_time() - started, 2)}))
    for case in cases:
        print(json.dumps(run_case(case, errors)), flush=True)
    if fuzz is not None:
        fuzz.run(args.examples, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
