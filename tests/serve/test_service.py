"""The prediction service through FastAPI's TestClient: endpoints, API key, limits, bad input, batching."""

import asyncio
import base64
import io
import re

import numpy as np
import pytest
from badinputs import CASES, write_cases
from fastapi.testclient import TestClient
from PIL import Image

from cxrkit.serve.app import ServeSettings, create_app
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
