"""Grad-CAM must point at the evidence: models trained (by ``cxr train``) to detect a bright patch at a random cell
of the image put the heatmap's peak inside that patch, and removing the heatmap's top region costs more probability
than removing a random region of the same size."""

from pathlib import Path

import numpy as np
import pytest
from synth import patch_folder
from typer.testing import CliRunner

from cxrkit.cli.main import app
from cxrkit.eval.evaluate import select_data
from cxrkit.explain.api import ExplainOptions, explain_batch
from cxrkit.explain.gradcam import Explainer
from cxrkit.serve.predictor import Predictor

RECIPE = """
name: patch-{backbone}
seed: 0
data: {{root: {root}, task: auto, split: {{ratios: [0.6, 0.1, 0.3], seed: 0, group_by_patient: true}}}}
model: {{backbone: {backbone}, weights: none, image_size: 128}}
stages:
  - {{name: all, trainable: all, epochs: {epochs}, optimizer: adam, lr: {lr}}}
runtime: {{batch_size: 16, workers: 0, precision: fp32}}
"""


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    return root, patch_folder(root, per_class=60)


# AlexNet's CAM layer is an in-place ReLU, ResNet-18's a residual stage: two different hook situations.
@pytest.mark.parametrize(("backbone", "epochs", "lr"), [("resnet18", 3, "1.0e-3"), ("alexnet", 4, "1.0e-4")])
def test_gradcam_peak_lies_inside_the_patch(patches, tmp_path, backbone, epochs, lr):
    root, boxes = patches
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(backbone=backbone, root=root, epochs=epochs, lr=lr))
    result = CliRunner().invoke(app, ["train", str(recipe), "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    predictor = Predictor(Path(result.stdout.strip().splitlines()[-1]))
    test, *_ = select_data(predictor, None, "test")
    positives = [i for i, item in enumerate(test.items) if item.source in boxes]
    assert len(positives) >= 10
    images = [test.read(i) for i in positives]
    with Explainer(predictor.model, predictor.task, "gradcam") as explainer:
        probs, maps = explain_batch(explainer, predictor, images, ExplainOptions(batch_size=16),
                                    [[1]] * len(images))
    assert np.mean(probs[:, 1] > 0.5) >= 0.9, "the model did not learn to detect the patch"
    inside = []
    for i, (m,) in zip(positives, maps):
        y, x = np.unravel_index(np.argmax(m.heatmap), m.heatmap.shape)
        left, top, right, bottom = boxes[test.items[i].source]
        inside.append(left <= x < right and top <= y < bottom)
    assert np.mean(inside) >= 0.8, f"peak inside the patch for only {np.mean(inside):.0%} of {len(inside)} images"
    verdicts = [m.check["verdict"] for (m,) in maps]
    assert verdicts.count("meaningful") >= 0.7 * len(verdicts), verdicts
    assert np.mean([m.check["drop_heatmap"] for (m,) in maps]) > np.mean([m.check["drop_random"] for (m,) in maps])
