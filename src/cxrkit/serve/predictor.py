"""A trained run, loaded once, applied to datasets or files. Shared by ``cxr predict``, ``cxr evaluate`` and the
service, so all three preprocess, batch and threshold in exactly the same way."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrkit import pipeline
from cxrkit.config import load_recipe
from cxrkit.data.base import LabelledImages
from cxrkit.data.transforms import Preprocessing, build_transform
from cxrkit.errors import CxrError
from cxrkit.runs import Run
from cxrkit.train.loop import make_progress, predict
from cxrkit.train.losses import probabilities
from cxrkit.train.runtime import Runtime, setup_runtime


@dataclass
class Prediction:
    """One image's result: a label with probabilities, or the reason it could not be read."""

    source: str
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "label": self.label, "probabilities": self.probabilities, "error": self.error}


class Predictor:
    """The model, labels and preprocessing of a run."""

    def __init__(self, run: str | Path | Run, checkpoint: str = "best", runtime: Runtime | None = None):
        self.run = run if isinstance(run, Run) else Run.open(run)
        self.recipe = load_recipe(self.run.file("recipe.yaml"))
        self.labels_info = self.run.read_json("labels.json")
        self.labels: list[str] = list(self.labels_info["labels"])
        self.task: str = self.labels_info["task"]
        self.preprocessing = Preprocessing.from_dict(self.run.read_json("data.json")["preprocessing"])
        self.transform = build_transform(self.preprocessing, None)
        self.runtime = runtime or setup_runtime(self.recipe.runtime.device, self.recipe.runtime.precision,
                                                self.recipe.runtime.channels_last, self.recipe.runtime.threads)
        model = pipeline.build_model(self.recipe.model, len(self.labels), weights="none")
        model.load_state_dict(self.run.load_checkpoint(checkpoint)["model"])
        self.model = self.runtime.prepare_model(model).eval()
        self.checkpoint = checkpoint

    @property
    def threshold(self) -> float | None:
        return self.labels_info.get("threshold")

    @property
    def temperature(self) -> float:
        """Temperature fitted on the validation split (1.0 before calibration)."""
        return float(self.labels_info.get("temperature") or 1.0)

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """Apply the run's temperature, so probabilities mean what they say."""
        if self.temperature == 1.0:
            return probs
        from cxrkit.eval.calibration import apply_temperature

        return apply_temperature(self.task, probs, self.temperature)

    def decide(self, probs: np.ndarray) -> list[str]:
        """Labels from probabilities: the positive class at the run's threshold (binary), the most probable class
        (multi-class) or every label over its threshold joined by ``|`` (multi-label)."""
        if self.task == "binary":
            threshold = self.threshold if self.threshold is not None else 0.5
            return [self.labels[int(p[1] >= threshold)] for p in probs]
        if self.task == "multilabel":
            threshold = self.threshold if self.threshold is not None else 0.5
            return ["|".join(n for n, q in zip(self.labels, p) if q >= threshold) or "none" for p in probs]
        return [self.labels[int(i)] for i in probs.argmax(1)]

    def predict_dataset(self, ds: LabelledImages, batch_size: int = 64, console: Any = None,
                        calibrated: bool = True) -> np.ndarray:
        """Probabilities ``[n, labels]`` for every item of ``ds``, in order (temperature-scaled unless
        ``calibrated`` is False)."""
        loader = pipeline.make_loader(ds, self.transform, batch_size, self.runtime)
        if console is None:
            _, probs, _, _ = predict(self.model, loader, self.runtime, self.task)
        else:
            with make_progress(console) as progress:
                _, probs, _, _ = predict(self.model, loader, self.runtime, self.task, progress, "predict")
        return self.calibrate(probs) if calibrated else probs

    @torch.no_grad()
    def predict_images(self, images: list[Any]) -> np.ndarray:
        """Probabilities for decoded PIL images (one batch)."""
        x = self.runtime.to_device(torch.stack([self.transform(im) for im in images]))
        with self.runtime.autocast():
            logits = self.model(x)
        return self.calibrate(probabilities(self.task, logits).cpu().numpy())

    def predict_files(self, paths: Iterable[str], batch_size: int = 32) -> Iterator[Prediction]:
        """Predict files in batches; unreadable files yield a :class:`Prediction` with ``error`` set."""
        from cxrkit.data.images import read_image

        batch: list[tuple[str, Any]] = []
        for path in paths:
            try:
                batch.append((path, read_image(path)))
            except CxrError as err:
                yield Prediction(path, error=str(err))
                continue
            if len(batch) == batch_size:
                yield from self._finish(batch)
                batch = []
        if batch:
            yield from self._finish(batch)

    def _finish(self, batch: list[tuple[str, Any]]) -> Iterator[Prediction]:
        probs = self.predict_images([im for _, im in batch])
        for (path, _), p, label in zip(batch, probs, self.decide(probs)):
            yield Prediction(path, label, {n: round(float(q), 6) for n, q in zip(self.labels, p)})


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (searched recursively for images) and glob patterns, in a stable order."""
    import glob

    from cxrkit.data.images import IMAGE_SUFFIXES

    paths: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise CxrError(f"{item}: no file matches this pattern")
            paths += [m for m in matches if Path(m).is_file()]
        else:
            paths.append(item)  # a missing file is reported per file, with the others still predicted
    return paths
