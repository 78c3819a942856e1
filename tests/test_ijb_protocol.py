"""IJB layout reader and 1:N lists: parsed values, and errors naming the file and line; the synthetic folder."""
import os
import shutil

import numpy as np
import pytest

from faceid_keras import alignment, ijb_identification
from faceid_keras.ijb_protocol import IJBLayoutError, read_protocol
from tfds_ms1m import synthetic, synthetic_ijb


@pytest.fixture(scope="module")
def ijb_folder(tmp_path_factory):
    return synthetic_ijb.write_ijb(tmp_path_factory.mktemp("ijb"), 6, crop_size=128, seed=3)


@pytest.fixture
def folder(ijb_folder, tmp_path):
    copy = tmp_path / "ijb"
    shutil.copytree(os.path.join(ijb_folder, "meta"), copy / "meta")
    return copy


def _edit(path, line, text):
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = text
    path.write_text("".join(lines))


def test_reads_rows_paired_by_position(ijb_folder):
    protocol = read_protocol(ijb_folder, "IJBC")
    meta = os.path.join(ijb_folder, "meta")
    media_rows = [line.split() for line in open(os.path.join(meta, "ijbc_face_tid_mid.txt"))]
    landmark_rows = [line.split() for line in open(os.path.join(meta, "ijbc_name_5pts_score.txt"))]
    pair_rows = np.loadtxt(os.path.join(meta, "ijbc_template_pair_label.txt"), dtype=np.int64)
    assert list(protocol.image_names) == [row[0] for row in media_rows]
    np.testing.assert_array_equal(protocol.templates, [int(row[1]) for row in media_rows])
    np.testing.assert_array_equal(protocol.medias, [int(row[2]) for row in media_rows])
    assert protocol.landmarks.dtype == np.float32 and protocol.detector_scores.dtype == np.float32
    expected = np.array([[float(x) for x in row[1:11]] for row in landmark_rows], np.float32).reshape(-1, 5, 2)
    np.testing.assert_array_equal(protocol.landmarks, expected)
    np.testing.assert_array_equal(protocol.detector_scores, np.array([float(r[11]) for r in landmark_rows], np.float32))
    np.testing.assert_array_equal(np.stack([protocol.template1, protocol.template2, protocol.labels], 1), pair_rows)
    assert set(protocol.labels) == {0, 1}


def test_synthetic_landmarks_align_onto_the_rendered_face():
    identity = synthetic.Identity(np.random.default_rng(0))
    face = identity.render(112, np.random.default_rng(7)).astype(float)
    crop, landmarks = synthetic_ijb._loose_crop(identity, np.random.default_rng(7), 160)
    aligned = alignment.align_face(crop, landmarks).astype(float)
    assert np.abs(aligned - face).mean() < 8 < 20 < np.abs(aligned - face[:, ::-1]).mean()


def test_missing_file_is_named(folder):
    os.remove(folder / "meta" / "ijbc_name_5pts_score.txt")
    with pytest.raises(FileNotFoundError, match=r"ijbc_name_5pts_score\.txt does not exist"):
        read_protocol(folder, "IJBC")
    with pytest.raises(FileNotFoundError, match=r"ijbb_face_tid_mid\.txt does not exist"):
        read_protocol(folder, "IJBB")


@pytest.mark.parametrize(
    "name, line, text, message",
    [
        ("ijbc_face_tid_mid.txt", 3, "3.jpg 2\n", r"ijbc_face_tid_mid\.txt, line 3: expected 3 fields, found 2"),
        ("ijbc_face_tid_mid.txt", 4, "4.jpg x 7\n", r"ijbc_face_tid_mid\.txt, line 4: template and media ids must be integers"),
        ("ijbc_face_tid_mid.txt", 2, "\n", r"ijbc_face_tid_mid\.txt, line 2: expected 3 fields, found 0"),
        ("ijbc_name_5pts_score.txt", 5, "5.jpg 1 2 3 4 5 6 7 8 9 nan 0.9\n", r"ijbc_name_5pts_score\.txt, line 5: landmarks must be finite"),
        ("ijbc_name_5pts_score.txt", 2, "2.jpg 1 2 3 4 5 6 7 8 9 10 high\n", r"ijbc_name_5pts_score\.txt, line 2: the detector score"),
        ("ijbc_name_5pts_score.txt", 6, "other.jpg 1 2 3 4 5 6 7 8 9 10 1\n", r"ijbc_name_5pts_score\.txt, line 6: image 'other\.jpg' differs from '6\.jpg' on line 6 of .*ijbc_face_tid_mid\.txt"),
        ("ijbc_template_pair_label.txt", 7, "1 999 1\n", r"ijbc_template_pair_label\.txt, line 7: template 999 has no images in .*ijbc_face_tid_mid\.txt"),
        ("ijbc_template_pair_label.txt", 3, "1 2 2\n", r"ijbc_template_pair_label\.txt, line 3: label must be 0 or 1, got 2"),
        ("ijbc_template_pair_label.txt", 4, "1 2\n", r"ijbc_template_pair_label\.txt, line 4: expected 3 fields, found 2"),
        ("ijbc_template_pair_label.txt", 5, "1 2.5 1\n", r"ijbc_template_pair_label\.txt, line 5: template ids and labels must be integers"),
        ("ijbc_template_pair_label.txt", 2, " \n", r"ijbc_template_pair_label\.txt, line 2: expected 3 fields, found 0"),
    ],
)
def test_malformed_line_is_named(folder, name, line, text, message):
    _edit(folder / "meta" / name, line, text)
    with pytest.raises(IJBLayoutError, match=message):
        read_protocol(folder, "IJBC")


def test_trailing_blank_lines_are_fine_but_row_counts_must_agree(folder):
    path = folder / "meta" / "ijbc_template_pair_label.txt"
    path.write_text(path.read_text() + "\n\n")
    read_protocol(folder, "IJBC")
    landmarks = folder / "meta" / "ijbc_name_5pts_score.txt"
    landmarks.write_text("".join(landmarks.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(IJBLayoutError, match=r"ijbc_name_5pts_score\.txt has \d+ images but .*ijbc_face_tid_mid\.txt has"):
        read_protocol(folder, "IJBC")


def test_identification_list_errors(folder):
    path = folder / "meta" / "ijbc_1N_probe_mixed.csv"
    original = path.read_text()
    template = original.splitlines()[1].split(",")[0]
    _edit(path, 3, f"{template},77,img/x.jpg\n")
    with pytest.raises(IJBLayoutError, match=rf"probe_mixed\.csv, line 3: template {template} has subject 77, but subject \d+ on line 2"):
        ijb_identification.read_template_subjects(str(path))
    _edit(path, 1, "TEMPLATE,SUBJECT\n")
    with pytest.raises(IJBLayoutError, match=r"probe_mixed\.csv, line 1: the header must name TEMPLATE_ID"):
        ijb_identification.read_template_subjects(str(path))
    path.write_text(original)
    _edit(folder / "meta" / "ijbc_1N_gallery_G1.csv", 2, "424242,1,img/1.jpg\n")
    template_ids = np.unique(read_protocol(folder, "IJBC").templates)
    with pytest.raises(IJBLayoutError, match=r"gallery_G1\.csv, line 2: template 424242 has no images"):
        ijb_identification.identification(folder, "IJBC", template_ids, np.zeros((len(template_ids), 4)))


def loop_search(gallery, gallery_subjects, probes, probe_subjects, fpirs, ranks):
    """Open-set identification one probe at a time, as the module docstring defines it."""
    mate_ranks, mate_scores, nonmate = [], [], []
    for feature, subject in zip(probes, probe_subjects):
        scores = [float(feature @ g) for g in gallery]
        if subject in list(gallery_subjects):
            own = scores[list(gallery_subjects).index(subject)]
            mate_ranks.append(1 + sum(s > own for s in scores))
            mate_scores.append(own)
        else:
            nonmate.append(max(scores))
    nonmate.sort(reverse=True)
    tpir = {}
    for f in fpirs:
        k = int(np.floor(f * len(nonmate)))
        t = nonmate[k] if k < len(nonmate) else -np.inf
        tpir[f] = sum(r == 1 and s > t for r, s in zip(mate_ranks, mate_scores)) / len(mate_ranks)
    return tpir, {k: sum(r <= k for r in mate_ranks) / len(mate_ranks) for k in ranks}


def test_search_hand_made_and_against_loop():
    gallery = np.eye(3)
    probes = np.array([[0.65, 0.1, 0.0], [0.6, 0.5, 0.0], [0.0, 0.0, 0.7], [0.2, 0.0, 0.0]])
    result = ijb_identification.search(gallery, [10, 20, 30], probes, [10, 20, 99, 98], fpirs=(0.1, 0.5), ranks=(1, 2))
    # non-mate best scores 0.7, 0.2: FPIR 0.1 -> threshold 0.7, FPIR 0.5 -> threshold 0.2
    assert result["tpir"] == {0.1: 0.0, 0.5: 0.5}
    assert result["rank"] == {1: 0.5, 2: 1.0}
    assert (result["mate_searches"], result["nonmate_searches"]) == (2, 2)
    rng = np.random.default_rng(0)
    gallery, probes = rng.normal(size=(40, 8)), rng.normal(size=(300, 8))
    gallery_subjects, probe_subjects = rng.permutation(80)[:40], rng.integers(0, 80, 300)
    for index, subject in enumerate(probe_subjects):
        if subject in gallery_subjects:
            probes[index] += 1.5 * gallery[list(gallery_subjects).index(subject)]
    got = ijb_identification.search(gallery, gallery_subjects, probes, probe_subjects, (0.01, 0.1, 0.3), (1, 5))
    tpir, cmc = loop_search(gallery, gallery_subjects, probes, probe_subjects, (0.01, 0.1, 0.3), (1, 5))
    assert got["tpir"] == pytest.approx(tpir, abs=1e-12) and got["rank"] == pytest.approx(cmc, abs=1e-12)


def test_small_blocks_read_the_same_and_count_lines_across_blocks(folder, monkeypatch):
    from faceid_keras import ijb_protocol

    whole = read_protocol(folder, "IJBC")
    monkeypatch.setattr(ijb_protocol, "_BLOCK_BYTES", 40)  # a few lines per block
    small = read_protocol(folder, "IJBC")
    for field in ("image_names", "landmarks", "detector_scores", "templates", "medias", "template1", "template2", "labels"):
        np.testing.assert_array_equal(getattr(small, field), getattr(whole, field))
    pairs = folder / "meta" / "ijbc_template_pair_label.txt"
    last = len(pairs.read_text().splitlines())
    _edit(pairs, last, "1 x 0\n")
    with pytest.raises(IJBLayoutError, match=rf"pair_label\.txt, line {last}: template ids and labels must be integers"):
        read_protocol(folder, "IJBC")
    _edit(pairs, last, "1 2 0 4\n")
    with pytest.raises(IJBLayoutError, match=rf"pair_label\.txt, line {last}: expected 3 fields, found 4"):
        read_protocol(folder, "IJBC")
