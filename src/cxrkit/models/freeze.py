"""Which part of a classifier trains: freezing as data.

A stage's ``trainable`` is one of:

- ``head``: the backbone is frozen (feature extraction); only the new head learns.
- ``all``: full fine-tuning.
- ``top:N``: the top N *layers* of the backbone learn, counted the way Keras counts them (every convolution,
  BatchNorm, activation, pooling and dropout is a layer). Study 1 (MobileNetV2, "top 14 layers unfrozen") thus
  trains 1,043,843 parameters with a 3-class head, the figure its paper reports.
- ``top:N:blocks``: the top N *blocks* of the backbone spec (inverted residuals, residual blocks, dense layers).
- ``from:<name>``: everything from a named module on (a cut-off layer, study 4), e.g.
  ``from:features.denseblock4.denselayer16``. ``cxr models --layers NAME`` lists the names.

Everything from the cut point on in module definition order trains; everything before it is frozen, and
BatchNorm and Dropout in the frozen part stay in inference mode while training (as Keras does with
``training=False``), so frozen statistics never drift.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cxrkit.errors import CxrError


@dataclass(frozen=True)
class FreezePlan:
    """The result of applying ``trainable``: where the cut is and what it leaves trainable."""

    trainable: str
    cut: str | None
    trainable_params: int
    total_params: int
    bn_statistics: int
    note: str = ""

    def describe(self) -> str:
        keras_total = self.total_params + self.bn_statistics
        where = f" from {self.cut}" if self.cut else ""
        return (
            f"{self.trainable}{where}: {self.trainable_params:,} trainable of {self.total_params:,} parameters "
            f"({keras_total:,} counting BatchNorm statistics, as Keras does)" + (f"; {self.note}" if self.note else "")
        )


def layer_names(backbone: nn.Module) -> list[str]:
    """Keras-style layers in definition order: leaf modules and modules that own parameters (no Identity)."""
    names = []
    for name, module in backbone.named_modules():
        if not name or isinstance(module, nn.Identity):
            continue
        is_leaf = next(module.children(), None) is None
        owns_params = next(module.parameters(recurse=False), None) is not None
        if is_leaf or owns_params:
            names.append(name)
    return names


def _module_order(backbone: nn.Module) -> dict[str, int]:
    return {name: i for i, (name, _) in enumerate(backbone.named_modules())}


def resolve_cut(backbone: nn.Module, trainable: str, blocks: list[str] | None = None) -> str | None:
    """Name of the first trainable module for ``trainable``; ``""`` means all of it, None means none."""
    if trainable == "all":
        return ""
    if trainable == "head":
        return None
    kind, _, rest = trainable.partition(":")
    if kind == "from":
        order = _module_order(backbone)
        if rest not in order or not rest:
            close = difflib.get_close_matches(rest, list(order), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; list them with `cxr models --layers`"
            raise CxrError(f"trainable {trainable!r}: the backbone has no layer named {rest!r}{hint}")
        return rest
    count_text, _, unit = rest.partition(":")
    count, unit = int(count_text), unit or "layers"
    units = layer_names(backbone) if unit == "layers" else list(blocks or [])
    if not units:
        raise CxrError(f"trainable {trainable!r}: this backbone defines no {unit}")
    if count <= 0:
        return None
    if count >= len(units):
        return ""
    return units[-count]


def apply_trainable(model: nn.Module, trainable: str, blocks: list[str] | None = None) -> FreezePlan:
    """Set ``requires_grad`` on ``model.backbone`` for ``trainable``; the head always trains.

    Args:
        model: a classifier with ``backbone`` and ``head`` submodules.
        trainable: ``head``, ``all``, ``top:N``, ``top:N:blocks`` or ``from:<name>``.
        blocks: block names of the backbone; by default those of the spec named by ``model.spec_name``.
    """
    backbone: nn.Module = model.backbone
    if blocks is None and hasattr(model, "spec_name"):
        from cxrkit.models.backbones import BACKBONES, block_names

        blocks = block_names(backbone, BACKBONES.get(model.spec_name))
    cut = resolve_cut(backbone, trainable, blocks)
    order = _module_order(backbone)
    start = len(order) if cut is None else order[cut] if cut else 0
    for name, module in backbone.named_modules():
        for param in module.parameters(recurse=False):
            param.requires_grad_(order[name] >= start)
    for param in model.head.parameters():
        param.requires_grad_(True)
    model._frozen_modules = [m for name, m in backbone.named_modules() if name and order[name] < start]
    from cxrkit.models.classifier import count_parameters

    counts = count_parameters(model)
    return FreezePlan(trainable, cut or None, counts["trainable"], counts["total"], counts["bn_statistics"],
                      _whole_or_nothing(backbone, trainable, cut, blocks))


def _whole_or_nothing(backbone: nn.Module, trainable: str, cut: str | None, blocks: list[str] | None) -> str:
    """For ``top:N`` that reaches past the bottom of the backbone (or is 0), what it amounts to; else ``""``."""
    if not trainable.startswith("top:") or cut not in ("", None):
        return ""
    unit = trainable.removeprefix("top:").partition(":")[2]
    unit = unit or "layers"
    if cut is None:
        return "no backbone layer trains, only the head"
    total = len(layer_names(backbone) if unit == "layers" else blocks or [])
    return f"the backbone has {total} {unit}, so all of it trains"


def set_train_mode(model: nn.Module, freeze_batchnorm: bool = False) -> None:
    """``model.train()``, then BatchNorm and Dropout of the frozen part back to inference mode.

    Args:
        model: a classifier after :func:`apply_trainable`.
        freeze_batchnorm: also keep the trainable part's BatchNorm in inference mode (its scale and shift still
            learn), the Keras way of fine-tuning a pretrained base.
    """
    model.train()
    for module in getattr(model, "_frozen_modules", []):
        if isinstance(module, (_BatchNorm, nn.Dropout)):
            module.eval()
    if freeze_batchnorm:
        for module in model.backbone.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
