"""The service on a multi-label run (ChestX-ray14's 14 findings)."""

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


def test_the_model_states_the_threshold_each_label_is_decided_at(client, decided_run):
    assert json.loads((decided_run / "labels.json").read_text())["threshold"] is None  # the run leaves it unsaid
    info = client.get("/v1/model").json()
    assert info["task"] == "multilabel" and len(info["labels"]) == 14
    assert info["threshold"] == 0.5 == client.post("/v1/predict", files=_image()).json()["threshold"]
