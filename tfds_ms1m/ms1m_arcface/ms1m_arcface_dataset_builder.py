"""tensorflow-datasets builder `ms1m_arcface` for insightface-format face folders (MS1MV2, MS1MV3, ...).

Config `train` (default): one example per image record of `train.rec`, the JPEG bytes stored as
they are (no re-encoding) and the class id; examples are keyed by their record key. The class count
comes from the folder's `property` file and is saved with the built dataset (as the label names
file), so loading a built dataset never needs the source folder.
Config `verification`: one split per `.bin` pack present, pairs in pack order.

Images are checked cheaply before they are written: a JPEG must start with the SOI marker (FF D8)
and end with EOI (FF D9, trailing zero padding allowed); that catches truncated and mislabelled
records without decoding. Verification packs may also hold PNG (signature and IEND chunk checked).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tfds_ms1m import binpack, recordio

_DESCRIPTION = """\
MS1M-ArcFace (insightface's `faces_emore`, a cleaned MS-Celeb-1M: 5.8M aligned 112x112 face
crops of 85,742 identities) and its successor MS1MV3 (5.2M images, 93,431 identities), read from
insightface's RecordIO release. Any insightface-format folder (train.rec, train.idx, property)
works; the class count comes from `property`. The `verification` config holds the 1:1 verification
packs shipped alongside (lfw, cfp_fp, agedb_30, calfw, cplfw, cfp_ff, vgg2_fp) as image pairs.
"""

_CITATION = """\
@inproceedings{deng2019arcface,
  title={ArcFace: Additive Angular Margin Loss for Deep Face Recognition},
  author={Deng, Jiankang and Guo, Jia and Xue, Niannan and Zafeiriou, Stefanos},
  booktitle={CVPR},
  year={2019}
}
"""

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"


def check_image(data: bytes, where: str, allow_png: bool = False) -> None:
    """Raise ValueError naming `where` unless `data` looks like a complete JPEG (or PNG if allowed)."""
    if data.startswith(_JPEG_SOI):
        if not data.rstrip(b"\0").endswith(_JPEG_EOI):
            raise ValueError(
                f"{where}: corrupt JPEG ({len(data)} bytes): no end-of-image marker FF D9, "
                "the image is truncated or damaged"
            )
        return
    if allow_png and data.startswith(_PNG_SIGNATURE):
        if not data.rstrip(b"\0").endswith(_PNG_IEND):
            raise ValueError(f"{where}: corrupt PNG ({len(data)} bytes): no IEND chunk at the end")
        return
    expected = "JPEG or PNG" if allow_png else "JPEG"
    raise ValueError(
        f"{where}: not a {expected} image ({len(data)} bytes, starts with {data[:4].hex(' ')}); "
        "a JPEG starts with FF D8"
    )


class Builder(tfds.core.GeneratorBasedBuilder):
    """MS1M-ArcFace style face recognition data from an insightface RecordIO folder."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: train images and verification pairs."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="train", description="Training images (JPEG bytes as released) with class labels."
        ),
        tfds.core.BuilderConfig(
            name="verification",
            description="Verification pairs (image1, image2, is_same), one split per .bin pack present.",
        ),
    ]
    DEFAULT_CONFIG_NAME = "train"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download an insightface RecordIO training set from insightface's dataset zoo
(https://github.com/deepinsight/insightface/tree/master/recognition/_datasets_):
MS1M-ArcFace (also called MS1MV2 or `faces_emore`, ~12 GB) or MS1MV3 (`ms1m-retinaface-t1`).
Unzip it and pass the folder that holds `train.rec`, `train.idx` and `property` (and the
verification packs lfw.bin, cfp_fp.bin, agedb_30.bin, ...) as the manual dir:

    tfds build ms1m_arcface --imports tfds_ms1m --manual_dir ~/faces_emore
    tfds build ms1m_arcface/verification --imports tfds_ms1m --manual_dir ~/faces_emore
"""

    def _info(self) -> tfds.core.DatasetInfo:
        if self.builder_config.name == "train":
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    # The class count is set from `property` when building and restored from the
                    # built dataset's label file when loading.
                    "label": tfds.features.ClassLabel(),
                }
            )
            supervised_keys = ("image", "label")
        else:
            features = tfds.features.FeaturesDict(
                {
                    "image1": tfds.features.Image(shape=(None, None, 3)),
                    "image2": tfds.features.Image(shape=(None, None, 3)),
                    "is_same": np.bool_,
                }
            )
            supervised_keys = None
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=features,
            supervised_keys=supervised_keys,
            homepage="https://github.com/deepinsight/insightface/tree/master/recognition/_datasets_",
            citation=_CITATION,
            disable_shuffling=self.builder_config.name == "verification",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        folder = epath.Path(dl_manager.manual_dir)
        if self.builder_config.name == "train":
            for name in ("train.rec", "train.idx", "property"):
                if not (folder / name).exists():
                    raise FileNotFoundError(
                        f"{folder / name}: missing; the manual dir must be an insightface folder "
                        "with train.rec, train.idx and property"
                    )
            num_classes, _, _ = recordio.read_property(folder / "property")
            label = self.info.features["label"]
            if label.num_classes != num_classes:
                label.names = [str(i) for i in range(num_classes)]
            return {"train": self._generate_examples(folder=folder, num_classes=num_classes)}
        targets = [t for t in binpack.VERIFICATION_TARGETS if (folder / f"{t}.bin").exists()]
        if not targets:
            raise FileNotFoundError(
                f"{folder}: no verification pack found; expected one of "
                + ", ".join(f"{t}.bin" for t in binpack.VERIFICATION_TARGETS)
            )
        return {t: self._generate_examples(folder=folder, target=t) for t in targets}

    def _generate_examples(self, folder: epath.Path, num_classes: int = 0, target: str | None = None):
        """Yield train examples (one record at a time) or the pairs of one verification pack."""
        if target is not None:
            yield from self._generate_pairs(folder / f"{target}.bin")
            return
        rec = folder / "train.rec"
        for key, label, image in recordio.iter_images(folder):
            where = f"{rec}: record key {key}"
            if not 0 <= label < num_classes:
                raise ValueError(
                    f"{where}: label {label} outside [0, {num_classes}) given by {folder / 'property'}"
                )
            check_image(image, where)
            yield key, {"image": image, "label": label}

    def _generate_pairs(self, path: epath.Path):
        images, issame = binpack.read_bin(path)
        for i, same in enumerate(issame):
            first, second = images[2 * i], images[2 * i + 1]
            check_image(first, f"{path}: pair {i}, image {2 * i}", allow_png=True)
            check_image(second, f"{path}: pair {i}, image {2 * i + 1}", allow_png=True)
            yield i, {"image1": first, "image2": second, "is_same": bool(same)}
