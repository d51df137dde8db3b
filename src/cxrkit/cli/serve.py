"""``cxr serve``: the prediction service (FastAPI + uvicorn) with its web page."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import typer


def serve(
    run: Path = typer.Argument(..., help="Run directory"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, "--port"),
    workers: int = typer.Option(1, "--workers", help="Processes, each with its own copy of the model"),
    engine: str = typer.Option("auto", "--engine",
                                help="auto (ONNX Runtime on CPUs without bf16), torch, onnx or onnx-int8"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CXR_API_KEY",
                                          help="Require this key (X-API-Key or Bearer) on every endpoint but health"),
    max_upload_mb: float = typer.Option(32.0, "--max-upload-mb", help="Larger uploads get 413"),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds before a request gets 504"),
    max_files: int = typer.Option(32, "--max-files", help="Most files in one batch request"),
    max_batch: int = typer.Option(16, "--max-batch", help="Most images in one model call"),
    batch_window_ms: float = typer.Option(5.0, "--batch-window-ms", help="How long a request waits for company"),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps",
                                  help="Offer Grad-CAM heatmaps (?heatmap=true); off: refused with 400, and no "
                                       "second fp32 model is loaded for them"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve a run over HTTP: POST /v1/predict, /v1/predict/batch, GET /v1/model, /v1/health, the page at /."""
    import uvicorn

    from cxrkit.errors import CxrError
    from cxrkit.runs import Run
    from cxrkit.serve.app import SETTINGS_ENV, ServeSettings, create_app
    from cxrkit.serve.predictor import ENGINES, Predictor
    from cxrkit.serve.service import Service
    from cxrkit.train.runtime import usable_cores

    if workers < 1:
        raise CxrError(f"--workers must be at least 1, not {workers}")
    if engine not in ("auto", *ENGINES):
        raise CxrError(f"--engine {engine!r} is not one of auto, {', '.join(ENGINES)}")
    path = Run.open(run).path.resolve()
    threads = max(1, usable_cores() // workers) if workers > 1 else None
    settings = ServeSettings(str(path), checkpoint, engine, api_key, max_upload_mb, timeout_s=timeout,
                             max_files=max_files, max_batch=max_batch, batch_window_ms=batch_window_ms,
                             threads=threads, heatmaps=heatmaps)
    # the model is loaded before the server starts, so a problem with it is a one-line error, not a failed start-up;
    # with several workers, once here too, so that they do not race to export one file
    service = Service(settings) if workers == 1 else None
    predictor = service.predictor if service else Predictor(path, checkpoint, engine=engine)
    # for every worker: what auto chose, and the calibration (a worker started again after a crash must not answer
    # with a later one)
    settings = dataclasses.replace(settings, engine=predictor.engine, calibration=predictor.calibration)
    del predictor  # with several workers, each loads its own
    typer.echo(f"serving {path.name} ({settings.engine} engine) on http://{host}:{port} with {workers} worker(s)",
               err=True)
    if service:
        uvicorn.run(create_app(settings, service), host=host, port=port, log_level=log_level)
    else:
        os.environ[SETTINGS_ENV] = settings.to_env()
        uvicorn.run("cxrkit.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level)
