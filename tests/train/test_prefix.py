"""Resuming a model from cached activations: where the boundary falls, and that the view is the model."""

import pytest
import torch

from cxrkit.models.classifier import build_classifier
from cxrkit.models.freeze import apply_trainable, set_train_mode
from cxrkit.models.weights import tensors_digest
from cxrkit.train.prefix import boundary_input, candidates, find_boundary, prefix_tensors, resume_from


def _model(name: str, trainable: str) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    model = build_classifier(name, 3, weights="none").eval()
    plan = apply_trainable(model, trainable)
    return model, f"backbone.{plan.cut}"


@pytest.mark.parametrize(("name", "trainable", "boundary"), [
    # the cut is inside an inverted residual; its `conv` branch starts from the block's own input
    ("mobilenet_v2", "top:14", "backbone.features.16.conv"),
    # dense layers concatenate everything before them: only the whole dense block can be resumed
    ("densenet121", "from:features.denseblock4.denselayer16", "backbone.features.denseblock4"),
    ("resnet18", "top:2:blocks", "backbone.layer4.0"),
])
def test_the_deepest_boundary_that_reproduces_the_output(name, trainable, boundary):
    model, cut = _model(name, trainable)
    x = torch.randn(2, 3, 96, 96)
    resumed = find_boundary(model, cut, x)
    assert resumed is not None and resumed.boundary == boundary
    cached = boundary_input(model, boundary, x)
    with torch.no_grad():
        assert torch.allclose(resumed.net(cached), model(x), atol=1e-5)
    # the cache skips work: what the boundary receives is smaller than the image or deeper than it
    assert cached.shape[-1] < x.shape[-1]


def test_the_prefix_weights_are_those_the_boundary_input_comes_from():
    """The feature cache is keyed by these: training the layers at or above the boundary (a top-N stage, resumed
    after an epoch) must keep the key, and any change below it must change it."""
    model, _ = _model("mobilenet_v2", "top:14")
    boundary = "backbone.features.16.conv"
    names = [name for name, _ in prefix_tensors(model, boundary)]
    assert "backbone.features.0.0.weight" in names and "backbone.features.15.conv.3.running_mean" in names
    assert not any(n.startswith(("backbone.features.16", "backbone.features.17", "head")) for n in names)
    x = torch.randn(2, 3, 64, 64)
    before, digest = boundary_input(model, boundary, x), tensors_digest(prefix_tensors(model, boundary))
    with torch.no_grad():
        model.backbone.features[17].conv[0][0].weight.add_(1.0)
        model.backbone.features[16].conv[0][0].weight.add_(1.0)
        next(model.head.parameters()).add_(1.0)
    assert torch.equal(boundary_input(model, boundary, x), before)
    assert tensors_digest(prefix_tensors(model, boundary)) == digest
    for change in (lambda: model.backbone.features[3].conv[0][0].weight.add_(1e-3),
                   lambda: model.backbone.features[15].conv[1][1].running_var.mul_(2.0)):
        with torch.no_grad():
            change()
        assert tensors_digest(prefix_tensors(model, boundary)) != digest
        digest = tensors_digest(prefix_tensors(model, boundary))


def test_no_boundary_when_the_forward_pass_transforms_its_input_first():
    # torchvision's GoogLeNet rescales the input channels in forward() before any module runs
    model, cut = _model("googlenet", "top:10")
    assert model.backbone.transform_input
    assert find_boundary(model, cut, torch.randn(2, 3, 96, 96)) is None


def test_the_view_shares_parameters_so_training_it_trains_the_model():
    model, cut = _model("resnet18", "top:2:blocks")
    resumed = find_boundary(model, cut, torch.randn(2, 3, 64, 64))
    view_params = dict(resumed.net.named_parameters())
    # every parameter at or after the boundary is the model's own tensor
    for name, param in model.named_parameters():
        if name.startswith(("backbone.layer4", "head")):
            assert view_params[name] is param
    # the prefix is gone from the view
    assert not any(n.startswith("backbone.layer1") for n in view_params)
    cached = boundary_input(model, resumed.boundary, torch.randn(4, 3, 64, 64))
    before = model.head[-1].weight.detach().clone()
    loss = resumed.net(cached).sum()
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert not torch.equal(model.head[-1].weight, before)
    assert set(model.state_dict()) == set(build_classifier("resnet18", 3, weights="none").state_dict())


def test_sync_gives_copied_ancestors_the_models_mode():
    model, cut = _model("mobilenet_v2", "top:14")
    resumed = find_boundary(model, cut, torch.randn(1, 3, 64, 64))
    resumed.net.eval()
    set_train_mode(model)
    assert any(not view.training for view, _ in resumed.copies)
    resumed.sync()
    assert all(view.training == original.training for view, original in resumed.copies)


def test_candidates_stop_inside_the_backbone():
    assert list(candidates("backbone.a.b.c")) == ["backbone.a.b.c", "backbone.a.b", "backbone.a"]
    with pytest.raises(KeyError, match="no module"):
        resume_from(_model("resnet18", "head")[0], "backbone.layer9")
