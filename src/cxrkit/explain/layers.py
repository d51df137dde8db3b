"""Naming the layer to explain or to read features from, and reading its output with a hook that cannot leak.

The default Grad-CAM layer comes from the backbone spec (``cam_layer``), so users never have to find it. A user may
name any module, either as the whole model names it (``backbone.features.17``, ``head.1``) or inside the backbone
(``features.17``, which is how ``cxr models`` and the recipes' ``from:<layer>`` name layers).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cxrkit.errors import CxrError


def module_names(model: nn.Module) -> list[str]:
    """Every named submodule of ``model``, in definition order."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The module called ``name`` in a :class:`~cxrkit.models.classifier.Classifier` (default: its CAM layer).

    Args:
        model: a classifier with ``backbone`` and ``spec``.
        name: a module path in the model or in its backbone; None for the backbone spec's ``cam_layer``.

    Returns:
        ``(path in the model, module)``.

    Raises:
        CxrError: no such module; the message lists the closest names.
    """
    if name is None:
        name = f"backbone.{model.spec.cam_layer}"
    modules = dict(model.named_modules())
    for candidate in (name, f"backbone.{name}"):
        if candidate and candidate in modules:
            return candidate, modules[candidate]
    names = module_names(model)
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    close += [n for n in difflib.get_close_matches(f"backbone.{name}", names, n=4, cutoff=0.6) if n not in close]
    hint = f"did you mean {', '.join(close[:4])}?" if close else f"`cxr models --layers {model.spec_name}` lists them"
    raise CxrError(f"model {model.spec_name} has no layer {name!r}; {hint}")


@contextmanager
def capture_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect ``module``'s outputs (detached) while the block runs; the hook is removed on exit, errors included.

    Yields:
        A list that receives one tensor per forward call.
    """
    outputs: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor):
            raise CxrError(f"layer {type(_module).__name__} returns {type(output).__name__}, not a tensor")
        outputs.append(output.detach().clone())

    handle = module.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()
        outputs.clear()


__all__ = ["capture_output", "module_names", "resolve_layer"]
