"""``cxr export`` (ONNX, TorchScript) and ``cxr serve`` as a real server process on loopback."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cxrkit.cli.main import app
from cxrkit.export.onnx import read_metadata
from cxrkit.export.torchscript import load_torchscript
from cxrkit.serve.predictor import Predictor
from cxrkit.train.runtime import setup_runtime

CXR = [sys.executable, "-m", "cxrkit.cli.main"]


@pytest.mark.parametrize("format_", ["onnx", "torchscript"])
def test_export_writes_the_model_with_its_metadata(tiny_run, tmp_path, format_):
    out = tmp_path / f"model.{format_}"
    result = CliRunner().invoke(app, ["export", str(tiny_run), "--format", format_, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert "max |exported - PyTorch| on 4 random inputs" in result.stderr
    difference = float(result.stderr.split("inputs: ")[1].split()[0])
    assert difference < 1e-4
    predictor = Predictor(tiny_run, runtime=setup_runtime("cpu", "fp32", channels_last=False, workers=0))
    if format_ == "onnx":
        meta = read_metadata(out)
    else:
        module, meta = load_torchscript(out)
        x = torch.randn(2, 3, 48, 48)
        with torch.no_grad():
            assert torch.allclose(module(x), predictor.model(x), atol=1e-5)
    labels = json.loads((tiny_run / "labels.json").read_text())
    assert meta["labels"] == labels["labels"] and meta["threshold"] == labels["threshold"]
    assert meta["temperature"] == labels["temperature"] and meta["weights_sha256"] == predictor.weights_sha256
    pre = json.loads((tiny_run / "data.json").read_text())["preprocessing"]
    assert meta["preprocessing"]["mean"] == pre["mean"] and meta["preprocessing"]["size"] == 48


def test_a_multilabel_export_states_the_threshold_each_label_is_decided_at(tiny_multilabel_run, tmp_path):
    """A multi-label run's labels.json holds no threshold (each label is decided at 0.5): the file said null, so
    whoever used it without cxrkit could not know the rule. A file exported before says so once it is next used."""
    from cxrkit.export.onnx import update_metadata

    run = shutil.copytree(tiny_multilabel_run, tmp_path / "run")
    assert json.loads((run / "labels.json").read_text())["threshold"] is None
    out = tmp_path / "ml.onnx"
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["task"] == "multilabel" and len(meta["labels"]) == 14 and meta["threshold"] == 0.5

    Predictor(run, engine="onnx")  # exports RUN/export/best.onnx
    own = run / "export" / "best.onnx"
    update_metadata(own, {**read_metadata(own), "threshold": None})  # as written before
    assert Predictor(run, engine="onnx").engine == "onnx" and read_metadata(own)["threshold"] == 0.5


def test_export_refuses_an_unknown_format(tiny_run):
    result = CliRunner().invoke(app, ["export", str(tiny_run), "--format", "tflite"])
    assert result.exit_code != 0 and "not one of onnx, onnx-int8, torchscript" in str(result.exception)


def test_onnx_names_its_batch_dimension(tiny_run, tmp_path):
    import onnx

    out = tmp_path / "model.onnx"
    assert CliRunner().invoke(app, ["export", str(tiny_run), "-o", str(out)]).exit_code == 0
    graph = onnx.load(str(out)).graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 48, 48]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 2]


def test_export_refuses_outputs_that_would_replace_the_run_s_state_and_options_of_another_format(tiny_run, tmp_path):
    """-o onto a checkpoint made the run unreadable; int8 onto the fp32 engine file made --engine onnx run int8."""
    import shutil

    run = Path(shutil.copytree(tiny_run, tmp_path / tiny_run.name))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for format_, target, owner in [("torchscript", "checkpoints/best.pt", "a checkpoint of run"),
                                   ("onnx", "labels.json", "the labels.json of run"),
                                   ("onnx-int8", "export/best.onnx", "the file that --engine onnx of run")]:
        result = CliRunner().invoke(app, ["export", str(run), "-f", format_, "-o", str(run / target)])
        assert result.exit_code != 0 and f"is {owner}" in str(result.exception), (format_, result.output)
    result = CliRunner().invoke(app, ["export", str(run), "-f", "torchscript", "--fp32-convs", "3"])
    assert result.exit_code != 0
    assert str(result.exception) == "--fp32-convs applies to --format onnx-int8 only, not torchscript"
    result = CliRunner().invoke(app, ["export", str(run), "-o", "/proc/cxrkit-test.onnx"])
    assert result.exit_code != 0 and "cannot write here" in str(result.exception)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # the default file of a format is its own to replace
    assert CliRunner().invoke(app, ["export", str(run), "-o", str(run / "export" / "best.onnx")]).exit_code == 0


def test_a_failed_check_leaves_the_earlier_export_in_place(tiny_run, tmp_path, monkeypatch):
    import cxrkit.export

    out = tmp_path / "model.onnx"
    out.write_bytes(b"the earlier export")
    monkeypatch.setattr(cxrkit.export, "max_difference", lambda *args: 0.5)
    result = CliRunner().invoke(app, ["export", str(tiny_run), "-o", str(out)])
    assert result.exit_code != 0 and "differs from PyTorch by 5.00e-01 (over 1e-4); nothing was written" in str(
        result.exception)
    assert out.read_bytes() == b"the earlier export" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cxr_serve_runs_two_workers_with_an_api_key(tiny_run, tmp_path):
    port = _free_port()
    env_key = {"CXR_API_KEY": "k3y"}
    proc = subprocess.Popen([*CXR, "serve", str(tiny_run), "--port", str(port), "--workers", "2",
                             "--engine", "torch", "--log-level", "warning"],
                            env={**os.environ, **env_key}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(base + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "cxr serve did not come up"
            time.sleep(0.3)
        image = tmp_path / "x.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 50), dtype=np.uint8)).save(image)
        files = {"file": (image.name, image.read_bytes(), "image/png")}
        assert httpx.post(base + "/v1/predict", files=files).status_code == 401
        answer = httpx.post(base + "/v1/predict", files=files, headers={"X-API-Key": "k3y"})
        assert answer.status_code == 200 and answer.json()["model"]["engine"] == "torch"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "serving" in proc.stderr.read()


def test_serve_refuses_bad_options_in_one_line(tiny_run, tmp_path):
    proc = subprocess.run([*CXR, "serve", str(tmp_path / "missing-run")], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "missing-run" in proc.stderr
    proc = subprocess.run([*CXR, "serve", str(tiny_run), "--workers", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--workers must be at least 1" in proc.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_run_that_cannot_be_loaded_stops_serve_before_it_starts_in_one_line(tiny_run, tmp_path, workers):
    run = Path(shutil.copytree(tiny_run, tmp_path / tiny_run.name))
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])  # cut short
    proc = subprocess.run([*CXR, "serve", str(run), "--port", str(_free_port()), "--workers", workers],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    # one line, not uvicorn's start-up traceback
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {best} cannot be read"), proc.stderr
