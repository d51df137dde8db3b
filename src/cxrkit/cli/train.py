"""``cxr train``: train a recipe into a new run directory, or resume one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _flag_overrides(data: str | None, task: str | None, backbone: str | None, weights: str | None,
                    epochs: int | None, out: str | None, stages: int) -> list[str]:
    pairs = []
    if data is not None:
        pairs.append(f"data.root={data}")
    if task is not None:
        pairs.append(f"data.task={task}")
    if backbone is not None:
        pairs.append(f"model.backbone={backbone}")
    if weights is not None:
        pairs.append(f"model.weights={weights}")
    if out is not None:
        pairs.append(f"out={out}")
    if epochs is not None:
        pairs += [f"stages.{i}.epochs={epochs}" for i in range(max(stages, 1))]
    return pairs


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
    from rich.console import Console

    from cxrkit.config import load_recipe
    from cxrkit.errors import CxrError
    from cxrkit.runs import Run
    from cxrkit.train.fit import Trainer, seed_everything
    from cxrkit.train.runtime import setup_runtime, shutdown

    console = Console(stderr=True, soft_wrap=True)
    last = None
    if resume is not None:
        if recipe is not None or set_ or any(v is not None for v in (data, task, backbone, weights, epochs, out)):
            raise CxrError("--resume continues a run with its saved recipe; do not pass a recipe or overrides")
        run = Run.open(resume)
        config = load_recipe(run.file("recipe.yaml"))
        last = run.load_checkpoint("last") if run.has_checkpoint("last") else None
    else:
        stages = len(load_recipe(recipe).stages)
        config = load_recipe(recipe, _flag_overrides(data, task, backbone, weights, epochs, out, stages) + set_)
    runtime = setup_runtime(config.runtime.device, config.runtime.precision, config.runtime.channels_last,
                            config.runtime.threads, config.runtime.workers)
    try:
        if resume is None:
            run = _create_run(config.out, config.name, runtime)
        if last is not None and last["stage"] >= len(config.stages):
            console.print(f"run {run.path} is already complete")
        else:
            seed_everything(config.seed)
            trainer = Trainer(config, run, runtime, console)
            if runtime.is_main:
                console.print(f"run {run.path}\n{trainer.data.spec.name}: {len(trainer.data.train)} train, "
                              f"{len(trainer.data.val)} val images; {runtime.describe()}")
            trainer.fit(resume=last)
    finally:
        shutdown(runtime)
    if runtime.is_main:
        print(run.path)


def _create_run(out: str, name: str, runtime):
    """Rank 0 creates the run directory; other processes learn its path."""
    from cxrkit.runs import Run

    if not runtime.distributed:
        return Run.create(out, name)
    from torch import distributed as dist

    holder = [str(Run.create(out, name).path) if runtime.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return Run(holder[0])
