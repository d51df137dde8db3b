"""One entry point from a data config to a :class:`~cxrkit.data.base.LabelledImages`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cxrkit.data.base import LabelledImages
from cxrkit.data.labels import select_labels
from cxrkit.errors import CxrError

FORMATS = ("auto", "folder", "medmnist", "csv", "combine")
DEFAULTS: dict[str, Any] = {
    "format": "auto",
    "root": None,
    "name": None,
    "size": 28,
    "task": "auto",
    "include": None,
    "rename": None,
    "download": False,
    "sources": None,
}


def as_config(cfg: Any) -> SimpleNamespace:
    """A namespace with every data key, from a mapping or any object with (some of) those attributes.

    Raises:
        CxrError: a mapping has keys that are not data keys.
    """
    if isinstance(cfg, Mapping):
        unknown = sorted(set(cfg) - set(DEFAULTS))
        if unknown:
            raise CxrError(f"data source: unknown keys {unknown}; known keys are {sorted(DEFAULTS)}")
        return SimpleNamespace(**{**DEFAULTS, **cfg})
    return SimpleNamespace(**{k: getattr(cfg, k, v) for k, v in DEFAULTS.items()})


def load_dataset(cfg: Any) -> LabelledImages:
    """Load the dataset a config describes.

    ``format: auto`` picks the loader from ``root``: a ``.csv`` file -> csv, a ``.npz`` file or a ``name`` that
    MedMNIST knows -> medmnist, a folder -> class folders. ``combine`` loads each entry of ``sources`` (dicts or
    objects with the same keys) and merges them by label name.

    Args:
        cfg: an object or mapping with ``format``, ``root``, ``name``, ``size``, ``task``, ``include``, ``rename``,
            ``download`` and ``sources`` (missing ones take defaults).

    Returns:
        The dataset, with ``include`` / ``rename`` applied.
    """
    cfg = as_config(cfg)
    fmt = resolve_format(cfg)
    if fmt == "combine":
        from cxrkit.data.combine import combine

        if not cfg.sources:
            raise CxrError("data source: format 'combine' needs a non-empty 'sources' list")
        parts = [load_dataset(source) for source in cfg.sources]
        return _select(combine(parts, cfg.name or "combined"), cfg)
    if fmt == "medmnist":
        return _select(_load_medmnist(cfg), cfg)
    root = Path(os.path.expanduser(cfg.root))
    if fmt == "csv":
        from cxrkit.data.csv import load_csv

        ds = load_csv(root, labels=cfg.include, task=cfg.task)
        return select_labels(ds, rename=cfg.rename) if cfg.rename else ds
    from cxrkit.data.folder import load_folder

    return load_folder(root, task=cfg.task, include=cfg.include, rename=cfg.rename, name=cfg.name)


def resolve_format(cfg: SimpleNamespace) -> str:
    """The loader ``cfg.format`` means (resolving ``auto``); checks that ``root`` exists where it must."""
    if cfg.format not in FORMATS:
        raise CxrError(f"data source: format {cfg.format!r} is not one of {FORMATS}")
    if cfg.format == "combine":
        return "combine"
    root = Path(os.path.expanduser(cfg.root)) if cfg.root is not None else None
    if cfg.format in ("auto", "medmnist") and root is not None and not root.exists() and is_medmnist_name(cfg.root):
        # ``--data pneumoniamnist``: a MedMNIST name, looked up in the default data folder
        cfg.name, cfg.root, root = str(cfg.root).lower(), None, None
    if cfg.format == "medmnist" or (cfg.format == "auto" and _is_medmnist(cfg, root)):
        if root is not None and not root.exists() and not cfg.download:
            raise CxrError(f"data root {root} does not exist")
        return "medmnist"
    if root is None:
        raise CxrError(f"data source: format {cfg.format!r} needs a 'root'")
    if not root.exists():
        raise CxrError(f"data root {root} does not exist")
    if cfg.format != "auto":
        return cfg.format
    if root.is_file() and root.suffix.lower() == ".csv":
        return "csv"
    if root.is_dir():
        return "folder"
    raise CxrError(f"{root}: cannot tell the data format; use a folder, a .csv or a .npz file, or set 'format'")


def _is_medmnist(cfg: SimpleNamespace, root: Path | None) -> bool:
    if root is not None and root.suffix.lower() == ".npz":
        return True
    if not cfg.name:
        return False
    from cxrkit.data.medmnist import medmnist_info

    return str(cfg.name).lower() in medmnist_info()


def is_medmnist_name(root: str) -> bool:
    """Whether ``root`` is the name of a MedMNIST dataset (``pneumoniamnist``), not a path."""
    from cxrkit.data.medmnist import medmnist_info

    return root.lower() in medmnist_info()


def _load_medmnist(cfg: SimpleNamespace) -> LabelledImages:
    from cxrkit.data.medmnist import load_medmnist

    name, size = cfg.name, int(cfg.size)
    if not name and cfg.root is not None and str(cfg.root).lower().endswith(".npz"):
        stem = Path(cfg.root).stem  # pneumoniamnist or pneumoniamnist_64
        base, _, suffix = stem.rpartition("_")
        name, size = (base, int(suffix)) if suffix.isdigit() else (stem, 28)
    if not name:
        raise CxrError("data source: MedMNIST needs a 'name' such as pneumoniamnist")
    ds = load_medmnist(name, size=size, root=cfg.root, download=bool(cfg.download))
    if cfg.task not in ("auto", ds.spec.task):
        raise CxrError(f"{name}: MedMNIST defines task {ds.spec.task!r}, not {cfg.task!r}")
    return ds


def _select(ds: LabelledImages, cfg: SimpleNamespace) -> LabelledImages:
    if cfg.include is None and not cfg.rename:
        return ds
    return select_labels(ds, include=cfg.include, rename=cfg.rename)
