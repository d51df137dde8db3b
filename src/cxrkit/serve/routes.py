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
                      heatmap: bool = Query(False, description="add Grad-CAM pictures (base64 PNG)")) -> dict:
        return await request.app.state.service.predict(file.filename, await file.read(), heatmap)

    @router.post("/predict/batch", dependencies=secured, summary="Predict several images (multipart field `files`)")
    async def predict_batch(request: Request, files: list[UploadFile] = File(...),
                            heatmap: bool = Query(False, description="add Grad-CAM pictures (base64 PNG)")) -> dict:
        if len(files) > settings.max_files:
            raise RequestError(413, f"{len(files)} files in one request; the limit is {settings.max_files}")
        service = request.app.state.service
        uploads = [(f.filename, await f.read()) for f in files]
        results = await asyncio.gather(*(service.predict_or_error(name, data, heatmap) for name, data in uploads))
        return {"results": results, "failed": sum(1 for r in results if r.get("error"))}

    return router
