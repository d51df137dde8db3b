"""Decoded-image cache: each image decoded and resized once, kept as uint8 in a memory-mapped file.

Training reads an image every epoch it is not served from cached features: with augmentation, or a stage that
trains the whole model. Decoding a JPEG and resizing it costs more on a small CPU than the rest of the input
pipeline, and the result is the same every time, because augmentation runs after resizing on the 8-bit image
(see :func:`~cxrkit.data.transforms.build_transform`). So the resized 8-bit images are written once to
``<cache>/decoded/<key>.u8`` (``N x size x size``), and the transforms skip the resize.

The key hashes every image's path, size and modification time with the resizing settings, so a changed file, a
new image or another input size makes a new cache, never a stale one. Files are written under a temporary name
and renamed when complete, so an interrupted build is never read. Grayscale (mode ``L``) datasets only: a colour
image turns the cache off for that dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from cxrkit.cache import (
    create_mapped,
    readable_size,
    remove_leftovers,
    short_of_space,
    touch,
    unwritable,
    write_failure,
)
from cxrkit.data.base import Item, LabelledImages
from cxrkit.data.transforms import Preprocessing
from cxrkit.errors import CxrError, user_message

VERSION = 1  # bump when the stored layout or the resize changes


def cache_root() -> Path:
    """``$CXR_CACHE_DIR``, else ``~/.cache/cxrkit``."""
    return Path(os.environ.get("CXR_CACHE_DIR") or Path.home() / ".cache" / "cxrkit").expanduser()


def cache_key(items: list[Item], pre: Preprocessing) -> str:
    """A hash of the resizing settings and every image's source, size and modification time."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": VERSION, "size": pre.size, "resize": pre.resize, "crop_pct": pre.crop_pct,
                         "interpolation": pre.interpolation}, sort_keys=True).encode())
    for item in items:
        try:
            st = os.stat(item.source)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "-"  # not a file (an array inside a MedMNIST archive): the archive's own key is in the source
        h.update(f"{item.source}\0{stamp}\n".encode("utf-8", "surrogateescape"))  # a path that is not UTF-8 too
    return h.hexdigest()[:32]


class DecodedReader:
    """A dataset reader that returns the cached uint8 image ``1 x size x size`` of an item."""

    def __init__(self, path: Path, sources: list[str], size: int):
        self.path, self.size = path, size
        self.rows = {source: i for i, source in enumerate(sources)}
        # mapped now: forked DataLoader workers inherit the mapping, so a `cxr cache clear` that removes the file
        # during training takes nothing from the run (a removed file's data lives as long as a mapping of it)
        self._array: np.ndarray | None = self._map()

    def _map(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=(len(self.rows), self.size, self.size))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}  # pickled (spawned workers): mapped again there, not copied

    def __call__(self, item: Item) -> Any:
        import torch
        from torchvision import tv_tensors

        if self._array is None:
            self._array = self._map()
        return tv_tensors.Image(torch.from_numpy(np.array(self._array[self.rows[item.source]]))[None])


def _resize_only(pre: Preprocessing) -> Any:
    from torchvision.transforms import v2

    from cxrkit.data.transforms import resize_steps

    return v2.Compose([v2.ToImage(), *resize_steps(pre)])


class _Resized:
    """Dataset of ``(row, resized uint8 image)`` for the build, so workers decode in parallel."""

    def __init__(self, ds: LabelledImages, pre: Preprocessing):
        self.ds, self.transform = ds, _resize_only(pre)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        """``(index, image)``; the image is None for a colour image, and why not for one that cannot be decoded."""
        try:
            image = self.ds.read(index)
        except CxrError as err:  # passed the scan's header checks, fails in its pixel data
            return index, user_message(err).removeprefix(f"{self.ds.items[index].source}: ")
        return index, self.transform(image) if image.mode == "L" else None


def decoded_images(ds: LabelledImages, pre: Preprocessing, workers: int = 0, progress: Any = None,
                   log: Any = print, root: Path | None = None) -> LabelledImages | None:
    """``ds`` with a reader of cached resized images, building the cache when it is missing.

    Every image is decoded in full here, so an image whose header passed the scan but whose pixel data cannot be
    decoded is found now: it is left out of the returned dataset and added to its ``skipped`` (the cache records it,
    so every use of the cache leaves the same images out).

    Returns:
        The dataset on the cache, or None when it cannot be cached (colour images, no disk space, a write that
        fails); ``log`` gets a one-line reason.
    """
    seen: set[str] = set()
    for item in ds.items:
        if item.source in seen:
            raise CxrError(f"the dataset lists {item.source} twice; the decoded-image cache needs each image once "
                           "(or set runtime.cache_images=false)")
        seen.add(item.source)
    folder = (root or cache_root()) / "decoded"
    key = cache_key(ds.items, pre)
    path, meta_path = folder / f"{key}.u8", folder / f"{key}.json"
    sources = [item.source for item in ds.items]
    size = len(ds) * pre.size * pre.size
    unreadable = _unreadable(meta_path) if path.is_file() and path.stat().st_size == size else None
    if unreadable is None:
        unreadable = _build(ds, pre, path, workers, progress, log)
        if unreadable is None:
            return None
        log(f"decoded {len(ds) - len(unreadable)} images once into {path} ({readable_size(size)})")
    else:
        touch(meta_path)  # its last use, for `cxr cache clear --older-than`
    reader = DecodedReader(path, sources, pre.size)
    left_out = {source for source, _ in unreadable}
    return LabelledImages(ds.spec, [item for item in ds.items if item.source not in left_out], reader,
                          list(ds.skipped) + unreadable)


def _build(ds: LabelledImages, pre: Preprocessing, path: Path, workers: int, progress: Any,
           log: Any) -> list[tuple[str, str]] | None:
    """Write the cache ``path`` of ``ds`` and its ``.json``.

    Returns:
        The ``(source, reason)`` of the images that could not be decoded, or None when the cache cannot be written
        (``log`` gets a one-line reason, and nothing is left in the cache folder).
    """
    from cxrkit.runs import atomic_write_json

    folder = path.parent
    why = unwritable(folder)
    if why is not None:
        log(f"decoded-image cache off: {folder} is not writable ({why})")
        return None
    shape = (len(ds), pre.size, pre.size)
    if (short := short_of_space(folder, int(np.prod(shape)))) is not None:
        log(f"decoded-image cache off: it needs {short}")
        return None
    remove_leftovers(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        try:  # its space reserved now: no other process can take it while the images are written
            array = create_mapped(tmp, np.uint8, shape)
        except OSError as err:  # no space after all, a file-size limit or a quota
            return _cache_off(folder, err, log)
        unreadable = _decode_into(array, ds, pre, workers, progress, log)
        if unreadable is None:
            return None
        try:
            array.flush()
            del array
            os.replace(tmp, path)
        except OSError as err:
            return _cache_off(folder, err, log)
        sources = [item.source for item in ds.items]
        files = [source.partition("#")[0] for source in sources]  # a MedMNIST image is <npz>#<split>/<row>
        try:
            atomic_write_json(path.with_suffix(".json"), {
                "version": VERSION, "images": len(ds), "size": pre.size, "preprocessing": pre.to_dict(),
                "first": sources[:1], "folder": os.path.commonpath(files) if files else None,
                "unreadable": unreadable})
        except CxrError as err:
            with contextlib.suppress(OSError):  # never read without its .json: it would only take space
                path.unlink(missing_ok=True)
            return _cache_off(folder, err, log)
        return unreadable
    finally:
        tmp.unlink(missing_ok=True)


def _cache_off(folder: Path, err: BaseException, log: Any) -> None:
    log(f"decoded-image cache off: cannot write {folder} ({write_failure(err)})")


def _decode_into(array: np.ndarray, ds: LabelledImages, pre: Preprocessing, workers: int, progress: Any,
                 log: Any) -> list[tuple[str, str]] | None:
    """Decode and resize every image of ``ds`` into its row of ``array``: the ``(source, reason)`` of those that
    cannot be decoded (their rows stay zeros, never read), or None at the first colour image."""
    import torch
    from torch.utils.data import DataLoader

    unreadable: list[tuple[str, str]] = []
    # its own generator: iterating a DataLoader draws a seed, and the build must not shift the global generator
    # (model initialisation would then depend on whether the cache already existed)
    loader = DataLoader(_Resized(ds, pre), batch_size=64, num_workers=workers, collate_fn=list,
                        generator=torch.Generator())
    task = progress.add_task("decoding images once", total=len(loader), rate="") if progress else None
    for batch in loader:
        for index, image in batch:
            if isinstance(image, str):
                unreadable.append((ds.items[index].source, image))
                continue
            if image is None:
                log(f"decoded-image cache off: {ds.items[index].source} is a colour image")
                return None
            array[index] = image[0].numpy()
        if task is not None:
            progress.update(task, advance=1)
    if task is not None:
        progress.remove_task(task)
    return unreadable


def _unreadable(meta_path: Path) -> list[tuple[str, str]] | None:
    """The ``(source, reason)`` of the images a finished cache could not decode, or None when its ``.json`` is
    missing or damaged (the cache is then built again)."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return [(str(source), str(reason)) for source, reason in meta.get("unreadable", [])]
    except (OSError, ValueError, TypeError, AttributeError):
        return None


__all__ = ["DecodedReader", "cache_key", "cache_root", "decoded_images"]
