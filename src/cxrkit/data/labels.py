"""Label names: ordering, task from label count, and choosing / renaming labels of a loaded dataset.

Labels are matched by name, case-insensitively. A "normal"-like label always goes first, so in a binary task the
other label is the positive class.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from cxrkit.data.base import DatasetSpec, Item, LabelledImages, Task
from cxrkit.errors import CxrError

NORMAL_NAMES = frozenset({"normal", "no finding", "no_finding", "healthy", "negative"})
SINGLE_LABEL_TASKS = ("auto", "binary", "multiclass")


def label_key(name: str) -> str:
    """How class names are matched: without case and without spaces at either end (``NORMAL`` in train is
    ``Normal`` in test)."""
    return name.strip().lower()


def is_normal_like(label: str) -> bool:
    """Whether a label names the normal / negative class (``NORMAL``, ``Normal``, ``No Finding``, ...)."""
    return label_key(label) in NORMAL_NAMES


def order_labels(names: Iterable[str]) -> tuple[str, ...]:
    """Sort label names case-insensitively, with a normal-like label first."""
    unique = sorted(set(names), key=lambda s: (s.lower(), s))
    return tuple(sorted(unique, key=lambda s: not is_normal_like(s)))


def single_label_task(labels: Sequence[str], task: str, where: str) -> Task:
    """Resolve ``auto`` / ``binary`` / ``multiclass`` for a single-label dataset.

    Args:
        labels: the final label names.
        task: the requested task.
        where: the dataset's location, for error messages.

    Returns:
        ``binary`` for two labels under ``auto``, otherwise ``multiclass`` (or the requested task).
    """
    if task not in SINGLE_LABEL_TASKS:
        raise CxrError(f"{where}: task {task!r} is not possible for single-label data; use one of {SINGLE_LABEL_TASKS}")
    if task == "binary" and len(labels) != 2:
        raise CxrError(f"{where}: task 'binary' needs exactly 2 labels, found {len(labels)}: {list(labels)}")
    if task == "auto":
        return "binary" if len(labels) == 2 else "multiclass"
    return task  # type: ignore[return-value]


def find_label(name: str, labels: Sequence[str]) -> int | None:
    """Index of ``name`` in ``labels`` matched by :func:`label_key`, or None."""
    keys = [label_key(lab) for lab in labels]
    key = label_key(name)
    return keys.index(key) if key in keys else None


def select_labels(
    ds: LabelledImages, include: Sequence[str] | None = None, rename: Mapping[str, str] | None = None
) -> LabelledImages:
    """Rename labels, then keep only some of them.

    Renaming two labels to the same name merges them. For single-label data, items whose label is not included are
    dropped and the labels are re-ordered (normal-like first) with the task re-derived from their count (2 labels:
    binary). For multilabel data every item stays and only the label columns change (order of ``include``).

    Args:
        ds: the dataset.
        include: label names to keep, matched case-insensitively after renaming; None keeps all.
        rename: ``{old: new}``; ``old`` is matched case-insensitively.

    Returns:
        A new :class:`LabelledImages` sharing the reader.
    """
    where = ds.spec.name
    names = list(ds.spec.labels)
    for old, new in (rename or {}).items():
        idx = find_label(old, ds.spec.labels)
        if idx is None:
            raise CxrError(f"{where}: cannot rename label {old!r}: labels are {list(ds.spec.labels)}")
        names[idx] = str(new)
    renamed = _unique_first_spelling(names)
    keep = renamed
    if include is not None:
        keep = []
        for want in include:
            idx = find_label(want, renamed)
            if idx is None:
                raise CxrError(f"{where}: label {want!r} is not in the dataset's labels {renamed}")
            if renamed[idx] not in keep:
                keep.append(renamed[idx])
    if ds.spec.task == "multilabel":
        return _select_multilabel(ds, names, keep)
    return _select_single(ds, names, keep)


def _unique_first_spelling(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        if find_label(n, out) is None:
            out.append(n)
    return out


def _select_single(ds: LabelledImages, names: Sequence[str], keep: Sequence[str]) -> LabelledImages:
    labels = order_labels(keep)
    old_to_new = {i: find_label(n, labels) for i, n in enumerate(names)}
    items = [
        Item(it.source, it.patient, old_to_new[it.target], it.split)
        for it in ds.items
        if old_to_new[it.target] is not None
    ]
    task = "binary" if len(labels) == 2 else "multiclass"
    return LabelledImages(DatasetSpec(ds.spec.name, task, labels), items, ds.reader, list(ds.skipped))


def _select_multilabel(ds: LabelledImages, names: Sequence[str], keep: Sequence[str]) -> LabelledImages:
    targets = ds.targets() if ds.items else np.zeros((0, len(names)), dtype=np.float32)
    columns = []
    for label in keep:
        cols = targets[:, [i for i, n in enumerate(names) if n.lower() == label.lower()]]
        known = ~np.isnan(cols)
        merged = np.where(known, cols, -np.inf).max(axis=1)  # any positive wins; nan only if all unknown
        columns.append(np.where(known.any(axis=1), merged, np.nan))
    new = np.stack(columns, axis=1) if columns else np.zeros((len(ds.items), 0), dtype=np.float32)
    items = [
        Item(it.source, it.patient, tuple(float(v) for v in row), it.split)
        for it, row in zip(ds.items, new, strict=True)
    ]
    spec = DatasetSpec(ds.spec.name, "multilabel", tuple(keep))
    return LabelledImages(spec, items, ds.reader, list(ds.skipped))
