"""IJB-B / IJB-C 1:1 verification scoring, as insightface's `eval_ijbc.py` computes it (NumPy in and out).

Steps (insightface's default test mode N1 D1 F1):

- image feature = raw embedding + raw embedding of the horizontally flipped crop (F1; F0 keeps the
  first only), then L2-normalised only when the norm is not used (N0), then multiplied by the
  detector score (D1);
- template feature: the images of one media (video) inside the template are averaged, a media with
  one image is kept as is; the template feature is the sum over its medias, L2-normalised (a zero
  sum stays zero, as scikit-learn's `normalize` leaves it). Templates are sorted by id;
- pair score = dot product of the two template features;
- ROC as scikit-learn's `roc_curve` (default `drop_intermediate=True`) and TAR at each FAR target
  read off it as insightface's table does: arrays flipped, the point with the nearest FPR, among
  equally near points the first of the flipped arrays (`min((|fpr - x|, index))`).

Everything works in chunks whose size bounds the temporary memory (`chunk_size` rows at a time).
"""
from __future__ import annotations

import numpy as np

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
_CHUNK = 8192
# Images per template-feature chunk: timed best of 1k-32k rows on 2 cores (the chunk stays in cache).
_TEMPLATE_CHUNK = 2048


def _float_dtype(array: np.ndarray) -> np.dtype:
    return np.result_type(array.dtype, np.float32)


def image_features(
    embeddings: np.ndarray,
    flipped_embeddings: np.ndarray | None,
    detector_scores: np.ndarray,
    use_norm: bool = True,
    use_detector_score: bool = True,
    use_flip: bool = True,
    chunk_size: int = _CHUNK,
) -> np.ndarray:
    """Per-image features [N, D] from raw (unnormalised) embeddings, as insightface's test modes build them."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {embeddings.shape}")
    if use_flip:
        if flipped_embeddings is None:
            raise ValueError("use_flip=True needs flipped_embeddings")
        flipped_embeddings = np.asarray(flipped_embeddings)
        if flipped_embeddings.shape != embeddings.shape:
            raise ValueError(
                f"flipped_embeddings shape {flipped_embeddings.shape} != embeddings shape {embeddings.shape}"
            )
    scores = np.asarray(detector_scores)
    if scores.shape != (len(embeddings),):
        raise ValueError(f"detector_scores must be [{len(embeddings)}], got shape {scores.shape}")
    dtype = _float_dtype(embeddings)
    features = np.empty(embeddings.shape, dtype)
    for start in range(0, len(embeddings), chunk_size):
        rows = slice(start, start + chunk_size)
        block = embeddings[rows].astype(dtype, copy=True)
        if use_flip:
            block += flipped_embeddings[rows]
        if not use_norm:
            block /= np.sqrt(np.sum(block**2, axis=-1, keepdims=True))
        if use_detector_score:
            block *= scores[rows, None]
        features[rows] = block
    return features


def _as_ids(values, name: str, length: int) -> np.ndarray:
    ids = np.asarray(values)
    if ids.shape != (length,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integer ids of shape [{length}], got {ids.dtype} {ids.shape}")
    return ids


def template_features(
    image_features: np.ndarray, templates: np.ndarray, medias: np.ndarray, chunk_size: int = _TEMPLATE_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted template ids [T], L2-normalised template features [T, D] in float64).

    Within each template the images of one media are averaged and the medias summed; a media id
    that appears in several templates is grouped separately inside each.
    """
    features = np.asarray(image_features)
    if features.ndim != 2:
        raise ValueError(f"image_features must be [N, D], got shape {features.shape}")
    templates = _as_ids(templates, "templates", len(features))
    medias = _as_ids(medias, "medias", len(features))
    order = np.lexsort((medias, templates))
    sorted_templates, sorted_medias = templates[order], medias[order]
    new_template = np.r_[True, sorted_templates[1:] != sorted_templates[:-1]]
    new_media = new_template | np.r_[True, sorted_medias[1:] != sorted_medias[:-1]]
    template_starts = np.flatnonzero(new_template)
    template_ids = sorted_templates[template_starts]
    result = np.zeros((len(template_ids), features.shape[1]), np.float64)
    bounds = np.r_[template_starts, len(order)]
    first = 0
    while first < len(template_ids):
        # Whole templates, at least one, up to chunk_size images.
        last = max(first + 1, int(np.searchsorted(bounds, bounds[first] + chunk_size, side="right")) - 1)
        begin, end = bounds[first], bounds[last]
        # Segment sums run along the contiguous axis of a transposed float64 copy: NumPy's
        # reduceat along axis 0 of a row-major array is ~10x slower.
        block = np.empty((features.shape[1], end - begin), np.float64)
        block[...] = features[order[begin:end]].T
        media_starts = np.flatnonzero(new_media[begin:end])
        counts = np.diff(np.r_[media_starts, end - begin])
        media_means = np.add.reduceat(block, media_starts, axis=1) / counts
        media_template_starts = np.searchsorted(media_starts, bounds[first:last] - begin)
        result[first:last] = np.add.reduceat(media_means, media_template_starts, axis=1).T
        first = last
    norms = np.sqrt(np.einsum("ij,ij->i", result, result))
    norms[norms == 0] = 1.0
    result /= norms[:, None]
    return template_ids, result


class MissingTemplateError(ValueError):
    """A pair names a template id that has no features; `pair_index` and `template_id` say which."""

    def __init__(self, pair_index: int, template_id: int):
        super().__init__(f"pair {pair_index} names template {template_id}, which has no images")
        self.pair_index = pair_index
        self.template_id = template_id


def template_rows(template_ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of each id of `query` in `template_ids`, whether it was found there) for unsorted ids."""
    template_ids, query = np.asarray(template_ids), np.asarray(query)
    if len(template_ids) == 0:
        return np.zeros(query.shape, np.intp), np.zeros(query.shape, bool)
    order = np.argsort(template_ids, kind="stable")
    rows = order[np.searchsorted(template_ids[order], query).clip(max=len(order) - 1)]
    return rows, template_ids[rows] == query


def pair_scores(
    template_ids: np.ndarray,
    features: np.ndarray,
    template1: np.ndarray,
    template2: np.ndarray,
    block_entries: int = 1 << 23,
) -> np.ndarray:
    """Dot product [P] (float64) of the template features of each pair (template1[i], template2[i]).

    Pairs are grouped by the side with fewer distinct templates; each group of those templates is
    scored against the other side's templates it meets with one matrix product of at most
    `block_entries` scores, from which the pairs' scores are picked. Gathering two feature rows
    per pair instead moves ~8 KB of memory per pair (~120 GB for IJB-C) and was ~5x slower here.
    """
    features = np.asarray(features, np.float64)
    template1, template2 = np.asarray(template1), np.asarray(template2)
    if template1.shape != template2.shape or template1.ndim != 1:
        raise ValueError(f"template1 and template2 must be [P], got {template1.shape} and {template2.shape}")
    if len(template_ids) != len(features):
        raise ValueError(f"{len(template_ids)} template ids but {len(features)} feature rows")
    rows, found = template_rows(template_ids, np.stack([template1, template2], axis=1))
    if not found.all():
        missing = int(np.argmin(found.all(axis=1)))
        raise MissingTemplateError(missing, int((template1 if not found[missing, 0] else template2)[missing]))
    rows1, rows2 = rows[:, 0], rows[:, 1]
    del rows
    if np.count_nonzero(np.bincount(rows1, minlength=len(features))) > np.count_nonzero(
        np.bincount(rows2, minlength=len(features))
    ):
        rows1, rows2 = rows2, rows1
    order = np.argsort(rows1, kind="stable")
    sorted1 = rows1[order]
    group_starts = np.flatnonzero(np.r_[True, sorted1[1:] != sorted1[:-1]])
    bounds = np.r_[group_starts, len(order)]
    per_block = max(1, block_entries // max(1, len(features)))
    scores = np.empty(len(template1), np.float64)
    for first in range(0, len(group_starts), per_block):
        last = min(first + per_block, len(group_starts))
        pairs = order[bounds[first] : bounds[last]]
        block_rows = sorted1[group_starts[first:last]]
        local = np.searchsorted(block_rows, sorted1[bounds[first] : bounds[last]])
        others = rows2[pairs]
        columns, inverse = np.unique(others, return_inverse=True)
        if len(columns) * 5 < len(features) * 4:  # score only the partners met
            scores[pairs] = (features[block_rows] @ features[columns].T)[local, inverse]
        else:
            scores[pairs] = (features[block_rows] @ features.T)[local, others]
    return scores


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) exactly as scikit-learn's `roc_curve(labels, scores)` with its defaults.

    One point per distinct score (highest first), collinear intermediate points dropped, and a
    first point (0, 0) at threshold +inf. Labels are 1 (same) / 0 (different).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must be [P], got {scores.shape} and {labels.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 or 1")
    positives = labels == 1
    if positives.all() or not positives.any():
        raise ValueError("labels must hold both genuine (1) and impostor (0) pairs")
    # Any order of equal scores gives the same points: only each run's last cumulative count is kept.
    order = np.argsort(-scores)
    sorted_scores = scores[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    tps = np.cumsum(positives[order], dtype=np.float64)[last_of_value]
    fps = 1 + last_of_value - tps
    thresholds = sorted_scores[last_of_value]
    if len(fps) > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoid area under a ROC curve with non-decreasing FPR (scikit-learn's `auc`)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def tar_at_far(
    scores: np.ndarray, labels: np.ndarray, fars=DEFAULT_FARS, roc: tuple | None = None
) -> dict[float, float]:
    """{far: TAR} read off the ROC as insightface's table does (nearest FPR; ties: the highest threshold
    index, i.e. the first of the flipped arrays). `roc` reuses an (fpr, tpr, ...) already computed."""
    fpr, tpr = (roc or roc_curve(scores, labels))[:2]
    flipped_fpr, flipped_tpr = fpr[::-1], tpr[::-1]
    return {far: float(flipped_tpr[np.argmin(np.abs(flipped_fpr - far))]) for far in fars}
