"""Regenerate `dummy_data/` (a few KB): `python -m tfds_ms1m.ms1m_arcface.dummy_data_generation`.

Three identities x two 8x8 images in train.rec/.idx with `property`, and two-pair lfw and cfp_fp
packs, all written with this package's own writers.
"""

import numpy as np
from etils import epath

from tfds_ms1m import binpack, synthetic

DUMMY_DATA = epath.Path(__file__).parent / "dummy_data"


def main() -> None:
    """Write the dummy insightface folder used by the builder test."""
    synthetic.write_dataset(DUMMY_DATA, 3, 2, image_size=8, targets=(), seed=0, jpeg_quality=50)
    rng = np.random.default_rng(0)
    identities = [synthetic.Identity(np.random.default_rng(i)) for i in range(2)]
    for target in ("lfw", "cfp_fp"):
        images = [synthetic.encode_jpeg(identities[i].render(8, rng), 50) for i in (0, 0, 0, 1)]
        binpack.write_bin(DUMMY_DATA / f"{target}.bin", images, [True, False])


if __name__ == "__main__":
    main()
