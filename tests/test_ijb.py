"""IJB scoring: image/template features, pair scores and TAR@FAR against plain loops and hand-made cases."""
import numpy as np
import pytest

from faceid_keras import ijb


def loop_template_features(features, templates, medias):
    """The described steps one template and one media at a time (float64)."""
    ids = sorted(set(templates.tolist()))
    out = np.zeros((len(ids), features.shape[1]))
    for row, template in enumerate(ids):
        in_template = [i for i in range(len(templates)) if templates[i] == template]
        total = np.zeros(features.shape[1])
        for media in sorted({medias[i] for i in in_template}):
            members = [features[i] for i in in_template if medias[i] == media]
            total += members[0] if len(members) == 1 else np.mean(members, axis=0)
        norm = np.sqrt(total @ total)
        out[row] = total / norm if norm > 0 else total
    return np.array(ids), out


def loop_image_features(embeddings, flipped, scores, use_norm, use_detector_score, use_flip):
    rows = []
    for e, f, s in zip(embeddings, flipped, scores):
        x = e + f if use_flip else e.copy()
        if not use_norm:
            x = x / np.sqrt(x @ x)
        rows.append(x * s if use_detector_score else x)
    return np.array(rows)


@pytest.fixture
def protocol():
    rng = np.random.default_rng(1)
    n, d = 600, 24
    templates = rng.integers(100, 160, n)
    medias = rng.integers(0, 25, n)  # the same media ids recur in many templates
    embeddings = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, (n, 1))
    flipped = embeddings + rng.normal(scale=0.3, size=(n, d))
    scores = rng.uniform(0.5, 1.0, n)
    return embeddings, flipped, scores, templates, medias


@pytest.mark.parametrize("mode", [(True, True, True), (False, True, True), (True, False, False), (False, False, True)])
def test_image_features_match_loop(protocol, mode):
    embeddings, flipped, scores, *_ = protocol
    got = ijb.image_features(embeddings, flipped, scores, *mode, chunk_size=64)
    np.testing.assert_allclose(got, loop_image_features(embeddings, flipped, scores, *mode), rtol=0, atol=1e-12)


def test_template_features_and_scores_match_loop(protocol):
    embeddings, flipped, scores, templates, medias = protocol
    features = ijb.image_features(embeddings, flipped, scores)
    expected_ids, expected = loop_template_features(features, templates, medias)
    for chunk in (7, 50, 10_000):  # chunks smaller than a template, a few templates, everything
        ids, got = ijb.template_features(features, templates, medias, chunk_size=chunk)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    rng = np.random.default_rng(2)
    t1, t2 = rng.choice(ids, 300), rng.choice(ids, 300)
    row = {t: i for i, t in enumerate(expected_ids)}
    loop_scores = [expected[row[a]] @ expected[row[b]] for a, b in zip(t1, t2)]
    shuffled = rng.permutation(len(ids))  # template ids need not be sorted
    got_scores = ijb.pair_scores(ids[shuffled], got[shuffled], t1, t2, block_entries=200)
    np.testing.assert_allclose(got_scores, loop_scores, rtol=0, atol=1e-9)
    one_block = ijb.pair_scores(ids, got, t1, t2)  # every template met: the whole product at once
    np.testing.assert_allclose(one_block, loop_scores, rtol=0, atol=1e-9)


def test_hand_made_templates():
    features = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    templates = np.array([7, 2, 2, 2, 9])
    medias = np.array([1, 5, 5, 6, 5])  # media 5 in templates 2 and 9: grouped per template
    ids, got = ijb.template_features(features, templates, medias)
    np.testing.assert_array_equal(ids, [2, 7, 9])
    # template 2: mean([1,0],[0,1]) + [0,3] = [0.5, 3.5]
    np.testing.assert_allclose(got, [[0.5, 3.5] / np.hypot(0.5, 3.5), [0.6, 0.8], [1.0, 0.0]], atol=1e-15)
    np.testing.assert_allclose(ijb.pair_scores(ids, got, [7, 9], [2, 7]), [(0.3 + 2.8) / np.hypot(0.5, 3.5), 0.6])
    zero_ids, zero = ijb.template_features(np.zeros((1, 2)), np.array([4]), np.array([0]))
    np.testing.assert_array_equal(zero, [[0.0, 0.0]])  # a zero sum stays zero


def test_pair_naming_missing_template_is_an_error():
    ids, features = np.array([3, 1]), np.eye(2)
    with pytest.raises(ijb.MissingTemplateError, match="pair 2 names template 5") as raised:
        ijb.pair_scores(ids, features, [1, 3, 3], [3, 1, 5])
    assert (raised.value.pair_index, raised.value.template_id) == (2, 5)


def test_roc_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for scores, labels in [
        (np.round(rng.normal(size=5000), 2), rng.integers(0, 2, 5000)),  # many ties
        (rng.normal(size=3000) + np.repeat([0.0, 1.5], 1500), np.repeat([0, 1], 1500)),
        (np.array([0.9, 0.9, 0.5, 0.5, 0.1]), np.array([1, 0, 1, 0, 0])),
    ]:
        fpr, tpr, thresholds = ijb.roc_curve(scores, labels)
        sk_fpr, sk_tpr, sk_thresholds = metrics.roc_curve(labels, scores)
        np.testing.assert_array_equal(fpr, sk_fpr)
        np.testing.assert_array_equal(tpr, sk_tpr)
        np.testing.assert_array_equal(thresholds[1:], sk_thresholds[1:])
        assert ijb.auc(fpr, tpr) == pytest.approx(metrics.auc(sk_fpr, sk_tpr), abs=1e-12)
        assert ijb.auc(fpr, tpr) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)


def loop_tar_at_far(fpr, tpr, fars):
    """insightface's table code on the flipped arrays."""
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return {x: tpr[min(zip(abs(fpr - x), range(len(fpr))))[1]] for x in fars}


def test_tar_at_far_nearest_point_and_ties():
    # 4 impostors, 2 genuine: FPR steps 0, .25, .5, ...; a target halfway between two points is a tie.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, 0, 1, 0, 0, 0])
    fpr, tpr, _ = ijb.roc_curve(scores, labels)
    np.testing.assert_array_equal(fpr, [0, 0, 0.25, 0.25, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 0.5, 1, 1])
    fars = (0.0, 0.125, 0.25, 0.6)
    got = ijb.tar_at_far(scores, labels, fars)
    # 0.25 is met by (0.25, 0.5) and (0.25, 1): the flipped arrays' first, TAR 1; 0.125 ties 0 and 0.25.
    assert got == loop_tar_at_far(fpr, tpr, fars) == {0.0: 0.5, 0.125: 1.0, 0.25: 1.0, 0.6: 1.0}
    rng = np.random.default_rng(4)
    scores, labels = np.round(rng.normal(size=20000), 3), rng.integers(0, 2, 20000)
    labels[scores > 1.5] = 1
    roc = ijb.roc_curve(scores, labels)
    assert ijb.tar_at_far(scores, labels, roc=roc) == loop_tar_at_far(roc[0], roc[1], ijb.DEFAULT_FARS)


def test_roc_rejects_one_class_and_bad_labels():
    with pytest.raises(ValueError, match="both genuine"):
        ijb.roc_curve(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="0 or 1"):
        ijb.roc_curve(np.array([0.1, 0.2]), np.array([1, 2]))
