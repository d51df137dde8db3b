"""MedMNIST v2 datasets (Yang et al. 2023) from their ``.npz`` files, by name: ``pneumoniamnist``, ``chestmnist``, ...

Metadata (task, label names, sizes, download URL) comes from the ``medmnist`` package's ``INFO`` dict, imported
only when needed (it imports torch and creates ``~/.medmnist``). An npz holds ``{train,val,test}_{images,labels}``.
MedMNIST has no patient ids, so every image is its own patient: its official splits are the only safe grouping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrkit.data.base import SPLITS, DatasetSpec, Item, LabelledImages, Task
from cxrkit.errors import CxrError

TASKS_FROM_INFO: dict[str, Task] = {
    "binary-class": "binary",
    "multi-class": "multiclass",
    "ordinal-regression": "multiclass",
    "multi-label, binary-class": "multilabel",
}
SIZES = (28, 64, 128, 224)


def medmnist_info() -> dict[str, dict[str, Any]]:
    """The ``medmnist`` package's ``INFO`` dict (imported lazily)."""
    from medmnist import INFO

    return INFO


def npz_filename(name: str, size: int = 28) -> str:
    """MedMNIST's file name for a dataset and size: ``pneumoniamnist.npz``, ``pneumoniamnist_64.npz``."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def default_root() -> Path:
    """Where MedMNIST files are looked for: ``$CXR_DATA_DIR`` (or its ``medmnist/``), else ``~/.medmnist``."""
    return Path(os.environ.get("CXR_DATA_DIR") or Path.home() / ".medmnist").expanduser()


def load_medmnist(
    name: str, size: int = 28, root: str | os.PathLike | None = None, download: bool = False
) -> LabelledImages:
    """Load a 2-D MedMNIST dataset.

    Items have ``source = "<npz path>#<split>/<row>"``, ``patient = source`` (MedMNIST has no patient ids) and
    ``split`` from the npz key. Labels are loaded now; images are loaded on the first read and kept in memory.

    Args:
        name: a MedMNIST flag, e.g. ``pneumoniamnist`` (case-insensitive).
        size: image size, one of 28, 64, 128, 224.
        root: folder holding the npz, or the npz file itself; defaults to :func:`default_root`.
        download: fetch a missing file with the ``medmnist`` package (needs internet).

    Returns:
        The dataset, labels named as in ``INFO[name]["label"]``.
    """
    flag = name.lower()
    info = medmnist_info().get(flag)
    if info is None or flag.endswith("3d"):
        known = sorted(k for k in medmnist_info() if not k.endswith("3d"))
        raise CxrError(f"{name}: not a 2-D MedMNIST dataset; known: {', '.join(known)}")
    if size not in SIZES or (size != 28 and f"url_{size}" not in info):
        raise CxrError(f"{name}: size {size} is not available; MedMNIST sizes are {SIZES}")
    path = _locate(flag, size, root, download, info)
    labels = tuple(info["label"][k] for k in sorted(info["label"], key=int))
    task = TASKS_FROM_INFO.get(info["task"], "multiclass")
    items = _items(path, task)
    spec = DatasetSpec(flag if size == 28 else f"{flag}_{size}", task, labels)
    return LabelledImages(spec, items, NpzImages(path))


def _locate(flag: str, size: int, root: str | os.PathLike | None, download: bool, info: dict[str, Any]) -> Path:
    if root is not None and Path(root).suffix == ".npz":
        if Path(root).is_file():
            return Path(root)
        raise CxrError(f"{root}: MedMNIST file does not exist")
    folder = Path(os.path.expanduser(root)) if root is not None else default_root()
    folders = [folder, folder / "medmnist"]  # a data folder may keep MedMNIST files in a medmnist/ subfolder
    names = [npz_filename(flag, size)] + ([f"{flag}_28.npz"] if size == 28 else [])
    candidates = [f / n for f in folders for n in names]
    for c in candidates:
        if c.is_file():
            return c
    if download:
        return _download(flag, size, folder, info)
    url = info.get("url" if size == 28 else f"url_{size}", "the MedMNIST Zenodo record")
    raise CxrError(
        f"{candidates[0]}: MedMNIST file not found; download {npz_filename(flag, size)} from {url} into {folder} "
        "(or set download=True, which needs internet)"
    )


def _download(flag: str, size: int, folder: Path, info: dict[str, Any]) -> Path:
    import medmnist

    folder.mkdir(parents=True, exist_ok=True)
    try:
        getattr(medmnist, info["python_class"])(split="train", root=str(folder), size=size, download=True)
    except Exception as e:  # medmnist wraps network errors in a RuntimeError with a multi-line message
        first_line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CxrError(f"{folder / npz_filename(flag, size)}: download failed (needs internet): {first_line}") from e
    return folder / npz_filename(flag, size)


def _items(path: Path, task: Task) -> list[Item]:
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            splits = [s for s in SPLITS if f"{s}_labels" in keys and f"{s}_images" in keys]
            if not splits:
                raise CxrError(f"{path}: no '<split>_images' / '<split>_labels' arrays (has {sorted(keys)})")
            label_arrays = {s: np.asarray(npz[f"{s}_labels"]) for s in splits}
    except (OSError, ValueError, EOFError) as e:
        raise CxrError(f"{path}: cannot read npz file ({e})") from e
    items = []
    for split, arr in label_arrays.items():
        arr = arr.reshape(len(arr), -1)
        for row, value in enumerate(arr):
            source = f"{path}#{split}/{row}"
            target = tuple(float(v) for v in value) if task == "multilabel" else int(value[0])
            items.append(Item(source, source, target, split))
    return items


class NpzImages:
    """Reader for ``<npz>#<split>/<row>`` items: loads each split's image array once, on first use."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reload lazily instead of pickling arrays
        return {"path": self.path, "_arrays": {}}

    def __call__(self, item: Item) -> Image.Image:
        split, _, row = item.source.rpartition("#")[2].partition("/")
        if split not in self._arrays:
            try:
                with np.load(self.path) as npz:
                    self._arrays[split] = np.asarray(npz[f"{split}_images"])
            except (OSError, ValueError, KeyError, EOFError) as e:
                raise CxrError(f"{self.path}: cannot read {split}_images ({e})") from e
        pixels = self._arrays[split][int(row)]
        im = Image.fromarray(np.ascontiguousarray(pixels.astype(np.uint8)))
        return im if im.mode == "L" else im.convert("L")
