"""The run directory: the only thing commands share.

``recipe.yaml`` (resolved recipe), ``data.json`` (dataset summary and resolved preprocessing), ``labels.json``
(task, label names, positive class, threshold), ``splits.csv``, ``env.json``, ``metrics.csv`` (one row per epoch),
``checkpoints/{best,last}.pt`` and ``eval/<name>/``. Every file is written atomically (temporary file + rename), so
a run killed at any moment keeps its last complete state.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from cxrkit.errors import CxrError, cannot_write, first_line, os_error, printable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_interrupted = False  # a Ctrl-C was seen by on_interrupt (or deferred by an atomic write) in this process


def on_interrupt(signum: int, frame: Any) -> None:
    """The CLI's SIGINT handler: Python's (raise KeyboardInterrupt), remembering that it happened, because an
    exception raised where Python ignores exceptions (a DataLoader iterator's ``__del__`` stopping its workers) would
    otherwise be lost and the command would go on. :func:`raise_if_interrupted` finds it."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a Ctrl-C was seen in this process (see :func:`on_interrupt`)."""
    return _interrupted


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C was seen (and maybe lost): between epochs and between cells."""
    if _interrupted:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Ctrl-C during the block takes effect when the block has ended. A KeyboardInterrupt inside ``torch.save``'s
    writer came back as a RuntimeError ("unexpected pos"), which looked like a failure (``cxr compare`` recorded the
    cell as failed and went on); and a write is short, so it finishes first."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    global _interrupted
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted = _interrupted or bool(pressed)  # kept even when the block raised
    if pressed:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` by calling ``write`` on an open binary file, so readers see the old file or the new one,
    never half of one. The content streams to a temporary file beside ``path`` (no copy of it is held in memory: a
    checkpoint with optimizer state can be gigabytes), which replaces ``path`` only once ``write`` has returned and
    the data is on disk; if ``write`` raises, ``path`` is untouched."""
    path = Path(path)
    if path.is_dir():
        raise CxrError(f"{path}: cannot write here (is a directory)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as err:  # a parent that is a file, a folder without write permission, a read-only disk
        raise CxrError(f"{path}: cannot write here ({_why_not_a_folder(path.parent) or err.strerror})") from err
    try:
        with _interrupt_after():
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results should be as readable as any file
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, FileNotFoundError) and path.parent.is_dir():
            raise CxrError(f"{path}: cannot write (its temporary file {Path(tmp).name} was removed while it was "
                           "written, by another process)") from err
        cause = os_error(err)  # torch.save's zip writer raises a RuntimeError over the OSError of a full disk
        if cause is not None:  # e.g. the disk filled up
            raise cannot_write(path, cause) from err
        raise


def _why_not_a_folder(folder: Path) -> str | None:
    """``"<ancestor> is a file"`` when a file stands where ``folder`` or one of its parents should be, else None."""
    for part in (folder, *folder.parents):
        if part.exists():
            return None if part.is_dir() else f"{part} is a file, not a folder"
    return None


def check_writable(path: str | Path) -> None:
    """Raise the error :func:`atomic_write` would raise for ``path``, before the work that makes its content: a
    folder, a file where a folder should be, or a place where no file can be created (probed by creating and
    removing a temporary file in the nearest folder that exists; no folder is made)."""
    path = Path(path)
    if path.is_dir():
        raise CxrError(f"{path}: cannot write here (is a directory)")
    why = _why_not_a_folder(path.parent)
    if why:
        raise CxrError(f"{path}: cannot write here ({why})")
    nearest = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    why = folder_unwritable(nearest)
    if why is not None:
        raise CxrError(f"{path}: cannot write here ({why})")


def folder_unwritable(folder: Path) -> str | None:
    """Why no file can be created in the existing ``folder``, or None when one can: probed by creating and removing
    a temporary file, since a folder on a read-only disk looks writable to every other check."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".cxrkit-probe-"):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def process_alive(pid: int) -> bool:
    """Whether the process ``pid`` (the writer named in a temporary file's name) still runs."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


TEMPORARY = r"\..+\.(\d+)\.[^.]+\.tmp"
"""The names of the temporary files of :func:`atomic_write` and folders of :func:`scratch_folder`
(``.<name>.<pid>.<random>.tmp``) as a pattern for :func:`remove_dead_writes`: group 1 is the writer's process id."""


def remove_dead_writes(path: Path, pattern: str) -> None:
    """Remove the temporary files (or folders) that killed writes of ``path`` left beside it: those whose name
    matches ``pattern`` (a regular expression whose group 1 is the writing process's id) of a process that is gone."""
    for left in path.parent.iterdir() if path.parent.is_dir() else []:
        match = re.fullmatch(pattern, left.name)
        if match and not process_alive(int(match.group(1))):
            if left.is_dir() and not left.is_symlink():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_files(folder: str | Path, last: str) -> Iterator[Path]:
    """A hidden folder inside ``folder`` in which to write its new files; when the ``with`` block ends without an
    error they replace the earlier ones (the earlier files go, its subfolders stay), with ``last`` put in place
    last, so that its presence marks a complete folder. When the block raises (a full disk, Ctrl-C), the earlier
    files are untouched and the new ones removed. Renaming within one folder needs no space."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_dead_writes(folder / last, r"\.new\.(\d+)\..*\.tmp")
    new = Path(tempfile.mkdtemp(dir=folder, prefix=f".new.{os.getpid()}.", suffix=".tmp"))
    try:
        try:
            yield new
        except CxrError as err:  # a message about the hidden folder is about the folder being written
            if str(new) not in str(err):
                raise
            raise CxrError(str(err).replace(str(new), str(folder))) from err
        with _interrupt_after():
            (folder / last).unlink(missing_ok=True)
            written = list(new.iterdir())
            for path in written:
                if path.name != last:
                    os.replace(path, folder / path.name)
            names = {path.name for path in written}
            for old in folder.iterdir():
                if old.is_file() and old.name not in names:
                    old.unlink(missing_ok=True)
            if (new / last).exists():
                os.replace(new / last, folder / last)
    finally:
        shutil.rmtree(new, ignore_errors=True)


@contextlib.contextmanager
def staged(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a file that is written, then checked or completed by several steps:
    it replaces ``path`` when the ``with`` block ends without an error, and is removed otherwise, so ``path`` holds
    the earlier file until the new one is whole."""
    path = Path(path)
    check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writes(path, rf"\.{re.escape(path.name)}\.(\d+)\.partial.*")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial{path.suffix}")  # the suffix may tell the format
    try:
        yield tmp
        os.replace(tmp, path)
    except CxrError as err:  # a message about the temporary file is about the file being made
        if str(tmp) not in str(err):
            raise
        raise CxrError(str(err).replace(str(tmp), str(path))) from err
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_folder(path: str | Path) -> Iterator[Path]:
    """A hidden folder beside ``path`` for the intermediate files of making it, named like :func:`atomic_write`'s
    temporary files (``.<name>.<pid>.<random>.tmp``) so that :meth:`Run.remove_leftovers` removes one that a killed
    writer left; making one removes those that killed writers left beside ``path`` too. The intermediates take room
    on ``path``'s disk, not the system's temporary folder, so a full disk is the one the user chose. Removed with
    what it holds when the block ends, by an error or Ctrl-C too; an OSError inside the block (the disk filled up)
    becomes ``<path>: cannot write (<reason>)``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_writes(path, TEMPORARY)  # what killed writers left here: a large int8 scratch
        folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
    except OSError as err:
        raise CxrError(f"{path}: cannot write here ({_why_not_a_folder(path.parent) or err.strerror})") from err
    try:
        yield folder
    except OSError as err:
        raise cannot_write(path, err) from err
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half of one."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def safe_name(text: str, default: str = "x") -> str:
    """``text`` as a file-name part: runs of characters other than ``[A-Za-z0-9._-]`` become ``_``, and leading or
    trailing dots and underscores go (no hidden files, no ``..``); ``default`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or default


def unique_safe_names(texts: Sequence[str], default: str = "x") -> list[str]:
    """:func:`safe_name` of each of ``texts``, made unique in order: a name already given gets ``-2``, ``-3``...
    (labels ``a,b`` and ``a;b`` are both ``a_b``; ``病毒`` and ``肺炎`` are both ``x``)."""
    names: list[str] = []
    for text in texts:
        base = safe_name(text, default)
        name = base
        for k in itertools.count(2):
            if name not in names:
                break
            name = f"{base}-{k}"
        names.append(name)
    return names


def csv_text(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows of dicts as CSV text; columns are the union of keys in first-seen order unless given. Text cells go
    through :func:`~cxrkit.errors.printable`: a carriage return, which the writer would not quote, would end a row
    early, and a file name that is not UTF-8 could not be written."""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: printable(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows)
    return buf.getvalue()


RUN_FILES = ("recipe.yaml", "data.json", "labels.json", "splits.csv", "env.json", "metrics.csv", "cell.json")
"""The files of a run directory that commands read; no output may replace them (see :meth:`Run.owns`)."""


class Run:
    """A run directory on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, out: str | Path, name: str) -> Run:
        """Make a new, uniquely named run directory ``<out>/<name>-<timestamp>``; ``name`` is made a plain file name
        (:func:`safe_name`), so that no recipe name can place a run outside ``out``."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(out) / f"{safe_name(name, 'run')}-{stamp}"
        path, n = base, 1
        while True:
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                if why := _why_not_a_folder(path.parent):
                    raise CxrError(f"{path.parent}: cannot create runs here ({why})") from None
                n += 1
                path = base.with_name(f"{base.name}-{n}")
            except OSError as err:
                why = _why_not_a_folder(path.parent) or err.strerror or first_line(err)
                raise CxrError(f"{path.parent}: cannot create runs here ({why})") from err
        (path / "checkpoints").mkdir()
        return cls(path)

    def remove_leftovers(self) -> int:
        """Remove the hidden temporary files that writes killed half-way left in the run, its checkpoints, exports
        and evaluations (``.X.<pid>.*.tmp`` of :func:`atomic_write`, ``.X.<pid>.partial.*`` of :func:`staged`,
        ``.X.<pid>.link``), and the folders of intermediate files (``.X.<pid>.<random>.tmp`` of
        :func:`scratch_folder`), when the process that wrote them has ended: the real files were never touched, but
        a killed checkpoint write leaves one as large as a checkpoint. Another command writing into the run (an
        evaluation, an export) keeps its files. Returns how many were removed."""
        pattern = re.compile(r"^\..+?(?:\.(\d+))?(?:\.[^.]+\.tmp|\.link|\.partial(?:\.[^.]+)?)$")
        removed = 0
        evaluations = sorted(p for p in (self.path / "eval").glob("*") if p.is_dir())
        for folder in (self.path, self.path / "checkpoints", self.path / "export", *evaluations):
            for entry in folder.iterdir() if folder.is_dir() else []:
                match = pattern.match(entry.name)
                if not match or (match.group(1) and process_alive(int(match.group(1)))):
                    continue
                if entry.is_file():
                    entry.unlink(missing_ok=True)
                    removed += 1
                elif entry.is_dir() and match.group(1) and entry.name.endswith(".tmp"):  # a scratch_folder's
                    shutil.rmtree(entry, ignore_errors=True)
                    removed += 1
        return removed

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """Open an existing run; a clear error when ``path`` is not one."""
        run = cls(path)
        if not run.path.is_dir():
            raise CxrError(f"run {path} is a file, not a folder" if run.path.exists() else f"run {path} does not exist")
        if not (run.path / "recipe.yaml").is_file():
            raise CxrError(f"{path} is not a cxrkit run directory (no recipe.yaml)")
        return run

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        path = self.path / name
        if not path.is_file():
            raise CxrError(f"run {self.path} has no {name}")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CxrError(f"{path} is not valid JSON: {err}") from None

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def checkpoint_path(self, name: str) -> Path:
        return self.path / "checkpoints" / f"{name}.pt"

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> None:
        """Save ``state`` (tensors, numbers, strings, lists, dicts only) atomically."""
        import torch

        atomic_write(self.checkpoint_path(name), lambda fh: torch.save(state, fh))

    def link_checkpoint(self, source: str, name: str) -> None:
        """Make checkpoint ``name`` hold what ``source`` holds without writing it again: a hard link (a copy where
        the file system has none), put in place atomically. Checkpoints are only ever replaced, never changed in
        place, so saving either name later leaves the other as it was."""
        src, dst = self.checkpoint_path(source), self.checkpoint_path(name)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            with src.open("rb") as fh:
                atomic_write(dst, lambda out: shutil.copyfileobj(fh, out))
            return
        try:
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, name: str, lazy: bool = False) -> dict[str, Any]:
        """Load a checkpoint without unpickling arbitrary objects (``weights_only=True``); ``lazy`` maps its tensors
        from the file instead of reading them, for a look at its numbers (``epoch``, ``stage``)."""
        import torch

        path = self.checkpoint_path(name)
        if not path.is_file():
            raise CxrError(f"run {self.path} has no checkpoint {name} ({path})")
        try:
            with warnings.catch_warnings():  # e.g. "looks like a TorchScript archive": the error below says it
                warnings.simplefilter("ignore")
                return torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
        except Exception as err:  # noqa: BLE001 - any failure to read is reported with the file name
            why = first_line(err)
            if "TorchScript" in why:
                why = "it is a TorchScript model, not a checkpoint"
            elif why.startswith("Weights only load failed"):  # torch's advice to unpickle it anyway is not for us
                why = "it is not a checkpoint of tensors (damaged, or it holds Python objects, which are not loaded)"
            raise CxrError(f"checkpoint {path} cannot be read: {why}") from None

    def owns(self, path: str | Path) -> str | None:
        """What ``path`` is to this run when an output there would replace the run's own state: a checkpoint, one
        of :data:`RUN_FILES`, or a file that ``--engine onnx`` / ``onnx-int8`` reuse (``export/<checkpoint>.onnx``,
        ``.int8.onnx``); else None."""
        target = Path(path).resolve()
        root = self.path.resolve()
        if not target.is_relative_to(root):
            return None
        relative = target.relative_to(root)
        if relative.parts[:1] == ("checkpoints",):
            return f"a checkpoint of run {self.path}"
        if len(relative.parts) == 1 and relative.name in RUN_FILES:
            return f"the {relative.name} of run {self.path}"
        if len(relative.parts) == 2 and relative.parts[0] == "export" and relative.name.endswith(".onnx") and \
                relative.name.split(".", 1)[0] in ("best", "last"):
            engine = "onnx-int8" if relative.name.endswith(".int8.onnx") else "onnx"
            return f"the file that --engine {engine} of run {self.path} uses"
        return None

    def has_checkpoint(self, name: str) -> bool:
        return self.checkpoint_path(name).is_file()

    def read_metrics(self) -> list[dict[str, str]]:
        path = self.path / "metrics.csv"
        if not path.is_file():
            return []
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.csv`` atomically (a few hundred rows at most, so rewriting is cheap and safe)."""
        self.write_text("metrics.csv", csv_text(rows))

    def eval_path(self, name: str) -> Path:
        """The folder ``RUN/eval/<name>``, ``name`` made a plain file name (:func:`safe_name`)."""
        return self.path / "eval" / safe_name(name, "eval")

    def eval_dir(self, name: str) -> Path:
        """:meth:`eval_path`, made if needed."""
        path = self.eval_path(name)
        path.mkdir(parents=True, exist_ok=True)
        return path
