"""``cxr train``: train a recipe into a new run directory, or resume one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

if TYPE_CHECKING:
    from cxrkit.config import Recipe


def _flag_overrides(data: str | None, task: str | None, backbone: str | None, weights: str | None,
                    epochs: int | None, out: str | None, stages: int) -> list[tuple[str, Any]]:
    """The recipe keys the flags set, as values, not YAML text: a path such as ``data #1`` or ``yes`` is itself."""
    pairs: list[tuple[str, Any]] = []
    for key, value in (("data.root", data), ("data.task", task), ("model.backbone", backbone),
                       ("model.weights", weights), ("out", out)):
        if value is not None:
            pairs.append((key, value))
    if epochs is not None:
        pairs += [(f"stages.{i}.epochs", epochs) for i in range(max(stages, 1))]
    return pairs


def _named_for_backbone(config: Recipe, base: Recipe) -> Recipe:
    """``config`` (``base`` with overrides) named after its backbone when the overrides changed it and kept the
    name: ``kermany-densenet121-weighted`` trained with ``--backbone googlenet`` is ``kermany-googlenet-weighted``,
    ``pneumonia-mobilenetv2`` with ``resnet18`` is ``pneumonia-resnet18`` (a name without the backbone gets it
    appended), so its run folder does not claim another backbone."""
    import dataclasses
    import re

    old, new = base.model.backbone, config.model.backbone
    if old == new or config.name != base.name:
        return config
    # the name may spell the backbone without its separators: pneumonia-mobilenetv2 names mobilenet_v2
    spelled = r"[-_.]?".join(re.escape(ch) for ch in re.sub(r"[^0-9a-z]", "", old.lower()))
    name, found = re.subn(spelled, new, config.name, count=1, flags=re.IGNORECASE)
    return dataclasses.replace(config, name=name if found else f"{config.name}-{new}")


def train(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (see recipes/). Without one, the defaults."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override any recipe key: --set stages.1.lr=1e-5"),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset: class-folder root, .npz, or .csv (data.root)"),
    task: Optional[str] = typer.Option(None, "--task", help="auto, normal-bacterial-viral, ... (data.task)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Backbone name (cxr models)"),
    weights: Optional[str] = typer.Option(None, "--weights", help="imagenet, none, or a .pth/.safetensors file"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs of every stage"),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for run directories (default runs/)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run directory"),
) -> None:
    """Train a model. The last line printed is the run directory."""
    import os

    from cxrkit.config import load_recipe
    from cxrkit.console import notes_console
    from cxrkit.errors import CxrError
    from cxrkit.runs import Run
    from cxrkit.train.api import train_recipe

    console = notes_console()
    if resume is not None:
        if recipe is not None or set_ or any(v is not None for v in (data, task, backbone, weights, epochs, out)):
            raise CxrError("--resume continues a run with its saved recipe; do not pass a recipe or overrides")
        run = train_recipe(resume=Run.open(resume), console=console)
    else:
        base = load_recipe(recipe)
        config = load_recipe(recipe, _flag_overrides(data, task, backbone, weights, epochs, out, len(base.stages))
                             + set_)
        run = train_recipe(_named_for_backbone(config, base), console=console)
    if os.environ.get("RANK", "0") == "0":
        print(run.path)
