"""The ``/v1`` endpoints; the work is in :class:`~cxrkit.serve.service.Service`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, File, Query, Request, Security, UploadFile
from fastapi.security import APIKeyHeader

from cxrkit.serve.app import RequestError, ServeSettings, check_api_key


def api_router(settings: ServeSettings) -> APIRouter:
    router = APIRouter(prefix="/v1")

    # declared so that the OpenAPI page offers "Authorize"; the check itself also accepts a Bearer token
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="needed when the service has --api-key")

    async def require_key(request: Request, _: str | None = Security(header)) -> None:
        check_api_key(settings, request.headers)

    secured = [Depends(require_key)]

    def check_heatmap(request: Request, heatmap: bool, target: str | None) -> int | None:
        """Refuse a heatmap the service does not offer and a target without a heatmap or not among the labels;
        the target's label index."""
        if heatmap and not settings.heatmaps:
            raise RequestError(400, "heatmaps are off in this service (it was started with --no-heatmaps)")
        if target is not None and not heatmap:
            raise RequestError(400, "target chooses the label the heatmap explains; add heatmap=true")
        return request.app.state.service.heatmap_target(target)

    target_query = Query(None, description="the label the heatmap explains, without case (default: the decided "
                                           "label; for a multi-label image the most probable decided one)")

    @router.get("/health", summary="Liveness; never needs the API key")
    async def health(request: Request) -> dict[str, Any]:
        service = request.app.state.service
        return {"status": "ok", "run": service.predictor.run.name, "engine": service.predictor.engine,
                "uptime_s": round(time.time() - service.started, 1), "batches": service.batcher.batches,
                "images": service.batcher.items}

    @router.get("/model", dependencies=secured, summary="Labels, input size, threshold and metrics of the run")
    async def model(request: Request) -> dict[str, Any]:
        return request.app.state.service.model_info()

    @router.post("/predict", dependencies=secured, summary="Predict one image (multipart field `file`)")
    async def predict(request: Request, file: UploadFile = File(...),
                      heatmap: bool = Query(False, description="add Grad-CAM pictures (base64 PNG)"),
                      target: str | None = target_query) -> dict:
        index = check_heatmap(request, heatmap, target)
        count = len((await request.form()).getlist("file"))  # the form is parsed once; this is its cached copy
        if count > 1:
            raise RequestError(400, f"{count} files in the field `file`; this endpoint predicts one image, "
                                    "send several as `files` to /v1/predict/batch")
        return await request.app.state.service.predict(file.filename, await file.read(), heatmap, index)

    @router.post("/predict/batch", dependencies=secured, summary="Predict several images (multipart field `files`)")
    async def predict_batch(request: Request, files: list[UploadFile] = File(...),
                            heatmap: bool = Query(False, description="add Grad-CAM pictures (base64 PNG)"),
                            target: str | None = target_query) -> dict:
        index = check_heatmap(request, heatmap, target)
        if len(files) > settings.max_files:
            raise RequestError(413, f"{len(files)} files in one request; the limit is {settings.max_files}")
        uploads = [(f.filename, await f.read()) for f in files]
        disconnected = watch_disconnect(request)
        try:
            results = await request.app.state.service.predict_many(uploads, heatmap, disconnected.done, index)
        finally:
            disconnected.cancel()
        return {"results": results, "failed": sum(1 for r in results if r.get("error"))}

    return router


def watch_disconnect(request: Request) -> asyncio.Task:
    """A task that ends when the client disconnects; start it once the body has been read (then the only message
    left to receive is the disconnect). ``Request.is_disconnected`` cannot tell behind ``BaseHTTPMiddleware``."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return asyncio.ensure_future(wait())
