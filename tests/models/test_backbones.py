"""Every registered backbone builds, runs, trains one step and knows its CAM layer and blocks; weights load safely."""

from __future__ import annotations

import os
import re
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from cxrkit.errors import CxrError
from cxrkit.models.backbones import BACKBONES, block_names, list_backbones, preprocessing_of
from cxrkit.models.classifier import Classifier, build_head
from cxrkit.models.weights import WEIGHTS_ENV, build_backbone, find_local_weights, load_state_dict_file

REQUIRED = {
    "mobilenet_v2", "mobilenetv2_100", "mobilenet_v3_small", "mobilenet_v3_large", "vgg11", "vgg16", "alexnet",
    "googlenet", "resnet18", "resnet50", "densenet121", "inception_resnet_v2", "tf_efficientnet_lite0",
    "tf_efficientnet_lite1", "efficientnet_b0", "convnext_tiny",
}  # fmt: skip
SHARED_WEIGHTS = Path(os.environ.get("CXR_SHARED", "/work/shared")) / "weights"


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_required_backbones_are_registered():
    assert REQUIRED <= set(BACKBONES.list())
    assert [s.name for s in list_backbones("mobilenet_v3*")] == ["mobilenet_v3_large", "mobilenet_v3_small"]


@pytest.mark.parametrize("name", BACKBONES.list())
def test_spec_preprocessing_comes_from_the_library(name):
    spec = BACKBONES.get(name)
    if spec.source == "timm":
        cfg = timm.get_pretrained_cfg(f"{spec.arch}.{spec.tag}")
        expected = (cfg.input_size[-1], cfg.mean, cfg.std, cfg.interpolation, cfg.crop_pct)
    else:
        evaluation = torchvision.models.get_model_weights(spec.arch)[spec.tag].transforms()
        crop, resize = evaluation.crop_size[0], evaluation.resize_size[0]
        expected = (crop, evaluation.mean, evaluation.std, evaluation.interpolation.value, crop / resize)
    pre = preprocessing_of(name)
    got = (pre["size"], pre["mean"], pre["std"], pre["interpolation"], pre["crop_pct"])
    assert got[:4] == (expected[0], tuple(expected[1]), tuple(expected[2]), expected[3])
    assert got[4] == pytest.approx(expected[4], abs=1e-4)
    assert spec.min_size <= spec.input_size and spec.weights_prefix and spec.description
    assert (spec.classifier is None) == (spec.source == "timm")


@pytest.fixture(scope="module", params=BACKBONES.list())
def built(request):
    """(spec, feature extractor, num_features), built once per backbone with random weights."""
    spec = BACKBONES.get(request.param)
    module, num_features = build_backbone(spec.name, "none")
    return spec, module, num_features


def test_forward_gives_pooled_features(built):
    spec, module, num_features = built
    size = max(spec.min_size, 64)
    with torch.no_grad():
        features = module.eval()(_images(2, size))
    assert features.shape == (2, num_features)
    assert torch.isfinite(features).all()
    with torch.no_grad():
        assert module(_images(1, spec.min_size)).shape == (1, num_features)


def test_cam_layer_is_a_feature_map(built):
    spec, module, _ = built
    seen = []
    handle = module.get_submodule(spec.cam_layer).register_forward_hook(lambda m, i, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            module.eval()(_images(1, spec.min_size))
    finally:
        handle.remove()
    assert len(seen) == 1 and len(seen[0]) == 4, f"{spec.cam_layer} gives {seen}"


def test_blocks_are_disjoint_and_in_forward_order(built):
    spec, module, _ = built
    names = block_names(module, spec)
    assert len(names) >= 5
    assert not [(a, b) for a in names for b in names if b.startswith(a + ".")], "a block nests in another"
    called: list[str] = []
    handles = [
        module.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: called.append(name))
        for name in names
    ]
    try:
        with torch.no_grad():
            module.eval()(_images(1, spec.min_size))
    finally:
        for handle in handles:
            handle.remove()
    assert called == names


def test_one_training_step(built):
    spec, module, num_features = built
    model = Classifier(module, build_head(num_features, 3), spec.name, num_features).train()
    head_before = model.head[-1].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(_images(2, spec.min_size)), torch.tensor([0, 2]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(model.head[-1].weight, head_before)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


# --- weights -------------------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No local weights anywhere and no network: the libraries' downloads raise URLError / OSError."""
    empty = tmp_path / "weights"
    empty.mkdir()
    monkeypatch.setenv(WEIGHTS_ENV, str(empty))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", no_network)
    return empty


@pytest.mark.parametrize(("name", "hint"), [("resnet18", "download.pytorch.org"), ("efficientnet_b0", "hf-hub")])
def test_missing_imagenet_weights_say_which_file_where(offline, name, hint):
    with pytest.raises(CxrError) as caught:
        build_backbone(name, "imagenet")
    message = str(caught.value)
    assert f"{name}.<tag>.safetensors" in message and str(offline) in message and hint in message
    assert "\n" not in message
    with pytest.raises(CxrError, match="elsewhere"):
        build_backbone(name, "imagenet", weights_dirs=[offline / "elsewhere"])


@pytest.mark.parametrize("proxy", [None, "http://proxy:3128"])
def test_an_unreachable_hub_is_read_from_its_cache_only(offline, monkeypatch, proxy):
    """Offline, the Hugging Face hub retried each download for about a minute, printing every attempt, before the
    error; now its cache is read at once. Behind a proxy only the download itself can tell, so it is left alone."""
    import socket

    from huggingface_hub import constants

    seen = []

    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    def from_hub(*args, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)
        raise OSError("not in the local cache")

    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    if proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", from_hub)
    with pytest.raises(CxrError, match="no ImageNet weights for efficientnet_b0"):
        build_backbone("efficientnet_b0", "imagenet")
    assert seen == [proxy is None] and constants.HF_HUB_OFFLINE is False


def test_non_network_download_errors_are_not_hidden(offline, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("checksum mismatch")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", broken)
    with pytest.raises(RuntimeError, match="checksum"):
        build_backbone("resnet18", "imagenet")


def _features(module: nn.Module, size: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(_images(2, size, seed=1))


def test_safetensors_round_trip_by_path_and_by_folder(offline):
    reference = torchvision.models.mobilenet_v2()
    full_file = offline / "mobilenet_v2.mine.safetensors"
    save_file(reference.state_dict(), str(full_file))
    reference.classifier = nn.Identity()
    by_path, _ = build_backbone("mobilenet_v2", full_file)
    by_folder, _ = build_backbone("mobilenet_v2", "imagenet")  # found in $CXR_WEIGHTS_DIR
    assert torch.equal(_features(by_path), _features(reference))
    assert torch.equal(_features(by_folder), _features(reference))
    extractor_file = offline / "extractor.safetensors"  # a feature extractor's own state dict loads too
    save_file(by_path.state_dict(), str(extractor_file))
    again, _ = build_backbone("mobilenet_v2", extractor_file)
    assert torch.equal(_features(again), _features(reference))
    (offline / "mobilenet_v2.other.pth").write_bytes(b"")
    with pytest.raises(CxrError, match="several"):
        find_local_weights("mobilenet_v2")


def test_timm_state_dict_round_trip(tmp_path):
    reference = timm.create_model("tf_efficientnet_lite0")
    path = tmp_path / "lite0.pth"
    torch.save(reference.state_dict(), path)
    reference.reset_classifier(0)
    loaded, num_features = build_backbone("tf_efficientnet_lite0", path)
    assert num_features == 1280 and torch.equal(_features(loaded), _features(reference))


def _as_downloaded(name: str) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """A random model's state dict as its library would download it, and that model as a feature extractor."""
    if name == "googlenet":  # with the (untrained) aux heads
        model = torchvision.models.googlenet(aux_logits=True, init_weights=False, transform_input=True)
        state, model.fc = model.state_dict(), nn.Identity()
    elif name == "densenet121":  # "norm.1" for "norm1", no num_batches_tracked, as in torchvision's file
        model = torchvision.models.densenet121()
        state, model.classifier = model.state_dict(), nn.Identity()
        renamed = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in state.items()}
        state = {k: v for k, v in renamed.items() if not k.endswith("num_batches_tracked")}
    else:
        model = timm.create_model(name)
        state = model.state_dict()
        model.reset_classifier(0)
    return state, model


@pytest.mark.parametrize("name", ["googlenet", "densenet121", "tf_efficientnet_lite0"])
def test_library_download_is_loaded_strictly(offline, monkeypatch, name):
    state, reference = _as_downloaded(name)
    downloaded = lambda *args, **kwargs: dict(state)  # noqa: E731
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", downloaded)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", downloaded)
    extractor, _ = build_backbone(name, "imagenet")
    assert torch.equal(_features(extractor), _features(reference))


def test_mismatched_corrupt_and_missing_files_name_the_file(tmp_path):
    wrong = tmp_path / "resnet18.safetensors"
    save_file(torchvision.models.resnet18().state_dict(), str(wrong))
    with pytest.raises(CxrError, match=r"resnet18\.safetensors does not fit mobilenet_v2.*missing"):
        build_backbone("mobilenet_v2", wrong)
    for corrupt in (tmp_path / "corrupt.safetensors", tmp_path / "corrupt.pth"):
        corrupt.write_bytes(b"not a weights file")
        with pytest.raises(CxrError, match=re.escape(str(corrupt))):
            build_backbone("mobilenet_v2", corrupt)
    with pytest.raises(CxrError, match=r"corrupt\.pth is not a PyTorch weights file"):  # not "holds Python objects"
        build_backbone("mobilenet_v2", tmp_path / "corrupt.pth")
    (tmp_path / "folder.pth").mkdir()
    with pytest.raises(CxrError, match=r"folder\.pth is a folder, not a file"):
        load_state_dict_file(tmp_path / "folder.pth")
    with pytest.raises(CxrError, match=r"^weights file \S*absent\.pth does not exist \(weights are 'imagenet', "
                                       r"'none' or a file\)$"):  # it said the path was none of those
        build_backbone("mobilenet_v2", tmp_path / "absent.pth")
    with pytest.raises(CxrError, match="weights must be 'imagenet', 'none' or a weights file; 'ImageNet' is none"):
        build_backbone("mobilenet_v2", "ImageNet")
    with pytest.raises(CxrError, match=r"weights file \$\{CXR_NO_SUCH_VAR\}/w\.pth: set the environment variable "
                                       "CXR_NO_SUCH_VAR it names"):
        build_backbone("mobilenet_v2", "${CXR_NO_SUCH_VAR}/w.pth")
    with pytest.raises(CxrError, match="not one of"):
        build_backbone("mobilenet_v2", wrong.rename(tmp_path / "weights.h5"))
    with pytest.raises(CxrError, match="unknown backbone 'mobilenet_v9'; did you mean"):
        build_backbone("mobilenet_v9", "none")


UNPICKLED: list[str] = []


def _record_unpickling() -> dict:
    UNPICKLED.append("ran")
    return {}


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "payload.pth"
    torch.save({"weight": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(CxrError, match="refusing to load .*payload.pth"):
        build_backbone("mobilenet_v2", path)
    assert UNPICKLED == []


# --- the real ImageNet weights in shared/ ------------------------------------------------------------------------


def _shared(file: str) -> Path:
    path = SHARED_WEIGHTS / file
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.mark.shared
def test_real_mobilenet_v2_weights_reproduce_imagenet_logits():
    tv_file = _shared("mobilenet_v2.in1k_dequantized.safetensors")
    _shared("mobilenetv2_100.in1k_dequantized.safetensors")
    full = torchvision.models.mobilenet_v2().eval()
    full.load_state_dict(load_file(str(tv_file)))
    torch_extractor, _ = build_backbone("mobilenet_v2", "imagenet", weights_dirs=[SHARED_WEIGHTS])
    timm_extractor, _ = build_backbone("mobilenetv2_100", "imagenet", weights_dirs=[SHARED_WEIGHTS])
    features = _features(torch_extractor, 128)
    with torch.no_grad():
        assert torch.allclose(full.classifier(features), full(_images(2, 128, seed=1)), atol=1e-5)
    assert torch.allclose(_features(timm_extractor, 128), features, atol=1e-5)  # same weights, other library


@pytest.mark.shared
@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1"])
def test_real_efficientnet_lite_weights_reproduce_imagenet_logits(name, monkeypatch):
    file = _shared(f"{name}.in1k.safetensors")
    monkeypatch.setenv(WEIGHTS_ENV, str(SHARED_WEIGHTS))
    assert find_local_weights(name) == file
    full = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}).eval()
    extractor, _ = build_backbone(name, "imagenet")
    state = load_file(str(file))
    size = 96
    logits = nn.functional.linear(_features(extractor, size), state["classifier.weight"], state["classifier.bias"])
    with torch.no_grad():
        assert torch.allclose(logits, full(_images(2, size, seed=1)), atol=1e-5)


@pytest.mark.shared
def test_real_weights_of_another_architecture_are_refused():
    file = _shared("mobilenet_v2.in1k_dequantized.safetensors")
    with pytest.raises(CxrError, match=re.escape(f"{file} does not fit resnet18")):
        build_backbone("resnet18", file)
