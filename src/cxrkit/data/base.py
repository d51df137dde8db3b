"""The data contract every loader meets: a :class:`DatasetSpec`, a list of :class:`Item` and a reader.

A loader (``folder.py``, ``medmnist.py``, ``csv.py``, ``combine.py``) returns :class:`LabelledImages`. Each item keeps
where its pixels came from (``source``) and whose they are (``patient``), so splits can be grouped by patient and
every prediction can be traced back to a file. Labels are names; ``target`` indexes ``spec.labels``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from cxrkit.errors import printable

Task = Literal["binary", "multiclass", "multilabel"]
TASKS: tuple[str, ...] = ("binary", "multiclass", "multilabel")
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is about.

    Attributes:
        name: short name, e.g. ``chest_xray`` or ``pneumoniamnist``.
        task: ``binary`` (two labels, the second is the positive class), ``multiclass`` or ``multilabel``.
        labels: label names; a target indexes this tuple.
        positive: for binary tasks, the name of the positive class (``labels[1]``).
    """

    name: str
    task: Task
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")
        if self.task == "binary" and len(self.labels) != 2:
            raise ValueError(f"a binary task needs exactly two labels, got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"duplicate label names in {list(self.labels)}")

    @property
    def positive(self) -> str | None:
        return self.labels[1] if self.task == "binary" else None

    def to_dict(self) -> dict:
        return {"name": self.name, "task": self.task, "labels": list(self.labels), "positive": self.positive}


@dataclass(frozen=True)
class Item:
    """One labelled image.

    Attributes:
        source: the file path, or ``<file>#<split>/<row>`` for images stored inside an array file.
        patient: patient id used to group splits; loaders fall back to ``source`` when none is known.
        target: class index for binary / multiclass; for multilabel a tuple of 0.0 / 1.0 / nan (unknown) per label.
        split: the dataset's own split (``train``/``val``/``test``) when it defines one, else None.
    """

    source: str
    patient: str
    target: int | tuple[float, ...]
    split: str | None = None


Reader = Callable[[Item], Image.Image]


@dataclass
class LabelledImages:
    """A labelled image collection: a spec, items and a reader that decodes one item to an 8-bit PIL image.

    The reader returns mode ``L`` (grayscale, the usual case) or ``RGB``; transforms turn either into the
    backbone's 3-channel tensor.
    """

    spec: DatasetSpec
    items: list[Item]
    reader: Reader
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) of files left out by a scan

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> Image.Image:
        return self.reader(self.items[index])

    def skipped_note(self, where: str = "") -> str | None:
        """One line on the files the scan left out (how many, and the first with its reason), or None."""
        if not self.skipped:
            return None
        source, reason = self.skipped[0]
        return (f"skipped {len(self.skipped)} image(s) that cannot be used{where}; the first: "
                f"{printable(source)}: {reason}")

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        return LabelledImages(self.spec, [self.items[i] for i in indices], self.reader, list(self.skipped))

    def targets(self) -> np.ndarray:
        """Class indices (shape ``[n]``) or multi-hot rows with nan for unknown (shape ``[n, labels]``)."""
        if self.spec.task == "multilabel":
            return np.asarray([it.target for it in self.items], dtype=np.float32).reshape(len(self.items), -1)
        return np.asarray([it.target for it in self.items], dtype=np.int64)

    def class_counts(self) -> dict[str, int]:
        """Images per label (for multilabel: positives per label)."""
        t = self.targets()
        if self.spec.task == "multilabel":
            counts = np.nansum(t, axis=0) if len(t) else np.zeros(len(self.spec.labels))
        else:
            counts = np.bincount(t, minlength=len(self.spec.labels))
        return {name: int(c) for name, c in zip(self.spec.labels, counts, strict=False)}
