"""Verification protocol: hand-made distance sets, a loop reference, embedding and pack loading."""
import io

import keras
import numpy as np
import pytest
from PIL import Image

from faceid_keras import embedding, packs, verification
from tfds_ms1m.binpack import write_bin

THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)


# A readable reference: insightface's loops over folds and thresholds.
def _rates(threshold, dist, issame):
    predicted = dist < threshold
    tp, fp = np.sum(predicted & issame), np.sum(predicted & ~issame)
    n_same, n_diff = np.sum(issame), np.sum(~issame)
    tpr = 0.0 if n_same == 0 else float(tp) / float(n_same)
    fpr = 0.0 if n_diff == 0 else float(fp) / float(n_diff)
    acc = float(tp + n_diff - fp) / dist.size
    return tpr, fpr, acc


def _reference(dist, issame):
    n, k = len(dist), 10
    bounds = np.cumsum([0] + [n // k + (i < n % k) for i in range(k)])
    out = {key: [] for key in ("fold_accuracies", "fold_thresholds", "fold_val", "fold_far")}
    tprs, fprs = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        test = np.arange(lo, hi)
        train = np.setdiff1d(np.arange(n), test)
        acc = [_rates(t, dist[train], issame[train])[2] for t in THRESHOLDS]
        best = THRESHOLDS[np.argmax(acc)]
        tprs.append([_rates(t, dist[test], issame[test])[0] for t in THRESHOLDS])
        fprs.append([_rates(t, dist[test], issame[test])[1] for t in THRESHOLDS])
        out["fold_accuracies"].append(_rates(best, dist[test], issame[test])[2])
        out["fold_thresholds"].append(best)
        far = np.array([_rates(t, dist[train], issame[train])[1] for t in VAL_THRESHOLDS])
        threshold = 0.0
        if far.max() >= 1e-3:
            j = 0
            while j + 2 < len(far) and far[j + 1] <= 1e-3:
                j += 1
            if far[j + 1] != far[j]:
                w = 1.0 / (far[j + 1] - far[j])
                threshold = VAL_THRESHOLDS[j] * (w * (far[j + 1] - 1e-3)) + VAL_THRESHOLDS[j + 1] * (
                    w * (1e-3 - far[j])
                )
        tpr, fpr, _ = _rates(threshold, dist[test], issame[test])
        out["fold_val"].append(tpr)
        out["fold_far"].append(fpr)
    out["tpr"], out["fpr"] = np.mean(tprs, 0), np.mean(fprs, 0)
    return out


def _folds(*fold_pairs):
    """Concatenates folds given as lists of (dist, issame) pairs into arrays."""
    pairs = [pair for fold in fold_pairs for pair in fold]
    return np.array([d for d, _ in pairs]), np.array([s for _, s in pairs])


def test_fold_slices_follow_kfold_without_shuffle():
    slices = verification.fold_slices(6003)
    sizes = [s.stop - s.start for s in slices]
    assert sizes == [601, 601, 601] + [600] * 7
    assert slices[0].start == 0 and slices[-1].stop == 6003
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))
    with pytest.raises(ValueError, match="9 pairs into 10 folds"):
        verification.fold_slices(9)


def test_perfectly_separable():
    dist, issame = _folds(*[[(0.5, True), (1.5, False)] * 3] * 10)
    result = verification.evaluate_distances(dist, issame)
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    # dist == 0.5 is not below 0.5: the first threshold that accepts the same pairs is 0.51.
    np.testing.assert_allclose(result["fold_thresholds"], 0.51)
    assert result["best_accuracy"] == 1.0 and result["threshold"] == pytest.approx(0.51)
    assert result["auc"] == pytest.approx(1.0)


def test_auc_of_reversed_and_uninformative_distances():
    reversed_ = verification.evaluate_distances(*_folds(*[[(1.6, True), (0.4, False)] * 3] * 10))
    assert reversed_["auc"] == pytest.approx(0.0)
    rng = np.random.default_rng(7)
    random = verification.evaluate_distances(rng.uniform(0, 3.99, 6000), rng.random(6000) < 0.5)
    assert random["auc"] == pytest.approx(0.5, abs=0.03)
    assert random["accuracy"] == pytest.approx(0.5, abs=0.03)


def test_accuracy_tie_takes_first_threshold():
    # Thresholds in (0.3, 0.6] and in (0.9, 1.2] are equally good: 3 of 4 pairs right.
    fold = [(0.3, True), (0.6, False), (0.9, True), (1.2, False)]
    result = verification.evaluate_distances(*_folds(*[fold] * 10))
    np.testing.assert_allclose(result["fold_thresholds"], 0.31)
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["accuracy_std"] == pytest.approx(0.0)


def test_val_at_far_known_by_construction():
    # Half of the same pairs are unreachable (3.0) behind the different pairs (2.0005): no threshold
    # reaching FAR 1e-3 accepts a different pair, so VAL = 0.5 and FAR = 0.
    fold = [(0.2, True), (0.2, True), (3.0, True), (3.0, True)] + [(2.0005, False)] * 4
    result = verification.evaluate_distances(*_folds(*[fold] * 10))
    assert result["val"] == 0.5 and result["val_std"] == 0.0 and result["far"] == 0.0
    np.testing.assert_allclose(result["val_thresholds"], 2.0 * 0.999 + 2.001 * 0.001)
    assert result["accuracy"] == pytest.approx(0.75)
    np.testing.assert_allclose(result["fold_thresholds"], 0.21)


def test_all_same_pairs():
    dist = np.tile(np.linspace(0.1, 1.9, 5), 10)  # every fold sees the same distances
    result = verification.evaluate_distances(dist, np.ones(50, bool))
    assert result["accuracy"] == 1.0
    assert result["val"] == 0.0 and result["far"] == 0.0  # FAR never reaches 1e-3: threshold 0
    np.testing.assert_array_equal(result["fpr"], 0.0)
    # np.arange's 190th threshold is 1.9000000000000001, already above the largest distance 1.9.
    np.testing.assert_array_equal(result["fold_thresholds"], THRESHOLDS[190])


def test_sorted_distances_fail_the_last_fold():
    # Folds are taken in order: the fold holding the largest same-pair distances is never accepted.
    result = verification.evaluate_distances(np.linspace(0.1, 1.9, 50), np.ones(50, bool))
    np.testing.assert_array_equal(result["fold_accuracies"], [1.0] * 9 + [0.0])


def test_all_different_pairs():
    dist = np.tile(np.linspace(0.1, 1.9, 5), 10)
    result = verification.evaluate_distances(dist, np.zeros(50, bool))
    assert result["accuracy"] == 1.0
    np.testing.assert_array_equal(result["fold_thresholds"], 0.0)
    assert result["val"] == 0.0
    np.testing.assert_array_equal(result["tpr"], 0.0)


def test_one_fold_impossible():
    normal = [(0.4, True), (1.6, False)] * 5
    reversed_ = [(1.6, True), (0.4, False)] * 5
    result = verification.evaluate_distances(*_folds(reversed_, *[normal] * 9))
    np.testing.assert_allclose(result["fold_accuracies"], [0.0] + [1.0] * 9)
    assert result["accuracy"] == pytest.approx(0.9)
    assert result["accuracy_std"] == pytest.approx(0.3)


@pytest.mark.parametrize("n,seed,decimals", [(300, 0, None), (503, 1, 2), (257, 2, 3)])
def test_matches_loop_reference(n, seed, decimals):
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    dist = np.where(issame, rng.normal(1.0, 0.35, n), rng.normal(1.7, 0.35, n)).clip(0, 4)
    if decimals is not None:  # many distances exactly on a threshold
        dist = np.round(dist, decimals)
    ours = verification.evaluate_distances(dist, issame)
    for key, expected in _reference(dist, issame).items():
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)
    assert ours["accuracy"] == np.mean(ours["fold_accuracies"])
    assert ours["accuracy_std"] == np.std(ours["fold_accuracies"])
    assert 0.5 < ours["auc"] <= 1.0


def test_threshold_interpolation_matches_scipy_degree_one_spline():
    # insightface's interp1d(far, thresholds, kind="slinear") is this degree-1 B-spline.
    interpolate = pytest.importorskip("scipy.interpolate")
    rng = np.random.default_rng(3)
    for trial in range(60):
        n = int(rng.integers(1000, 3000))
        dist = np.sort(rng.uniform(0, 4, n))
        if trial % 2:
            dist = np.round(dist, 2)
        far = np.searchsorted(dist, VAL_THRESHOLDS) / n
        knots = np.r_[far[0], far, far[-1]]
        spline = interpolate.BSpline.construct_fast(knots, VAL_THRESHOLDS.copy(), 1)
        assert verification.interpolate_threshold(far, VAL_THRESHOLDS, 1e-3) == float(spline(1e-3))
    # FAR reaching the target only on a flat final segment gives threshold 0, as there.
    assert verification.interpolate_threshold(np.array([0, 0.0005, 1e-3, 1e-3]), np.arange(4.0), 1e-3) == 0.0
    assert verification.interpolate_threshold(np.array([0, 0, 5e-4]), np.arange(3.0), 1e-3) == 0.0


def test_evaluate_embeddings_and_input_errors():
    rng = np.random.default_rng(4)
    e1, e2 = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    issame = np.arange(40) % 2 == 0
    dist = np.sum((e1 - e2) ** 2, axis=1)
    np.testing.assert_array_equal(
        verification.evaluate(e1, e2, issame)["fold_accuracies"],
        verification.evaluate_distances(dist, issame)["fold_accuracies"],
    )
    with pytest.raises(ValueError, match="pair 3"):
        verification.evaluate_distances(np.r_[np.ones(3), -1.0, np.ones(16)], np.ones(20, bool))
    with pytest.raises(ValueError, match="same length"):
        verification.evaluate_distances(np.ones(20), np.ones(19, bool))
    with pytest.raises(ValueError, match="same shape"):
        verification.evaluate(e1, e2[:, :4], issame)


def _tiny_model(size=16):
    return keras.Sequential(
        [keras.Input((size, size, 3)), keras.layers.Flatten(), keras.layers.Dense(8, use_bias=False)]
    )


def test_embed_feeds_pixels_and_their_mirror_images_and_normalises():
    model = _tiny_model()
    images = np.random.default_rng(5).integers(0, 256, (11, 16, 16, 3), dtype=np.uint8)
    embeddings = embedding.embed(model, images, batch_size=4)

    def forward(x):
        return model.predict(x.astype("float32"), verbose=0).astype(np.float64)

    expected = forward(images) + forward(images[:, :, ::-1])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    # A mirrored image has the same embedding.
    np.testing.assert_allclose(embedding.embed(model, images[:, :, ::-1]), embeddings, atol=1e-5)
    # Images of another size are resized to the model input.
    assert embedding.embed(model, np.zeros((3, 24, 20, 3), np.uint8)).shape == (3, 8)
    with pytest.raises(ValueError, match="uint8"):
        embedding.embed(model, images.astype(np.float32))


def _encode(image, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def pack_folder(tmp_path):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    issame = np.arange(10) % 2 == 0
    for name in ("lfw", "agedb_30"):
        write_bin(tmp_path / f"{name}.bin", [_encode(im) for im in images], issame)
    return tmp_path, images, issame


def test_load_bin_roundtrip_and_resize(pack_folder):
    folder, images, issame = pack_folder
    loaded, flags = packs.load_bin(folder / "lfw.bin")
    assert loaded.dtype == np.uint8 and flags.dtype == bool
    np.testing.assert_array_equal(loaded, images)
    np.testing.assert_array_equal(flags, issame)
    resized, _ = packs.load_bin(folder / "lfw.bin", image_size=(24, 20))
    assert resized.shape == (20, 24, 20, 3)


def test_load_bin_names_undecodable_image(tmp_path):
    good = _encode(np.zeros((8, 8, 3), np.uint8), "JPEG")
    write_bin(tmp_path / "lfw.bin", [good, good, good, b"not an image"], [True, False])
    with pytest.raises(ValueError, match=r"lfw\.bin: image 3 \(pair 1\) cannot be decoded"):
        packs.load_bin(tmp_path / "lfw.bin")


def test_load_targets_from_folder(pack_folder, tmp_path_factory):
    folder, images, issame = pack_folder
    assert packs.available_targets(folder) == ["agedb_30", "lfw"]
    targets = packs.load_targets(folder, "lfw,agedb_30")
    assert list(targets) == ["lfw", "agedb_30"]
    np.testing.assert_array_equal(targets["agedb_30"][0], images)
    with pytest.raises(FileNotFoundError, match=r"cfp_fp\.bin does not exist; targets found: agedb_30, lfw"):
        packs.load_targets(folder, ["lfw", "cfp_fp"])
    with pytest.raises(FileNotFoundError, match="targets found: none"):
        packs.load_targets(tmp_path_factory.mktemp("empty"), ["lfw"])


def test_verify_runs_embedding_and_protocol(pack_folder):
    folder, images, issame = pack_folder
    model = _tiny_model()
    result = embedding.verify(model, images, issame, batch_size=8)
    embeddings = embedding.embed(model, images, batch_size=5)
    expected = verification.evaluate(embeddings[0::2], embeddings[1::2], issame)
    assert result["pairs"] == 10
    assert result["accuracy"] == expected["accuracy"] and result["threshold"] == expected["threshold"]
    with pytest.raises(ValueError, match="Expected 20 images for 10 pairs"):
        embedding.verify(_tiny_model(), images[:18], issame)


def test_load_targets_from_tfds_matches_bin_packs(tfds_data_dir, synthetic_folder):
    names = ["lfw", "cfp_fp", "agedb_30"]
    assert packs.available_targets(tfds_data_dir) == sorted(names)
    from_tfds = packs.load_targets(tfds_data_dir, names)
    for name in names:
        images, issame = packs.load_bin(synthetic_folder / f"{name}.bin")
        np.testing.assert_array_equal(from_tfds[name][0], images)  # same pair order and pixels
        np.testing.assert_array_equal(from_tfds[name][1], issame)
    with pytest.raises(FileNotFoundError, match="no split 'calfw'; targets found: agedb_30, cfp_fp, lfw"):
        packs.load_targets(tfds_data_dir, ["calfw"])
