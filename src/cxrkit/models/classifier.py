"""A classifier is a backbone (pooled features) plus a small head that outputs logits.

The head never applies softmax or sigmoid: for ``binary`` and ``multiclass`` tasks it outputs one logit per class
(softmax in the loss), for ``multilabel`` one logit per label (sigmoid in the loss). The loss decides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cxrkit.errors import CxrError
from cxrkit.models.backbones import BACKBONES, BackboneSpec
from cxrkit.models.weights import PathLike, build_backbone

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Classifier(nn.Module):
    """``head(backbone(x))``.

    Attributes:
        backbone: the feature extractor, ``[B, 3, H, W] -> [B, num_features]``.
        head: ``nn.Sequential`` from features to ``num_outputs`` logits.
        spec_name: the backbone's registry name.
        num_features: width of the pooled features.
    """

    def __init__(self, backbone: nn.Module, head: nn.Sequential, spec_name: str, num_features: int):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec_name = spec_name
        self.num_features = num_features

    @property
    def spec(self) -> BackboneSpec:
        """The backbone's spec (preprocessing, CAM layer, blocks)."""
        return BACKBONES.get(self.spec_name)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, ``[B, num_features]``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, ``[B, num_outputs]``."""
        return self.head(self.backbone(x))


def build_head(
    num_features: int,
    num_outputs: int,
    hidden: Sequence[int] = (),
    dropout: float = 0.0,
    activation: str = "relu",
) -> nn.Sequential:
    """A linear head, or dense layers with dropout: ``[Dropout] Linear [activation [Dropout] Linear ...]``.

    Dropout (when ``dropout > 0``) comes before every Linear, so ``hidden=(256,), dropout=0.5`` gives
    ``Dropout, Linear(F, 256), ReLU, Dropout, Linear(256, num_outputs)``.

    Args:
        num_features: input width (the backbone's pooled features).
        num_outputs: logits out: classes for binary / multiclass, labels for multilabel.
        hidden: widths of hidden dense layers; empty for a linear head.
        dropout: dropout probability in [0, 1).
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh`` after each hidden layer.

    Raises:
        CxrError: a size is not positive, ``dropout`` is outside [0, 1) or ``activation`` is unknown.
    """
    widths = _checked_widths(num_features, num_outputs, hidden, dropout, activation)
    layers: list[nn.Module] = []
    for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        if i > 0:
            layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width_in, width_out))
    return nn.Sequential(*layers)


def _checked_widths(
    num_features: int, num_outputs: int, hidden: Sequence[int], dropout: float, activation: str
) -> list[int]:
    widths = [num_features, *hidden, num_outputs]
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        sizes = f"features={num_features}, hidden={list(hidden)}, outputs={num_outputs}"
        raise CxrError(f"head sizes must be positive integers, got {sizes}")
    if not 0.0 <= dropout < 1.0:
        raise CxrError(f"head dropout must be in [0, 1), got {dropout}")
    if activation not in ACTIVATIONS:
        raise CxrError(f"unknown head activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    return widths


def build_classifier(
    backbone_name: str,
    num_outputs: int,
    weights: PathLike = "imagenet",
    hidden: Sequence[int] = (),
    dropout: float = 0.0,
    weights_dirs: PathLike | Sequence[PathLike] | None = None,
    activation: str = "relu",
) -> Classifier:
    """A backbone (see :func:`cxrkit.models.weights.build_backbone`) with a new, randomly initialised head.

    Args:
        backbone_name: registry name of the backbone.
        num_outputs: logits out (classes, or labels for multilabel).
        weights: ``imagenet``, ``none`` or a state-dict path for the backbone.
        hidden: hidden dense layer widths of the head.
        dropout: head dropout probability.
        weights_dirs: folders searched for local ImageNet weights.
        activation: activation after each hidden layer.
    """
    _checked_widths(1, num_outputs, hidden, dropout, activation)  # fail before building a big model
    backbone, num_features = build_backbone(backbone_name, weights, weights_dirs)
    head = build_head(num_features, num_outputs, hidden, dropout, activation)
    return Classifier(backbone, head, backbone_name, num_features)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``trainable``, ``total`` and ``bn_statistics``.

    ``bn_statistics`` counts BatchNorm running mean and variance elements, which Keras lists among its
    "non-trainable params"; ``total + bn_statistics`` is the figure Keras' ``model.summary()`` prints.
    """
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        "bn_statistics": sum(
            buffer.numel()
            for module in model.modules()
            if isinstance(module, _BatchNorm)
            for buffer in (module.running_mean, module.running_var)
            if buffer is not None
        ),
    }


__all__ = ["ACTIVATIONS", "Classifier", "build_classifier", "build_head", "count_parameters"]
