"""Class-folder datasets in the Kaggle layout: ``<root>/{train,val,test}/<CLASS>/*`` or ``<root>/<CLASS>/*``.

File names of the Kermany et al. (2018) pediatric chest X-ray set carry the patient and, for pneumonia, the cause:
``person1234_bacteria_5.jpeg``, ``person1234_virus_5.jpeg``, ``IM-0115-0001.jpeg``, ``NORMAL2-IM-0115-0001.jpeg``.
:func:`patient_from_filename` turns those into patient ids so that splits can be grouped by patient.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from cxrkit.data.base import DatasetSpec, Item, LabelledImages
from cxrkit.data.images import IMAGE_SUFFIXES, content_problem, name_problem, read_item
from cxrkit.data.labels import find_label, label_key, order_labels, select_labels, single_label_task
from cxrkit.errors import CxrError, printable

SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
NORMAL_BACTERIAL_VIRAL = "normal-bacterial-viral"
FOLDER_TASKS = ("auto", "binary", "multiclass", NORMAL_BACTERIAL_VIRAL)
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "icon\r"})

# (pattern, group) pairs tried in order on the file stem; the first match gives the patient id.
PATIENT_PATTERNS: tuple[tuple[re.Pattern[str], int], ...] = (
    # Kermany pneumonia: person1234_bacteria_5 / person1234_virus_5 (rarely person447_virus_921_1)
    (re.compile(r"^(person\d+)_(?:bacteria|virus)(?:_\d+)+$", re.IGNORECASE), 1),
    # Kermany normal: IM-0115-0001, IM-0429-0001-0002 and NORMAL2-IM-0115-0001 (a different patient from IM-0115)
    (re.compile(r"^((?:[A-Za-z0-9]+-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE), 1),
)
CAUSE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"_bacteria_", re.IGNORECASE), "bacterial"),
    (re.compile(r"_virus_", re.IGNORECASE), "viral"),
)


def patient_from_filename(filename: str) -> str:
    """Patient id from a file name: Kermany patterns from :data:`PATIENT_PATTERNS`, else the file stem.

    Args:
        filename: a file name or path, e.g. ``person1234_bacteria_5.jpeg``.

    Returns:
        ``person1234`` for that example; ``NORMAL2-IM-0115`` for ``NORMAL2-IM-0115-0001.jpeg``; the stem for
        names without a known pattern (``COVID-100.png`` -> ``COVID-100``: one patient per file).
    """
    stem = Path(filename).stem
    for pattern, group in PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group(group)
    return stem


def pneumonia_cause(filename: str) -> str | None:
    """``bacterial`` or ``viral`` from a Kermany pneumonia file name, or None when the name does not say."""
    name = Path(filename).name
    causes = {cause for pattern, cause in CAUSE_PATTERNS if pattern.search(name)}
    return causes.pop() if len(causes) == 1 else None


def load_folder(
    root: str | os.PathLike,
    task: str = "auto",
    include: Sequence[str] | None = None,
    rename: Mapping[str, str] | None = None,
    check: bool = True,
    name: str | None = None,
) -> LabelledImages:
    """Load a class-folder dataset.

    Labels are the class folder names (after ``rename``), sorted with a normal-like label first, so in a binary
    task the other label is positive. Hidden and system files and non-image extensions are left out and reported in
    ``skipped``; with ``check`` empty files and files whose first bytes are no known image format are too. Images
    are decoded only when read, so a corrupt file raises :class:`CxrError` naming it at read time.

    Args:
        root: the dataset folder.
        task: ``auto`` (2 labels: binary, more: multiclass), ``binary``, ``multiclass`` or
            ``normal-bacterial-viral`` (the PNEUMONIA folder split into ``bacterial`` / ``viral`` by file name).
        include: label names to keep (after renaming), case-insensitive.
        rename: ``{old: new}`` label names.
        check: sniff each file's first bytes (cheap; no full decode).
        name: dataset name; defaults to the folder name.

    Returns:
        The dataset; items carry ``split`` when the folder has split subfolders.
    """
    root = Path(root)
    if not root.is_dir():
        raise CxrError(f"data root {root} does not exist" if not root.exists() else f"{root}: not a folder")
    if task not in FOLDER_TASKS:
        raise CxrError(f"{root}: task {task!r} is not possible for a class-folder dataset; use one of {FOLDER_TASKS}")
    skipped: list[tuple[str, str]] = []
    files = _scan(root, check, skipped)  # (path, class folder name, split)
    if not files:
        # A dataset one level down (--data /data for /data/chest_xray) is the usual slip: name it.
        below = next((d for d in _visible_dirs(root) if _scan(d, False, [])), None)
        hint = f"; did you mean {below}?" if below is not None else ""
        raise CxrError(f"{root}: no images found (expected <root>/<split>/<class>/* or <root>/<class>/*){hint}")
    if task == NORMAL_BACTERIAL_VIRAL:
        files = _split_pneumonia(root, files, skipped)
    names: list[str] = []
    for _, label, _ in files:
        if find_label(label, names) is None:  # NORMAL in train and Normal in test are one label
            names.append(label)
    labels = order_labels(names)
    items = [Item(str(p), patient_from_filename(p.name), find_label(lab, labels), split) for p, lab, split in files]
    ds_name = name or root.resolve().name
    skipped = [(printable(source), reason) for source, reason in skipped]  # a name that is not UTF-8, spelt out
    ds = LabelledImages(DatasetSpec(ds_name, "multiclass", labels), items, read_item, skipped)
    if include is not None or rename:
        ds = select_labels(ds, include=include, rename=rename)
    final = single_label_task(ds.spec.labels, "auto" if task == NORMAL_BACTERIAL_VIRAL else task, str(root))
    ds.spec = DatasetSpec(ds_name, final, ds.spec.labels)
    return ds


def _scan(root: Path, check: bool, skipped: list[tuple[str, str]]) -> list[tuple[Path, str, str | None]]:
    """All candidate image files as (path, class folder name, split or None), sorted."""
    subdirs = _visible_dirs(root)
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_DIRS]
    _stray_images(root, skipped)
    if split_dirs:
        for d in subdirs:
            if d not in split_dirs:
                skipped.append((str(d), "folder ignored: not a split folder (train/val/test) beside split folders"))
        for d in split_dirs:
            _stray_images(d, skipped)
        class_dirs = [(c, SPLIT_DIRS[d.name.lower()]) for d in split_dirs for c in _visible_dirs(d)]
    else:
        class_dirs = [(c, None) for c in subdirs]
    _refuse_look_alike_classes([c for c, _ in class_dirs])
    files = []
    for class_dir, split in class_dirs:
        if problem := name_problem(class_dir.name):
            skipped.append((str(class_dir), f"class folder ignored: {problem}"))
            continue
        for path in sorted(class_dir.iterdir()):
            reason = _reject_reason(path, check)
            if reason:
                skipped.append((str(path), reason))
            else:
                files.append((path, class_dir.name, split))
    return files


def _refuse_look_alike_classes(class_dirs: list[Path]) -> None:
    """Class folders side by side whose names differ only in case or in spaces at either end (``Viral`` and
    ``viral``) would be read as one class, as ``NORMAL`` in train and ``Normal`` in test are: refuse them."""
    seen: dict[tuple[Path, str], Path] = {}
    for folder in class_dirs:
        other = seen.setdefault((folder.parent, label_key(folder.name)), folder)
        if other is not folder:
            raise CxrError(f"{folder.parent}: class folders {other.name!r} and {folder.name!r} differ only in case or "
                           "spaces, and would be read as one class; merge or rename them")


def _stray_images(folder: Path, skipped: list[tuple[str, str]]) -> None:
    """Report image files lying where class folders are expected: they have no class."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            skipped.append((str(path), "image outside a class folder ignored (it has no class)"))


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))


def _reject_reason(path: Path, check: bool) -> str | None:
    """Why a file in a class folder is not a usable image, or None; reads at most a few bytes."""
    if path.is_dir():
        inside = sum(1 for f in path.rglob("*") if f.is_file())
        return f"nested folder ignored ({inside} file{'' if inside == 1 else 's'} in it)"
    if path.name.startswith(".") or path.name.lower() in SYSTEM_FILES:
        return "hidden or system file"
    if problem := name_problem(path.name):
        return problem
    suffix = path.suffix.lower()
    if suffix and suffix not in IMAGE_SUFFIXES:
        return f"not an image file extension ({suffix})"
    return content_problem(path) if check else None


def _split_pneumonia(
    root: Path, files: list[tuple[Path, str, str | None]], skipped: list[tuple[str, str]]
) -> list[tuple[Path, str, str | None]]:
    """Relabel files of the PNEUMONIA folder as bacterial / viral from their names; report the undecidable."""
    if not any(label_key(label) == "pneumonia" for _, label, _ in files):
        raise CxrError(f"{root}: task {NORMAL_BACTERIAL_VIRAL!r} needs a PNEUMONIA class folder")
    out = []
    for path, label, split in files:
        if label_key(label) == "pneumonia":
            cause = pneumonia_cause(path.name)
            if cause is None:
                skipped.append((str(path), "cannot tell bacterial from viral: no '_bacteria_' or '_virus_' in name"))
                continue
            label = cause
        out.append((path, label, split))
    return out
