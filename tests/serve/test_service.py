"""The prediction service through FastAPI's TestClient: endpoints, API key, limits, bad input, batching."""

import asyncio
import base64
import io
import json
import re
import shutil
import threading
import time

import numpy as np
import pytest
from badinputs import CASES, write_cases
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from cxrkit.cli.main import app as cli
from cxrkit.serve.app import ServeSettings, create_app
from cxrkit.serve.batcher import MicroBatcher
from cxrkit.serve.predictor import Predictor

KEY = {"X-API-Key": "s3cret"}


@pytest.fixture(scope="module")
def client(tiny_run):
    app = create_app(ServeSettings(str(tiny_run), engine="torch", api_key="s3cret", max_upload_mb=1))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return write_cases(tmp_path_factory.mktemp("bad"))


def _upload(path, name=None):
    return {"file": (name or path.name, path.read_bytes(), "application/octet-stream")}


def _served(app, work):
    """``await work(service, client)`` with ``app`` started and an httpx client on it, in a fresh event loop."""
    import httpx

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await work(app.state.service, client)

    return asyncio.run(main())


def test_health_needs_no_key_and_everything_else_does(client):
    assert client.get("/v1/health").json()["status"] == "ok"
    for method, url in (("get", "/v1/model"), ("post", "/v1/predict"), ("post", "/v1/predict/batch")):
        response = getattr(client, method)(url)
        assert response.status_code == 401 and "API key" in response.json()["error"]
    assert client.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/v1/model", headers={"X-API-Key": "wrong"}).status_code == 401


def test_model_describes_labels_input_and_checksum(client, tiny_run):
    info = client.get("/v1/model", headers=KEY).json()
    predictor = Predictor(tiny_run)
    assert info["labels"] == ["NORMAL", "PNEUMONIA"] and info["input_size"] == [3, 48, 48]
    assert info["model"]["weights_sha256"] == predictor.weights_sha256
    assert info["threshold"] == predictor.threshold and info["temperature"] == predictor.temperature


def test_a_worker_started_after_a_new_calibration_answers_with_the_one_the_service_started_with(tiny_run, cases,
                                                                                                   caplog):
    """With several workers, uvicorn starts a crashed one again; it loaded the run's labels.json as it was then, so
    after a cxr calibrate two workers answered the same image with two thresholds."""
    started = {**Predictor(tiny_run).calibration, "threshold": 0.123, "temperature": 2.0}  # the run's is now another
    with TestClient(create_app(ServeSettings(str(tiny_run), engine="torch", calibration=started))) as c:
        info = c.get("/v1/model").json()
        body = c.post("/v1/predict", files=_upload(cases["16bit-png"])).json()
    assert (info["threshold"], info["temperature"], body["threshold"]) == (0.123, 2.0, 0.123)
    expected = Predictor(tiny_run)
    assert expected.hold_calibration(started)
    (answer,) = expected.predict_files([str(cases["16bit-png"])])
    assert list(body["probabilities"].values()) == pytest.approx(list(answer.probabilities.values()), abs=1e-4)
    assert "was calibrated again since the service started" in caplog.text
    caplog.clear()
    with TestClient(create_app(ServeSettings(str(tiny_run), engine="torch",
                                             calibration=Predictor(tiny_run).calibration))):  # the run's own
        pass
    assert "calibrated again" not in caplog.text


def test_predict_answers_like_cxr_predict(client, tiny_run, cases):
    path = cases["16bit-png"]
    response = client.post("/v1/predict", files=_upload(path), headers=KEY)
    assert response.status_code == 200, response.text
    body = response.json()
    (expected,) = Predictor(tiny_run).predict_files([str(path)])
    assert body["label"] == expected.label and body["exceeded"] == expected.exceeded
    assert list(body["probabilities"].values()) == pytest.approx(list(expected.probabilities.values()), abs=1e-4)
    assert body["threshold"] == expected.threshold and body["model"] == expected.model
    assert body["timing_ms"]["request"] >= body["timing_ms"]["model"] > 0


def test_heatmap_pictures_are_pngs_of_the_image(client, cases):
    response = client.post("/v1/predict?heatmap=true", files=_upload(cases["exif-jpeg"]), headers=KEY)
    heat = response.json()["heatmap"]
    assert heat["method"] == "Grad-CAM" and heat["class"] in ("NORMAL", "PNEUMONIA")
    pictures = {k: Image.open(io.BytesIO(base64.b64decode(heat[f"{k}_png"]))) for k in ("image", "map", "overlay")}
    assert {p.size for p in pictures.values()} == {(64, 32)}  # the EXIF-rotated frame, not the stored one
    assert pictures["map"].mode == "RGBA" and np.asarray(pictures["map"])[..., 3].max() == 255


@pytest.mark.parametrize("case", list(CASES))
def test_every_bad_or_unusual_input(client, cases, case):
    response = client.post("/v1/predict", files=_upload(cases[case]), headers=KEY)
    expected = CASES[case][1]
    if expected == "ok":
        assert response.status_code == 200, response.text
        assert response.json()["label"] in ("NORMAL", "PNEUMONIA")
    else:
        assert response.status_code in (400, 415, 422), response.text
        message = response.json()["error"]
        assert re.search(expected, message), message  # names the upload and the problem
        assert "Traceback" not in response.text and "\n" not in message
    assert client.get("/v1/health").status_code == 200  # and the service keeps serving


def test_status_codes_of_refusals(client, cases):
    assert client.post("/v1/predict", files=_upload(cases["text"]), headers=KEY).status_code == 415
    text = cases["text"].read_bytes()  # named .dcm, the one name that makes the service try DICOM: still 415
    response = client.post("/v1/predict", files={"file": ("notes.dcm", text)}, headers=KEY)
    assert response.status_code == 415 and "the content was checked" in response.json()["error"]  # was 422
    assert client.post("/v1/predict", files=_upload(cases["empty"]), headers=KEY).status_code == 400
    assert client.post("/v1/predict", files=_upload(cases["truncated-jpeg"]), headers=KEY).status_code == 422
    # the name says PNG, the bytes say JPEG: the bytes decide
    assert client.post("/v1/predict", files=_upload(cases["cmyk-jpeg"], "scan.png"), headers=KEY).status_code == 200
    big = {"file": ("big.png", b"\x89PNG\r\n\x1a\n" + bytes(2 * 1024 * 1024), "image/png")}
    response = client.post("/v1/predict", files=big, headers=KEY)
    assert response.status_code == 413 and "limit of 1 MiB" in response.json()["error"]


def test_a_chunked_upload_is_cut_off_at_the_limit(client):
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def body():  # no Content-Length: the middleware must count
        yield head
        for _ in range(40):
            yield bytes(64 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/v1/predict", content=body(), headers={
        **KEY, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413


def test_batch_answers_each_file_and_refuses_too_many(client, cases):
    files = [("files", (cases[c].name, cases[c].read_bytes(), "image/png"))
             for c in ("rgba-png", "text", "dicom-mono1")]
    body = client.post("/v1/predict/batch", files=files, headers=KEY).json()
    assert [r["source"] for r in body["results"]] == ["rgba.png", "notes.jpeg", "mono1.dcm"]
    assert body["failed"] == 1 and body["results"][1]["status"] == 415 and body["results"][0]["label"]
    many = [("files", (f"{i}.png", cases["rgba-png"].read_bytes(), "image/png")) for i in range(33)]
    assert client.post("/v1/predict/batch", files=many, headers=KEY).status_code == 413


def test_monochrome1_and_monochrome2_give_the_same_answer(client, cases):
    one, two = (client.post("/v1/predict", files=_upload(cases[c]), headers=KEY).json()
                for c in ("dicom-mono1", "dicom-mono2"))
    assert one["probabilities"] == pytest.approx(two["probabilities"], abs=1e-6)


def test_dicom_without_its_preamble_is_read_when_named_dcm_like_cxr_predict_does(client, cases):
    import pydicom

    ds = pydicom.dcmread(cases["dicom-mono2"])
    ds.preamble, ds.file_meta = None, pydicom.dataset.FileMetaDataset()  # no preamble, no "DICM", no file meta
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    bare = buffer.getvalue()
    answer = client.post("/v1/predict", files={"file": ("bare.dcm", bare)}, headers=KEY).json()
    whole = client.post("/v1/predict", files=_upload(cases["dicom-mono2"]), headers=KEY).json()
    assert answer["probabilities"] == pytest.approx(whole["probabilities"], abs=1e-6)
    assert client.post("/v1/predict", files={"file": ("bare.bin", bare)}, headers=KEY).status_code == 415


def test_a_request_over_the_time_limit_gets_504_and_the_service_goes_on(tiny_run, cases):
    app = create_app(ServeSettings(str(tiny_run), engine="torch", timeout_s=0.001))
    with TestClient(app) as c:
        response = c.post("/v1/predict?heatmap=true", files=_upload(cases["rgba-png"]))
        assert response.status_code == 504 and "longer than" in response.json()["error"]
    with TestClient(create_app(ServeSettings(str(tiny_run), engine="torch"))) as c:
        assert c.post("/v1/predict", files=_upload(cases["rgba-png"])).status_code == 200


def test_concurrent_requests_share_model_calls(tiny_run, cases):
    import httpx

    app = create_app(ServeSettings(str(tiny_run), engine="torch", batch_window_ms=50))
    data = cases["rgba-png"].read_bytes()

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                responses = await asyncio.gather(*(
                    client.post("/v1/predict", files={"file": (f"{i}.png", data, "image/png")}) for i in range(16)))
            return responses, app.state.service.batcher

    responses, batcher = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses)
    assert len({tuple(r.json()["probabilities"].values()) for r in responses}) == 1
    assert batcher.items == 16 and batcher.batches < 16


def test_the_page_and_the_schema_are_served_without_outside_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and "not a diagnosis" in page.text
    assert not re.search(r"(src|href)=\"https?://", page.text)
    assert client.get("/static/app.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/v1/predict" in schema["paths"] and "/v1/predict/batch" in schema["paths"]
    schemes = schema["components"]["securitySchemes"].values()
    assert any(s["type"] == "apiKey" and s["name"] == "X-API-Key" for s in schemes)  # /docs can authorize


def test_heatmaps_come_from_the_model_loaded_at_start_up(tiny_run, tmp_path, cases):
    run = shutil.copytree(tiny_run, tmp_path / "run")  # tiny_run is shared: edit a copy
    with TestClient(create_app(ServeSettings(str(run), engine="onnx"))) as c:  # Grad-CAM needs a second model
        labels = list(c.get("/v1/model").json()["labels"])
        (run / "labels.json").write_text(json.dumps({"labels": ["A", "B"], "task": "binary"}))
        edited = c.post("/v1/predict?heatmap=true", files=_upload(cases["rgba-png"]))
        moved = run.rename(tmp_path / "moved")
        gone = c.post("/v1/predict?heatmap=true", files=_upload(cases["rgba-png"]))
    for response in (edited, gone):
        assert response.status_code == 200, response.text
        assert response.json()["heatmap"]["class"] in labels and str(moved.parent) not in response.text


def test_a_service_without_heatmaps_refuses_them_and_loads_no_second_model(tiny_run, cases):
    with TestClient(create_app(ServeSettings(str(tiny_run), engine="onnx", heatmaps=False))) as c:
        assert c.app.state.service.cam_predictor is None  # with onnx, heatmaps would need an fp32 PyTorch copy
        assert c.get("/v1/model").json()["heatmaps"] is False
        for url, files in (("/v1/predict", _upload(cases["rgba-png"])),
                           ("/v1/predict/batch", {"files": _upload(cases["rgba-png"])["file"]})):
            refused = c.post(f"{url}?heatmap=true", files=files)
            assert refused.status_code == 400 and "--no-heatmaps" in refused.json()["error"], refused.text
            assert c.post(url, files=files).status_code == 200
    with TestClient(create_app(ServeSettings(str(tiny_run), engine="onnx"))) as c:
        assert c.get("/v1/model").json()["heatmaps"] is True and c.app.state.service.cam_predictor is not None


def test_a_model_call_whose_callers_have_gone_is_skipped():
    ran, gate = [], threading.Event()

    async def main():
        async with MicroBatcher(lambda items: [ran.append(i) or i for i in items], window_ms=0) as batcher:
            busy = asyncio.ensure_future(batcher.call(gate.wait, 10))  # the model thread is busy ...
            await asyncio.sleep(0.05)
            waiting = [asyncio.ensure_future(batcher.submit("batch")), asyncio.ensure_future(batcher.call(ran.append,
                                                                                                     "call"))]
            await asyncio.sleep(0.05)  # ... while both are queued behind it, and their callers give up
            for task in waiting:
                task.cancel()
            gate.set()
            await busy
            assert await batcher.submit("next") == "next"
            return batcher.batches

    assert asyncio.run(main()) == 1 and ran == ["next"]


def test_batch_heatmaps_let_other_requests_use_the_model_in_between(tiny_run, cases):
    app = create_app(ServeSettings(str(tiny_run), engine="torch"))
    data = cases["rgba-png"].read_bytes()
    log, first_heatmap, go = [], threading.Event(), threading.Event()

    async def work(service, client):
        heatmap, predict = service._heatmap, service.batcher.fn

        def logged_heatmap(*args):
            log.append("heatmap")
            first_heatmap.set()
            go.wait(10)  # hold the model thread until the other request is queued
            return heatmap(*args)

        def logged_predict(items):
            log.append("predict")
            return predict(items)

        service._heatmap, service.batcher.fn = logged_heatmap, logged_predict
        files = [("files", (f"{i}.png", data, "image/png")) for i in range(3)]
        batch = asyncio.ensure_future(client.post("/v1/predict/batch?heatmap=true", files=files))
        await asyncio.to_thread(first_heatmap.wait, 10)
        single = asyncio.ensure_future(client.post("/v1/predict", files={"file": ("x.png", data, "image/png")}))
        await asyncio.sleep(0.3)
        go.set()
        return await batch, await single

    batch, single = _served(app, work)
    assert batch.status_code == 200 and single.status_code == 200
    assert [len(r["heatmap"]["map_png"]) > 0 for r in batch.json()["results"]] == [True] * 3
    assert log[log.index("heatmap"):] == ["heatmap", "predict", "heatmap", "heatmap"]


def test_batch_heatmaps_stop_when_the_client_has_gone(tiny_run, cases):
    import httpx

    app = create_app(ServeSettings(str(tiny_run), engine="torch"))
    files = [("files", (f"{i}.png", cases["rgba-png"].read_bytes(), "image/png")) for i in range(3)]
    request = httpx.Request("POST", "http://test/v1/predict/batch?heatmap=true", files=files)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": request.url.path, "raw_path": request.url.raw_path, "query_string": request.url.query,
             "root_path": "", "headers": [(k.lower(), v) for k, v in request.headers.raw],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    messages = [{"type": "http.request", "body": request.read(), "more_body": False}]
    heatmaps, sent = [], []

    async def receive():  # the body, then the client hangs up, as uvicorn tells it
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def main():
        async with app.router.lifespan_context(app):
            service = app.state.service
            heatmap = service._heatmap
            service._heatmap = lambda *args: heatmaps.append(args) or heatmap(*args)
            await app({**scope, "app": app, "state": {}}, receive, send)
            return service.batcher.items

    assert asyncio.run(main()) == 3  # predicted, and then no heatmap was made for nobody
    assert heatmaps == [] and sent[0]["status"] == 499


def test_decodes_at_once_are_bounded_by_the_threads(tiny_run, cases):
    import torch

    threads = torch.get_num_threads()
    app = create_app(ServeSettings(str(tiny_run), engine="torch", threads=2))
    data = cases["rgba-png"].read_bytes()
    lock, running, most = threading.Lock(), [0], [0]

    async def work(service, client):
        decode = service.decode

        def counted_decode(name, data):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                time.sleep(0.05)
                return decode(name, data)
            finally:
                with lock:
                    running[0] -= 1

        service.decode = counted_decode
        singles = [client.post("/v1/predict", files={"file": (f"{i}.png", data, "image/png")}) for i in range(8)]
        batch = client.post("/v1/predict/batch", files=[("files", (f"{i}.png", data, "image/png")) for i in range(8)])
        return await asyncio.gather(*singles, batch)

    try:
        responses = _served(app, work)
    finally:
        torch.set_num_threads(threads)
    assert all(r.status_code == 200 for r in responses) and responses[-1].json()["failed"] == 0
    assert most[0] == 2


def test_unreadable_metrics_files_do_not_break_the_model_endpoint(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    files = {"good": json.dumps({"n": 10, "accuracy": 0.9}), "half-written": '{"n": 10', "a-list": "[1, 2]"}
    for name, text in files.items():
        (run / "eval" / name).mkdir(parents=True, exist_ok=True)
        (run / "eval" / name / "metrics.json").write_text(text)
    with TestClient(create_app(ServeSettings(str(run), engine="torch"))) as c:
        response = c.get("/v1/model")
    assert response.status_code == 200, response.text
    metrics = response.json()["metrics"]
    assert metrics["good"]["n"] == 10 and metrics["good"]["accuracy"] == 0.9
    assert metrics["half-written"] == metrics["a-list"] == {"error": "unreadable metrics.json"}
    assert metrics["good"]["as_served"] is False  # it names no model or calibration


def test_the_model_endpoint_says_which_evaluations_were_measured_as_served(tiny_run, tmp_path):
    """/v1/model listed an evaluation made before `cxr calibrate` next to the new threshold, as if it were current."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    result = CliRunner().invoke(cli, ["evaluate", str(run), "--split", "test", "--name", "before"])
    assert result.exit_code == 0, result.output
    labels = json.loads((run / "labels.json").read_text())
    with TestClient(create_app(ServeSettings(str(run), engine="torch"))) as c:
        current = c.get("/v1/model").json()["metrics"]["before"]
    assert current["as_served"] is True and current["threshold"] == labels["threshold"]
    assert current["checkpoint"] == "best" and current["engine"] == "torch"
    (run / "labels.json").write_text(json.dumps({**labels, "threshold": 0.25}))  # as a new calibration leaves it
    with TestClient(create_app(ServeSettings(str(run), engine="torch"))) as c:
        model = c.get("/v1/model").json()
    assert model["threshold"] == 0.25
    assert model["metrics"]["before"]["as_served"] is False
    assert model["metrics"]["before"]["threshold"] == labels["threshold"]


def test_two_files_in_a_single_predict_are_refused(client, cases):
    files = [("file", (cases[c].name, cases[c].read_bytes(), "image/png")) for c in ("rgba-png", "16bit-png")]
    response = client.post("/v1/predict", files=files, headers=KEY)
    assert response.status_code == 400 and "/v1/predict/batch" in response.json()["error"]
