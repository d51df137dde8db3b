"""TorchScript export: a traced fp32 model with the same ``cxrkit.json`` metadata as the ONNX file.

``torch.jit`` is deprecated in PyTorch 2.14 in favour of ``torch.export``; TorchScript files still load in C++
(libtorch) and in every PyTorch release that can read them, which is why deployments ask for them. The warnings
of the tracer are kept out of the user's terminal; the format's status is stated in ``docs/deploy.md``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrkit.export import fp32_copy
from cxrkit.runs import atomic_write

METADATA_FILE = "cxrkit.json"


def export_torchscript(model: nn.Module, path: str | Path, size: int, metadata: dict[str, Any]) -> Path:
    """Trace ``model`` (fp32, eval) at ``size`` and save it with ``metadata`` as the extra file ``cxrkit.json``."""
    fp32 = fp32_copy(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(fp32, torch.zeros(2, 3, size, size))
    _save(traced, path, metadata)
    return Path(path)


def _save(module: torch.jit.ScriptModule, path: str | Path, metadata: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated")
        atomic_write(path, lambda fh: torch.jit.save(module, fh, _extra_files={METADATA_FILE: json.dumps(metadata)}))


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The traced model and its metadata."""
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated")
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[METADATA_FILE] or "{}")


def update_torchscript_metadata(path: str | Path, changes: dict[str, Any]) -> bool | None:
    """Set ``changes`` in the ``cxrkit.json`` of the TorchScript file at ``path`` (replaced atomically): True when
    it changed, False when they were there already, None when the file cannot be read as cxrkit's TorchScript."""
    try:
        module, metadata = load_torchscript(path)
    except (RuntimeError, ValueError, OSError):
        return None
    if not metadata:
        return None
    if all(metadata.get(key) == value for key, value in changes.items()):
        return False
    _save(module, path, {**metadata, **changes})
    return True
