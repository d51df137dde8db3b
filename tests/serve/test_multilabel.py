"""The service on a multi-label run (ChestX-ray14's 14 findings): which label a heatmap explains, ``?target=``,
the threshold ``/v1/model`` states, and how an image with no decided label is answered."""

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from synth import with_logits, xray

from cxrkit.serve.app import ServeSettings, create_app

# calibrated probabilities: Atelectasis 0.55 and Edema 0.90 decided, the first in label order is the less probable
DECIDED = {"Atelectasis": 0.2, "Edema": 2.2, "Effusion": 1.0}


@pytest.fixture(scope="module")
def decided_run(tiny_multilabel_run, tmp_path_factory):
    return with_logits(tiny_multilabel_run, tmp_path_factory.mktemp("ml") / "run", DECIDED)


@pytest.fixture(scope="module")
def client(decided_run):
    with TestClient(create_app(ServeSettings(str(decided_run), engine="torch"))) as c:
        yield c


def _image() -> dict:
    buffer = io.BytesIO()
    xray(np.random.default_rng(1), 64, True).save(buffer, format="PNG")
    return {"file": ("chest.png", buffer.getvalue(), "image/png")}


def test_the_heatmap_explains_the_most_probable_decided_label(client):
    body = client.post("/v1/predict?heatmap=true", files=_image()).json()
    labels = client.get("/v1/model").json()["labels"]
    p = body["probabilities"]
    assert labels.index("Atelectasis") < labels.index("Edema")  # the old rule took the first one over 0.5
    assert p["Atelectasis"] == pytest.approx(0.55, abs=0.02) and p["Edema"] == pytest.approx(0.90, abs=0.02)
    assert body["label"] == "|".join(n for n in labels if n in DECIDED)  # decided, in label order
    assert body["heatmap"]["class"] == max(p, key=p.get) == "Edema"


def test_a_target_chooses_the_heatmap_s_label_without_case(client):
    for asked, explained in (("atelectasis", "Atelectasis"), (" CARDIOMEGALY ", "Cardiomegaly")):
        response = client.post("/v1/predict", params={"heatmap": "true", "target": asked}, files=_image())
        assert response.status_code == 200, response.text
        assert response.json()["heatmap"]["class"] == explained
    batch = client.post("/v1/predict/batch", params={"heatmap": "true", "target": "effusion"},
                        files=[("files", _image()["file"]), ("files", _image()["file"])])
    assert [r["heatmap"]["class"] for r in batch.json()["results"]] == ["Effusion", "Effusion"]


def test_an_unknown_target_or_one_without_a_heatmap_is_refused(client):
    response = client.post("/v1/predict", params={"heatmap": "true", "target": "Fracture"}, files=_image())
    assert response.status_code == 400
    assert response.json()["error"].startswith("target 'Fracture' is not one of the model's labels: Atelectasis, ")
    response = client.post("/v1/predict/batch", params={"heatmap": "true", "target": "none"},
                           files=[("files", _image()["file"])])
    assert response.status_code == 400 and "not one of the model's labels" in response.json()["error"]
    response = client.post("/v1/predict", params={"target": "Edema"}, files=_image())
    assert response.status_code == 400 and "add heatmap=true" in response.json()["error"]


def test_the_model_states_the_threshold_each_label_is_decided_at(client, decided_run):
    assert json.loads((decided_run / "labels.json").read_text())["threshold"] is None  # the run leaves it unsaid
    info = client.get("/v1/model").json()
    assert info["task"] == "multilabel" and len(info["labels"]) == 14
    assert info["threshold"] == 0.5 == client.post("/v1/predict", files=_image()).json()["threshold"]


def test_no_decided_label_is_an_empty_label_and_the_heatmap_shows_the_most_probable(tiny_multilabel_run, tmp_path):
    run = with_logits(tiny_multilabel_run, tmp_path / "run", {"Cardiomegaly": -1.0})  # p 0.27, the others 0.0025
    with TestClient(create_app(ServeSettings(str(run), engine="torch"))) as c:
        body = c.post("/v1/predict?heatmap=true", files=_image()).json()
    assert max(body["probabilities"].values()) < 0.5
    assert body["label"] == "" and body["exceeded"] is False
    assert body["heatmap"]["class"] == "Cardiomegaly"
