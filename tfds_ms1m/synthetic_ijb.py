"""A synthetic IJB-style folder (insightface's release layout) for tests and a try-out without the licensed data.

Each subject is one of the demo's synthetic faces (`tfds_ms1m.synthetic`), rendered at 112 x 112 so
that the ArcFace template's five points sit on it, then placed into a larger loose crop by a random
similarity transform (scale, rotation, shift); the landmarks written are the template's points under
that transform, so aligning a crop with them recovers the rendered face. Subjects own a few medias
(videos); each template draws its images from its subject's medias, so media ids recur across
templates. Pairs: every genuine template pair, and as many random impostor pairs. The NIST 1:N lists
put one gallery template of each subject in G1 (even subjects) or G2 (odd subjects); all other
templates are the mixed probes.

Command line: `python -m tfds_ms1m.synthetic_ijb DIR --subjects N`.
"""
from __future__ import annotations

import argparse
import itertools
import os

import numpy as np

from tfds_ms1m import synthetic

# insightface's ArcFace template for 112 x 112 crops (x, y).
_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
_FACE = 112


def _place(face: np.ndarray, matrix: np.ndarray, size: int, background: np.ndarray) -> np.ndarray:
    """The face warped by `matrix` (face -> crop pixels, [2, 3]) into a size x size crop (bilinear)."""
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    u = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    v = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    inside = (u >= 0) & (u <= _FACE - 1) & (v >= 0) & (v <= _FACE - 1)
    u0 = np.clip(np.floor(u).astype(int), 0, _FACE - 2)
    v0 = np.clip(np.floor(v).astype(int), 0, _FACE - 2)
    du, dv = (u - u0)[..., None], (v - v0)[..., None]
    pixels = face.astype(np.float64)
    top = pixels[v0, u0] * (1 - du) + pixels[v0, u0 + 1] * du
    bottom = pixels[v0 + 1, u0] * (1 - du) + pixels[v0 + 1, u0 + 1] * du
    crop = np.where(inside[..., None], top * (1 - dv) + bottom * dv, background)
    return np.clip(np.round(crop), 0, 255).astype(np.uint8)


def _loose_crop(identity, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(loose crop uint8 [size, size, 3], its five landmarks [5, 2])."""
    face = identity.render(_FACE, rng)
    scale = rng.uniform(0.8, 1.1) * size / (1.5 * _FACE)
    angle = rng.uniform(-0.3, 0.3)
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = size / 2 - linear @ np.array([_FACE / 2, _FACE / 2]) + rng.uniform(-0.05, 0.05, 2) * size
    matrix = np.hstack([linear, shift[:, None]])
    background = rng.uniform(0, 255, 3)
    return _place(face, matrix, size, background), _TEMPLATE @ linear.T + shift


def write_ijb(
    directory: str | os.PathLike,
    num_subjects: int,
    ijb_set: str = "IJBC",
    templates_per_subject: int = 3,
    medias_per_subject: int = 3,
    max_images_per_template: int = 3,
    crop_size: int = 160,
    seed: int = 0,
) -> str:
    """Writes DIR/loose_crop/*.jpg, the three 1:1 meta files and the NIST 1:N lists; returns DIR."""
    if num_subjects < 2 or templates_per_subject < 2:
        raise ValueError("need at least 2 subjects and 2 templates per subject (genuine and impostor pairs)")
    if medias_per_subject < 1 or max_images_per_template < 1:
        raise ValueError("need at least 1 media per subject and 1 image per template")
    prefix = ijb_set.lower()
    root = os.fspath(directory)
    os.makedirs(os.path.join(root, "loose_crop"), exist_ok=True)
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    identity_seed, image_seed, pair_seed = np.random.SeedSequence(seed).spawn(3)
    identities = [synthetic.Identity(np.random.default_rng(s)) for s in identity_seed.spawn(num_subjects)]
    rng = np.random.default_rng(image_seed)
    media_lines, landmark_lines, subject_templates = [], [], []
    template_id, image_id = 1, 1
    for subject, identity in enumerate(identities):
        medias = 1000 * (subject + 1) + np.arange(medias_per_subject)
        subject_templates.append([])
        for _ in range(templates_per_subject):
            for _ in range(int(rng.integers(1, max_images_per_template + 1))):
                name = f"{image_id}.jpg"
                crop, landmarks = _loose_crop(identity, rng, crop_size)
                with open(os.path.join(root, "loose_crop", name), "wb") as file:
                    file.write(synthetic.encode_jpeg(crop, 95))
                media_lines.append(f"{name} {template_id} {rng.choice(medias)}\n")
                points = " ".join(f"{value:.4f}" for value in landmarks.ravel())
                landmark_lines.append(f"{name} {points} {rng.uniform(0.6, 1.0):.6f}\n")
                image_id += 1
            subject_templates[-1].append(template_id)
            template_id += 1
    genuine = [p for templates in subject_templates for p in itertools.combinations(templates, 2)]
    pair_rng = np.random.default_rng(pair_seed)
    impostor = []
    while len(impostor) < len(genuine):
        a, b = pair_rng.choice(num_subjects, 2, replace=False)
        impostor.append((pair_rng.choice(subject_templates[a]), pair_rng.choice(subject_templates[b])))
    pairs = [(a, b, 1) for a, b in genuine] + [(a, b, 0) for a, b in impostor]
    pairs = [pairs[i] for i in pair_rng.permutation(len(pairs))]
    _write(os.path.join(root, "meta", f"{prefix}_face_tid_mid.txt"), media_lines)
    _write(os.path.join(root, "meta", f"{prefix}_name_5pts_score.txt"), landmark_lines)
    _write(os.path.join(root, "meta", f"{prefix}_template_pair_label.txt"), [f"{a} {b} {y}\n" for a, b, y in pairs])
    _write_identification_lists(root, prefix, subject_templates, media_lines)
    return root


def _write(path: str, lines: list[str]) -> None:
    with open(path, "w") as file:
        file.writelines(lines)


def _write_identification_lists(root: str, prefix: str, subject_templates: list[list[int]], media_lines) -> None:
    """NIST-style CSVs (one row per image: TEMPLATE_ID,SUBJECT_ID,FILENAME) for G1, G2 and the probes."""
    images: dict[int, list[str]] = {}
    for line in media_lines:
        name, template, _ = line.split()
        images.setdefault(int(template), []).append(name)
    rows: dict[str, list[str]] = {"gallery_G1": [], "gallery_G2": [], "probe_mixed": []}
    for subject, templates in enumerate(subject_templates):
        for index, template in enumerate(templates):
            kind = "probe_mixed" if index else ("gallery_G1" if subject % 2 == 0 else "gallery_G2")
            rows[kind] += [f"{template},{subject + 1},img/{name}\n" for name in images[template]]
    for kind, lines in rows.items():
        _write(os.path.join(root, "meta", f"{prefix}_1N_{kind}.csv"), ["TEMPLATE_ID,SUBJECT_ID,FILENAME\n"] + lines)


def main(argv=None) -> None:
    """Command line: write a synthetic IJB-style folder."""
    parser = argparse.ArgumentParser(prog="python -m tfds_ms1m.synthetic_ijb", description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="output folder (created if missing)")
    parser.add_argument("--subjects", type=int, default=20, help="number of subjects")
    parser.add_argument("--ijb_set", choices=("IJBC", "IJBB"), default="IJBC", help="file prefix ijbc_ or ijbb_")
    parser.add_argument("--templates_per_subject", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        root = write_ijb(args.directory, args.subjects, args.ijb_set, args.templates_per_subject, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote a synthetic {args.ijb_set} folder with {args.subjects} subjects to {root}")


if __name__ == "__main__":
    main()
