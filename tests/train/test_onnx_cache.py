"""ONNX Runtime as the engine of feature caching: when it is chosen, that it caches what PyTorch caches, and that
a failed export or a mismatch falls back to PyTorch."""

import pytest
import torch
from torch.utils.data import DataLoader

from cxrkit.errors import CxrError
from cxrkit.models.classifier import build_classifier
from cxrkit.train import onnx_cache
from cxrkit.train.features import extract_features
from cxrkit.train.onnx_cache import MIN_IMAGES, OnnxFrozen, choose_engine
from cxrkit.train.prefix import find_boundary
from cxrkit.train.runtime import Runtime, setup_runtime

SIZE = 64


class Images(torch.utils.data.Dataset):
    def __init__(self, n=12):
        self.x = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "target": torch.tensor(i % 3)}


def _runtime(device="cpu", amp=None):
    return Runtime(torch.device(device), amp, channels_last=True)


def test_auto_uses_onnx_runtime_only_for_fp32_on_the_cpu_and_enough_images(monkeypatch):
    assert choose_engine("auto", _runtime(), MIN_IMAGES)[0] == "onnx"
    assert choose_engine("auto", _runtime(), MIN_IMAGES - 1)[0] == "torch"
    engine, why = choose_engine("auto", _runtime(amp=torch.bfloat16), 10 * MIN_IMAGES)
    assert engine == "torch" and "bf16" in why
    assert choose_engine("auto", _runtime("cuda"), 10 * MIN_IMAGES)[0] == "torch"
    assert choose_engine("torch", _runtime(), 10 * MIN_IMAGES)[0] == "torch"
    assert choose_engine("onnx", _runtime(), 1)[0] == "onnx"
    with pytest.raises(CxrError, match="computes in fp32, but runtime.precision is bf16"):
        choose_engine("onnx", _runtime(amp=torch.bfloat16), 1)  # its features would be filed as bf16 ones
    with pytest.raises(CxrError, match="runs on the CPU"):
        choose_engine("onnx", _runtime("cuda"), 1)
    monkeypatch.setattr(onnx_cache, "onnx_available", lambda: False)
    assert choose_engine("auto", _runtime(), 10 * MIN_IMAGES) == ("torch", "onnxruntime is not installed")
    with pytest.raises(CxrError, match="pip install"):
        choose_engine("onnx", _runtime(), 1)


@pytest.fixture(scope="module")
def model():
    runtime = setup_runtime("cpu", "fp32", workers=0)
    return runtime.prepare_model(build_classifier("resnet18", 3, weights="none")).eval()


@pytest.mark.parametrize("where", ["backbone", "boundary"])
def test_onnx_runtime_caches_what_pytorch_caches(model, where):
    runtime = setup_runtime("cpu", "fp32", workers=0)
    if where == "boundary":
        probe = runtime.to_device(Images(4).x)
        boundary = find_boundary(model, "backbone.layer4.1.conv2", probe).boundary
        net = model
    else:
        boundary, net = None, model.backbone
    loader = DataLoader(Images(), batch_size=5)  # a short last batch: the batch dimension is dynamic
    expected = extract_features(net, loader, runtime, boundary=boundary)
    notes = []
    engine = OnnxFrozen(net, boundary, SIZE, notes.append)
    got = extract_features(net, loader, runtime, boundary=boundary, engine=engine)
    assert engine.session is not None and not engine.failed and notes == []
    assert got.features.shape == expected.features.shape
    assert torch.allclose(got.features, expected.features, atol=1e-4 * float(expected.features.abs().max()))
    assert not torch.equal(got.features, expected.features)  # it was ONNX Runtime's own computation
    assert torch.equal(got.targets, expected.targets)


class DataDependent(torch.nn.Module):
    """Python control flow on tensor values: torch.export cannot trace it."""

    def forward(self, x):
        return x.mean((2, 3)) if float(x.sum()) > 0 else -x.mean((2, 3))


def test_a_failed_export_falls_back_to_pytorch_with_a_note():
    runtime = setup_runtime("cpu", "fp32", workers=0)
    loader = DataLoader(Images(), batch_size=5)
    notes = []
    engine = OnnxFrozen(DataDependent(), None, SIZE, notes.append)
    got = extract_features(DataDependent(), loader, runtime, engine=engine)
    assert engine.failed and len(notes) == 1 and "cannot be exported to ONNX" in notes[0]
    assert torch.equal(got.features, extract_features(DataDependent(), loader, runtime).features)


def test_a_mismatch_on_the_first_batch_falls_back_to_pytorch(model, monkeypatch):
    monkeypatch.setattr(onnx_cache, "TOLERANCE", -1.0)  # any difference at all counts as a mismatch
    runtime = setup_runtime("cpu", "fp32", workers=0)
    loader = DataLoader(Images(), batch_size=5)
    notes = []
    engine = OnnxFrozen(model.backbone, None, SIZE, notes.append)
    got = extract_features(model.backbone, loader, runtime, engine=engine)
    assert engine.failed and "differs from PyTorch" in notes[0]
    assert torch.equal(got.features, extract_features(model.backbone, loader, runtime).features)
    assert engine(Images(2).x) is None  # and it stays off
