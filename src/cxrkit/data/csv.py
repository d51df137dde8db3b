"""CSV-labelled datasets: NIH ChestX-ray14 ``Data_Entry_2017*.csv`` and a generic ``path,label`` / multi-label CSV.

NIH ChestX-ray14 (Wang et al., CVPR 2017) has one row per image with ``|``-separated ``Finding Labels``; ``No
Finding`` means all 14 findings are negative. Its images may sit in ``images/``, beside the CSV or in the
``images_001/images`` ... folders of the original download. When ``train_val_list.txt`` and ``test_list.txt`` lie
beside the CSV, items carry the official split.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

from cxrkit.data.base import DatasetSpec, Item, LabelledImages
from cxrkit.data.images import content_problem, read_item
from cxrkit.data.labels import find_label, order_labels, select_labels, single_label_task
from cxrkit.errors import CxrError

NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
NIH_NO_FINDING = "No Finding"
PATH_COLUMNS = ("path", "image", "file", "filename")
LABEL_COLUMNS = ("label", "class")
META_COLUMNS = ("patient", "split")
MULTILABEL_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": math.nan, "-1": math.nan, "-1.0": math.nan}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def load_csv(
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    labels: Sequence[str] | None = None,
    task: str = "auto",
) -> LabelledImages:
    """Load a CSV-labelled dataset; NIH ChestX-ray14 is recognised by its header.

    Generic CSVs have a path column (``path``, ``image``, ``file`` or ``filename``) and either one ``label`` column
    of names (binary or multiclass by the number of distinct names) or one column per label holding 1, 0 or blank
    (unknown: nan; ``-1`` also means unknown, as in CheXpert) for multilabel; optional ``patient`` and ``split``
    columns. Relative paths are resolved against ``image_dir`` or the CSV's folder. Rows whose image file is
    missing are reported in ``skipped``.

    Args:
        path: the CSV file.
        image_dir: folder the image paths are relative to.
        labels: labels to keep, case-insensitive (for NIH: which findings, default the 14 standard ones).
        task: ``auto`` or the task the file must give.

    Returns:
        The dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"data root {path} does not exist" if not path.exists() else f"{path}: not a file")
    header, rows = _read_rows(path)
    if "Image Index" in header and "Finding Labels" in header:
        if task not in ("auto", "multilabel"):
            raise CxrError(f"{path}: NIH ChestX-ray14 labels are multilabel, not {task!r}")
        return _load_nih(path, rows, image_dir, labels)
    return _load_generic(path, header, rows, image_dir, labels, task)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CxrError(f"{path}: cannot read CSV ({e})") from e
    if not header:
        raise CxrError(f"{path}: empty CSV (no header)")
    rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str)} for row in rows]
    return header, rows


def _load_nih(
    path: Path, rows: list[dict[str, str]], image_dir: str | os.PathLike | None, labels: Sequence[str] | None
) -> LabelledImages:
    known = (*NIH_FINDINGS, NIH_NO_FINDING)
    chosen = []
    for want in labels if labels is not None else NIH_FINDINGS:
        idx = find_label(want, known)
        if idx is None:
            raise CxrError(f"{path}: {want!r} is not an NIH ChestX-ray14 label; labels are {list(known)}")
        chosen.append(known[idx])
    index = _nih_image_index(path, image_dir)
    splits = _nih_official_splits(path.parent)
    items, skipped = [], []
    seen: dict[str, int] = {}
    names = {name.lower() for name in known}
    for line, row in enumerate(rows, start=2):
        image = row.get("Image Index", "")
        file = index.get(image)
        if file is None:
            skipped.append((image or f"{path} line {line}", f"image file not found ({path.name} line {line})" if image
                            else f"no Image Index ({path.name} line {line})"))
            continue
        why = _row_problem(path, line, image, file, seen)
        written = [f.strip() for f in row.get("Finding Labels", "").split("|") if f.strip()]
        findings = {f.lower() for f in written}
        unknown = [f for f in written if f.lower() not in names]  # as the file spells them
        if why is None and not findings:  # "No Finding" is how the file says none; blank says nothing
            why = f"no Finding Labels ({path.name} line {line})"
        if why is None and unknown:  # a typo would otherwise read as a negative for every finding
            why = f"unknown finding {unknown[0]!r} ({path.name} line {line})"
        if why is None and NIH_NO_FINDING.lower() in findings and len(findings) > 1:  # both cannot be true
            why = f"'{NIH_NO_FINDING}' together with findings ({path.name} line {line})"
        if why:
            skipped.append((str(file), why))
            continue
        target = tuple(1.0 if lab.lower() in findings else 0.0 for lab in chosen)
        patient = (row.get("Patient ID") or "").strip() or str(file)  # no id: its own patient (noted at splitting)
        items.append(Item(str(file), patient, target, splits.get(image)))
    spec = DatasetSpec("chestxray14", "multilabel", tuple(chosen))
    return LabelledImages(spec, items, read_item, skipped)


def _nih_image_index(path: Path, image_dir: str | os.PathLike | None) -> dict[str, Path]:
    """File name -> path for every file in the candidate image folders (first folder wins)."""
    if image_dir is not None:
        folders = [Path(image_dir)]
        if not folders[0].is_dir():
            raise CxrError(f"{image_dir}: image folder does not exist")
    else:
        folders = [path.parent / "images", path.parent, *sorted(path.parent.glob("images_*/images"))]
    index: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.is_file():
                        index.setdefault(e.name, Path(e.path))
    return index


def _nih_official_splits(folder: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    lists = {"train": folder / "train_val_list.txt", "test": folder / "test_list.txt"}
    if not all(p.is_file() for p in lists.values()):
        return out
    for split, p in lists.items():
        out.update({line.strip(): split for line in p.read_text().splitlines() if line.strip()})
    return out


def _find_column(header: Sequence[str], names: Sequence[str]) -> str | None:
    lowered = {h.lower(): h for h in header}
    return next((lowered[n] for n in names if n in lowered), None)


def _load_generic(
    path: Path,
    header: list[str],
    rows: list[dict[str, str]],
    image_dir: str | os.PathLike | None,
    labels: Sequence[str] | None,
    task: str,
) -> LabelledImages:
    path_col = _find_column(header, PATH_COLUMNS)
    if path_col is None:
        raise CxrError(f"{path}: no image path column; expected one of {PATH_COLUMNS} in header {header}")
    label_col = _find_column(header, LABEL_COLUMNS)
    patient_col, split_col = _find_column(header, ("patient",)), _find_column(header, ("split",))
    base = Path(image_dir) if image_dir is not None else path.parent
    if label_col is not None:
        ds = _generic_single(path, rows, (path_col, label_col, patient_col, split_col), base, task)
    else:
        columns = [h for h in header if h not in (path_col, patient_col, split_col)]
        if not columns:
            raise CxrError(f"{path}: no label columns; add a 'label' column or one 0/1 column per label")
        if task not in ("auto", "multilabel"):
            raise CxrError(f"{path}: one column per label means multilabel, not {task!r}")
        ds = _generic_multi(path, rows, (path_col, patient_col, split_col), columns, base)
    if labels is not None:
        ds = select_labels(ds, include=labels)
        if ds.spec.task != "multilabel":
            ds.spec = DatasetSpec(ds.spec.name, single_label_task(ds.spec.labels, task, str(path)), ds.spec.labels)
    return ds


def _row_problem(path: Path, line: int, value: str, file: Path, seen: dict[str, int]) -> str | None:
    """Why row ``line`` (naming ``value``, found at ``file``) cannot be an item: no path, no file, a file an earlier
    row already listed (by its real path, however it is spelled), or one whose header rules it out as a folder scan
    would (:func:`~cxrkit.data.images.content_problem`); None when it can."""
    if not value:
        return f"no image path ({path.name} line {line})"
    if not file.is_file():
        return "image file not found"
    real = os.path.realpath(file)
    if real in seen:
        return f"listed again ({path.name} line {line}; first on line {seen[real]})"
    seen[real] = line
    return content_problem(file)


def _resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else base / p


def _row_meta(path: Path, line: int, row: dict[str, str], cols: tuple[str | None, ...], file: Path) -> tuple:
    patient_col, split_col = cols
    patient = ((row.get(patient_col) or "").strip() if patient_col else "") or str(file)
    split_value = (row.get(split_col) or "").lower() if split_col else ""
    if split_value and split_value not in SPLIT_NAMES:
        raise CxrError(f"{path}:{line}: split {split_value!r} is not one of train/val/test")
    return patient, SPLIT_NAMES.get(split_value)


def _generic_single(path: Path, rows: list[dict[str, str]], cols: tuple, base: Path, task: str) -> LabelledImages:
    path_col, label_col, *meta_cols = cols
    found, skipped = [], []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        file = _resolve(base, row.get(path_col, ""))
        label = row.get(label_col, "")
        why = _row_problem(path, line, row.get(path_col, ""), file, seen)
        if why:
            skipped.append((str(file), why))
        elif not label:
            skipped.append((str(file), f"no label ({path.name} line {line})"))
        else:
            found.append((file, label, *_row_meta(path, line, row, tuple(meta_cols), file)))
    names: list[str] = []
    for _, label, _, _ in found:
        if find_label(label, names) is None:
            names.append(label)
    order = order_labels(names)
    items = [Item(str(f), patient, find_label(lab, order), split) for f, lab, patient, split in found]
    spec = DatasetSpec(path.stem, single_label_task(order, task, str(path)), order)
    return LabelledImages(spec, items, read_item, skipped)


def _generic_multi(
    path: Path, rows: list[dict[str, str]], cols: tuple, columns: list[str], base: Path
) -> LabelledImages:
    path_col, *meta_cols = cols
    items, skipped = [], []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        file = _resolve(base, row.get(path_col, ""))
        why = _row_problem(path, line, row.get(path_col, ""), file, seen)
        if why:
            skipped.append((str(file), why))
            continue
        target = []
        for col in columns:
            value = row.get(col, "")
            if value not in MULTILABEL_VALUES:
                raise CxrError(f"{path}:{line}: column {col!r} has {value!r}; expected 1, 0 or blank (unknown)")
            target.append(MULTILABEL_VALUES[value])
        patient, split = _row_meta(path, line, row, tuple(meta_cols), file)
        items.append(Item(str(file), patient, tuple(target), split))
    return LabelledImages(DatasetSpec(path.stem, "multilabel", tuple(columns)), items, read_item, skipped)
