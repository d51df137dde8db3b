import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from cxrkit.errors import CxrError
from cxrkit.models.backbones import BACKBONES, block_names
from cxrkit.models.classifier import build_classifier
from cxrkit.models.freeze import apply_trainable, layer_names, set_train_mode


@pytest.fixture(scope="module")
def mobilenet():
    return build_classifier("mobilenet_v2", 3, weights="none")


def test_study1_top14_layers_match_the_paper(mobilenet):
    # Study 1 unfreezes the top 14 Keras layers of MobileNetV2: 1,043,843 trainable of 2,261,827 parameters
    # (Keras counts BatchNorm moving statistics as non-trainable parameters).
    plan = apply_trainable(mobilenet, "top:14")
    assert plan.trainable_params == 1_043_843
    assert plan.total_params + plan.bn_statistics == 2_261_827


def test_head_all_and_named_cut(mobilenet):
    blocks = block_names(mobilenet.backbone, BACKBONES.get("mobilenet_v2"))
    assert apply_trainable(mobilenet, "head").trainable_params == 1280 * 3 + 3
    assert apply_trainable(mobilenet, "all").trainable_params == apply_trainable(mobilenet, "all").total_params
    by_name = apply_trainable(mobilenet, f"from:{blocks[-2]}")
    by_blocks = apply_trainable(mobilenet, "top:2:blocks")
    assert by_name.trainable_params == by_blocks.trainable_params
    assert 1280 * 3 < by_name.trainable_params < by_name.total_params


def test_top_n_past_the_bottom_of_the_backbone_says_that_all_of_it_trains(mobilenet):
    """``top:500`` on a backbone of fewer layers trains everything, ``top:0`` nothing but the head; the stage line
    says so instead of leaving it to the parameter count."""
    layers, blocks = len(layer_names(mobilenet.backbone)), len(block_names(mobilenet.backbone,
                                                                           BACKBONES.get("mobilenet_v2")))
    over = apply_trainable(mobilenet, f"top:{layers + 1}")
    assert over.trainable_params == over.total_params
    assert over.describe().endswith(f"; the backbone has {layers} layers, so all of it trains")
    assert apply_trainable(mobilenet, f"top:{blocks}:blocks").note == f"the backbone has {blocks} blocks, so all of " \
                                                                      "it trains"
    assert apply_trainable(mobilenet, "top:0").note == "no backbone layer trains, only the head"
    assert apply_trainable(mobilenet, f"top:{layers - 1}").note == ""
    assert apply_trainable(mobilenet, "all").note == "" and apply_trainable(mobilenet, "head").note == ""


def test_unknown_cut_layer_is_a_clear_error(mobilenet):
    with pytest.raises(CxrError, match="no layer named 'features.99'"):
        apply_trainable(mobilenet, "from:features.99")


def test_frozen_batchnorm_statistics_do_not_move(mobilenet):
    apply_trainable(mobilenet, "top:3:blocks")
    set_train_mode(mobilenet)
    frozen_bn = [m for m in mobilenet._frozen_modules if isinstance(m, _BatchNorm)]
    trainable_bn = [m for n, m in mobilenet.backbone.named_modules()
                    if isinstance(m, _BatchNorm) and m not in frozen_bn]
    assert frozen_bn and trainable_bn
    assert all(not m.training for m in frozen_bn) and all(m.training for m in trainable_bn)
    before = frozen_bn[0].running_mean.clone()
    optimizer = torch.optim.SGD([p for p in mobilenet.parameters() if p.requires_grad], lr=0.1)
    loss = mobilenet(torch.randn(4, 3, 64, 64)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    assert torch.equal(before, frozen_bn[0].running_mean)
    assert not torch.equal(trainable_bn[-1].running_mean, torch.zeros_like(trainable_bn[-1].running_mean))


def test_layers_are_counted_like_keras(mobilenet):
    top = layer_names(mobilenet.backbone)[-3:]
    assert top == ["features.18.0", "features.18.1", "features.18.2"]  # Conv_1, Conv_1_bn, out_relu


def test_keras_style_fine_tuning_keeps_all_batchnorm_in_inference_mode(mobilenet):
    apply_trainable(mobilenet, "top:14")
    set_train_mode(mobilenet, freeze_batchnorm=True)
    norms = [m for m in mobilenet.backbone.modules() if isinstance(m, _BatchNorm)]
    assert all(not m.training for m in norms)
    trainable_norm = mobilenet.backbone.features[18][1]
    assert trainable_norm.weight.requires_grad  # scale and shift still learn
    before = trainable_norm.running_var.clone()
    mobilenet(torch.randn(4, 3, 64, 64)).sum().backward()
    assert torch.equal(before, trainable_norm.running_var)
