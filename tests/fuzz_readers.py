"""Property-based fuzzing of the RecordIO, `.bin` and model readers (run by limited_reader.py).

Each property takes a valid file, applies a few hypothesis-chosen mutations (bit flips,
truncation, insertion, a 32/64-bit field overwritten with an extreme value such as 2**63 - 1 or
the bits of +-inf/NaN) and reads it: the reader must return a well-formed result or raise one of
our errors. Generated `.bin` pack structures in pickle protocols 0-5 must load exactly when they
are valid packs and be refused with BinPackError otherwise.
"""
import pickle
import shutil
import struct
import time

import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tfds_ms1m import binpack, insightface_folder, synthetic

_EXTREMES = [0, 1, 2, 255, 2**29 - 1, 2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1,
             0x7F800000, 0xFF800000, 0x7FC00000]
_MUTATION = st.tuples(
    st.sampled_from(["flip", "truncate", "insert", "u32", "u64"]),
    st.integers(0, 2**31),
    st.binary(min_size=1, max_size=8),
    st.sampled_from(_EXTREMES),
)
MUTATIONS = st.lists(_MUTATION, min_size=1, max_size=4)


def mutate(data: bytes, mutations) -> bytes:
    """Apply (kind, position, payload, extreme) mutations to `data`."""
    data = bytearray(data)
    for kind, position, payload, extreme in mutations:
        at = position % max(len(data), 1)
        if kind == "flip" and data:
            data[at] ^= payload[0] or 1
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = payload
        elif kind == "u32":
            data[at : at + 4] = struct.pack("<I", extreme & 0xFFFFFFFF)
        elif kind == "u64":
            data[at : at + 8] = struct.pack("<Q", extreme)
    return bytes(data)


def _item(draw_kind: str, value: bytes):
    if draw_kind == "array":
        return np.frombuffer(value, np.uint8)
    return value


_IMAGE = st.tuples(st.sampled_from(["bytes", "array"]), st.binary(max_size=40))
_JUNK = st.one_of(st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=5), st.none(),
                  st.lists(st.booleans(), max_size=2),
                  st.builds(lambda n: np.zeros(n, np.float32), st.integers(0, 3)))


@st.composite
def packs(draw):
    """(object to pickle, protocol, expected (images, flags) or None when the pack is invalid)."""
    pairs = draw(st.integers(0, 4))
    images = [_item(*draw(_IMAGE)) for _ in range(2 * pairs + draw(st.sampled_from([0, 0, 0, 1, -1])))]
    if draw(st.booleans()) and len(images) > 1:
        images[1] = images[0]  # a shared reference
    issame = draw(st.lists(st.booleans(), min_size=pairs, max_size=pairs))
    valid = len(images) == 2 * pairs
    form = draw(st.sampled_from(["list", "tuple", "bool_array", "int_array", "junk_flag", "junk_image"]))
    if form == "tuple":
        issame = tuple(issame)
    elif form == "bool_array":
        issame = np.array(issame, dtype=bool)
    elif form == "int_array":
        issame = np.array(issame, dtype=np.int64)
    elif form == "junk_flag" and issame:
        issame[-1] = draw(_JUNK)
        valid = valid and type(issame[-1]) in (bool, int) and issame[-1] in (0, 1)
    elif form == "junk_image" and images:
        images[-1] = draw(_JUNK)
        valid = False
    expected = ([bytes(x) for x in images], [bool(f) for f in issame]) if valid else None
    return (images, issame), draw(st.integers(0, 5)), expected


def _seed_files(workdir):
    """A tiny insightface folder and a valid `.bin` pack to mutate."""
    folder = synthetic.write_dataset(workdir / "src", 3, 2, image_size=8, pairs_per_target=20,
                                     targets=("lfw",), seed=5)
    return folder


def _tiny_model(path):
    import keras

    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(path)
    return path.read_bytes()


class Campaign:
    """The files to mutate (made before the memory limit is set) and the properties to run."""

    def __init__(self, workdir, models: bool, errors) -> None:
        from pathlib import Path

        self.workdir = Path(workdir)
        self.folder = _seed_files(self.workdir)
        self.model = _tiny_model(self.workdir / "model.keras") if models else None
        self.errors = errors

    def run(self, examples: int, fixed_seed=None) -> None:
        """Run every property with `examples` examples each; derandomized unless a seed is given."""
        from tfds_ms1m.ms1m_arcface import ms1m_arcface_dataset_builder as builder

        workdir, folder, model, errors = self.workdir, self.folder, self.model, self.errors
        config = settings(max_examples=examples, derandomize=fixed_seed is None, database=None,
                          deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
        case_dir = workdir / "case"

        @config
        @given(st.sampled_from(["train.rec", "train.idx", "property"]), MUTATIONS)
        def recordio_readers(name, mutations):
            shutil.rmtree(case_dir, ignore_errors=True)
            shutil.copytree(folder, case_dir)
            (case_dir / name).write_bytes(mutate((folder / name).read_bytes(), mutations))
            try:
                records = list(insightface_folder.iter_images(case_dir))
                assert all(isinstance(c, int) and isinstance(b, bytes) for _, c, b in records)
            except errors:
                pass
            try:
                num_classes = builder.check_train_folder(case_dir)
                assert 0 < num_classes <= insightface_folder.MAX_CLASSES
            except errors:
                pass

        @config
        @given(packs(), MUTATIONS, st.booleans())
        def bin_reader(pack, mutations, mutated):
            obj, protocol, expected = pack
            data = pickle.dumps(obj, protocol=protocol)
            path = workdir / "case.bin"
            path.write_bytes(mutate(data, mutations) if mutated else data)
            try:
                images, issame = binpack.read_bin(path)
            except binpack.BinPackError:
                assert mutated or expected is None, f"valid protocol-{protocol} pack refused"
                return
            assert len(images) == 2 * len(issame) and issame.dtype == bool
            if not mutated:
                assert expected is not None, "invalid pack accepted"
                assert (images, issame.tolist()) == expected

        @config
        @given(MUTATIONS)
        def model_reader(mutations):
            from faceid_keras.model_file import ModelFileError, load_model

            path = workdir / "case.keras"
            path.write_bytes(mutate(model, mutations))
            try:
                load_model(path)
            except ModelFileError:
                pass

        properties = [recordio_readers, bin_reader] + ([model_reader] if model is not None else [])
        for prop in properties:
            if fixed_seed is not None:
                prop = seed(fixed_seed)(prop)
            started = time.perf_counter()
            prop()
            elapsed = time.perf_counter() - started
            print(f'{{"id": "{prop.__name__}", "outcome": "ok", "examples": {examples}, '
                  f'"seconds": {elapsed:.1f}}}', flush=True)

