"""Image to tensor: resizing, augmentation and normalisation. The only place with mean/std arithmetic.

:class:`Preprocessing` travels with the weights and the run (``data.json``), so evaluation and serving resize and
normalise exactly as training did. Chest X-rays are squashed to a square by default, which keeps the whole chest;
horizontal flips are off by default because they move the heart and the radiographic side marker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from cxrkit.errors import CxrError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
RESIZE_MODES = ("squash", "crop")
POLICIES = ("none", "light", "strong")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input.

    Attributes:
        size: output height and width.
        mean: per-channel mean subtracted after scaling pixels to [0, 1] (from the backbone's pretrained config).
        std: per-channel standard deviation divided by.
        interpolation: ``nearest``, ``bilinear`` or ``bicubic``.
        resize: ``squash`` (whole image to size x size) or ``crop`` (shorter side to size / crop_pct, centre crop).
        crop_pct: fraction of the resized image the centre crop keeps (``crop`` only).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    resize: str = "squash"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        problems = []
        if not isinstance(self.size, int) or self.size <= 0:
            problems.append(f"size must be a positive integer, not {self.size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            problems.append(f"mean and std need 3 values, std > 0 (got {self.mean}, {self.std})")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation must be one of {INTERPOLATIONS}, not {self.interpolation!r}")
        if self.resize not in RESIZE_MODES:
            problems.append(f"resize must be one of {RESIZE_MODES}, not {self.resize!r}")
        if not 0 < self.crop_pct <= 1:
            problems.append(f"crop_pct must be in (0, 1], not {self.crop_pct!r}")
        if problems:
            raise CxrError(f"preprocessing: {'; '.join(problems)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return cls(**_known_fields(cls, data, "preprocessing"))


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation.

    Attributes:
        policy: ``none``; ``light`` (small affine rotate / translate / scale and brightness / contrast);
            ``strong`` (``light`` at 1.5x the magnitudes plus a random resized crop of 70-100% of the area).
        hflip: random horizontal flips (any policy); off by default: a chest X-ray is not left-right symmetric.
        rotate: maximum rotation in degrees.
        translate: maximum shift as a fraction of the size.
        scale: zoom range.
        brightness: brightness jitter factor.
        contrast: contrast jitter factor.
    """

    policy: str = "none"
    hflip: bool = False
    rotate: float = 10.0
    translate: float = 0.05
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.1
    contrast: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        if self.policy not in POLICIES:
            raise CxrError(f"augment: policy must be one of {POLICIES}, not {self.policy!r}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise CxrError(f"augment: scale must be (low, high) with 0 < low <= high, not {self.scale}")
        if min(self.rotate, self.translate, self.brightness, self.contrast) < 0:
            raise CxrError("augment: rotate, translate, brightness and contrast must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Augment:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return cls(**_known_fields(cls, data, "augment"))


def _known_fields(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CxrError(f"{what}: unknown keys {unknown}; known keys are {sorted(names)}")
    return dict(data)


def resize_steps(pre: Preprocessing) -> list[Any]:
    """The resizing part of :func:`build_transform`: squash to ``size x size``, or resize and centre-crop."""
    from torchvision.transforms import v2

    interpolation = v2.InterpolationMode(pre.interpolation)
    if pre.resize == "squash":
        return [v2.Resize((pre.size, pre.size), interpolation=interpolation, antialias=True)]
    shorter = int(math.floor(pre.size / pre.crop_pct))
    return [v2.Resize(shorter, interpolation=interpolation, antialias=True), v2.CenterCrop(pre.size)]


def build_transform(pre: Preprocessing, augment: Augment | None = None, resized: bool = False) -> Callable[[Any], Any]:
    """A callable PIL image -> float tensor ``3 x size x size``, normalised by ``pre.mean`` / ``pre.std``.

    Grayscale input is replicated to three channels. Augmentation runs after resizing, on the 8-bit image.

    Args:
        pre: resizing and normalisation.
        augment: training augmentation; None (or policy ``none`` without flips) for evaluation.
        resized: the input is already the resized 8-bit image (from :mod:`cxrkit.data.decoded`).
    """
    import torch
    from torchvision.transforms import v2

    interpolation = v2.InterpolationMode(pre.interpolation)
    steps: list[Any] = [v2.ToImage()]
    if not resized:
        steps += resize_steps(pre)
    steps += _augmentations(augment, pre.size, interpolation) if augment is not None else []
    steps += [v2.RGB(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))]
    return v2.Compose(steps)


def input_box(pre: Preprocessing, width: int, height: int) -> tuple[float, float, float, float]:
    """The part of a ``width x height`` image that the model input shows, as ``(left, top, right, bottom)`` in
    the image's pixels: the whole image for ``squash``, the centre crop for ``crop`` (as :func:`build_transform`
    computes it). A heatmap over the model input lies on this box of the original image."""
    if pre.resize == "squash":
        return 0.0, 0.0, float(width), float(height)
    shorter = int(math.floor(pre.size / pre.crop_pct))
    # torchvision's Resize(int): the shorter side becomes `shorter`, the longer side int(shorter * long / short)
    if width <= height:
        new_w, new_h = shorter, int(shorter * height / width)
    else:
        new_w, new_h = int(shorter * width / height), shorter
    left, top = int(round((new_w - pre.size) / 2.0)), int(round((new_h - pre.size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + pre.size) * sx, (top + pre.size) * sy


def _augmentations(aug: Augment, size: int, interpolation: Any) -> list[Any]:
    from torchvision.transforms import v2

    steps: list[Any] = []
    # affine warps of tensors support nearest and bilinear only: a bicubic backbone (timm's) warps bilinearly
    warp = v2.InterpolationMode.BILINEAR if interpolation == v2.InterpolationMode.BICUBIC else interpolation
    if aug.policy != "none":
        k = 1.5 if aug.policy == "strong" else 1.0
        if aug.policy == "strong":
            steps.append(v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.9, 1.1), interpolation=interpolation))
        lo, hi = aug.scale
        steps.append(
            v2.RandomAffine(
                degrees=aug.rotate * k,
                translate=(min(aug.translate * k, 1.0),) * 2,
                scale=(max(0.05, 1 - (1 - lo) * k), 1 + (hi - 1) * k),
                interpolation=warp,
            )
        )
        steps.append(v2.ColorJitter(brightness=aug.brightness * k, contrast=aug.contrast * k))
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    return steps


def denormalize(tensor: Any, pre: Preprocessing) -> Any:
    """Undo the normalisation of :func:`build_transform`: a ``[..., 3, H, W]`` tensor back to [0, 1] pixels."""
    import torch

    mean = torch.tensor(pre.mean, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    return (tensor * std + mean).clamp(0.0, 1.0)
