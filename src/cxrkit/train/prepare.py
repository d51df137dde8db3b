"""Data for a run: load, split (or reload the run's saved split), and record it all in the run directory."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cxrkit import __version__, pipeline
from cxrkit.config import Recipe
from cxrkit.data.base import DatasetSpec, LabelledImages
from cxrkit.data.transforms import Preprocessing, build_transform
from cxrkit.errors import CxrError, printable
from cxrkit.runs import Run
from cxrkit.train.runtime import Runtime


@dataclass
class RunData:
    spec: DatasetSpec
    dataset: LabelledImages
    splits: dict[str, np.ndarray]
    preprocessing: Preprocessing
    train_transform: Any
    eval_transform: Any

    @property
    def train(self) -> LabelledImages:
        return self.dataset.subset(self.splits["train"])

    @property
    def val(self) -> LabelledImages:
        return self.dataset.subset(self.splits.get("val", np.array([], dtype=int)))


def split_counts(ds: LabelledImages, splits: dict[str, np.ndarray]) -> dict[str, Any]:
    """Images, patients and images per label in each split."""
    out = {}
    for name, idx in splits.items():
        part = ds.subset(idx)
        out[name] = {"images": len(part), "patients": len({it.patient for it in part.items}),
                     "per_label": part.class_counts()}
    return out


def patients_in_several_splits(ds: LabelledImages, splits: dict[str, np.ndarray]) -> list[str]:
    """The patients with images in more than one split, in item order."""
    first: dict[str, str] = {}
    found: dict[str, None] = {}
    for name, idx in splits.items():
        for i in idx:
            patient = ds.items[int(i)].patient
            if first.setdefault(patient, name) != name:
                found[patient] = None
    return list(found)


def without_patient_id(ds: LabelledImages) -> int:
    """How many images have no patient id: loaders give them their own source as patient (a CSV without a patient
    column or with a blank cell, MedMNIST), so carved splits cannot keep a patient's images together."""
    return sum(it.patient == it.source for it in ds.items)


def split_notes(ds: LabelledImages, splits: dict[str, np.ndarray], ratios: Any, carved: bool = True) -> list[str]:
    """What a user should know about splits that came out other than the recipe asked: a held-out split that is
    empty, one much larger or smaller than its ratio (patient-grouped folds come in steps of 1/20 at the finest;
    only when the held-out splits were ``carved``, not kept from the dataset's own), and classes with no image
    (for multilabel: no positive) in a held-out split, whose metrics there are undefined."""
    from cxrkit.data.splits import check_ratios

    wanted = check_ratios(ratios)
    total = sum(len(idx) for idx in splits.values())
    notes = []
    if not len(splits.get("test", [])):
        notes.append("note: the test split is empty (data.split.ratios gives it none, or the dataset's own splits "
                     "have none), so `cxr evaluate` has no held-out images of this run to report on")
    off = {s: len(splits.get(s, [])) / total for s, r in wanted.items()
           if carved and total and abs(len(splits.get(s, [])) / total - r) > max(0.02, r / 2)}
    if off:
        notes.append("note: the splits came out at " + ", ".join(f"{s} {100 * f:.0f}%" for s, f in off.items())
                     + " of the images, against " + ", ".join(f"{100 * wanted[s]:.0f}%" for s in off)
                     + " asked: patients are kept whole and folds are stratified, in steps of 1/20 at the finest")
    for name in ("val", "test"):
        idx = splits.get(name, [])
        absent = [label for label, n in ds.subset(idx).class_counts().items() if n == 0] if len(idx) else []
        if absent:
            what = "positive image" if ds.spec.task == "multilabel" else "image"
            notes.append(f"note: the {name} split has no {what} of {', '.join(absent)} ({len(idx)} images), so "
                         f"per-class metrics for {'it' if len(absent) == 1 else 'them'} there are undefined")
    return notes


def environment() -> dict[str, Any]:
    return {
        "cxrkit": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "argv": sys.argv,
    }


def _labels_json(spec: DatasetSpec) -> dict[str, Any]:
    return {**spec.to_dict(), "threshold": 0.5 if spec.task == "binary" else None}


def prepare_data(recipe: Recipe, run: Run | None, runtime: Runtime, console: Any = None) -> RunData:
    """Load the recipe's data; a new run saves its split, a resumed run reuses the saved one.

    With ``runtime.cache_images`` (and one process), images are read through the decoded-image cache
    (:mod:`cxrkit.data.decoded`), built on first use; ``console`` shows its progress and notes.
    """
    from cxrkit.data.splits import load_splits, save_splits

    ds = pipeline.load_data(recipe.data)
    if ds.spec.task != "multilabel" and len(ds.spec.labels) < 2 and len(ds):
        raise CxrError(f"dataset {recipe.data.root or recipe.data.name} has one class only "
                       f"({', '.join(ds.spec.labels)}); a classifier needs images of at least 2 classes")
    pre = pipeline.resolve_preprocessing(recipe.model)
    # before the split: decoding every image finds those that cannot be, which the split must not hold
    cached = _decoded(ds, pre, recipe, runtime, console) if len(ds) else None
    if cached is not None:
        ds = cached
    if not len(ds):
        why = ds.skipped_note()  # e.g. a CSV whose every path is wrong: say how and where
        raise CxrError(f"dataset {recipe.data.root or recipe.data.name} has no images" + (f"; {why}" if why else ""))
    resumed = run is not None and run.file("splits.csv").is_file()
    if ds.skipped and console is not None and runtime.is_main and not resumed:
        where = " (the run's data.json lists them all)" if run is not None else ""  # written below, if all goes well
        console.print(ds.skipped_note(where), highlight=False)
    splits = load_splits(run.file("splits.csv"), ds) if resumed else pipeline.split_data(ds, recipe.data)
    if not len(splits.get("train", [])):
        raise CxrError("the training split is empty")
    shared = patients_in_several_splits(ds, splits) if recipe.data.split.group_by_patient else []
    if shared and console is not None and runtime.is_main and not resumed:  # only a dataset's own splits can
        console.print(f"note: the dataset's own splits put {len(shared)} patient(s) in more than one split (the "
                      f"first: {shared[0]}), so held-out numbers may be optimistic; data.split.use_own=false makes "
                      "patient-grouped splits", highlight=False)
    own = recipe.data.split.use_own and any(it.split in ("val", "test") for it in ds.items)  # kept as given
    anonymous = without_patient_id(ds) if recipe.data.split.group_by_patient and not own else 0
    if console is not None and runtime.is_main and not resumed:
        notes = split_notes(ds, splits, recipe.data.split.ratios, carved=not own)
        if anonymous:
            first = next(it.source for it in ds.items if it.patient == it.source)
            notes.insert(0, f"note: {anonymous} of {len(ds)} images have no patient id (the first: "
                            f"{printable(first)}), so each counts as its own patient and the split cannot keep a "
                            "patient's images together; give every image its patient's id (an NIH file's 'Patient "
                            "ID')")
        for note in notes:
            console.print(note, highlight=False)
    augment = pipeline.augmentation(recipe.augment)
    resized = cached is not None
    data = RunData(ds.spec, ds, splits, pre, build_transform(pre, augment, resized),
                   build_transform(pre, None, resized))
    if run is not None and runtime.is_main and not resumed:
        save_splits(run.file("splits.csv"), ds, splits)
        run.write_text("recipe.yaml", recipe.to_yaml())
        run.write_json("labels.json", _labels_json(ds.spec))
        run.write_json("data.json", {
            "dataset": ds.spec.to_dict(), "splits": split_counts(ds, splits), "without_patient_id": anonymous,
            "skipped": [{"source": s, "reason": r} for s, r in ds.skipped],
            "preprocessing": pre.to_dict(), "augment": None if augment is None else recipe.to_dict()["augment"],
        })
        run.write_json("env.json", {**environment(), "runtime": runtime.describe()})
    return data


def _decoded(ds: LabelledImages, pre: Preprocessing, recipe: Recipe, runtime: Runtime,
             console: Any) -> LabelledImages | None:
    """``ds`` on the decoded-image cache, without the images that cannot be decoded, when the cache is on and can
    be built; else None."""
    if not recipe.runtime.cache_images or runtime.distributed:
        return None
    from cxrkit.data.decoded import decoded_images
    from cxrkit.train.loop import make_progress

    def log(text: str) -> None:
        if console is not None and runtime.is_main:
            console.print(text, highlight=False)

    with make_progress(console, console is not None and runtime.is_main) as progress:
        return decoded_images(ds, pre, runtime.workers, progress, log)
