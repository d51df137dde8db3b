"""A trained run, loaded once, applied to datasets or files. Shared by ``cxr predict``, ``cxr evaluate`` and the
service, so all three preprocess, batch and threshold in exactly the same way."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrkit import pipeline
from cxrkit.config import load_recipe
from cxrkit.console import notes_console
from cxrkit.data.base import LabelledImages
from cxrkit.data.transforms import Preprocessing, build_transform
from cxrkit.errors import CxrError, printable
from cxrkit.models.weights import weights_digest
from cxrkit.runs import Run, check_writable, folder_unwritable, staged
from cxrkit.train.loop import make_progress, predict
from cxrkit.train.losses import probabilities
from cxrkit.train.runtime import Runtime, setup_runtime


@dataclass
class Prediction:
    """One image's result, the same fields in ``cxr predict`` output and the service's JSON.

    Attributes:
        source: the file (or upload) name.
        label: the decision: the positive class at the threshold (binary), the most probable class (multi-class),
            the labels at or over the threshold joined by ``|`` (multi-label; ``""`` when none is, which no label can
            be called); None when the image could not be read.
        probabilities: calibrated probability per label.
        threshold: the run's operating threshold (binary and multi-label; None for multi-class).
        exceeded: whether the positive class (binary) or any label (multi-label) reached the threshold.
        model: which model answered: run, backbone, checkpoint, weights checksum and engine.
        timing_ms: decoding, the model's share of its batch, and their sum.
        error: why the image could not be predicted (then the other fields are empty).
    """

    source: str
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    exceeded: bool | None = None
    model: dict[str, str] = field(default_factory=dict)
    timing_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "source": printable(self.source)}  # a file name that is not UTF-8, spelt out

    def to_row(self, labels: list[str]) -> dict[str, Any]:
        """The same fields, flat, for CSV: ``p_<label>`` columns, ``model_<key>`` and ``ms_<stage>``."""
        return {"source": self.source, "label": self.label or "",  # csv_text spells out what CSV cannot hold
                **{f"p_{n}": self.probabilities.get(n, "") for n in labels},
                "threshold": "" if self.threshold is None else self.threshold,
                "exceeded": "" if self.exceeded is None else int(self.exceeded),
                **{f"model_{k}": v for k, v in self.model.items()},
                **{f"ms_{k}": self.timing_ms.get(k, "") for k in ("decode", "model", "total")},
                "error": self.error or ""}


ENGINES = ("torch", "onnx", "onnx-int8")
# What an exported file carries of the run's calibration (labels.json), to use it and to tell which one it is.
CALIBRATION_KEYS = ("threshold", "temperature", "threshold_method", "calibrated_on", "calibrated_checkpoint")


def resolve_engine(engine: str) -> str:
    """``auto``: ONNX Runtime on a CPU without bf16 instructions (measured faster there for all four backbones of
    ``bench/inference.py``), PyTorch where bf16 autocast or a GPU is available; other names pass through. ``auto``
    never picks ``onnx-int8``: int8 changes the numbers, so it is the user's choice."""
    if engine != "auto":
        return engine
    from cxrkit.train.runtime import cpu_supports_bf16

    return "torch" if torch.cuda.is_available() or cpu_supports_bf16() else "onnx"


class CannotExport(CxrError):
    """An ONNX engine needs a file in ``RUN/export/`` that is not there and cannot be written there."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(f"{problem}; the ONNX engines export the model there once, so run them once where the run "
                         "can be written, or use --engine torch")


def _check_exportable(path: Path) -> None:
    """Raise :class:`CannotExport` when ``path``, an export an ONNX engine needs, cannot be written."""
    try:
        check_writable(path)
    except CxrError as err:
        raise CannotExport(str(err)) from None


CALIBRATING = ".calibration-pending"
"""In ``RUN/export/`` while ``cxr calibrate`` has not yet brought the files there up to date with ``labels.json``."""


def _update_if_writable(path: Path, found: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Bring the metadata of the exported file ``path`` from ``found`` to ``wanted``; where the file cannot be
    written (a read-only mount of a run, perhaps renamed or copied), say which keys it keeps and go on: the model in
    it is current, and this process uses ``wanted`` (the run's own calibration) either way. Any other failure (a
    full disk) is raised: an int8 file being made must not be put in place without its calibration."""
    from cxrkit.export.onnx import update_metadata

    try:
        update_metadata(path, wanted)
    except CxrError as err:
        if folder_unwritable(path.parent) is None:
            raise
        keys = sorted(key for key in {*found, *wanted} if found.get(key) != wanted.get(key))
        notes_console().print(f"note: {err}; it keeps its old {', '.join(keys)} in its metadata (this command uses "
                              "the run's)", highlight=False)


def _exported_metadata(path: Path) -> dict[str, Any]:
    """The cxrkit metadata of an exported file at ``path``; ``{}`` when there is none or it is damaged (it is then
    exported again from the checkpoint, which is the source of truth)."""
    from cxrkit.export.onnx import read_metadata

    if not path.is_file():
        return {}
    try:
        return read_metadata(path)
    except CxrError:
        return {}


class Predictor:
    """The model, labels and preprocessing of a run.

    Args:
        run: the run directory (or an open :class:`~cxrkit.runs.Run`).
        checkpoint: ``best`` or ``last``.
        runtime: where and how the PyTorch engine runs (default: the recipe's runtime settings).
        engine: ``torch`` (bf16 autocast and channels_last where the CPU supports them), ``onnx`` (ONNX Runtime
            on the CPU, fp32, from ``RUN/export/<checkpoint>.onnx``, exported on first use), ``onnx-int8``
            (ONNX Runtime with int8 weights and activations, from ``RUN/export/<checkpoint>.int8.onnx``, quantized
            on first use with ranges from the run's training images; see :mod:`cxrkit.export.quantize`) or
            ``auto`` (:func:`resolve_engine`).
        console: where the one-off ONNX export is announced (rich console; default: stderr).
        check_calibration: note when the run's temperature and threshold were fitted on other weights (another
            checkpoint); off for the calibration itself.
    """

    def __init__(self, run: str | Path | Run, checkpoint: str = "best", runtime: Runtime | None = None,
                 engine: str = "torch", console: Any = None, check_calibration: bool = True):
        if engine not in ("auto", *ENGINES):
            raise CxrError(f"engine {engine!r} is not one of auto, {', '.join(ENGINES)}")
        requested, engine = engine, resolve_engine(engine)
        self.run = run if isinstance(run, Run) else Run.open(run)
        self.recipe = load_recipe(self.run.file("recipe.yaml"))
        self.labels_info = self.run.read_json("labels.json")
        self.labels: list[str] = list(self.labels_info["labels"])
        self.task: str = self.labels_info["task"]
        self.preprocessing = Preprocessing.from_dict(self.run.read_json("data.json")["preprocessing"])
        self.transform = build_transform(self.preprocessing, None)
        settings = self.recipe.runtime  # but not its threads: a training setting, and the caller's to set
        if engine != "torch":  # ONNX Runtime runs on the CPU; the torch side only feeds it fp32 batches
            runtime = runtime or setup_runtime("cpu", "fp32", False)
        self.runtime = runtime or setup_runtime(settings.device, settings.precision, settings.channels_last)
        with torch.random.fork_rng(devices=[]):  # the random weights it starts with leave the caller's RNG alone
            model = pipeline.build_model(self.recipe.model, len(self.labels), weights="none")
        model.load_state_dict(self.run.load_checkpoint(checkpoint)["model"])
        self.checkpoint = checkpoint
        self.engine = engine
        self.weights_sha256 = weights_digest(model)
        fitted_on = self.labels_info.get("calibrated_weights_sha256")
        if check_calibration and fitted_on and fitted_on != self.weights_sha256:
            (console or notes_console()).print(
                f"note: the run's temperature and threshold were fitted on other weights (the "
                f"{self.labels_info.get('calibrated_checkpoint')} checkpoint as it was then), not on this "
                f"{checkpoint} checkpoint; `cxr calibrate {self.run.path} --checkpoint {checkpoint}` fits them for it",
                highlight=False)
        self.model: torch.nn.Module
        if engine != "torch":
            try:
                self.use_onnx(self.onnx_file(model, console) if engine == "onnx" else self.int8_file(model, console),
                              console)
            except CannotExport as err:
                if requested != "auto":
                    raise
                (console or notes_console()).print(f"note: {err.problem}; using PyTorch instead", highlight=False)
                self.engine = engine = "torch"
        if engine == "torch":
            self.model = self.runtime.prepare_model(model).eval()
        if check_calibration and (self.run.path / "export" / CALIBRATING).exists():
            self._finish_stopped_calibration(console or notes_console())

    def begin_calibration(self) -> None:
        """Before ``cxr calibrate`` writes ``labels.json``: refuse when ``RUN/export/`` holds files but cannot be
        written (they change with ``labels.json``), else leave a marker there until :meth:`refresh_exports` has
        brought them up to date, so that a calibration stopped between the two is finished by the next command that
        loads the run (a copied TorchScript file would otherwise keep the old threshold unseen)."""
        folder = self.run.path / "export"
        if not folder.is_dir() or not any(not p.name.startswith(".") for p in folder.iterdir()):
            return
        why = folder_unwritable(folder)
        if why is not None:
            raise CxrError(f"{folder}: cannot write here ({why}); cxr calibrate updates labels.json and the files "
                           "exported there together, so it changed nothing")
        (folder / CALIBRATING).touch()

    def _finish_stopped_calibration(self, console: Any) -> None:
        folder = self.run.path / "export"
        stopped = f"note: a cxr calibrate of this run stopped before it updated {folder}"
        try:
            refreshed, _ = self.refresh_exports(console)
        except CxrError as err:
            console.print(f"{stopped}, and bringing it up to date failed ({err}); run cxr calibrate again",
                          highlight=False)
            return
        if refreshed:  # else it stopped before labels.json changed
            console.print(f"{stopped}; brought {', '.join(path.name for path in refreshed)} up to date now",
                          highlight=False)

    def use_onnx(self, path: Path, console: Any = None) -> None:
        """Answer from now on with ``path``, an ONNX export of these weights, run by ONNX Runtime; an int8 file
        (``engine`` becomes ``onnx-int8``) brings its own temperature and threshold."""
        from cxrkit.export.onnx import OnnxModel, read_metadata

        self.model = OnnxModel(path, torch.get_num_threads())
        found = read_metadata(path)
        self.engine = "onnx-int8" if "quantization" in found else "onnx"
        if self.engine == "onnx-int8":
            self._use_int8_calibration(path, found, console)

    def export_metadata(self) -> dict[str, Any]:
        """What an exported file carries so it can be used without cxrkit; its ``threshold`` is the one decisions use
        (:attr:`operating_threshold`: 0.5 per label for a multi-label run, whose ``labels.json`` holds none)."""
        from cxrkit import __version__

        return {
            "run": self.run.name, "backbone": self.recipe.model.backbone, "checkpoint": self.checkpoint,
            "weights_sha256": self.weights_sha256, "labels": self.labels, "task": self.task,
            "positive": self.labels_info.get("positive"), "preprocessing": self.preprocessing.to_dict(),
            "threshold": self.operating_threshold, "temperature": self.temperature, "cxrkit_version": __version__,
            **{key: self.labels_info.get(key) for key in CALIBRATION_KEYS[2:]},
        }

    def refresh_exports(self, console: Any = None) -> tuple[list[Path], list[Path]]:
        """Bring the calibration that the run's own exported files (``RUN/export/``) carry up to date with the run's
        (after ``cxr calibrate``), so that a file copied from there has the current temperature and threshold: fp32
        ONNX and TorchScript files get the run's, and int8 files fit their own again (see
        :meth:`_use_int8_calibration`). Returns the files brought up to date, and those that could not be read
        (damaged: the next use by ``--engine`` exports them again)."""
        from cxrkit.export.onnx import update_metadata
        from cxrkit.export.torchscript import update_torchscript_metadata

        folder = self.run.path / "export"
        metadata = self.export_metadata()
        calibration = {key: metadata[key] for key in CALIBRATION_KEYS}
        refreshed, unreadable = [], []
        for path in sorted(folder.glob("*.onnx")) if folder.is_dir() else []:
            if path.name.startswith(".") or not path.is_file():
                continue
            found = _exported_metadata(path)
            if not found:
                unreadable.append(path)
                continue
            if "quantization" in found:
                checkpoint = str(found.get("checkpoint") or "best")
                if checkpoint in ("best", "last") and path.name == f"{checkpoint}.int8.onnx":
                    Predictor(self.run, checkpoint, engine="onnx-int8", console=console, check_calibration=False)
                    if _exported_metadata(path) != found:  # its own calibration fitted again
                        refreshed.append(path)
            elif any(found.get(key) != value for key, value in calibration.items()):
                update_metadata(path, {**found, **calibration})
                refreshed.append(path)
        for path in sorted(folder.glob("*.torchscript.pt")) if folder.is_dir() else []:
            if path.name.startswith(".") or not path.is_file():
                continue
            changed = update_torchscript_metadata(path, calibration)
            (refreshed if changed else unreadable if changed is None else []).append(path)
        (folder / CALIBRATING).unlink(missing_ok=True)  # see begin_calibration
        return refreshed, unreadable

    def onnx_file(self, model: torch.nn.Module, console: Any = None) -> Path:
        """``RUN/export/<checkpoint>.onnx`` for these weights: reused when its weights checksum matches (metadata
        refreshed if calibration changed since), exported otherwise."""
        from cxrkit.export.onnx import export_onnx

        path = self.run.path / "export" / f"{self.checkpoint}.onnx"
        if self._reusable(path, _exported_metadata(path)):
            return path
        _check_exportable(path)
        console = console or notes_console()
        console.print(f"exporting the {self.checkpoint} checkpoint to ONNX once: {path}")
        return export_onnx(model, path, self.preprocessing.size, self.export_metadata())

    def int8_file(self, model: torch.nn.Module, console: Any = None, images: int | None = None,
                  path: Path | None = None, fp32_convs: int | None = None, name: Path | None = None) -> Path:
        """``RUN/export/<checkpoint>.int8.onnx`` for these weights: reused when its weights checksum matches
        (metadata refreshed if calibration changed since) and it was quantized with this cxrkit's settings, else
        quantized from :meth:`onnx_file` with ranges measured on ``images`` training images and the first
        ``fp32_convs`` convolutions left in fp32 (by default as many of each as the earlier file there had, else
        :data:`~cxrkit.export.quantize.CALIBRATION_IMAGES` and none). Given ``path``, ``images`` or ``fp32_convs``,
        it is always quantized afresh, to ``path`` (which messages call ``name`` when given). The run's own file
        replaces the earlier one only once its calibration is fitted (a ``path`` is the caller's to complete)."""
        from cxrkit.export.quantize import CALIBRATION_IMAGES, SETTINGS, quantize_int8

        fresh = path is not None or images is not None or fp32_convs is not None
        given = path
        path = path or self.run.path / "export" / f"{self.checkpoint}.int8.onnx"
        console = console or notes_console()
        if not fresh:
            found = _exported_metadata(path)
            earlier = found.get("quantization")
            if path.is_file() and not isinstance(earlier, dict):
                console.print(f"{path} is {'not an int8 model' if found else 'damaged'}; quantizing again")
            earlier = earlier if isinstance(earlier, dict) else {}
            if earlier and self._reusable(path, found):
                if all(earlier.get(key) == value for key, value in SETTINGS.items()):
                    return path
                console.print(f"{path} was quantized with an earlier version's int8 settings")
            # new weights or settings: the earlier file's choices hold (fp32 convolutions, how many images)
            kept = earlier.get("fp32_convs")
            fp32_convs = kept if isinstance(kept, int) and kept >= 0 else None
            kept = earlier.get("range_images")
            images = kept if isinstance(kept, int) and kept >= 1 else None
        if given is None:
            _check_exportable(path)
        source = self.onnx_file(model, console)
        images = CALIBRATION_IMAGES if images is None else images
        if images < 1:
            raise CxrError(f"int8 calibration needs at least 1 image, not {images}")
        once = "" if fresh else " once"
        kept = f", the first {fp32_convs} convolutions kept in fp32" if fp32_convs else ""
        console.print(f"quantizing the {self.checkpoint} checkpoint to int8{once}, with ranges from up to {images} "
                      f"training images{kept}: {name or path}")
        metadata = {**self.export_metadata(), "quantization": {"range_split": "train"}}
        batches, count = self._calibration_batches(images, console)
        if given is not None:
            return quantize_int8(source, path, batches, count, metadata, fp32_convs or 0)
        with staged(path) as partial:  # a file killed between quantizing and calibrating would carry fp32's values
            quantize_int8(source, partial, batches, count, metadata, fp32_convs or 0)
            self.use_onnx(partial, console)
        return path

    def _reusable(self, path: Path, found: dict[str, Any]) -> bool:
        """Whether the exported file at ``path``, whose metadata is ``found``, holds these weights; its metadata is
        brought up to date (a new calibration changes the threshold and temperature, not the graph). How an int8
        file was quantized is kept."""
        if found.get("weights_sha256") != self.weights_sha256:
            return False
        wanted = self.export_metadata()
        if "quantization" in found:  # an int8 file keeps its own calibration (see _use_int8_calibration)
            wanted.update({key: found.get(key) for key in ("quantization", "threshold", "temperature")})
        if found != wanted:
            _update_if_writable(path, found, wanted)
        return True

    def _use_int8_calibration(self, path: Path, found: dict[str, Any], console: Any) -> None:
        """Give the int8 model its own temperature and threshold, fitted on the validation split as the run's were
        (same threshold rule; a temperature only if the run has one), since int8 moves the probabilities a little.
        They are kept in the file's metadata with the run's calibration they follow, and refitted when the run is
        calibrated again (``cxr calibrate``). ``found`` is the file's metadata."""
        from cxrkit.eval.calibrate import fit_calibration

        run_labels = self.run.read_json("labels.json")  # the run's own, not the int8 values set below
        follows = {key: run_labels.get(key) for key in ("calibrated_on", "temperature", "threshold",
                                                         "threshold_method")}
        quantization = found.get("quantization", {})
        own = quantization.get("calibration")
        if not isinstance(own, dict) or own.get("follows") != follows:
            own = {"temperature": 1.0, "threshold": follows["threshold"],
                   "threshold_method": follows["threshold_method"]}
            if follows["calibrated_on"]:
                (console or notes_console()).print("fitting the int8 model's temperature and threshold on the "
                                                    "validation split, as the run's were fitted")
                method = str(follows["threshold_method"] or "youden")
                target = float(method.split(">=", 1)[1]) if method.startswith("sensitivity>=") else None
                own = fit_calibration(self, "sensitivity" if target else "youden", target,
                                      temperature=float(follows["temperature"] or 1.0) != 1.0, console=console,
                                      strict_threshold=False)
                own.setdefault("threshold", follows["threshold"])  # only a binary threshold is fitted
            own["follows"] = follows
        self.labels_info = {**self.labels_info, **{key: value for key, value in own.items() if key != "follows"}}
        # the threshold decisions use (a multi-label run's 0.5 too), also in a file written before that was so
        wanted = {**found, "threshold": self.operating_threshold, "temperature": own["temperature"],
                  "quantization": {**quantization, "calibration": own}}
        if wanted != found:
            _update_if_writable(path, found, wanted)

    def _calibration_batches(self, images: int, console: Any) -> tuple[Iterator[np.ndarray], int]:
        """Preprocessed float batches of ``images`` training images drawn at random (seed 0), shown as progress,
        and how many batches there are."""
        from cxrkit.eval.evaluate import select_data

        try:
            train, *_ = select_data(self, None, "train")
        except CxrError as err:
            raise CxrError(f"int8 calibration reads the run's training images: {err}") from None
        chosen = np.sort(np.random.default_rng(0).choice(len(train), min(images, len(train)), replace=False))
        loader = pipeline.make_loader(train.subset(chosen), self.transform, 16, self.runtime)

        def batches() -> Iterator[np.ndarray]:
            with make_progress(console) as progress:
                task = progress.add_task("int8 calibration", total=len(loader), rate="")
                for batch in loader:
                    yield batch["image"].float().numpy()
                    progress.advance(task)

        return batches(), len(loader)

    @property
    def calibration(self) -> dict[str, Any]:
        """The temperature and threshold this predictor answers with, and where they come from."""
        return {key: self.labels_info.get(key) for key in CALIBRATION_KEYS}

    def hold_calibration(self, calibration: dict[str, Any]) -> bool:
        """Answer with ``calibration`` (a :attr:`calibration` of these weights and engine, taken earlier) instead
        of what the run holds now; whether the two differed."""
        differed = calibration != self.calibration
        self.labels_info = {**self.labels_info, **calibration}
        return differed

    @property
    def threshold(self) -> float | None:
        return self.labels_info.get("threshold")

    @property
    def operating_threshold(self) -> float | None:
        """The threshold decisions use: the run's, or 0.5 before calibration; None for multi-class (argmax)."""
        if self.task == "multiclass":
            return None
        return self.threshold if self.threshold is not None else 0.5

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
        (multi-class) or every label at or over its threshold joined by ``|`` (multi-label), ``""`` when none is:
        an empty name cannot be mistaken for a label (``"none"`` could be one, or read like ``No Finding``)."""
        threshold = self.operating_threshold
        if self.task == "binary":
            return [self.labels[int(p[1] >= threshold)] for p in probs]
        if self.task == "multilabel":
            return ["|".join(n for n, q in zip(self.labels, p) if q >= threshold) for p in probs]
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

    def predict_images(self, images: Sequence[Any]) -> np.ndarray:
        """Probabilities ``[n, labels]`` for images in memory (one batch): PIL images, NumPy arrays or file paths,
        each made what a file of it would be (:func:`~cxrkit.data.images.as_image`: grey, 16-bit and float arrays
        scaled by their own range, blank images refused), so that they get the probabilities the file would."""
        from cxrkit.data.images import as_image

        if not len(images):
            return np.zeros((0, len(self.labels)))
        return self.predict_inputs(torch.stack([self.transform(as_image(im, f"image {i}"))
                                                for i, im in enumerate(images)]))

    @property
    def model_id(self) -> dict[str, str]:
        """Which model answers: run name, backbone, checkpoint, SHA-256 of the weights, engine."""
        return {"run": self.run.name, "backbone": self.recipe.model.backbone, "checkpoint": self.checkpoint,
                "weights_sha256": self.weights_sha256, "engine": self.engine}

    def exceeded(self, probs: np.ndarray) -> list[bool | None]:
        """Per image: the positive class (binary) or any label (multi-label) at or over the threshold."""
        threshold = self.operating_threshold
        if threshold is None:
            return [None] * len(probs)
        if self.task == "binary":
            return [bool(p[1] >= threshold) for p in probs]
        return [bool((p >= threshold).any()) for p in probs]

    @torch.no_grad()
    def predict_inputs(self, x: torch.Tensor) -> np.ndarray:
        """Probabilities for a batch of model inputs (images already through :attr:`transform`)."""
        x = self.runtime.to_device(x)
        with self.runtime.autocast():
            logits = self.model(x)
        return self.calibrate(probabilities(self.task, logits).cpu().numpy())

    def predict_decoded(self, items: list[tuple[str, Any, float]]) -> list[Prediction]:
        """Predictions for decoded images (one batch of ``(source, image, decode_ms)``), with their timing; an
        image may also be given as its model input (a tensor from :attr:`transform`, e.g. made in another thread)."""
        start = time.perf_counter()
        probs = self.predict_inputs(torch.stack([
            image if isinstance(image, torch.Tensor) else self.transform(image) for _, image, _ in items]))
        model_ms = (time.perf_counter() - start) * 1000 / max(1, len(items))
        return [
            Prediction(source, label, {n: round(float(q), 6) for n, q in zip(self.labels, p)},
                       self.operating_threshold, over,
                       self.model_id, {"decode": round(d, 2), "model": round(model_ms, 2),
                                       "total": round(d + model_ms, 2)})
            for (source, _, d), p, label, over in zip(items, probs, self.decide(probs), self.exceeded(probs))
        ]

    def predict_files(self, paths: str | os.PathLike | Iterable[str | os.PathLike],
                      batch_size: int = 32) -> Iterator[Prediction]:
        """Predict files (one path, or several) in batches, in the order given; an unreadable file yields a
        :class:`Prediction` with ``error`` set. Folders and patterns go through :func:`expand_inputs` first."""
        from cxrkit.data.images import as_image

        pending: list[Prediction | tuple[str, Any, float]] = []  # in input order: failures and decoded images
        decoded = 0
        for path in map(os.fspath, [paths] if isinstance(paths, str | os.PathLike) else paths):
            start = time.perf_counter()
            try:
                pending.append((path, as_image(path, path), (time.perf_counter() - start) * 1000))
                decoded += 1
            except CxrError as err:
                pending.append(Prediction(path, model=self.model_id, error=str(err)))
            if decoded == batch_size:
                yield from self._flush(pending)
                pending, decoded = [], 0
        yield from self._flush(pending)

    def _flush(self, pending: list[Prediction | tuple[str, Any, float]]) -> Iterator[Prediction]:
        images = [item for item in pending if not isinstance(item, Prediction)]
        answers = iter(self.predict_decoded(images) if images else [])
        for item in pending:
            yield item if isinstance(item, Prediction) else next(answers)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (searched recursively for images) and glob patterns (an existing file whose name holds ``*?[``
    is that file), in a stable order; a file named twice (a file and a pattern that matches it, ``a.png`` and
    ``./a.png``) is listed once, where it was first named."""
    import glob

    from cxrkit.data.images import IMAGE_SUFFIXES

    paths: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in item for ch in "*?[") and not path.exists():  # a file named a[1].png is that file
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise CxrError(f"{item}: no file matches this pattern")
            paths += [m for m in matches if Path(m).is_file()]
        else:
            paths.append(item)  # a missing file is reported per file, with the others still predicted
    unique: dict[str, str] = {}  # real path -> the first spelling of it
    for p in paths:
        unique.setdefault(os.path.realpath(p), p)
    return list(unique.values())
