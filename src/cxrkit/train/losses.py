"""Losses for the three tasks, with class weights against imbalance.

Binary and multi-class tasks use softmax cross-entropy (binary as a two-way softmax, so every task has one logit
per label). Multi-label tasks use sigmoid BCE with unknown labels (NaN, as in torchxrayvision) masked out.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cxrkit.errors import CxrError


def class_weights_for(
    task: str, labels: list[str], targets: np.ndarray, spec: str | list[float] | None
) -> list[float] | None:
    """Resolve ``loss.class_weights``: None, ``balanced`` (n / (k * count), as scikit-learn) or explicit values.

    For multi-label tasks the weights are per-label positive weights; ``balanced`` gives negatives / positives.
    """
    if spec is None:
        return None
    if isinstance(spec, list):
        if len(spec) != len(labels):
            raise CxrError(f"loss.class_weights has {len(spec)} values but the task has {len(labels)} labels {labels}")
        return [float(w) for w in spec]
    if task == "multilabel":
        known = ~np.isnan(targets)
        pos = np.nansum(targets, axis=0)
        neg = known.sum(axis=0) - pos
        return [float(n / p) if p > 0 else 1.0 for n, p in zip(neg, pos)]
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(targets)
    weights = compute_class_weight("balanced", classes=present, y=targets)
    by_class = dict(zip(present.tolist(), weights.tolist()))
    return [float(by_class.get(i, 1.0)) for i in range(len(labels))]


class MaskedBCEWithLogits(nn.Module):
    """Sigmoid BCE averaged over known (non-NaN) targets only."""

    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(target)
        safe = torch.where(known, target, torch.zeros_like(target))
        loss = F.binary_cross_entropy_with_logits(logits.float(), safe, pos_weight=self.pos_weight, reduction="none")
        return (loss * known).sum() / known.sum().clamp(min=1)


def build_loss(task: str, weights: list[float] | None, label_smoothing: float = 0.0) -> nn.Module:
    """The loss module for ``task``; ``weights`` from :func:`class_weights_for`."""
    tensor = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
    if task == "multilabel":
        return MaskedBCEWithLogits(tensor)
    return nn.CrossEntropyLoss(weight=tensor, label_smoothing=label_smoothing)


def probabilities(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Logits to probabilities: sigmoid per label for multi-label, softmax otherwise."""
    logits = logits.float()
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)
