"""Exported models: ONNX files with their preprocessing metadata, usable without cxrkit."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def fp32_copy(model: nn.Module) -> nn.Module:
    """A float32, eval-mode, contiguous-format copy of ``model`` (what every export and check runs on)."""
    return copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)


def max_difference(model: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], size: int, batch: int = 4,
                   seed: int = 0) -> float:
    """Largest absolute difference between an exported model's logits and the fp32 PyTorch model's, on ``batch``
    seeded random inputs."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((exported(x) - fp32_copy(model)(x)).abs().max())
