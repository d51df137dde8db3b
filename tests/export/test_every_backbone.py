"""Every registered backbone exports to ONNX, and ONNX Runtime gives PyTorch's fp32 outputs (tiny size)."""

import sys

import pytest

from cxrkit.export import max_difference
from cxrkit.export.onnx import OnnxModel, export_onnx, read_metadata
from cxrkit.models.backbones import BACKBONES
from cxrkit.models.classifier import build_classifier


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES.list())
def test_onnx_runtime_agrees_with_pytorch(name, tmp_path):
    spec = BACKBONES.get(name)
    model = build_classifier(name, 3, weights="none").eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx", spec.min_size, {"backbone": name})
    difference = max_difference(model, OnnxModel(path), spec.min_size, batch=3)  # a batch size the export did not see
    print(f"{name}: max |onnx - torch| = {difference:.2e}", file=sys.stderr)
    assert difference < 1e-4
    assert read_metadata(path) == {"backbone": name}
