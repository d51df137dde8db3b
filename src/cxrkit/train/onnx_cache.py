"""The frozen part of a stage run by ONNX Runtime while its features are cached (``runtime.cache_engine``).

Without bf16 instructions PyTorch runs the frozen part in fp32 on the CPU, and ONNX Runtime's CPU kernels run the
same fp32 graph faster: 1.6-5.4x on machine B (AVX2) for four backbones, MobileNetV2 up to study 1's boundary at
145 images/s against 27 (``python bench/cache_engine.py``). The export takes 4-26 s, once per caching stage, and pays
for itself from 305-664 images there, so ``auto`` uses ONNX Runtime only on a CPU computing in fp32 and for at least
:data:`MIN_IMAGES` images.

The engine does not change what is cached beyond fp32 rounding: the first batch is compared with PyTorch, and a
failed export or a mismatch falls back to PyTorch with a one-line note. So the engine is not part of the cache key.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cxrkit.errors import CxrError
from cxrkit.train.runtime import Runtime

MIN_IMAGES = 1000  # the export paid for itself from 305-664 images on machine B (bench/cache_engine.py)
TOLERANCE = 1e-3  # largest difference from PyTorch on the first batch, relative to the features' scale
OUTPUT = "features"


def onnx_available() -> bool:
    """True when the exporter (onnx, onnxscript) and ONNX Runtime can be imported."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript", "onnxruntime"))


def check_engine_setting(setting: str, runtime: Runtime) -> None:
    """Raise a CxrError when ``runtime.cache_engine: onnx`` cannot run with ``runtime``: not on the CPU, not
    installed, or under bf16/fp16 autocast (ONNX Runtime computes in fp32, and the cache files features by the
    precision that computed them). Checked before training, whatever the cache already holds."""
    if setting != "onnx":
        return
    if runtime.device.type != "cpu":
        raise CxrError(f"runtime.cache_engine onnx runs on the CPU, but runtime.device is {runtime.device}; "
                       "use auto or torch")
    if not onnx_available():
        raise CxrError("runtime.cache_engine onnx needs onnx, onnxscript and onnxruntime: "
                       "pip install onnx onnxscript onnxruntime")
    if runtime.amp_dtype is not None:
        raise CxrError(f"runtime.cache_engine onnx computes in fp32, but runtime.precision is "
                       f"{runtime.precision}; use cache_engine auto or torch, or precision fp32")


def choose_engine(setting: str, runtime: Runtime, images: int) -> tuple[str, str]:
    """``(engine, why)``: ``torch`` or ``onnx`` for a caching pass over ``images`` images.

    Raises:
        CxrError: ``onnx`` was asked for where it cannot run (:func:`check_engine_setting`).
    """
    check_engine_setting(setting, runtime)
    if setting == "torch":
        return "torch", "runtime.cache_engine is torch"
    if setting == "onnx":
        return "onnx", "runtime.cache_engine is onnx"
    if runtime.device.type != "cpu":
        return "torch", f"the frozen part runs on {runtime.device}"
    if runtime.amp_dtype is not None:
        return "torch", f"PyTorch computes in {runtime.precision} on this CPU"
    if images < MIN_IMAGES:
        return "torch", f"{images} images are too few to pay for the export (fewer than {MIN_IMAGES})"
    if not onnx_available():
        return "torch", "onnxruntime is not installed"
    return "onnx", "this CPU computes in fp32, where ONNX Runtime runs the frozen part faster than PyTorch"


class FrozenPart(nn.Module):
    """What a caching pass computes: ``net(x)``, or the input that ``boundary`` (a submodule path) receives."""

    def __init__(self, net: nn.Module, boundary: str | None):
        super().__init__()
        self.net, self.boundary = net, boundary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.boundary is None:
            return self.net(x)
        seen: list[torch.Tensor] = []
        # the exporter traces the whole forward pass and drops what the boundary's input does not need
        handle = self.net.get_submodule(self.boundary).register_forward_pre_hook(
            lambda _module, args: seen.append(args[0]))
        try:
            self.net(x)
        finally:
            handle.remove()
        return seen[0]


class OnnxFrozen:
    """The frozen part of ``net`` exported to ONNX and run by ONNX Runtime, for :func:`extract_features`.

    Built by :meth:`prepare` (once, however many passes share it). Calling it on a batch returns the features, or
    None when ONNX Runtime cannot be used (the export failed, or the first batch differs from PyTorch): the caller
    then uses PyTorch, and every later call returns None at once.
    """

    def __init__(self, net: nn.Module, boundary: str | None, size: int, log: Callable[[str], Any] | None = None):
        self.net, self.boundary, self.size = net, boundary, size
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.session: Any = None
        self.failed = False
        self.checked = False

    def prepare(self, progress: Any = None) -> None:
        """Export the frozen part and open the session (skipped when done or failed)."""
        if self.session is not None or self.failed:
            return
        from cxrkit.export import fp32_copy
        from cxrkit.export.onnx import OnnxModel, export_graph

        task = progress.add_task("exporting the frozen part to ONNX", total=None, rate="") if progress else None
        try:
            frozen = FrozenPart(fp32_copy(self.net), self.boundary).eval()
            proto = export_graph(frozen, self.size, OUTPUT, "the frozen part")
            self.session = OnnxModel(proto.SerializeToString(), torch.get_num_threads(), output=OUTPUT)
        except CxrError as err:
            self._give_up(str(err))
        finally:
            if task is not None:
                progress.remove_task(task)

    def _give_up(self, why: str) -> None:
        self.failed, self.session = True, None
        self.log(f"feature caching uses PyTorch: {why}")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor | None:
        self.prepare()
        if self.failed:
            return None
        out = self.session(images)
        if not self.checked:
            self.checked = True
            few = images[:2].to(torch.float32)
            expected = FrozenPart(self.net, self.boundary).eval()(few).float().cpu()
            scale = max(float(expected.abs().max()), 1.0)
            difference = float("inf")
            if out.shape[1:] == expected.shape[1:]:
                difference = float((out[: len(few)] - expected).abs().max())
            if difference > TOLERANCE * scale:
                self._give_up(f"ONNX Runtime differs from PyTorch by {difference:.2g} on the first images")
                return None
        return out


__all__ = ["MIN_IMAGES", "FrozenPart", "OnnxFrozen", "choose_engine", "onnx_available"]
