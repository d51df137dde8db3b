"""What one service worker holds: the run's predictor, the micro-batcher that feeds it, and Grad-CAM on demand."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cxrkit.errors import CxrError, NotAnImage
from cxrkit.serve.app import RequestError, ServeSettings
from cxrkit.serve.batcher import MicroBatcher
from cxrkit.serve.predictor import Prediction, Predictor

_log = logging.getLogger("cxrkit.serve")
SUPPORTED = "PNG, JPEG, TIFF, WebP, BMP, GIF, JPEG 2000 or DICOM"
NAME_LIMIT = 200


def client_name(name: str | None) -> str:
    """An upload's file name as it is echoed back (never used as a path): printable, at most 200 characters."""
    text = "".join(ch for ch in (name or "upload") if ch.isprintable()).strip() or "upload"
    return text if len(text) <= NAME_LIMIT else text[: NAME_LIMIT - 3] + "..."


class Service:
    """The model of one worker process, used as an async context manager (the batcher lives inside it).

    Everything it answers from is loaded here, at start-up: the predictor, and the fp32 PyTorch model Grad-CAM
    needs when the predictor is not one (not with ``--no-heatmaps``). A run moved or edited later changes nothing
    until a restart.
    """

    def __init__(self, settings: ServeSettings):
        import torch

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.predictor = Predictor(settings.run, settings.checkpoint, engine=settings.engine)
        if settings.calibration is not None and self.predictor.hold_calibration(settings.calibration):
            _log.warning("%s was calibrated again since the service started; this worker answers with the "
                         "calibration the others have (restart the service for the new one)", self.predictor.run.name)
        self.cam_predictor = self._load_cam_predictor() if settings.heatmaps else None
        self.batcher: MicroBatcher[tuple[str, Any, float], Prediction] = MicroBatcher(
            self.predictor.predict_decoded, settings.max_batch, settings.batch_window_ms)
        # a decode can take far more memory than its upload (a 400 KB float TIFF: ~2 GB): one per thread at once
        self._decode_slots = asyncio.Semaphore(torch.get_num_threads())
        self._warm_up()
        self.started = time.time()

    def _load_cam_predictor(self) -> Predictor:
        """The fp32 PyTorch model for Grad-CAM: the predictor itself when it is one, else the same checkpoint
        loaded again (refused when its weights differ: the checkpoint changed during start-up)."""
        p = self.predictor
        if p.engine == "torch" and p.runtime.amp_dtype is None:
            return p
        cam = Predictor(p.run, self.settings.checkpoint, engine="torch", runtime=_fp32_runtime())
        if cam.weights_sha256 != p.weights_sha256:
            raise CxrError(f"{p.run.name}: the {self.settings.checkpoint} checkpoint changed while the service "
                           "started; start it again")
        return cam

    def _warm_up(self) -> None:
        """One blank image through the model, so the first request does not pay for kernel set-up (seconds)."""
        from PIL import Image

        size = self.predictor.preprocessing.size
        self.predictor.predict_inputs(self.predictor.transform(Image.new("L", (size, size)))[None])

    async def __aenter__(self) -> Service:
        await self.batcher.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.batcher.__aexit__(*exc_info)

    def decode(self, name: str, data: bytes) -> Any:
        """The upload as a grayscale PIL image; 400 for an empty file, 415 when the bytes are not an image format
        we read, 422 (:class:`CxrError`) when they are one but cannot be decoded."""
        from cxrkit.data.images import DICOM_SUFFIXES, SNIFF_BYTES, decode_image_bytes, refuse_blank, sniff_format

        if not data:
            raise RequestError(400, f"{name}: empty file (0 bytes)")
        unsupported = RequestError(415, f"{name}: not a supported image ({SUPPORTED}); the content was checked, "
                                        "not the file name")
        # DICOM written without its 128-byte preamble has no signature: its name is the only hint, as for cxr predict
        if sniff_format(data[:SNIFF_BYTES]) is None and not name.lower().endswith(DICOM_SUFFIXES):
            raise unsupported
        try:
            image = decode_image_bytes(data, name, self.settings.max_pixels)
        except NotAnImage as err:  # named .dcm, but neither DICOM nor any other image
            raise unsupported from err
        return refuse_blank(image, name)

    def _decode_input(self, name: str, data: bytes) -> tuple[Any, Any]:
        """The decoded image and its model input (resized and normalised here, so the model thread only runs the
        model)."""
        image = self.decode(name, data)
        return image, self.predictor.transform(image)

    async def _predict(self, name: str, data: bytes) -> tuple[Any, Any, Prediction]:
        """Decode in the thread pool (at most one image per thread at once), then predict in a shared batch: the
        image, its model input and the prediction."""
        from starlette.concurrency import run_in_threadpool

        async with self._decode_slots:
            start = time.perf_counter()
            image, x = await run_in_threadpool(self._decode_input, name, data)
            decode_ms = (time.perf_counter() - start) * 1000
        return image, x, await self.batcher.submit((name, x, decode_ms))

    def heatmap_target(self, name: str | None) -> int | None:
        """The index of the label a heatmap is asked to explain (``?target=``), matched like class names elsewhere
        (no case, no spaces at either end); None when none is asked for; 400 for a name the run does not have."""
        from cxrkit.data.labels import find_label

        if name is None:
            return None
        labels = self.predictor.labels
        index = find_label(name, labels)
        if index is None:
            raise RequestError(400, f"target {client_name(name)!r} is not one of the model's labels: "
                                    f"{', '.join(labels)}")
        return index

    async def predict(self, name: str | None, data: bytes, heatmap: bool = False,
                      target: int | None = None) -> dict[str, Any]:
        """One upload's answer (raises :class:`RequestError` or :class:`CxrError` for a bad image); ``target`` is
        the label index the heatmap explains (default: :func:`heatmap_label`'s)."""
        start = time.perf_counter()
        return await self._answer(await self._predict(client_name(name), data), heatmap, start, target)

    async def _answer(self, predicted: tuple[Any, Any, Prediction], heatmap: bool, start: float,
                      target: int | None = None) -> dict[str, Any]:
        """The answer for one predicted upload: its fields, the heatmap (of ``target``) when asked for, the time
        since ``start``."""
        image, x, prediction = predicted
        result = prediction.to_dict()
        if heatmap:
            result["heatmap"] = await self.batcher.call(self._heatmap, image, x, prediction, target)
        result["timing_ms"]["request"] = round((time.perf_counter() - start) * 1000, 2)
        return result

    async def predict_many(self, uploads: list[tuple[str | None, bytes]], heatmap: bool,
                           client_gone: Callable[[], bool], target: int | None = None) -> list[dict[str, Any]]:
        """Answers for several uploads, in order; a bad image is answered as ``{"source", "error", "status"}``;
        ``target`` as for :meth:`predict`.

        The predictions share model calls. Heatmaps follow one model-thread call each, so other requests get the
        model in between, and stop (499) once ``client_gone()`` says the client has left; a time-out cancels the
        rest too.
        """
        start = time.perf_counter()
        answers = await asyncio.gather(*(self._predict_or_error(client_name(name), data) for name, data in uploads))
        results = []
        for answer in answers:
            if isinstance(answer, dict):  # a bad image's error
                results.append(answer)
                continue
            if heatmap and client_gone():
                raise RequestError(499, "the client closed the connection")
            results.append(await self._answer(answer, heatmap, start, target))
        return results

    async def _predict_or_error(self, name: str, data: bytes) -> tuple[Any, Any, Prediction] | dict[str, Any]:
        """Like :meth:`_predict`, with a bad image answered as ``{"source", "error", "status"}``."""
        try:
            return await self._predict(name, data)
        except RequestError as err:
            return {"source": name, "error": str(err), "status": err.status}
        except CxrError as err:
            return {"source": name, "error": str(err), "status": 422}

    def _heatmap(self, image: Any, x: Any, prediction: Prediction, target: int | None = None) -> dict[str, Any]:
        """Grad-CAM on the fp32 PyTorch model, for the decoded ``image`` and its model input ``x``, of the label
        index ``target``, by default :func:`heatmap_label`'s (runs in the model thread)."""
        from cxrkit.data.transforms import input_box
        from cxrkit.explain.gradcam import Explainer
        from cxrkit.serve.heatmap import as_base64, heatmap_layers

        p, cam = self.predictor, self.cam_predictor
        index = heatmap_label(p, prediction) if target is None else target
        with Explainer(cam.model, p.task, "gradcam", None, p.temperature) as explainer:
            heat = explainer.heatmaps(cam.runtime.to_device(x[None]), [index])[0]
            method, layer = explainer.method_name, explainer.layer_name
        layers = heatmap_layers(image, heat, input_box(p.preprocessing, *image.size))
        return {"class": p.labels[index], "method": method, "layer": layer, **as_base64(layers)}

    def model_info(self) -> dict[str, Any]:
        """What ``GET /v1/model`` answers: the model, its inputs and outputs, and the run's evaluations."""
        from cxrkit import __version__

        p = self.predictor
        # the threshold decisions use: for a multi-label run 0.5 per label, which labels.json leaves unsaid
        served = {"checkpoint": p.checkpoint, "engine": p.engine, "threshold": p.operating_threshold,
                  "temperature": p.temperature}
        evaluations = {path.parent.name: _evaluation_summary(path, served)
                       for path in sorted((p.run.path / "eval").glob("*/metrics.json"))}
        size = p.preprocessing.size
        return {
            "model": p.model_id, "labels": p.labels, "task": p.task, "positive": p.labels_info.get("positive"),
            "input_size": [3, size, size], "preprocessing": p.preprocessing.to_dict(), "threshold": served["threshold"],
            "threshold_method": p.labels_info.get("threshold_method"), "temperature": p.temperature,
            "metrics": evaluations, "heatmaps": self.settings.heatmaps, "cxrkit_version": __version__,
            "limits": {"max_upload_mb": self.settings.max_upload_mb, "max_pixels": self.settings.max_pixels,
                       "max_files": self.settings.max_files, "timeout_s": self.settings.timeout_s},
        }


def heatmap_label(predictor: Predictor, prediction: Prediction) -> int:
    """The label a heatmap explains by default: the decided class (binary: at the run's threshold; multi-class: the
    most probable), and for a multi-label image the most probable of its decided labels, or the most probable label
    when none is decided (not the first decided one in label order)."""
    from cxrkit.explain.gradcam import choose_targets

    p = predictor
    probs = np.array([[prediction.probabilities[label] for label in p.labels]])
    decided = choose_targets(p.task, p.labels, probs, p.operating_threshold)[0]
    return max(decided, key=lambda i: probs[0, i])


def _evaluation_summary(path: Path, served: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of an evaluation's ``metrics.json`` with the model and calibration they were measured
    with, and ``as_served``: whether those are the ``served`` ones (an evaluation from before ``cxr calibrate``, or of
    another engine or checkpoint, is not). ``{"error": ...}`` when the file cannot be read or is not a JSON object
    (e.g. half-written by a running ``cxr evaluate``)."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: invalid JSON or text
        metrics = None
    if not isinstance(metrics, dict):
        return {"error": "unreadable metrics.json"}
    summary = {key: metrics.get(key) for key in (
        "dataset", "split", "n", "accuracy", "auc", "f1_macro", "sensitivity", "specificity", "ece", *served)}
    summary["as_served"] = all(_same(summary[key], value) for key, value in served.items())
    return summary


def _same(measured: Any, served: Any) -> bool:
    if isinstance(measured, (int, float)) and isinstance(served, (int, float)):
        return abs(float(measured) - float(served)) <= 1e-9 * max(1.0, abs(float(served)))
    return measured == served


def _fp32_runtime() -> Any:
    from cxrkit.train.runtime import setup_runtime

    return setup_runtime("cpu", "fp32", channels_last=False, workers=0)
