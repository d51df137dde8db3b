"""What cxrkit keeps in its cache folder, and clearing it: ``cxr cache``.

Two kinds of entries live under :func:`~cxrkit.data.decoded.cache_root` and can always be rebuilt:

- ``decoded/<key>.u8`` (+ ``.json``): images decoded and resized once (:mod:`cxrkit.data.decoded`);
- ``features/<key>.bin`` (+ ``.json``): a frozen part's outputs (:mod:`cxrkit.train.features`).

An entry is complete once its ``.json`` is written, which happens last; the ``.json`` is touched whenever a run
reuses the entry, so its modification time is the entry's last use. Temporary files carry the writing process's
id (``<key>.bin.<pid>.tmp``): while that process lives the entry is being written and is never removed; once it is
gone they are leftovers of an interrupted write. Local weight files (:func:`default_weights_dir`) are listed but
never cleared.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cxrkit.errors import CxrError, os_error
from cxrkit.runs import folder_unwritable, process_alive, remove_dead_writes

KINDS = ("decoded", "features")
_DATA_SUFFIX = {"decoded": ".u8", "features": ".bin"}
_PID_TMP = re.compile(r"\.(\d+)\.tmp$")  # <key>.<suffix>.<pid>.tmp
_ATOMIC_TMP = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")  # an atomic write's own: .<name>.<pid>.<random>.tmp
_ATOMIC_TMP_AGE = 600  # seconds after which an atomic write's own temporary file (no pid) is a leftover
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_AGES = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class Entry:
    """One cache entry: its files, and what a listing shows about it."""

    kind: str
    key: str
    files: list[Path] = field(default_factory=list)
    meta: dict[str, Any] | None = None
    busy: str | None = None  # who is still writing it: "process 1234", or "a write in progress"
    size: int = 0
    last_used: float = 0.0  # the .json's modification time (touched on every reuse), else the newest file's

    @property
    def status(self) -> str:
        if self.busy is not None:
            return f"being written ({self.busy})"
        if self.meta is not None and self._file(_DATA_SUFFIX[self.kind]) is not None:
            return "complete"
        return "incomplete (an interrupted write)"

    def _file(self, suffix: str) -> Path | None:
        return next((f for f in self.files if f.name == f"{self.key}{suffix}"), None)

    def describe(self) -> str:
        """What the entry holds, from its ``.json``."""
        meta = self.meta or {}
        if self.kind == "decoded":
            size, folder = meta.get("size"), meta.get("folder")  # the images' common folder (or MedMNIST file)
            return f"{size}x{size} px" + (f" from {folder}" if folder else "") if size else "-"
        shape = "x".join(map(str, meta.get("shape", [])[1:]))
        parts = [f"{meta.get('dtype', '?')} {shape}".strip()]
        parts.append(f"input of {meta['boundary'].removeprefix('backbone.')}" if meta.get("boundary") else "pooled")
        parts += [str(meta[k]) for k in ("backbone", "split") if meta.get(k)]
        parts += [f"{meta['image_size']} px images"] if meta.get("image_size") else []
        return ", ".join(parts) if meta else "-"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "status": self.status, "bytes": self.size,
                "images": (self.meta or {}).get("images"), "what": self.describe(),
                "last_used": datetime.fromtimestamp(self.last_used).astimezone().isoformat(timespec="seconds"),
                "files": [str(f) for f in self.files]}


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def scan(root: Path) -> list[Entry]:
    """Every entry under ``root``, most recently used first."""
    entries: dict[tuple[str, str], Entry] = {}
    used: dict[tuple[str, str], float] = {}  # a complete entry's .json time: its last use
    now = time.time()
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            stat = _stat(path)
            if stat is None or not path.is_file():
                continue
            key = path.name.lstrip(".").split(".", 1)[0]
            entry = entries.setdefault((kind, key), Entry(kind, key))
            entry.files.append(path)
            entry.size += stat.st_size
            entry.last_used = max(entry.last_used, stat.st_mtime)
            hidden = path.name.startswith(".")
            pid = (_ATOMIC_TMP.match if hidden else _PID_TMP.search)(path.name)
            if pid and process_alive(int(pid.group(1))):
                entry.busy = f"process {pid.group(1)}"
            elif not pid and hidden and path.name.endswith(".tmp") and now - stat.st_mtime < _ATOMIC_TMP_AGE:
                entry.busy = entry.busy or "a write in progress"  # an earlier cxrkit's, whose names had no pid
            elif path.name == f"{key}.json":
                try:
                    entry.meta = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                used[kind, key] = stat.st_mtime
    for where, when in used.items():
        entries[where].last_used = when
    for entry in entries.values():  # renamed into place a moment ago, its .json not yet written
        data = entry._file(_DATA_SUFFIX[entry.kind])
        stat = _stat(data) if data is not None else None
        if entry.meta is None and entry.busy is None and stat and now - stat.st_mtime < _ATOMIC_TMP_AGE:
            entry.busy = "a write in progress"
    return sorted(entries.values(), key=lambda e: -e.last_used)


def default_weights_dir() -> Path:
    """``~/.cache/cxrkit/weights``, where local weight files are searched last (whatever ``$CXR_CACHE_DIR`` says)."""
    return Path.home() / ".cache" / "cxrkit" / "weights"


def weights_files() -> list[Path]:
    folder = default_weights_dir()
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500M"``, ``"2GiB"``, ``"0"``: bytes (KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise CxrError(f"--max-size {text!r}: give a size such as 500MB, 5GB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def parse_age(text: str) -> float:
    """``"30d"``, ``"12h"``, ``"2w"``, ``"90min"``: seconds. ``m`` is refused: minutes or months?"""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|min|h|d|w)\s*", text.lower())
    if not match:
        raise CxrError(f"--older-than {text!r}: give an age such as 30d, 12h or 2w (s, min, h, d, w)")
    return float(match.group(1)) * _AGES[match.group(2)]


def select(entries: list[Entry], kinds: list[str] | None = None, older_than: float | None = None,
           max_size: int | None = None) -> list[Entry]:
    """The entries to remove: of ``kinds``, unused for ``older_than`` seconds, and then the least recently used
    until the rest take at most ``max_size`` bytes. Incomplete entries always go; those being written never do."""
    now = time.time()
    candidates = [e for e in entries if e.busy is None and (not kinds or e.kind in kinds)]
    chosen = [e for e in candidates if e.status != "complete"
              or (older_than is None and max_size is None)
              or (older_than is not None and now - e.last_used > older_than)]
    if max_size is not None:
        kept = sorted((e for e in candidates if e not in chosen), key=lambda e: -e.last_used)
        total = sum(e.size for e in entries if e not in chosen and (not kinds or e.kind in kinds))
        while kept and total > max_size:
            oldest = kept.pop()
            total -= oldest.size
            chosen.append(oldest)
    return chosen


def remove(entry: Entry) -> list[str]:
    """Delete ``entry``'s files, its ``.json`` first so that no run takes it for complete meanwhile; the
    problems, one line per file that could not be removed."""
    problems = []
    for path in sorted(entry.files, key=lambda f: f.suffix != ".json"):
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            problems.append(f"{path}: {err.strerror or err}")
    return problems


def unwritable(folder: Path) -> str | None:
    """Why no cache entry can be written in ``folder`` (made if missing), or None when one can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return err.strerror or str(err)
    return folder_unwritable(folder)


def remove_leftovers(path: Path) -> None:
    """Remove what killed writes of the entry ``path`` left (``<name>.<pid>.tmp``), before it is written again."""
    remove_dead_writes(path, rf"{re.escape(path.name)}\.(\d+)\.tmp")


def create_mapped(path: Path, dtype: Any, shape: tuple[int, ...]) -> Any:
    """A new file ``path`` holding ``shape`` values of ``dtype``, memory-mapped for writing (``np.memmap``), with
    its disk space reserved before the mapping is made.

    A write into a sparse mapping on a full disk ends the process with SIGBUS, without a message, and another
    process can fill the disk after any check of the free space. So the file's blocks are allocated first
    (``posix_fallocate``), which fails with an OSError instead (ENOSPC, or EFBIG from a file-size limit). Where the
    system or the filesystem cannot allocate ahead, the file is left sparse, as if this step did not exist.

    Raises:
        OSError: ``path`` cannot be created or made this large; it is then removed.
    """
    import numpy as np

    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            if not _reserve(fd, nbytes):
                os.ftruncate(fd, nbytes)  # sparse
        finally:
            os.close(fd)
        return np.memmap(path, dtype=dtype, mode="r+", shape=shape)
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        raise


def _reserve(fd: int, nbytes: int) -> bool:
    """Allocate ``nbytes`` of disk space to the open file ``fd``; False where that cannot be done ahead."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except AttributeError:  # not on this system (macOS, Windows)
        return False
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):  # a filesystem that cannot, or 0 bytes
            return False
        raise
    return True


def write_failure(err: BaseException) -> str:
    """Why writing a cache entry failed, for a note: the system's reason for an OSError, or that of the OSError
    behind the CxrError of an atomic write (:func:`~cxrkit.runs.atomic_write`), else that error's message."""
    cause = os_error(err)
    return (cause.strerror or str(cause)) if cause is not None else str(err)


def short_of_space(folder: Path, need: int) -> str | None:
    """``"2.1 GiB, FOLDER has 1.3 GiB free"`` when ``need`` bytes would take more than 90% of the free space of
    ``folder`` (a cache must not fill the disk), for a note that says what needs them; None when they fit."""
    free = shutil.disk_usage(folder).free
    return f"{readable_size(need)}, {folder} has {readable_size(free)} free" if need > 0.9 * free else None


def readable_size(n: int) -> str:
    """``n`` bytes as a short text: ``"1.2 GiB"``, ``"340.0 KiB"``, ``"812 B"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def touch(path: Path) -> None:
    """Mark a cache entry as used now (its ``.json``); a read-only cache stays as it is."""
    try:
        os.utime(path)
    except OSError:
        pass


__all__ = ["KINDS", "Entry", "create_mapped", "default_weights_dir", "parse_age", "parse_size", "readable_size",
           "remove", "remove_leftovers", "scan", "select", "short_of_space", "touch", "unwritable", "weights_files",
           "write_failure"]
