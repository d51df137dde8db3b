"""One epoch of training and one pass of inference. Reads top to bottom; no callbacks."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import distributed as dist
from torch import nn

from cxrkit.errors import CxrError
from cxrkit.train.losses import probabilities
from cxrkit.train.runtime import Runtime


def make_progress(console: Console, enabled: bool = True) -> Progress:
    """A rich progress bar with images/s and ETA, drawn on a terminal or in Jupyter; silent when ``enabled`` is False
    or the console writes to a file or a pipe (where rich would leave only a stray blank line)."""
    drawn = enabled and console is not None and (console.is_terminal or console.is_jupyter)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=not drawn, transient=True,
    )


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def _batch_correct(task: str, logits: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
    if task == "multilabel":
        known = ~torch.isnan(target)
        hits = ((logits > 0) == (target > 0.5)) & known
        return float(hits.sum()), int(known.sum())
    return float((logits.argmax(1) == target).sum()), int(target.numel())


def _all_reduce(values: list[float], runtime: Runtime) -> list[float]:
    if not runtime.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def train_one_epoch(
    model: nn.Module, loader: Iterable, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
    runtime: Runtime, task: str, progress: Progress, description: str,
) -> EpochStats:
    """Train for one pass over ``loader``; returns mean loss and accuracy over all processes."""
    total = len(loader)  # type: ignore[arg-type]
    bar = progress.add_task(description, total=total, rate="")
    loss_sum = correct = counted = images = 0.0
    start = time.perf_counter()
    for batch in loader:
        x, y = runtime.to_device(batch["image"]), batch["target"].to(runtime.device)
        with runtime.autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        if not math.isfinite(loss.item()):
            raise CxrError(f"training loss became {loss.item()} in {description}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = x.shape[0]
        loss_sum += loss.item() * n
        hit, count = _batch_correct(task, logits.detach().float(), y)
        correct, counted, images = correct + hit, counted + count, images + n
        rate = images * runtime.world_size / (time.perf_counter() - start)
        progress.update(bar, advance=1, rate=f"{rate:.0f} img/s  loss {loss_sum / images:.4f}")
    progress.remove_task(bar)
    loss_sum, correct, counted, images = _all_reduce([loss_sum, correct, counted, images], runtime)
    seconds = time.perf_counter() - start
    return EpochStats(loss_sum / max(images, 1), correct / max(counted, 1), int(images), seconds)


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable, runtime: Runtime, task: str, progress: Progress | None = None,
    description: str = "predict", loss_fn: nn.Module | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Probabilities for every sample of ``loader`` (gathered over processes, in dataset order).

    Returns:
        ``(indices, probs, targets, mean_loss)``; ``mean_loss`` is nan without ``loss_fn``.
    """
    was_training = model.training
    model.eval()
    bar = progress.add_task(description, total=len(loader), rate="") if progress else None  # type: ignore[arg-type]
    indices, probs, targets, loss_sum, start = [], [], [], 0.0, time.perf_counter()
    for batch in loader:
        x = runtime.to_device(batch["image"])
        with runtime.autocast():
            logits = model(x).float()
        if loss_fn is not None:
            loss_sum += loss_fn(logits, batch["target"].to(runtime.device)).item() * x.shape[0]
        indices.append(batch["index"].numpy())
        probs.append(probabilities(task, logits).cpu().numpy())
        targets.append(batch["target"].numpy())
        if bar is not None:
            rate = sum(map(len, indices)) * runtime.world_size / (time.perf_counter() - start)
            progress.update(bar, advance=1, rate=f"{rate:.0f} img/s")
    if bar is not None:
        progress.remove_task(bar)
    model.train(was_training)
    idx, p, t = np.concatenate(indices), np.concatenate(probs), np.concatenate(targets)
    if runtime.distributed:
        gathered: list = [None] * runtime.world_size
        dist.all_gather_object(gathered, (idx, p, t, loss_sum))
        idx = np.concatenate([g[0] for g in gathered])
        p = np.concatenate([g[1] for g in gathered])
        t = np.concatenate([g[2] for g in gathered])
        loss_sum = sum(g[3] for g in gathered)
    idx, first = np.unique(idx, return_index=True)  # the distributed sampler pads with repeats
    n = len(idx)
    return idx, p[first], t[first], (loss_sum / n if loss_fn is not None and n else float("nan"))
