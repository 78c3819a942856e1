"""IJB 1:N identification (open set) on the NIST gallery G1 / G2 and mixed-probe lists.

Files, when present: DIR/meta/<set>_1N_gallery_G1.csv, <set>_1N_gallery_G2.csv and
<set>_1N_probe_mixed.csv (NIST's CSVs: a header naming TEMPLATE_ID and SUBJECT_ID, one row per image).
Template features are the 1:1 protocol's (`faceid_keras.ijb.template_features`).

Definition used (open set, as NIST's IJB-C protocol): every probe template is searched against the
gallery; a probe whose subject has a gallery template is a mate search, any other probe a non-mate
search (so a G2 subject's probes are non-mate searches against G1).

- rank of a mate search = 1 + the number of gallery templates scoring strictly higher than its
  mate; rank-k = the fraction of mate searches with rank <= k (ties count in the probe's favour);
- FPIR at threshold t = the fraction of non-mate searches whose best score is > t; for a target
  FPIR f, t is the (floor(f * n) + 1)-th highest best non-mate score (-inf if that is past the end),
  the lowest threshold with FPIR <= f;
- TPIR(f) = the fraction of mate searches whose mate is at rank 1 with a score > t.

Every figure is averaged over G1 and G2.
"""
from __future__ import annotations

import csv
import os

import numpy as np

from faceid_keras.ijb import template_rows
from faceid_keras.ijb_protocol import IJBLayoutError

GALLERIES = ("G1", "G2")
DEFAULT_FPIRS = (1e-2, 1e-1)
DEFAULT_RANKS = (1, 5, 10)
_CHUNK = 4096


def list_path(root: str | os.PathLike, ijb_set: str, kind: str) -> str:
    """DIR/meta/<set>_1N_<kind>.csv with kind gallery_G1, gallery_G2 or probe_mixed."""
    return os.path.join(os.fspath(root), "meta", f"{ijb_set.lower()}_1N_{kind}.csv")


def has_identification_lists(root: str | os.PathLike, ijb_set: str) -> bool:
    """Whether all three NIST 1:N lists are in DIR/meta."""
    kinds = [f"gallery_{g}" for g in GALLERIES] + ["probe_mixed"]
    return all(os.path.isfile(list_path(root, ijb_set, kind)) for kind in kinds)


def read_template_subjects(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(template ids [T], subject ids [T], line of each template's first row) of a NIST 1:N CSV."""
    subject_of, line_of = {}, {}
    with open(path, newline="") as file:
        reader = csv.reader(file)
        header = [name.strip().upper() for name in next(reader, [])]
        if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
            raise IJBLayoutError(f"{path}, line 1: the header must name TEMPLATE_ID and SUBJECT_ID, got {header}")
        t_column, s_column = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
        for line, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                template, subject = int(row[t_column]), int(row[s_column])
            except (IndexError, ValueError):
                raise IJBLayoutError(f"{path}, line {line}: expected integer TEMPLATE_ID and SUBJECT_ID, got {row}")
            if subject_of.setdefault(template, subject) != subject:
                raise IJBLayoutError(
                    f"{path}, line {line}: template {template} has subject {subject}, "
                    f"but subject {subject_of[template]} on line {line_of[template]}"
                )
            line_of.setdefault(template, line)
    if not subject_of:
        raise IJBLayoutError(f"{path}: the file lists no templates")
    templates = np.fromiter(subject_of, np.int64)
    return templates, np.fromiter(subject_of.values(), np.int64), np.fromiter(line_of.values(), np.int64)


def _features_of(path: str, templates, lines, template_ids, features) -> np.ndarray:
    rows, found = template_rows(template_ids, templates)
    if not found.all():
        index = int(np.argmin(found))
        raise IJBLayoutError(f"{path}, line {lines[index]}: template {templates[index]} has no images in the 1:1 lists")
    return features[rows]


def search(
    gallery_features, gallery_subjects, probe_features, probe_subjects, fpirs=DEFAULT_FPIRS, ranks=DEFAULT_RANKS
) -> dict:
    """Open-set search of every probe against one gallery: {"tpir": {fpir: rate}, "rank": {k: rate}, counts}."""
    gallery_subjects, probe_subjects = np.asarray(gallery_subjects), np.asarray(probe_subjects)
    if len(np.unique(gallery_subjects)) != len(gallery_subjects):
        raise ValueError("each subject must have one gallery template")
    mate_column = template_rows(gallery_subjects, probe_subjects)
    mated = mate_column[1]
    best = np.empty(len(probe_features))
    mate_score = np.full(len(probe_features), -np.inf)
    rank = np.zeros(len(probe_features), np.int64)
    for start in range(0, len(probe_features), _CHUNK):
        part = slice(start, start + _CHUNK)
        scores = np.asarray(probe_features[part], np.float64) @ np.asarray(gallery_features, np.float64).T
        best[part] = scores.max(axis=1)
        columns = mate_column[0][part]
        own = scores[np.arange(len(scores)), columns]
        mate_score[part] = np.where(mated[part], own, -np.inf)
        rank[part] = 1 + np.count_nonzero(scores > own[:, None], axis=1)
    nonmate_best = np.sort(best[~mated])[::-1]
    mate_rank, mate_best = rank[mated], mate_score[mated]
    tpir = {}
    for fpir in fpirs:
        allowed = int(np.floor(fpir * len(nonmate_best)))
        threshold = nonmate_best[allowed] if allowed < len(nonmate_best) else -np.inf
        tpir[fpir] = float(np.mean((mate_rank == 1) & (mate_best > threshold))) if len(mate_rank) else 0.0
    cmc = {k: float(np.mean(mate_rank <= k)) if len(mate_rank) else 0.0 for k in ranks}
    return {"tpir": tpir, "rank": cmc, "mate_searches": int(mated.sum()), "nonmate_searches": int((~mated).sum())}


def identification(root, ijb_set: str, template_ids, features, fpirs=DEFAULT_FPIRS, ranks=DEFAULT_RANKS) -> dict:
    """1:N results of the NIST lists in DIR/meta: {"G1": ..., "G2": ..., "mean": ...} (see `search`)."""
    probe_path = list_path(root, ijb_set, "probe_mixed")
    probes, probe_subjects, probe_lines = read_template_subjects(probe_path)
    probe_features = _features_of(probe_path, probes, probe_lines, template_ids, features)
    results = {}
    for gallery in GALLERIES:
        path = list_path(root, ijb_set, f"gallery_{gallery}")
        templates, subjects, lines = read_template_subjects(path)
        gallery_features = _features_of(path, templates, lines, template_ids, features)
        results[gallery] = search(gallery_features, subjects, probe_features, probe_subjects, fpirs, ranks)
    results["mean"] = {
        "tpir": {f: float(np.mean([results[g]["tpir"][f] for g in GALLERIES])) for f in fpirs},
        "rank": {k: float(np.mean([results[g]["rank"][k] for g in GALLERIES])) for k in ranks},
    }
    return results
