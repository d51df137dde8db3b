"""Cached prefix activations for partial fine-tuning: run the frozen part once, train the rest on its output.

A ``top:N`` or ``from:<name>`` stage freezes everything before a cut point. When the inputs are not augmented,
the frozen prefix (BatchNorm and Dropout in inference mode) gives the same activation for an image in every epoch,
so it runs once per image and only the suffix (the unfrozen layers, any frozen layers after the boundary, and the
head) runs in each epoch.

The boundary is the module whose *input* is cached. It is the cut itself or one of its ancestors, because a cut
inside a block with a skip connection (an inverted residual) or a concatenation (a dense block) cannot be resumed
from the cut's input alone. Candidates are tried from the deepest to the shallowest. A candidate is used only
when the resumed forward pass reproduces the full model's output on real images in fp32, so the cache never
changes what the model computes.

The resumed model is a *view*: shallow copies of the boundary's ancestors in which the children that run before
the boundary are replaced by ``nn.Identity``. The cached activation therefore flows unchanged to the boundary.
Every other module, including every parameter, is shared with the model, so training the view trains the model,
and checkpoints stay the model's own.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


class _Stop(Exception):
    """Raised by the capture hook once the boundary's input is known: nothing after it needs to run."""


@dataclass
class ResumedModel:
    """A model that starts at ``boundary``: call ``net`` on cached boundary inputs.

    Attributes:
        boundary: module path, in the model, whose input is cached.
        net: the view (shares all parameters and buffers with the model).
        copies: ``(copy, original)`` pairs of the boundary's ancestors, whose train/eval flag :meth:`sync` copies.
    """

    boundary: str
    net: nn.Module
    copies: list[tuple[nn.Module, nn.Module]]

    def sync(self) -> None:
        """Give the copied ancestors the train/eval flags of the originals (after ``set_train_mode(model)``)."""
        for view, original in self.copies:
            view.training = original.training


def resume_from(model: nn.Module, boundary: str) -> ResumedModel:
    """A view of ``model`` whose forward pass takes the input of ``boundary`` and runs from there on.

    Children that are defined before the path to ``boundary``, in each of its ancestors, become ``nn.Identity``.
    Whether that matches the forward pass is for :func:`find_boundary` to check.
    """
    parts = boundary.split(".")
    root = _shallow(model)
    copies = [(root, model)]
    view, original = root, model
    for depth, name in enumerate(parts):
        names = list(original._modules)
        if name not in names:
            raise KeyError(f"{boundary}: no module {name!r} in {type(original).__name__}")
        for earlier in names[: names.index(name)]:
            view._modules[earlier] = nn.Identity()
        if depth == len(parts) - 1:
            break
        child = original._modules[name]
        child_view = _shallow(child)
        view._modules[name] = child_view
        copies.append((child_view, child))
        view, original = child_view, child
    return ResumedModel(boundary, root, copies)


def prefix_tensors(model: nn.Module, boundary: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters and persistent buffers that the input of ``boundary`` can depend on: those of the children
    that run before the path to it (the ones :func:`resume_from` replaces), and, to be safe, the boundary's
    ancestors' own. Layers at or after the boundary are left out, so training them keeps the cached input valid."""
    module, path = model, ""
    for name in boundary.split("."):
        own = {**module._parameters, **{k: v for k, v in module._buffers.items()
                                        if k not in module._non_persistent_buffers_set}}
        yield from ((f"{path}{key}", tensor) for key, tensor in own.items() if tensor is not None)
        names = list(module._modules)
        for earlier in names[: names.index(name)]:
            child = module._modules[earlier]
            if child is not None:
                yield from child.state_dict(prefix=f"{path}{earlier}.").items()
        module, path = module._modules[name], f"{path}{name}."


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that shares its parameters, buffers and children but has its own child table."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


def candidates(cut: str) -> Iterator[str]:
    """``backbone.a.b.c``, ``backbone.a.b``, ``backbone.a``: the cut and its ancestors inside the backbone."""
    parts = cut.split(".")
    for end in range(len(parts), 1, -1):
        yield ".".join(parts[:end])


@torch.no_grad()
def boundary_input(model: nn.Module, boundary: str, images: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``boundary`` receives when ``model`` runs on ``images``; None when it takes anything else."""
    module = model.get_submodule(boundary)
    seen: list[object] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        seen.append(args[0] if len(args) == 1 else args)
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0] if seen and isinstance(seen[0], torch.Tensor) else None


@torch.no_grad()
def find_boundary(model: nn.Module, cut: str, probe: torch.Tensor, atol: float = 1e-4) -> ResumedModel | None:
    """The deepest boundary at or above ``cut`` (a path in ``model``) from which the model can be resumed.

    Each candidate is checked on ``probe`` (a few real, preprocessed images) in inference mode and fp32: the
    resumed output must match the full output to ``atol`` relative to its scale.

    Returns:
        The resumed model, or None when no candidate below the backbone itself reproduces the output.
    """
    was_training = model.training
    model.eval()
    try:
        reference = model(probe).float()
        scale = max(float(reference.abs().max()), 1.0)
        for boundary in candidates(cut):
            cached = boundary_input(model, boundary, probe)
            if cached is None or (cached.shape == probe.shape and torch.equal(cached, probe)):
                continue  # not a tensor, or the prefix does nothing worth caching
            resumed = resume_from(model, boundary)
            try:
                out = resumed.net(cached).float()
            except (RuntimeError, TypeError, ValueError, IndexError):
                continue  # the ancestor does more than chain its children (a skip connection, a concatenation)
            if out.shape == reference.shape and float((out - reference).abs().max()) <= atol * scale:
                return resumed
        return None
    finally:
        model.train(was_training)


__all__ = ["ResumedModel", "boundary_input", "candidates", "find_boundary", "prefix_tensors", "resume_from"]
