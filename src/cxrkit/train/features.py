"""Cached features for stages that train only part of the model.

When a stage trains only the head and the inputs are not augmented, the frozen backbone (BatchNorm and Dropout in
inference mode) gives the same features for an image in every epoch. So it runs once per image, its pooled
output is kept, and the head trains on it: the same computation, seconds per epoch instead of minutes. A partial
stage keeps the input of a boundary module instead (see :mod:`cxrkit.train.prefix`), stored in the autocast
precision (bf16 under bf16 autocast, which is what the layer computes in anyway) to halve its size.

Features are written to ``<cache>/features/<key>.bin`` (``$CXR_CACHE_DIR``, default ``~/.cache/cxrkit``) as they
are computed, so a cache larger than memory never has to fit in it: it is memory-mapped, and read into memory
only when it fits comfortably. The key hashes everything the features depend on: the images (path, size,
modification time), the preprocessing, the backbone's weights, where the features are taken, the precision and
the library versions. Another run of the same recipe, or another ``cxr compare`` cell on the same frozen base,
reuses them; a change to any of those makes a new key, never a stale hit. Labels are neither in the key nor stored
(the features do not depend on them): a reused entry takes its targets from the loader's dataset, so a renamed
class or another task reuses the features with its own labels. The engine that computed them
(PyTorch, or ONNX Runtime on CPUs computing in fp32: :mod:`cxrkit.train.onnx_cache`) is not part of the key,
because both compute the same fp32 function and the first batch is checked. Files are renamed into place when
complete, so an interrupted pass is never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cxrkit.cache import create_mapped, remove_leftovers, short_of_space, touch, write_failure
from cxrkit.errors import CxrError
from cxrkit.train.onnx_cache import OnnxFrozen
from cxrkit.train.runtime import Runtime

MEMORY_SHARE = 0.25  # features are read into memory when they take less than this share of the available memory
_STORED = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.float16}  # bf16 as raw bits


class FeatureDataset(Dataset):
    """Stored features with their targets, in the sample-dict format of :class:`cxrkit.data.dataset.ImageDataset`."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, mapped: bool = False):
        self.features, self.targets = features, targets
        self.mapped = mapped  # read from a memory-mapped file, not held in memory

    def __len__(self) -> int:
        return len(self.features)

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.features[index], "target": self.targets[index], "index": index}


def features_key(weights: str, images_key: str, boundary: str | None, runtime: Runtime) -> str:
    """What cached features depend on, hashed: the weights that compute them (the backbone's, or those below
    ``boundary``), the images and their preprocessing (``images_key``), where the features are taken, and the
    numerics (precision, memory format, library version)."""
    text = json.dumps({"weights": weights, "images": images_key, "boundary": boundary, "precision": runtime.precision,
                       "channels_last": runtime.channels_last, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 4 * 2**30


def stored_meta(store: Path) -> dict[str, Any] | None:
    """The ``.json`` of the complete entry ``store``, or None: absent, or damaged (a bad ``.json``, a missing or
    short file), in which case its files are removed so that it is written again."""
    meta_path = store.with_suffix(".json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if store.stat().st_size != int(np.prod(meta["shape"])) * np.dtype(meta["stored"]).itemsize:
            raise ValueError(f"{store} is not the size its .json gives")
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        for path in (meta_path, store):
            with contextlib.suppress(OSError):  # a read-only cache: computed again, kept in memory
                path.unlink(missing_ok=True)
        return None


def _loader_targets(loader: DataLoader) -> torch.Tensor:
    """The targets of ``loader``'s images in its order, from its dataset's ``targets()``: no image is read."""
    return loader.dataset.targets()[list(loader.sampler)]


def _open(path: Path, meta: dict[str, Any], targets: torch.Tensor) -> FeatureDataset:
    """The stored features as a tensor: in memory when they fit comfortably, else memory-mapped."""
    shape, stored = tuple(meta["shape"]), np.dtype(meta["stored"])
    # copy-on-write: torch wants a writable array, and nothing may write to the file
    array: np.ndarray = np.memmap(path, dtype=stored, mode="c", shape=shape)
    mapped = array.nbytes >= MEMORY_SHARE * _available_memory()
    if not mapped:
        array = np.array(array)
    return FeatureDataset(_tensor(array, meta), targets, mapped)


def _tensor(array: np.ndarray, meta: dict[str, Any]) -> torch.Tensor:
    """Stored features as a tensor of their own dtype (bf16 is stored as its raw bits)."""
    features = torch.from_numpy(array)
    return features.view(torch.bfloat16) if meta["dtype"] == "bfloat16" else features


def _start_store(tmp: Path, store: Path, shape: tuple[int, ...], stored: Any, log: Any) -> np.ndarray | None:
    """The file ``tmp`` that the features of ``store`` are written to, memory-mapped, its disk space reserved; None
    when it does not fit or cannot be written (``log`` gets a one-line note, and the features stay in memory)."""
    folder = tmp.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_leftovers(store)
        if (short := short_of_space(folder, int(np.prod(shape)) * np.dtype(stored).itemsize)) is not None:
            log(f"features stay in memory: they need {short}")
            return None
        # reserved up front: another process cannot take the space while the features are written (a write into
        # a mapping with no disk space behind it would end this process with SIGBUS)
        return create_mapped(tmp, stored, shape)
    except OSError as err:  # no space after all, a file-size limit or a quota
        log(f"features stay in memory: cannot write {folder} ({write_failure(err)})")
        return None


def _kept_in_memory(array: np.ndarray, meta: dict[str, Any], targets: torch.Tensor, folder: Path,
                    err: BaseException, log: Any) -> FeatureDataset:
    """The features written to ``array`` when their entry cannot be completed, copied into memory, with a note."""
    log(f"features stay in memory: cannot write {folder} ({write_failure(err)})")
    return FeatureDataset(_tensor(np.array(array), meta), targets)


@torch.no_grad()
def extract_features(net: torch.nn.Module, loader: DataLoader, runtime: Runtime, progress: Any = None,
                     description: str = "features", boundary: str | None = None,
                     store: Path | None = None, engine: OnnxFrozen | None = None,
                     about: dict[str, Any] | None = None, log: Any = print) -> FeatureDataset:
    """Run ``net`` in inference mode over ``loader`` (in order) and keep its outputs.

    Args:
        net: the backbone (its pooled outputs are kept as fp32), or the whole model with ``boundary``.
        boundary: keep the input of this submodule of ``net`` instead, in the autocast dtype, and stop each
            forward pass there.
        store: write the features to ``store`` (``.bin``, and ``.json`` beside it) as they are computed and return
            them from there; None to keep them in memory only. A stored entry keeps no labels: reusing one takes
            the targets from ``loader.dataset.targets()`` (see :class:`~cxrkit.data.dataset.ImageDataset`).
        engine: ONNX Runtime running the same frozen part (see :mod:`cxrkit.train.onnx_cache`); PyTorch computes
            any batch it returns None for.
        about: what ``cxr cache`` shows of a stored entry (backbone, split), kept in its ``.json``.
        log: gets a one-line note when ``store`` cannot be written: no room on the disk, or a write that fails
            (the features then stay in memory).
    """
    from cxrkit.runs import atomic_write_json
    from cxrkit.train.prefix import boundary_input

    meta = stored_meta(store) if store is not None else None
    if store is not None and meta is not None:
        touch(store.with_suffix(".json"))  # its last use, for `cxr cache clear --older-than`
        return _open(store, meta, _loader_targets(loader))
    was_training = net.training
    net.eval()
    task = progress.add_task(description, total=len(loader), rate="") if progress is not None else None
    keep = runtime.amp_dtype if boundary is not None and runtime.amp_dtype is not None else torch.float32
    n = len(loader.sampler) if loader.sampler is not None else len(loader.dataset)
    chunks: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    array: np.ndarray | None = None
    tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp") if store is not None else None
    row = 0
    try:
        if engine is not None:
            engine.prepare(progress)
        for batch in loader:
            out = engine(batch["image"]) if engine is not None else None
            if out is None:
                images = runtime.to_device(batch["image"])
                with runtime.autocast():
                    out = net(images) if boundary is None else boundary_input(net, boundary, images)
            if out is None:
                raise RuntimeError(f"{boundary} does not take a single tensor; it cannot be cached")
            out = out.to(keep).cpu().contiguous()
            if tmp is not None and array is None:
                array = _start_store(tmp, store, (n, *out.shape[1:]), _STORED[keep], log)
                if array is None:
                    tmp = None
            if tmp is not None:
                bits = out.view(torch.int16) if keep == torch.bfloat16 else out
                array[row : row + len(out)] = bits.numpy().view(_STORED[keep])
            else:
                chunks.append(out)
            row += len(out)
            targets.append(batch["target"])
            if task is not None:
                progress.update(task, advance=1)
        all_targets = torch.cat(targets)
        if tmp is None:
            return FeatureDataset(torch.cat(chunks), all_targets)
        if array is None:
            raise RuntimeError("no images to cache features of")
        meta = {"shape": list(array.shape), "stored": np.dtype(_STORED[keep]).str,
                "dtype": str(keep).removeprefix("torch."), "boundary": boundary, "images": n, **(about or {})}
        try:
            array.flush()
            os.replace(tmp, store)
        except OSError as err:
            return _kept_in_memory(array, meta, all_targets, store.parent, err, log)
        try:
            atomic_write_json(store.with_suffix(".json"), meta)  # written last: its presence marks a complete cache
        except CxrError as err:
            with contextlib.suppress(OSError):  # never read without its .json: it would only take space
                store.unlink(missing_ok=True)
            return _kept_in_memory(array, meta, all_targets, store.parent, err, log)
        del array
        return _open(store, meta, all_targets)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if task is not None:
            progress.remove_task(task)
        net.train(was_training)


def feature_loader(dataset: FeatureDataset, batch_size: int, sampler: Any = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler or range(len(dataset)), num_workers=0)
