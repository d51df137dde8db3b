"""Combine several labelled sources into one dataset, matching labels by name.

Example (study 5, normal / COVID-19 / viral pneumonia)::

    covid = load_folder("covid19-radiography-subset")                       # COVID, Normal
    viral = load_folder("chest_xray", task="normal-bacterial-viral", include=["viral"])
    ds = combine([covid, viral], "covid-viral")                             # Normal, COVID, viral
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from cxrkit.data.base import DatasetSpec, Item, LabelledImages, Reader
from cxrkit.data.labels import find_label, order_labels, select_labels
from cxrkit.errors import CxrError

__all__ = ["combine", "select_labels", "CombinedReader"]


class CombinedReader:
    """Dispatches each item to the reader of the part it came from, looked up by ``Item.source``.

    Keyed by source rather than position so that subsets and re-labelled copies of the combined dataset still read.
    """

    def __init__(self, readers: Sequence[Reader], part_of_source: dict[str, int]) -> None:
        self.readers = list(readers)
        self.part_of_source = part_of_source

    def __call__(self, item: Item) -> Any:
        part = self.part_of_source.get(item.source)
        if part is None:
            raise CxrError(f"{item.source}: not an item of this combined dataset")
        return self.readers[part](item)


def combine(parts: Sequence[LabelledImages], name: str) -> LabelledImages:
    """Merge single-label datasets into one, matching label names case-insensitively (first spelling wins).

    Labels are ordered with a normal-like label first, then alphabetically; two labels give a binary task, more a
    multiclass one. Patient ids are prefixed with the part's dataset name (``covid19:COVID-100``) when the parts
    come from different datasets, so that unrelated ids cannot collide. An item whose source already came from an
    earlier part is left out and reported in ``skipped``. Items keep their own split only when every part has
    splits; otherwise splits are cleared, to be assigned over the whole combination.

    Args:
        parts: datasets to merge, each filtered beforehand with :func:`select_labels` if needed.
        name: the combined dataset's name.

    Returns:
        The combined dataset, reading through each part's reader.
    """
    if not parts:
        raise CxrError(f"{name}: nothing to combine (no parts)")
    multilabel = [p.spec.name for p in parts if p.spec.task == "multilabel"]
    if multilabel:
        raise CxrError(f"{name}: cannot combine multilabel datasets ({', '.join(multilabel)}) by class name")
    names: list[str] = []
    for part in parts:
        for label in part.spec.labels:
            if find_label(label, names) is None:
                names.append(label)
    labels = order_labels(names)
    prefix = len({p.spec.name for p in parts}) > 1
    keep_splits = all(all(it.split is not None for it in p.items) for p in parts)
    items: list[Item] = []
    skipped: list[tuple[str, str]] = []
    part_of_source: dict[str, int] = {}
    part_of_file: dict[str, int] = {}  # by real path: a folder reached through a link is the same folder
    for k, part in enumerate(parts):
        skipped.extend(part.skipped)
        new_index = [find_label(label, labels) for label in part.spec.labels]
        for it in part.items:
            real = os.path.realpath(it.source)
            if real in part_of_file:
                skipped.append((it.source, f"duplicate: already in part {part_of_file[real]} of {name}"))
                continue
            part_of_source[it.source] = part_of_file[real] = k
            patient = f"{part.spec.name}:{it.patient}" if prefix else it.patient
            items.append(Item(it.source, patient, new_index[it.target], it.split if keep_splits else None))
    task = "binary" if len(labels) == 2 else "multiclass"
    reader = CombinedReader([p.reader for p in parts], part_of_source)
    return LabelledImages(DatasetSpec(name, task, labels), items, reader, skipped)
