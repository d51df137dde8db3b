"""The prediction service: FastAPI over a :class:`~cxrkit.serve.predictor.Predictor`.

Endpoints (JSON; errors are ``{"error": "<message>"}`` with a status code, never a traceback):

- ``POST /v1/predict``: one image as a multipart upload (``file``); ``?heatmap=true`` adds Grad-CAM pictures.
- ``POST /v1/predict/batch``: several uploads (``files``); a bad file gets its own ``error``, the others answer.
- ``GET /v1/model``: labels, input size, preprocessing, threshold, temperature, model id and the run's metrics.
- ``GET /v1/health``: liveness (never needs the API key).
- ``GET /``: the web page; ``/docs``: the OpenAPI page.

Safety: uploads over ``max_upload_mb`` get 413 before they are read in full; the format is sniffed from the bytes
(415 for anything that is not PNG, JPEG, TIFF, WebP, BMP, GIF, JPEG 2000 or DICOM), whatever the file name says;
images over ``max_pixels`` are refused before decoding (decompression bombs); every request has a time limit
(504); uploads are decoded in memory and nothing is written under a client-supplied name; weights are read with
``weights_only=True``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cxrkit.data.images import DEFAULT_MAX_PIXELS
from cxrkit.errors import CxrError

STATIC = Path(__file__).parent / "static"
SETTINGS_ENV = "CXR_SERVE_SETTINGS"
_log = logging.getLogger("cxrkit.serve")


@dataclass
class ServeSettings:
    """How ``cxr serve`` runs; every field but ``calibration`` has a ``cxr serve`` option of the same name.
    ``calibration`` is the one the service started with (:attr:`Predictor.calibration`): with several workers,
    one that uvicorn starts again later answers with it too, even if the run was calibrated since."""

    run: str
    checkpoint: str = "best"
    engine: str = "auto"
    api_key: str | None = None
    max_upload_mb: float = 32.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout_s: float = 30.0
    max_files: int = 32
    max_batch: int = 16
    batch_window_ms: float = 5.0
    threads: int | None = None
    heatmaps: bool = True
    calibration: dict[str, Any] | None = None

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        text = os.environ.get(SETTINGS_ENV)
        if not text:
            raise CxrError(f"${SETTINGS_ENV} is not set: start the service with `cxr serve RUN`")
        return cls(**json.loads(text))


class RequestError(Exception):
    """A request that cannot be answered, with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(settings: ServeSettings, service: Any = None) -> Any:
    """The FastAPI app; the model is loaded when the app starts (once per worker process), unless ``service`` (a
    :class:`~cxrkit.serve.service.Service` of ``settings``) was loaded already."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from cxrkit import __version__
    from cxrkit.serve.routes import api_router
    from cxrkit.serve.service import Service
    from cxrkit.serve.upload_limit import UploadLimit

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = service or Service(settings)
        async with loaded:
            app.state.service = loaded
            yield

    app = FastAPI(title="cxrkit prediction service", version=__version__, lifespan=lifespan,
                  description="Chest X-ray classification from a cxrkit run. A research tool, not a diagnosis.")
    app.add_middleware(UploadLimit, max_bytes=int(settings.max_upload_mb * 1024 * 1024))

    @app.middleware("http")
    async def time_limit(request: Request, call_next):
        start = time.perf_counter()
        try:
            response = await asyncio.wait_for(call_next(request), settings.timeout_s)
        except asyncio.TimeoutError:
            return JSONResponse({"error": f"the request took longer than {settings.timeout_s:g} s"}, status_code=504)
        response.headers["X-Process-Time-Ms"] = f"{(time.perf_counter() - start) * 1000:.1f}"
        return response

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.exception_handler(CxrError)
    async def cxr_error(request: Request, err: CxrError):
        return JSONResponse({"error": str(err)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        _log.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(err).__name__}); the server log has the details"},
                            status_code=500)

    app.include_router(api_router(settings))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def app_from_env() -> Any:
    """``uvicorn --factory`` entry point for worker processes: settings come from ``$CXR_SERVE_SETTINGS``."""
    return create_app(ServeSettings.from_env())


def check_api_key(settings: ServeSettings, headers: Any) -> None:
    """Raise :class:`RequestError` (401) unless the request carries the key (``X-API-Key`` or ``Bearer``)."""
    if not settings.api_key:
        return
    given = headers.get("x-api-key") or ""
    auth = headers.get("authorization") or ""
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
        raise RequestError(401, "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)")
