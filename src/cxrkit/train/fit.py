"""Train a recipe: stages in order, each with its trainable part, optimizer, schedule and early stopping.

State lives in the run directory. ``checkpoints/last.pt`` is written atomically after every epoch with the
model, optimizer, scheduler, early-stopping state and position, so ``cxr train --resume RUN`` continues exactly
where a killed run stopped (losing at most the epoch in progress). Epoch order and dropout depend only on
``(seed, epoch)``, and so does augmentation (each image's random transforms are seeded from them, see
:class:`~cxrkit.train.sampling.WithSeeds`), so a resumed run matches an uninterrupted one, with any number of
DataLoader workers.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from torch.nn.parallel import DistributedDataParallel

from cxrkit import pipeline
from cxrkit.cache import readable_size
from cxrkit.config import Recipe, StageConfig
from cxrkit.errors import CxrError
from cxrkit.models.freeze import apply_trainable, set_train_mode
from cxrkit.models.weights import tensors_digest, weights_digest
from cxrkit.runs import Run, raise_if_interrupted
from cxrkit.train.features import extract_features, feature_loader, features_key, stored_meta
from cxrkit.train.loop import make_progress, predict, train_one_epoch
from cxrkit.train.losses import build_loss, class_weights_for
from cxrkit.train.onnx_cache import OnnxFrozen, check_engine_setting, choose_engine
from cxrkit.train.prefix import ResumedModel, find_boundary, prefix_tensors
from cxrkit.train.prepare import RunData, prepare_data
from cxrkit.train.runtime import Runtime
from cxrkit.train.sampling import EpochSampler, WithSeeds, oversampling_weights

MAXIMIZE = {"val_loss": False, "val_accuracy": True, "val_auc": True}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def callers_random_state() -> Iterator[None]:
    """Python's, NumPy's and torch's random generators as they were before the block: training seeds them (two
    trainings of one recipe, and a resumed one, draw the same numbers), and the caller's draws must not change."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def make_optimizer(stage: StageConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kind, lr, wd = stage.optimizer, stage.lr, stage.weight_decay
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=stage.momentum, weight_decay=wd, nesterov=stage.momentum > 0)
    return torch.optim.RMSprop(params, lr=lr, momentum=stage.momentum, weight_decay=wd)


def make_scheduler(stage: StageConfig, optimizer: torch.optim.Optimizer) -> Any:
    if stage.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(stage.epochs, 1))
    if stage.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=stage.step_size, gamma=stage.gamma)
    if stage.schedule == "plateau":
        mode = "max" if MAXIMIZE[stage.early_stopping.monitor] else "min"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=stage.gamma, patience=2)
    return None


@dataclass
class Tracker:
    """Best score of a monitored metric and epochs since it improved."""

    monitor: str
    best: float | None = None
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, value: float, min_delta: float = 0.0) -> bool:
        """Record ``value``; True when it is a new best."""
        if math.isnan(value):
            return False
        sign = 1.0 if MAXIMIZE[self.monitor] else -1.0
        if self.best is None or sign * (value - self.best) > min_delta:
            self.best, self.bad_epochs = value, 0
            return True
        self.bad_epochs += 1
        return False

    def state(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "best": self.best, "bad_epochs": self.bad_epochs, "stopped": self.stopped}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Tracker:
        return cls(state["monitor"], state["best"], state["bad_epochs"], state["stopped"])


def _validation_scores(data: RunData, probs: np.ndarray, targets: np.ndarray, loss: float) -> dict[str, float]:
    from cxrkit.eval.metrics import compute_metrics

    metrics = compute_metrics(data.spec.task, list(data.spec.labels), targets, probs)
    nan = float("nan")
    return {
        "val_loss": loss,
        "val_accuracy": metrics["accuracy"] if metrics["accuracy"] is not None else nan,
        "val_auc": metrics["auc"] if metrics["auc"] is not None else nan,
    }


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


class Trainer:
    """Runs the stages of one recipe in one run directory."""

    def __init__(self, recipe: Recipe, run: Run | None, runtime: Runtime, console: Console, resuming: bool = False):
        self.recipe, self.run, self.runtime, self.console = recipe, run, runtime, console
        if recipe.runtime.cache_features:
            check_engine_setting(recipe.runtime.cache_engine, runtime)
        self.data = prepare_data(recipe, run, runtime, console)
        spec = self.data.spec
        # a resumed run takes every weight from its checkpoint, so it needs no pretrained file
        self.model = pipeline.build_model(recipe.model, len(spec.labels), weights="none" if resuming else None)
        self.model = runtime.prepare_model(self.model)
        for i, stage in enumerate(recipe.stages):  # a wrong layer name fails now, not after the stages before it
            try:
                apply_trainable(self.model, stage.trainable)
            except CxrError as err:
                raise CxrError(f"recipe key stages.{i}.trainable: {err}") from None
        weights = class_weights_for(spec.task, list(spec.labels), self.data.train.targets(), recipe.loss.class_weights)
        self.loss_fn = build_loss(spec.task, weights, recipe.loss.label_smoothing).to(runtime.device)
        if weights is not None and runtime.is_main:
            pairs = ", ".join(f"{n} {w:.3g}" for n, w in zip(spec.labels, weights))
            console.print(f"class weights: {pairs}", highlight=False)
        sample_weights = None
        if recipe.loss.sampling == "oversample":
            sample_weights = oversampling_weights(self.data.train.targets())
        self.sampler = EpochSampler(len(self.data.train), recipe.seed, runtime.rank, runtime.world_size, sample_weights)
        per_process = max(1, recipe.runtime.batch_size // runtime.world_size)
        self.train_loader = pipeline.make_loader(self.data.train, self.data.train_transform, per_process, runtime,
                                                 WithSeeds(self.sampler))
        self.val_loader = None
        if len(self.data.val):
            self.val_loader = pipeline.make_loader(self.data.val, self.data.eval_transform,
                                                   recipe.runtime.eval_batch_size, runtime)
        self.rows: list[dict[str, Any]] = run.read_metrics() if run else []
        self.best = Tracker(recipe.runtime.checkpoint_monitor)
        for note in recipe.monitor_notes() if not resuming else []:
            self.log(f"note: {note}")
        self._cache: tuple[str, Any, Any] | None = None  # (what is cached: "head" or a boundary, train, val)
        self._resumed: ResumedModel | None = None
        self._unwritable: set[Any] = set()  # feature-cache folders already noted as not writable

    def log(self, text: str) -> None:
        if self.runtime.is_main:
            self.console.print(text)

    def save(self, name: str, state: dict[str, Any]) -> None:
        if self.runtime.is_main and self.run is not None:
            self.run.save_checkpoint(name, state)

    def link_checkpoint(self, source: str, name: str) -> None:
        if self.runtime.is_main and self.run is not None:
            self.run.link_checkpoint(source, name)

    def fit(self, resume: dict[str, Any] | None = None) -> None:
        """Run every stage; ``resume`` is the content of ``last.pt`` of an interrupted run."""
        start_stage = 0
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            self.best = Tracker.from_state(resume["best"])
            start_stage = resume["stage"]
            self.rows = [r for r in self.rows if int(r["epoch"]) <= resume["epoch"]]
            self.log(f"resuming at stage {start_stage + 1}, epoch {resume['stage_epoch'] + 1}")
        else:
            self.rows = []  # a run killed before its first last.pt starts again, whatever rows it wrote
        for index in range(start_stage, len(self.recipe.stages)):
            self.fit_stage(index, resume if resume is not None and index == start_stage else None)
        if self.runtime.is_main and self.run is not None:
            self.run.write_metrics(self.rows)
            self._say_which_weights()

    def _say_which_weights(self) -> None:
        """Which epoch ``best.pt`` holds, the weights that evaluation, prediction and export use by default; with
        several stages, a note when no epoch of the later stages did better, so none of their training is in it."""
        if self.val_loader is None or not self.run.has_checkpoint("best"):
            return  # without a validation split best.pt is the last epoch
        best, stages = self.run.load_checkpoint("best", lazy=True), self.recipe.stages
        if not isinstance(best.get("score"), float) or not isinstance(best.get("stage"), int):
            return
        stage = best["stage"]
        named = f" (stage {stage + 1}, {stages[stage].name})" if len(stages) > 1 else ""
        self.log(f"best.pt: epoch {best['epoch']} of {len(self.rows)}{named}, {best['monitor']} {best['score']:.4f}; "
                 "evaluate, predict and export use it")
        if stage < len(stages) - 1:
            later = ", ".join(f"{i + 1} ({s.name})" for i, s in enumerate(stages) if i > stage)
            self.log(f"note: no epoch of stage {later} did better on {best['monitor']}, so best.pt holds none of "
                     "their training; --checkpoint last uses the last epoch's weights")

    def _epoch_state(self, index: int, stage_epoch: int, optimizer: Any, scheduler: Any, tracker: Tracker) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "stage": index, "stage_epoch": stage_epoch, "epoch": len(self.rows),
            "tracker": tracker.state(), "best": self.best.state(),
        }

    def fit_stage(self, index: int, resume: dict[str, Any] | None) -> None:
        stage, runtime = self.recipe.stages[index], self.runtime
        plan = apply_trainable(self.model, stage.trainable)
        momentum = f", momentum {stage.momentum:g}" if stage.optimizer in ("sgd", "rmsprop") else ""
        nesterov = " (Nesterov)" if stage.optimizer == "sgd" and stage.momentum > 0 else ""
        decay = f", weight decay {stage.weight_decay:g}" if stage.weight_decay else ""
        self.log(f"[bold]stage {index + 1}/{len(self.recipe.stages)} {stage.name}[/]: {plan.describe()}; "
                 f"{stage.optimizer} lr {stage.lr:g}{momentum}{nesterov}{decay}, {stage.epochs} epoch(s)")
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(stage, params)
        scheduler = make_scheduler(stage, optimizer)
        tracker = Tracker(stage.early_stopping.monitor)
        first_epoch = 0
        if resume is not None and resume.get("optimizer") is not None:
            optimizer.load_state_dict(resume["optimizer"])
            if scheduler is not None and resume["scheduler"] is not None:
                scheduler.load_state_dict(resume["scheduler"])
            tracker, first_epoch = Tracker.from_state(resume["tracker"]), resume["stage_epoch"]
        patience = stage.early_stopping.patience
        with make_progress(self.console, runtime.is_main) as progress:
            # a stage with no epoch left (0 epochs, or stopped early before a resume) caches nothing
            more = first_epoch < stage.epochs and not tracker.stopped
            inputs = self._stage_inputs(stage, plan.cut, progress) if more else None
            for stage_epoch in range(first_epoch, stage.epochs):
                if tracker.stopped:
                    break
                raise_if_interrupted()  # a Ctrl-C that the last epoch lost (see cxrkit.runs.on_interrupt)
                row = self._run_epoch(index, stage, stage_epoch, inputs, optimizer, progress)
                improved = tracker.update(row[stage.early_stopping.monitor], stage.early_stopping.min_delta)
                best_improved = self.best.update(row[self.best.monitor]) or self.val_loader is None
                if best_improved:
                    self.save("best", {"model": self.model.state_dict(), "stage": index, "epoch": row["epoch"],
                                       "monitor": self.best.monitor, "score": row[self.best.monitor]})
                if improved and stage.early_stopping.restore_best:
                    if best_improved:  # the same weights: best.pt's "model" is all that restoring reads
                        self.link_checkpoint("best", "stage_best")
                    else:
                        self.save("stage_best", {"model": self.model.state_dict(), "stage": index})
                if scheduler is not None:
                    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
                    scheduler.step(row[stage.early_stopping.monitor]) if plateau else scheduler.step()
                tracker.stopped = patience is not None and tracker.bad_epochs >= max(patience, 1)  # as Keras
                # the row first: a resume keeps the rows up to last.pt's epoch, so a kill between the two writes
                # redoes the epoch, where the other order would lose its row and renumber the epochs after it
                if self.runtime.is_main and self.run is not None:
                    self.run.write_metrics(self.rows)
                self.save("last", self._epoch_state(index, stage_epoch + 1, optimizer, scheduler, tracker))
        if tracker.stopped:
            self.log(f"early stopping: {tracker.monitor} has not improved for {tracker.bad_epochs} epoch(s)")
        self._finish_stage(index, stage.early_stopping.restore_best and tracker.best is not None)

    def _stage_inputs(self, stage: StageConfig, cut: str | None, progress: Any) -> tuple[Any, Any, Any, Any]:
        """(training net, evaluation net, train loader, val loader) of a stage.

        Without augmentation, the frozen part runs once per image: a head-only stage trains the head on cached
        backbone features, and a partial stage (``top:N``, ``from:<name>``) trains the rest of the model on the
        cached input of the boundary at or above its cut (see :mod:`cxrkit.train.prefix`). Otherwise images go
        through the whole model every epoch.
        """
        recipe, runtime = self.recipe, self.runtime
        partial = stage.trainable != "head" and cut is not None
        cacheable = (stage.trainable == "head" or partial) and recipe.runtime.cache_features and not runtime.distributed
        if cacheable and recipe.augment.enabled:
            self.log("feature cache off: augmentation changes the inputs every epoch")
            cacheable = False
        self._resumed = None
        resumed = self._find_boundary(cut) if cacheable and partial else None
        key = resumed.boundary if resumed is not None else "head" if cacheable and not partial else None
        if self._cache is not None and self._cache[0] != key:
            self._cache = None  # another stage trained what the cache was computed from
        if key is None:
            net = self.model
            if runtime.distributed:
                ids = [runtime.device] if runtime.device.type == "cuda" else None
                net = DistributedDataParallel(self.model, device_ids=ids)
            return net, self.model, self.train_loader, self.val_loader
        if self._cache is None:
            self._cache = (key, *self._cache_inputs(None if key == "head" else key, progress))
        _, train, val = self._cache
        batch = max(1, recipe.runtime.batch_size // runtime.world_size)
        val_loader = feature_loader(val, recipe.runtime.eval_batch_size) if val is not None else None
        self._resumed = resumed
        net = self.model.head if resumed is None else resumed.net
        return net, net, feature_loader(train, batch, self.sampler), val_loader

    def _find_boundary(self, cut: str) -> ResumedModel | None:
        """Where a partial stage can resume from cached activations, checked on a few training images."""
        n = min(4, len(self.data.train))
        if n == 0:
            return None
        probe = self.runtime.to_device(torch.stack([self.data.eval_transform(self.data.train.read(i))
                                                    for i in range(n)]))
        resumed = find_boundary(self.model, f"backbone.{cut}", probe)
        if resumed is None:
            self.log(f"feature cache off: this backbone's forward pass cannot be resumed at or above {cut}")
        return resumed

    def _cache_inputs(self, boundary: str | None, progress: Any) -> tuple[Any, Any]:
        """Run the frozen part once over train and val: backbone features, or the input of ``boundary``."""
        recipe, runtime = self.recipe, self.runtime
        what = "backbone features" if boundary is None else f"inputs of {boundary.removeprefix('backbone.')}"
        net = self.model.backbone if boundary is None else self.model
        train_plain = pipeline.make_loader(self.data.train, self.data.eval_transform, recipe.runtime.eval_batch_size,
                                           runtime)
        # the weights the cached values come from: a resume inside a top-N stage, whose layers above the boundary
        # have trained, finds the same entry
        weights = (weights_digest(self.model.backbone) if boundary is None
                   else tensors_digest(prefix_tensors(self.model, boundary)))
        store = self._feature_store(self.data.train, boundary, weights)
        val_store = self._feature_store(self.data.val, boundary, weights) if self.val_loader is not None else None
        passes = [(self.data.train, store)] + ([(self.data.val, val_store)] if self.val_loader is not None else [])
        reused = [s is not None and s.with_suffix(".json").is_file() for _, s in passes]  # checked by _feature_store
        engine = self._cache_engine(net, boundary, passes)
        about = {"backbone": recipe.model.backbone, "image_size": self.data.preprocessing.size}  # for `cxr cache`
        train = extract_features(net, train_plain, runtime, progress, "caching train features", boundary, store,
                                 engine, {**about, "split": "train"}, self.log)
        val = None
        if self.val_loader is not None:
            val = extract_features(net, self.val_loader, runtime, progress, "caching val features", boundary,
                                   val_store, engine, {**about, "split": "val"}, self.log)
        size = train.nbytes + (val.nbytes if val is not None else 0)
        shape = "x".join(map(str, train.features.shape[1:]))
        images = f"{len(train)} training" + (f" and {len(val)} validation" if val is not None else "")
        where = f", memory-mapped from {store.parent}" if train.mapped else ""
        how = "reused " if all(reused) else "" if not any(reused) else "partly reused "
        self.log(f"{how}cached {what} ({shape}, {readable_size(size)}{where}) of {images} "
                 f"images; {'the head trains on them' if boundary is None else 'each epoch runs from there'}")
        return train, val

    def _cache_engine(self, net: torch.nn.Module, boundary: str | None, passes: list[tuple[Any, Any]]) -> Any:
        """ONNX Runtime for the caching passes (see :mod:`cxrkit.train.onnx_cache`), or None for PyTorch.

        ``passes`` are ``(images, store)`` pairs; images whose store is complete are not computed again."""
        pending = sum(len(images) for images, store in passes
                      if store is None or not store.with_suffix(".json").is_file())
        if not pending:
            return None
        engine, why = choose_engine(self.recipe.runtime.cache_engine, self.runtime, pending)
        if engine == "torch":
            return None
        self.log(f"feature caching uses ONNX Runtime: {why}")
        return OnnxFrozen(net, boundary, self.data.preprocessing.size, self.log)

    def _feature_store(self, images: Any, boundary: str | None, weights: str) -> Any:
        """Where the features of ``images`` are kept on disk (keyed by all they depend on), or None for memory."""
        from cxrkit.cache import unwritable
        from cxrkit.data.decoded import cache_key, cache_root

        folder = cache_root() / "features"
        key = features_key(weights, cache_key(images.items, self.data.preprocessing), boundary, self.runtime)
        store = folder / f"{key}.bin"
        if stored_meta(store) is not None:
            return store  # complete: read, even from a read-only cache (a damaged entry is removed)
        why = unwritable(folder)
        if why is not None:
            if folder not in self._unwritable:
                self.log(f"features stay in memory: {folder} is not writable ({why})")
            self._unwritable.add(folder)
            return None
        return store

    def _run_epoch(self, index: int, stage: StageConfig, stage_epoch: int, inputs: tuple[Any, Any, Any, Any],
                   optimizer: torch.optim.Optimizer, progress: Any) -> dict[str, Any]:
        net, eval_net, train_loader, val_loader = inputs
        epoch = len(self.rows) + 1
        torch.manual_seed(self.recipe.seed * 100_003 + epoch)
        self.sampler.set_epoch(epoch)
        freeze_bn = stage.batchnorm == "frozen" or (stage.batchnorm == "auto" and self.recipe.model.weights != "none")
        set_train_mode(self.model, freeze_batchnorm=freeze_bn)
        if self._resumed is not None:
            self._resumed.sync()
        desc = f"{stage.name} {stage_epoch + 1}/{stage.epochs}"
        stats = train_one_epoch(net, train_loader, self.loss_fn, optimizer, self.runtime,
                                self.data.spec.task, progress, desc)
        scores = {"val_loss": float("nan"), "val_accuracy": float("nan"), "val_auc": float("nan")}
        val_start = time.perf_counter()
        if val_loader is not None:
            _, probs, targets, loss = predict(eval_net, val_loader, self.runtime, self.data.spec.task,
                                              progress, f"validate {stage_epoch + 1}", self.loss_fn)
            scores = _validation_scores(self.data, probs, targets, loss)
        row = {
            "epoch": epoch, "stage": index + 1, "stage_name": stage.name, "stage_epoch": stage_epoch + 1,
            "train_loss": stats.loss, "train_accuracy": stats.accuracy, **scores,
            "lr": optimizer.param_groups[0]["lr"], "train_seconds": round(stats.seconds, 2),
            "val_seconds": round(time.perf_counter() - val_start, 2),
            "images_per_second": round(stats.images_per_second, 1),
        }
        self.rows.append(row)
        self.log(
            f"epoch {epoch:>3} {escape('[' + desc + ']')} train loss {_fmt(stats.loss)} acc {_fmt(stats.accuracy)} | "
            f"val loss {_fmt(scores['val_loss'])} acc {_fmt(scores['val_accuracy'])} auc {_fmt(scores['val_auc'])}"
            f" | {stats.seconds:.0f}s, {stats.images_per_second:.0f} img/s"
        )
        return row

    def _finish_stage(self, index: int, restore: bool) -> None:
        if restore and self.run is not None:
            if self.runtime.distributed:
                torch.distributed.barrier()
            if self.run.has_checkpoint("stage_best"):
                self.model.load_state_dict(self.run.load_checkpoint("stage_best")["model"])
                self.log("restored the stage's best weights")
        state = {"model": self.model.state_dict(), "optimizer": None, "scheduler": None, "stage": index + 1,
                 "stage_epoch": 0, "epoch": len(self.rows), "tracker": None, "best": self.best.state()}
        self.save("last", state)
        if self.runtime.is_main and self.run is not None and self.run.has_checkpoint("stage_best"):
            self.run.checkpoint_path("stage_best").unlink()
        if self.runtime.distributed:
            torch.distributed.barrier()
