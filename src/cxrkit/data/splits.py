"""Train / validation / test splits: the dataset's own where it has them, else stratified and grouped by patient.

Splits are carved with scikit-learn's ``StratifiedGroupKFold``: to take a fraction ``f`` of a pool, the pool is
cut into ``K`` stratified, patient-disjoint folds and ``m`` of them are taken, with ``m / K`` the closest fraction
to ``f`` for ``K <= 20``. Multilabel data is stratified on each image's first positive label. Splits are saved as a
CSV (``source,patient,label,split``) so that an evaluation can be reproduced exactly.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrkit.data.base import SPLITS, LabelledImages
from cxrkit.errors import CxrError
from cxrkit.runs import atomic_write_text, csv_text

MAX_FOLDS = 20
SPLIT_COLUMNS = ("source", "patient", "label", "split")


def check_ratios(ratios: Sequence[float]) -> dict[str, float]:
    """Validate split ratios: ``(train, test)`` or ``(train, val, test)``, non-negative, summing to 1.

    Returns:
        ``{split name: ratio}``.
    """
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) not in (2, 3) or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise CxrError(f"split ratios {list(ratios)}: need 2 (train, test) or 3 (train, val, test) summing to 1")
    names = ("train", "test") if len(ratios) == 2 else SPLITS
    return dict(zip(names, ratios, strict=True))


def assign_splits(
    ds: LabelledImages,
    ratios: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    group_by_patient: bool = True,
    use_own: bool = True,
) -> dict[str, np.ndarray]:
    """Assign every item to ``train``, ``val`` or ``test``.

    With ``use_own`` and items that all carry a split, those are kept and a missing ``val`` / ``test`` is carved
    from ``train`` in the requested proportions (70/10/20 on a train-only folder: test takes 20% of it, then val
    10/80 of the rest). Otherwise the whole dataset is split.

    Args:
        ds: the dataset.
        ratios: ``(train, test)`` or ``(train, val, test)`` fractions summing to 1.
        seed: random seed of the fold shuffling.
        group_by_patient: keep all images of a patient in one split.
        use_own: use the dataset's own splits when its items have them.

    Returns:
        Sorted int64 item indices per split; ``val`` is empty for two ratios unless the dataset has its own.
    """
    wanted = check_ratios(ratios)
    own = [it.split for it in ds.items]
    has_own = [s is not None for s in own]
    if use_own and any(has_own) and not all(has_own):
        first = next(it.source for it in ds.items if it.split is None)
        raise CxrError(
            f"{ds.spec.name}: {has_own.count(False)} of {len(own)} items have no split of their own (the first: "
            f"{first}); give every item a split, or set data.split.use_own: false to split them all"
        )
    y = _strata(ds)
    groups = _groups(ds, group_by_patient)
    if use_own and own and all(has_own):
        out = {s: np.flatnonzero(np.asarray(own) == s) for s in SPLITS}
        if not len(out["train"]):
            held = ", ".join(f"{len(out[s])} {s}" for s in SPLITS if len(out[s]))
            raise CxrError(f"{ds.spec.name}: its own splits hold no training images ({held}); add a train split, "
                           "or set data.split.use_own: false to split all of them")
        missing = {s: r for s, r in wanted.items() if s != "train" and len(out[s]) == 0}
        pool_ratio = wanted["train"] + sum(missing.values())
        carved = _carve(out["train"], missing, pool_ratio, y, groups, seed)
        out.update(carved)
    else:
        out = _carve(np.arange(len(ds)), {s: r for s, r in wanted.items() if s != "train"}, 1.0, y, groups, seed)
    return {s: np.sort(np.asarray(out.get(s, []), dtype=np.int64)) for s in SPLITS}


def _strata(ds: LabelledImages) -> np.ndarray:
    """Stratification class per item: the target, or for multilabel the first positive label (else "none")."""
    targets = ds.targets() if len(ds) else np.zeros(0, dtype=np.int64)
    if ds.spec.task != "multilabel":
        return targets
    positive = np.nan_to_num(targets.reshape(len(ds), -1), nan=0.0) > 0.5
    return np.where(positive.any(axis=1), positive.argmax(axis=1), positive.shape[1])


def _groups(ds: LabelledImages, group_by_patient: bool) -> np.ndarray:
    if not group_by_patient:
        return np.arange(len(ds))
    _, codes = np.unique(np.asarray([it.patient for it in ds.items], dtype=object).astype(str), return_inverse=True)
    return codes.reshape(-1)


def _carve(
    pool: np.ndarray, fractions: dict[str, float], pool_ratio: float, y: np.ndarray, groups: np.ndarray, seed: int
) -> dict[str, np.ndarray]:
    """Take ``fractions`` (of the whole dataset) out of ``pool`` (``pool_ratio`` of it): test first, then val."""
    out: dict[str, np.ndarray] = {}
    remaining, remaining_ratio = pool, pool_ratio
    for split in ("test", "val"):
        ratio = fractions.get(split, 0.0)
        if ratio <= 0 or remaining_ratio <= 0:
            continue
        out[split], remaining = _take_fraction(remaining, ratio / remaining_ratio, y, groups, seed)
        remaining_ratio -= ratio
    out["train"] = remaining
    return out


def _take_fraction(
    pool: np.ndarray, fraction: float, y: np.ndarray, groups: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``pool`` into (taken, rest) with about ``fraction`` taken, stratified and patient-disjoint."""
    if fraction >= 1.0 - 1e-9:
        return pool, pool[:0]
    n_groups = len(np.unique(groups[pool]))
    if n_groups < 2:
        raise CxrError(f"cannot split {len(pool)} images of {n_groups} patient(s): need at least 2 patients")
    largest = int(np.unique(y[pool], return_counts=True)[1].max())  # folds beyond it cannot all get that class
    folds, take = _fold_counts(fraction, min(MAX_FOLDS, n_groups, largest))
    strata = _merge_rare(y[pool], folds)
    from sklearn.model_selection import StratifiedGroupKFold  # here: loading a recipe must not import scikit-learn

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    try:
        taken = [pool[test] for _, test in splitter.split(np.zeros(len(pool)), strata, groups[pool])][:take]
    except ValueError as err:  # scikit-learn's word for a pool too small to stratify
        raise CxrError(f"cannot split {len(pool)} images of {n_groups} patients into {folds} stratified folds: "
                       f"{err}") from None
    taken_idx = np.concatenate(taken) if taken else pool[:0]
    return taken_idx, np.setdiff1d(pool, taken_idx)


def _merge_rare(strata: np.ndarray, folds: int) -> np.ndarray:
    """Fold strata with fewer members than folds (which cannot be spread over every fold) into the largest one."""
    values, counts = np.unique(strata, return_counts=True)
    rare = values[counts < folds]
    if len(rare) == 0 or len(rare) == len(values):
        return strata
    return np.where(np.isin(strata, rare), values[counts.argmax()], strata)


def _fold_counts(fraction: float, max_folds: int) -> tuple[int, int]:
    """``(K, m)`` with ``2 <= K <= max_folds`` and ``m / K`` closest to ``fraction`` (fewest folds on ties)."""
    best = (2, 1)
    for k in range(2, max(2, max_folds) + 1):
        m = min(max(round(fraction * k), 1), k - 1)
        if abs(m / k - fraction) < abs(best[1] / best[0] - fraction) - 1e-12:
            best = (k, m)
    return best


def _label_text(ds: LabelledImages, index: int) -> str:
    target = ds.items[index].target
    if ds.spec.task == "multilabel":
        return "|".join(name for name, v in zip(ds.spec.labels, target, strict=True) if v == 1.0)
    return ds.spec.labels[int(target)]


def save_splits(path_csv: str | os.PathLike, ds: LabelledImages, splits: dict[str, np.ndarray]) -> None:
    """Write the splits as CSV ``source,patient,label,split`` in dataset order (label: name, or ``|``-joined)."""
    split_of = {int(i): s for s, idx in splits.items() for i in idx}
    rows = [{"source": ds.items[i].source, "patient": ds.items[i].patient, "label": _label_text(ds, i),
             "split": split_of[i]} for i in sorted(split_of)]
    atomic_write_text(path_csv, csv_text(rows, list(SPLIT_COLUMNS)))


def _source_index(saved: list[str], sources: list[str]) -> dict[str, int]:
    """Saved source -> item index. Paths match as written, else as absolute normalised paths (a relative data
    root from another working directory), else relative to each side's common folder (the data moved)."""
    exact = {src: i for i, src in enumerate(sources)}
    if all(s in exact for s in saved):
        return exact

    def absolute(path: str) -> str:
        return os.path.normpath(os.path.abspath(path))

    by_absolute = {absolute(src): i for i, src in enumerate(sources)}
    index = {s: by_absolute[absolute(s)] for s in saved if absolute(s) in by_absolute}
    if len(index) == len(saved) or not saved or not sources:
        return index

    def relative(paths: list[str]) -> list[str]:
        root = os.path.commonpath([absolute(p) for p in paths]) if len(paths) > 1 else os.path.dirname(paths[0])
        return [os.path.relpath(absolute(p), root) for p in paths]

    by_relative = {rel: i for i, rel in enumerate(relative(sources))}
    moved = {s: by_relative[rel] for s, rel in zip(saved, relative(saved)) if rel in by_relative}
    return moved if len(moved) > len(index) else index


def load_splits(path_csv: str | os.PathLike, ds: LabelledImages) -> dict[str, np.ndarray]:
    """Read splits saved by :func:`save_splits`, matching rows to items by ``source``.

    Raises:
        CxrError: the file is missing or malformed, or the dataset changed (sources missing, labels differ).
    """
    path = Path(path_csv)
    if not path.is_file():
        raise CxrError(f"{path}: split file does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != SPLIT_COLUMNS:
            raise CxrError(f"{path}: expected columns {','.join(SPLIT_COLUMNS)}, found {reader.fieldnames}")
        rows = list(reader)
    index = _source_index([row["source"] for row in rows], [it.source for it in ds.items])
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    missing, relabelled = [], []
    for row in rows:
        i = index.get(row["source"])
        if i is None:
            missing.append(row["source"])
            continue
        if row["split"] not in out:
            raise CxrError(f"{path}: split {row['split']!r} for {row['source']} is not one of {SPLITS}")
        if _label_text(ds, i) != row["label"]:
            relabelled.append(row["source"])
        out[row["split"]].append(i)
    if missing or relabelled:
        first = (missing or relabelled)[0]
        raise CxrError(
            f"{path}: the dataset changed since the splits were saved: {len(missing)} sources missing, "
            f"{len(relabelled)} with a different label (e.g. {first})"
        )
    return {s: np.asarray(sorted(v), dtype=np.int64) for s, v in out.items()}
