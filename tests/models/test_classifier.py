"""The classifier: backbone features plus a head of logits; parameter counts as Keras reports them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxrkit.errors import CxrError
from cxrkit.models.classifier import Classifier, build_classifier, build_head, count_parameters


def test_linear_head():
    head = build_head(1280, 3)
    assert [type(m) for m in head] == [nn.Linear]
    assert head(torch.zeros(4, 1280)).shape == (4, 3)


def test_dense_head_with_dropout():
    head = build_head(1280, 2, hidden=(256,), dropout=0.5)
    assert [type(m) for m in head] == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head[1].in_features, head[1].out_features, head[4].out_features) == (1280, 256, 2)
    assert head[3].p == 0.5
    deep = build_head(64, 14, hidden=(32, 16), activation="gelu")
    assert [type(m) for m in deep] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_outputs": 0}, "positive integers"),
        ({"hidden": (0,)}, "positive integers"),
        ({"dropout": 1.0}, "dropout"),
        ({"activation": "swish"}, "unknown head activation 'swish'"),
    ],
)
def test_bad_head_arguments_are_user_errors(kwargs, message):
    arguments = {"num_features": 8, "num_outputs": 2, **kwargs}
    with pytest.raises(CxrError, match=message):
        build_head(**arguments)
    with pytest.raises(CxrError, match=message):  # before any backbone is built
        build_classifier(
            "no_such_backbone",
            arguments["num_outputs"],
            "none",
            hidden=arguments.get("hidden", ()),
            dropout=arguments.get("dropout", 0.0),
            activation=arguments.get("activation", "relu"),
        )


def test_mobilenet_v2_counts_match_keras():
    model = build_classifier("mobilenet_v2", 3, weights="none")
    counts = count_parameters(model)
    assert counts == {"trainable": 2_227_715, "total": 2_227_715, "bn_statistics": 34_112}
    assert counts["total"] + counts["bn_statistics"] == 2_261_827  # Keras' "Total params"
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    assert count_parameters(model)["trainable"] == 1280 * 3 + 3


def test_classifier_outputs_logits_and_features():
    model = build_classifier("resnet18", 5, weights="none", hidden=(16,), dropout=0.2)
    assert isinstance(model, Classifier) and isinstance(model.head, nn.Sequential)
    assert model.spec_name == "resnet18" and model.spec.cam_layer == "layer4" and model.num_features == 512
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        features, logits = model.features(x), model(x)
    assert features.shape == (2, 512) and logits.shape == (2, 5)
    assert torch.equal(logits, model.head(features))


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(CxrError, match="did you mean.*resnet50"):
        build_classifier("resnet05", 2, weights="none")
