"""What one service worker holds: the run's predictor, the micro-batcher that feeds it, and Grad-CAM on demand."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from cxrkit.errors import CxrError
from cxrkit.serve.app import RequestError, ServeSettings
from cxrkit.serve.batcher import MicroBatcher
from cxrkit.serve.predictor import Prediction, Predictor

SUPPORTED = "PNG, JPEG, TIFF, WebP, BMP, GIF, JPEG 2000 or DICOM"
NAME_LIMIT = 200


def client_name(name: str | None) -> str:
    """An upload's file name as it is echoed back (never used as a path): printable, at most 200 characters."""
    text = "".join(ch for ch in (name or "upload") if ch.isprintable()).strip() or "upload"
    return text if len(text) <= NAME_LIMIT else text[: NAME_LIMIT - 3] + "..."


class Service:
    """The model of one worker process, used as an async context manager (the batcher lives inside it)."""

    def __init__(self, settings: ServeSettings):
        import torch

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.predictor = Predictor(settings.run, settings.checkpoint, engine=settings.engine)
        self.batcher: MicroBatcher[tuple[str, Any, float], Prediction] = MicroBatcher(
            self.predictor.predict_decoded, settings.max_batch, settings.batch_window_ms)
        self._cam_predictor: Predictor | None = None
        self._warm_up()
        self.started = time.time()

    def _warm_up(self) -> None:
        """One blank image through the model, so the first request does not pay for kernel set-up (seconds)."""
        from PIL import Image

        size = self.predictor.preprocessing.size
        self.predictor.predict_images([Image.new("L", (size, size))])

    async def __aenter__(self) -> Service:
        await self.batcher.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.batcher.__aexit__(*exc_info)

    def decode(self, name: str, data: bytes) -> Any:
        """The upload as a grayscale PIL image; 400 for an empty file, 415 when the bytes are not an image format
        we read, 422 (:class:`CxrError`) when they are one but cannot be decoded."""
        from cxrkit.data.images import SNIFF_BYTES, decode_image_bytes, sniff_format

        if not data:
            raise RequestError(400, f"{name}: empty file (0 bytes)")
        if sniff_format(data[:SNIFF_BYTES]) is None:
            raise RequestError(415, f"{name}: not a supported image ({SUPPORTED}); the content was checked, "
                                    "not the file name")
        return decode_image_bytes(data, name, self.settings.max_pixels)


    async def predict(self, name: str | None, data: bytes, heatmap: bool = False) -> dict[str, Any]:
        """One upload's answer (raises :class:`RequestError` or :class:`CxrError` for a bad image)."""
        from starlette.concurrency import run_in_threadpool

        start = time.perf_counter()
        name = client_name(name)
        image = await run_in_threadpool(self.decode, name, data)
        decode_ms = (time.perf_counter() - start) * 1000
        prediction = await self.batcher.submit((name, image, decode_ms))
        result = prediction.to_dict()
        if heatmap:
            result["heatmap"] = await self.batcher.call(self._heatmap, image, prediction)
        result["timing_ms"]["request"] = round((time.perf_counter() - start) * 1000, 2)
        return result

    async def predict_or_error(self, name: str | None, data: bytes, heatmap: bool) -> dict[str, Any]:
        """Like :meth:`predict`, with a bad image answered as ``{"source", "error", "status"}``."""
        try:
            return await self.predict(name, data, heatmap)
        except RequestError as err:
            return {"source": client_name(name), "error": str(err), "status": err.status}
        except CxrError as err:
            return {"source": client_name(name), "error": str(err), "status": 422}

    def _heatmap(self, image: Any, prediction: Prediction) -> dict[str, Any]:
        """Grad-CAM of the predicted class on the fp32 PyTorch model (runs in the model thread)."""
        from cxrkit.data.transforms import input_box
        from cxrkit.explain.gradcam import Explainer, choose_targets
        from cxrkit.serve.heatmap import as_base64, heatmap_layers

        if self._cam_predictor is None:
            same = self.predictor.engine == "torch" and self.predictor.runtime.amp_dtype is None
            self._cam_predictor = self.predictor if same else Predictor(
                self.settings.run, self.settings.checkpoint, engine="torch", runtime=_fp32_runtime())
        p = self._cam_predictor
        probs = np.array([[prediction.probabilities[label] for label in p.labels]])
        index = choose_targets(p.task, p.labels, probs, p.threshold)[0][0]
        x = p.runtime.to_device(p.transform(image)[None])
        with Explainer(p.model, p.task, "gradcam", None, p.temperature) as explainer:
            heat = explainer.heatmaps(x, [index])[0]
            method, layer = explainer.method_name, explainer.layer_name
        layers = heatmap_layers(image, heat, input_box(p.preprocessing, *image.size))
        return {"class": p.labels[index], "method": method, "layer": layer, **as_base64(layers)}

    def model_info(self) -> dict[str, Any]:
        """What ``GET /v1/model`` answers: the model, its inputs and outputs, and the run's evaluations."""
        from cxrkit import __version__

        p = self.predictor
        evaluations = {}
        for path in sorted((p.run.path / "eval").glob("*/metrics.json")):
            metrics = json.loads(path.read_text())
            evaluations[path.parent.name] = {k: metrics.get(k) for k in (
                "dataset", "split", "n", "accuracy", "auc", "f1_macro", "sensitivity", "specificity", "ece")}
        size = p.preprocessing.size
        return {
            "model": p.model_id, "labels": p.labels, "task": p.task, "positive": p.labels_info.get("positive"),
            "input_size": [3, size, size], "preprocessing": p.preprocessing.to_dict(), "threshold": p.threshold,
            "threshold_method": p.labels_info.get("threshold_method"), "temperature": p.temperature,
            "metrics": evaluations, "cxrkit_version": __version__,
            "limits": {"max_upload_mb": self.settings.max_upload_mb, "max_pixels": self.settings.max_pixels,
                       "max_files": self.settings.max_files, "timeout_s": self.settings.timeout_s},
        }


def _fp32_runtime() -> Any:
    from cxrkit.train.runtime import setup_runtime

    return setup_runtime("cpu", "fp32", channels_last=False, workers=0)
