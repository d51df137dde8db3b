"""The CAM wrapper: every backbone's default layer works, hooks never outlive the explainer (errors included),
memory does not grow over a loop, and targets, layers and the faithfulness check behave as documented."""

import gc

import numpy as np
import pytest
import torch
from PIL import Image

from cxrkit.data.transforms import Preprocessing, build_transform, input_box
from cxrkit.errors import CxrError
from cxrkit.explain.faithfulness import Faithfulness, _ranked, faithfulness, random_maps
from cxrkit.explain.gradcam import METHODS, Explainer, choose_targets, method_info
from cxrkit.explain.layers import capture_output, resolve_layer
from cxrkit.models.backbones import BACKBONES
from cxrkit.models.classifier import build_classifier


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_classifier("resnet18", 3, weights="none").eval()


@pytest.mark.parametrize("name", BACKBONES.list())
def test_every_backbone_explains_at_its_default_layer(name):
    spec = BACKBONES.get(name)
    model = build_classifier(name, 2, weights="none").train()
    size = max(spec.min_size, 64)
    x = torch.randn(2, 3, size, size)
    with Explainer(model, "binary") as explainer:
        assert explainer.layer_name == f"backbone.{spec.cam_layer}"
        assert explainer.hooks_open > 0
        maps = explainer.heatmaps(x, [0, 1])
    assert maps.shape == (2, size, size) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert _hooks(model) == 0
    assert all(p.requires_grad for p in model.parameters()) and model.training  # restored
    assert all(p.grad is None for p in model.parameters())  # gradients went to the input, not the weights


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_gives_a_map(tiny, method):
    x = torch.randn(1, 3, 64, 64)
    if method == "scorecam":
        pytest.importorskip("pytorch_grad_cam")
    with Explainer(tiny, "multiclass", method=method, score_batch_size=128) as explainer:
        maps = explainer.heatmaps(x, [2])
    assert maps.shape == (1, 64, 64) and np.isfinite(maps).all() and maps.max() > 0
    assert _hooks(tiny) == 0


def test_hooks_are_released_when_the_block_raises_and_the_error_propagates(tiny):
    # pytorch-grad-cam's own __exit__ swallows IndexError; ours must not
    with pytest.raises(IndexError), Explainer(tiny, "multiclass") as explainer:
        explainer.heatmaps(torch.randn(1, 3, 64, 64), [0])
        raise IndexError("boom")
    assert _hooks(tiny) == 0
    with pytest.raises(RuntimeError), Explainer(tiny, "multiclass") as explainer:
        explainer.heatmaps(torch.randn(1, 2, 64, 64), [0])  # wrong channel count fails inside the model
    assert _hooks(tiny) == 0


def test_memory_does_not_grow_over_a_loop(tiny):
    def live_tensors() -> int:
        gc.collect()
        return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())

    x = torch.randn(2, 3, 64, 64)
    with Explainer(tiny, "multiclass") as explainer:
        for _ in range(3):
            explainer.heatmaps(x, [0, 1])
        before = live_tensors()
        for _ in range(25):
            explainer.heatmaps(x, [0, 1])
        after = live_tensors()
        assert explainer._cam.outputs is None  # the retained autograd graph is dropped after every call
        assert not explainer._cam.activations_and_grads.activations
    assert after <= before + 2, (before, after)


def test_a_named_layer_and_clear_errors_for_bad_ones(tiny):
    assert resolve_layer(tiny, "layer3")[0] == "backbone.layer3"
    assert resolve_layer(tiny, "backbone.layer3")[0] == "backbone.layer3"
    with pytest.raises(CxrError, match="did you mean backbone.layer3"):
        resolve_layer(tiny, "layr3")
    with Explainer(tiny, "multiclass", layer="layer3") as explainer:
        assert explainer.heatmaps(torch.randn(1, 3, 64, 64), [0]).shape == (1, 64, 64)
        assert explainer.grid_shape == (4, 4)  # stride 16 at 64 px
    with pytest.raises(CxrError, match="no 2-D feature map"), Explainer(tiny, "multiclass", layer="head.0") as ex:
        ex.heatmaps(torch.randn(1, 3, 64, 64), [0])
    assert _hooks(tiny) == 0
    with pytest.raises(CxrError, match="unknown CAM method"):
        method_info("gradkam")
    assert method_info("GradCAM++")[0] == "GradCAMPlusPlus"


def test_capture_output_removes_its_hook(tiny):
    _, layer = resolve_layer(tiny, "layer4")
    with pytest.raises(ZeroDivisionError), capture_output(layer) as outputs:
        tiny(torch.randn(1, 3, 64, 64))
        assert outputs[0].shape == (1, 512, 2, 2)
        1 / 0  # noqa: B018
    assert _hooks(tiny) == 0


def test_choose_targets():
    labels = ["NORMAL", "PNEUMONIA"]
    probs = np.array([[0.3, 0.7], [0.8, 0.2]])
    assert choose_targets("binary", labels, probs, threshold=0.6) == [[1], [0]]
    assert choose_targets("binary", labels, probs, threshold=0.75) == [[0], [0]]
    assert choose_targets("binary", labels, probs, None, ["PNEUMONIA"]) == [[1], [1]]
    assert choose_targets("multiclass", ["a", "b", "c"], np.array([[0.2, 0.5, 0.3]]), None) == [[1]]
    multi = np.array([[0.9, 0.1, 0.7], [0.1, 0.2, 0.3]])
    assert choose_targets("multilabel", ["a", "b", "c"], multi, 0.5) == [[0, 2], [2]]  # none over: the top one
    assert choose_targets("multilabel", ["a", "b", "c"], multi, 0.5, ["all"]) == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(CxrError, match="unknown target"):
        choose_targets("binary", labels, probs, 0.5, ["COVID"])


def test_ranked_removes_exactly_the_share_asked_even_for_flat_maps():
    rng = np.random.default_rng(0)
    flat = np.zeros((2, 20, 20), dtype=np.float32)
    flat[0, :2, :2] = 1.0  # 1% non-zero, 99% ties at zero
    ranks = _ranked(flat, rng)
    kept = ranks < np.percentile(ranks, 80, axis=(1, 2), keepdims=True)
    assert np.allclose(kept.mean(axis=(1, 2)), 0.8, atol=0.01)
    assert (ranks[0, :2, :2] > 0.98).all()  # the hot pixels are removed first
    maps = random_maps(3, (4, 4), (32, 48), rng)
    assert maps.shape == (3, 32, 48) and 0 <= maps.min() and maps.max() <= 1


def test_verdicts():
    assert Faithfulness(0.40, 0.05, 20).verdict == "meaningful"
    assert Faithfulness(0.004, 0.001, 20).verdict == "inconclusive"
    assert Faithfulness(0.05, 0.30, 20).verdict == "no better than random"
    # a class at p = 0.01 that random regions raise to 0.12: removing the map's region raised it too (0.03), so
    # nothing shows that the model rests on it, though the difference is 0.09
    assert Faithfulness(-0.02, -0.11, 20).verdict == "inconclusive"
    assert Faithfulness(0.006, -0.007, 20).verdict == "inconclusive"
    assert Faithfulness(0.40, 0.05, 20).to_dict()["score"] == pytest.approx(0.35)


def test_faithfulness_is_repeatable_and_leaves_the_global_generator_alone(tiny):
    x = torch.randn(2, 3, 64, 64)
    maps = np.random.default_rng(1).random((2, 64, 64)).astype(np.float32)
    state = torch.random.get_rng_state()
    first = faithfulness(tiny, x, maps, [0, 1], "multiclass", grid=(2, 2), seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = faithfulness(tiny, x, maps, [0, 1], "multiclass", grid=(2, 2), seed=3)
    assert [f.to_dict() for f in first] == [f.to_dict() for f in again]


def test_an_images_check_does_not_depend_on_the_images_explained_with_it(tiny):
    """The check of one image gave another verdict alone than beside another image, with another --batch-size,
    or in a resumed run: its random regions came from one generator seeded per batch."""
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = np.random.default_rng(1).random((3, 64, 64)).astype(np.float32)
    together = faithfulness(tiny, x, maps, [0, 1, 1], "multiclass", grid=(2, 2), seed=3)
    alone = [faithfulness(tiny, x[i : i + 1], maps[i : i + 1], [c], "multiclass", grid=(2, 2), seed=3)[0]
             for i, c in ((2, 1), (0, 0), (1, 1))]
    reordered = faithfulness(tiny, x[[2, 0, 1]], maps[[2, 0, 1]], [1, 0, 1], "multiclass", grid=(2, 2), seed=3)
    for mine, others in ((together[2], (alone[0], reordered[0])), (together[0], (alone[1], reordered[1]))):
        for other in others:
            assert other.drop_random == pytest.approx(mine.drop_random, abs=1e-6)
            assert other.drop_heatmap == pytest.approx(mine.drop_heatmap, abs=1e-6)
    assert faithfulness(tiny, x[:1], maps[:1], [0], "multiclass", grid=(2, 2), seed=4)[0].drop_random != \
        together[0].drop_random  # the seed still matters


@pytest.mark.parametrize(("width", "height"), [(300, 200), (180, 260)])
def test_input_box_matches_the_crop_the_transform_takes(width, height):
    pre = Preprocessing(size=64, mean=(0, 0, 0), std=(1, 1, 1), resize="crop", crop_pct=0.875)
    left, top, right, bottom = input_box(pre, width, height)
    marker = np.zeros((height, width), np.uint8)
    marker[round(top) + 2 : round(bottom) - 2, round(left) + 2 : round(right) - 2] = 255
    x = build_transform(pre)(Image.fromarray(marker))[0]
    assert x[3:-3, 3:-3].min() > 0.99  # the box fills the whole model input...
    outside = np.zeros_like(marker)
    outside[:, : max(0, round(left) - 2)] = 255
    outside[:, round(right) + 2 :] = 255
    assert build_transform(pre)(Image.fromarray(outside))[0].max() < 0.01  # ...and nothing outside it shows
    squash = Preprocessing(size=64, mean=(0, 0, 0), std=(1, 1, 1))
    assert input_box(squash, width, height) == (0, 0, width, height)


def test_the_heatmap_covers_exactly_the_image_it_was_computed_over():
    """The image was drawn centred on pixel indices (-0.5 ... W-0.5) and the map on the box's edges (0 ... W), so
    the map sat half a pixel right of and below the image (a quarter of a 1x1 image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxrkit.explain.plots import Explained, _draw

    for size in ((1, 1), (6, 3)):
        image = Image.new("L", size, 128)
        item = Explained(image, np.random.default_rng(0).random((4, 4)), (0.0, 0.0, *map(float, size)), "PNEUMONIA",
                         0.9, "PNEUMONIA", "x.png", None)
        figure, ax = plt.subplots()
        _draw(ax, item, 0.5, 512)
        drawn, heat = (tuple(shown.get_extent()) for shown in ax.images)
        assert drawn == heat == (0, size[0], size[1], 0)
        assert tuple(ax.get_xlim()) == (0, size[0]) and tuple(ax.get_ylim()) == (size[1], 0)
        plt.close(figure)
