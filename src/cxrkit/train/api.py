"""Train or resume a recipe from Python: what ``cxr train`` and ``cxr compare`` call."""

from __future__ import annotations

import contextlib
import os

from rich.console import Console

from cxrkit.config import Recipe, expand_path, load_recipe
from cxrkit.console import notes_console
from cxrkit.errors import CxrError
from cxrkit.locks import exclusive
from cxrkit.runs import Run
from cxrkit.train.fit import Trainer, callers_random_state, seed_everything
from cxrkit.train.runtime import Runtime, setup_runtime, shutdown


def _create_run(out: str, name: str, runtime: Runtime) -> Run:
    """Rank 0 creates the run directory; other processes learn its path."""
    if not runtime.distributed:
        return Run.create(out, name)
    from torch import distributed as dist

    holder = [str(Run.create(out, name).path) if runtime.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return Run(holder[0])


def run_is_complete(run: Run) -> bool:
    """True when every stage of the run's recipe has finished."""
    if not run.has_checkpoint("last"):
        return False
    stages = len(load_recipe(run.file("recipe.yaml")).stages)
    return run.load_checkpoint("last")["stage"] >= stages and not _calibration_interrupted(run)


def _calibration_interrupted(run: Run) -> bool:
    """Whether the run has a validation split but no calibration: the calibration that ends training was
    interrupted (every stage had finished)."""
    try:
        val = run.read_json("data.json").get("splits", {}).get("val", {}).get("images", 0)
        return bool(val) and "calibrated_on" not in run.read_json("labels.json")
    except (OSError, ValueError, CxrError):
        return False


def calibrate_after_training(run: Run, runtime: Runtime, console: Console) -> None:
    """Fit the temperature and the binary operating threshold on the validation split (rank 0, one process)."""
    import dataclasses

    from cxrkit.eval.calibrate import calibrate_run, calibration_notes
    from cxrkit.serve.predictor import Predictor

    single = dataclasses.replace(runtime, rank=0, world_size=1)
    info = calibrate_run(Predictor(run, runtime=single, check_calibration=False), strict_threshold=False)
    parts = [f"temperature {info['temperature']:.3f}",
             f"val ECE {info['val_ece_before']:.4f} -> {info['val_ece_after']:.4f}"]
    if info.get("threshold") is not None:
        parts.append(f"threshold {info['threshold']:.4f} ({info['threshold_method']})")
    console.print("calibrated on the validation split: " + ", ".join(parts), highlight=False)
    for note in calibration_notes(info):
        console.print(note, highlight=False)


def train_recipe(recipe: Recipe | str | os.PathLike | None = None, resume: Run | str | os.PathLike | None = None,
                 console: Console | None = None, run: Run | None = None) -> Run:
    """Train ``recipe`` into a new run directory (or into ``run``), or continue the interrupted run ``resume``.

    The caller's random generators and PyTorch thread count are as they were when it returns.

    Args:
        recipe: A :class:`~cxrkit.config.Recipe` or a recipe file.
        resume: A run (or its directory) to continue, instead of a recipe.
        console: Where progress and notes go (``Console(quiet=True)`` for none); stderr by default.
        run: An existing, empty run directory to train into.

    Returns:
        The run directory.
    """
    if (recipe is None) == (resume is None):
        raise CxrError("train_recipe needs a recipe or a run to resume, not " + ("both" if recipe else "neither"))
    if not isinstance(recipe, Recipe | None):
        recipe = load_recipe(recipe)
    if not isinstance(resume, Run | None):
        resume = Run.open(resume)
    console = console or notes_console()
    with contextlib.ExitStack() as held, callers_random_state():
        if resume is not None:
            run = resume
            if not _is_other_rank():  # under torchrun, rank 0 holds it for all
                held.enter_context(training_lock(run))
            if removed := run.remove_leftovers():
                console.print(f"removed {removed} temporary file(s) that the interrupted run left", highlight=False)
            recipe = load_recipe(run.file("recipe.yaml"))
        assert recipe is not None
        if resume is None:
            from cxrkit.pipeline import anchor_paths

            recipe = anchor_paths(recipe)  # the saved recipe must not depend on the directory it was started from
        return _train(recipe, run, resume is not None, console, held)


def training_lock(run: Run) -> contextlib.AbstractContextManager[None]:
    """Held while ``run`` trains, so that a second ``cxr train --resume`` of it is refused instead of training it
    twice at once (and removing the first one's temporary files as leftovers)."""
    return exclusive(run.path / ".train.lock",
                     lambda who: f"run {run.path} is being trained by {who}; wait for it to finish, or stop it before "
                                 "resuming")


def _is_other_rank() -> bool:
    """A process of a ``torchrun`` launch other than rank 0 (whose runtime is not set up yet)."""
    return int(os.environ.get("RANK", "0")) != 0


def _train(recipe: Recipe, run: Run | None, resuming: bool, console: Console, held: contextlib.ExitStack) -> Run:
    last = run.load_checkpoint("last") if resuming and run is not None and run.has_checkpoint("last") else None
    rt = recipe.runtime
    runtime = setup_runtime(rt.device, rt.precision, rt.channels_last, rt.threads, rt.workers)
    created = None
    try:
        if run is None:
            run = created = _create_run(expand_path(recipe.out, "out"), recipe.name, runtime)
        if runtime.is_main and not resuming:  # a resumed run's lock was taken before its leftovers were removed
            held.enter_context(training_lock(run))
        if last is not None and last["stage"] >= len(recipe.stages):
            if not _calibration_interrupted(run):
                console.print(f"run {run.path} is already complete")
            elif runtime.is_main:
                console.print("every stage had finished; calibrating, which the interruption stopped",
                              highlight=False)
                calibrate_after_training(run, runtime, console)
            return run
        seed_everything(recipe.seed)
        trainer = Trainer(recipe, run, runtime, console, resuming=last is not None)
        if runtime.is_main:
            spec = trainer.data.spec
            console.print(f"run {run.path}\n{spec.name} ({spec.task}: {', '.join(spec.labels)}): "
                          f"{len(trainer.data.train)} train, {len(trainer.data.val)} val images; "
                          f"{runtime.describe()}", highlight=False)
        trainer.fit(resume=last)
        if runtime.is_main and len(trainer.data.val):
            calibrate_after_training(run, runtime, console)
        elif runtime.is_main:
            console.print("not calibrated: the run has no validation split (temperature 1; a binary run decides at "
                          "0.5); `cxr calibrate` needs one too", highlight=False)
    except BaseException:
        if created is not None and runtime.is_main:
            _discard_unstarted(created)
        raise
    finally:
        shutdown(runtime)
    return run


def _discard_unstarted(run: Run) -> None:
    """Remove a run directory made by this call when it failed before its first epoch was saved (the data, the
    weights or a layer name were wrong...): it holds nothing ``--resume`` could continue from, and a directory left
    behind would pass for a run."""
    import shutil

    if not run.has_checkpoint("last"):
        shutil.rmtree(run.path, ignore_errors=True)
