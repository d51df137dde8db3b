import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from cxrkit.data.transforms import Augment, Preprocessing, build_transform, denormalize
from cxrkit.errors import CxrError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pre(**kw):
    return Preprocessing(size=kw.pop("size", 32), mean=MEAN, std=STD, **kw)


def test_grayscale_becomes_a_normalised_3_channel_tensor():
    out = build_transform(_pre())(Image.new("L", (50, 40), 255))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out[:, 5, 5], expected)
    rgb = build_transform(_pre())(Image.new("RGB", (50, 40), (255, 255, 255)))
    torch.testing.assert_close(rgb, out)


def _left_stripe(width=80, height=40):
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, :10] = 255  # content at the left edge
    return Image.fromarray(pixels)


def test_squash_keeps_the_whole_image_and_crop_cuts_the_sides():
    squashed = denormalize(build_transform(_pre(resize="squash"))(_left_stripe()), _pre())
    cropped = denormalize(build_transform(_pre(resize="crop", crop_pct=1.0))(_left_stripe()), _pre())
    assert squashed[0, :, 0].min() > 0.9  # the stripe survives at the left edge
    assert cropped[0].max() < 0.05  # centre crop of a 2:1 image drops the left quarter


def test_crop_pct_resizes_shorter_side_to_size_over_crop_pct():
    steps = build_transform(_pre(size=224, resize="crop", crop_pct=0.875)).transforms
    resize = next(t for t in steps if isinstance(t, v2.Resize))
    assert resize.size == [256]


def test_no_augmentation_is_deterministic_and_never_flips_by_default():
    image = _left_stripe(40, 40)
    plain = build_transform(_pre())
    for policy in ("none", "light", "strong"):
        steps = build_transform(_pre(), Augment(policy=policy)).transforms
        assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in steps)
    torch.testing.assert_close(build_transform(_pre(), Augment("none"))(image), plain(image))


def test_hflip_only_when_asked():
    torch.manual_seed(0)
    transform = build_transform(_pre(), Augment(policy="none", hflip=True))
    outs = [denormalize(transform(_left_stripe(40, 40)), _pre()) for _ in range(20)]
    left = sum(bool(o[0, :, 0].min() > 0.9) for o in outs)
    assert 0 < left < 20


@pytest.mark.parametrize("policy", ["light", "strong"])
def test_augment_policies_vary_the_image_but_keep_the_shape(policy):
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8))
    transform = build_transform(_pre(), Augment(policy=policy))
    a, b = transform(image), transform(image)
    assert a.shape == b.shape == (3, 32, 32)
    assert not torch.equal(a, b)
    steps = transform.transforms
    assert any(isinstance(t, v2.RandomResizedCrop) for t in steps) == (policy == "strong")


def test_round_trip_dicts():
    pre = _pre(size=240, interpolation="bicubic", resize="crop", crop_pct=0.9)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    assert pre.to_dict()["mean"] == list(MEAN)
    aug = Augment(policy="light", scale=[0.8, 1.2])
    assert Augment.from_dict(aug.to_dict()) == aug and aug.scale == (0.8, 1.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "size must be a positive integer"),
        ({"resize": "pad"}, "resize must be one of"),
        ({"interpolation": "lanczos"}, "interpolation must be one of"),
        ({"crop_pct": 1.5}, "crop_pct"),
    ],
)
def test_invalid_preprocessing(kwargs, message):
    with pytest.raises(CxrError, match=message):
        _pre(**kwargs)


def test_invalid_augment_and_unknown_keys():
    with pytest.raises(CxrError, match="policy must be one of"):
        Augment(policy="heavy")
    with pytest.raises(CxrError, match=r"unknown keys \['colour'\]"):
        Augment.from_dict({"policy": "light", "colour": 1})
    with pytest.raises(CxrError, match="unknown keys"):
        Preprocessing.from_dict({"size": 8, "mean": MEAN, "std": STD, "scale": 2})


def test_denormalize_inverts_the_normalisation():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8))
    back = denormalize(build_transform(_pre())(image), _pre())
    np.testing.assert_allclose(back[0].numpy() * 255, np.asarray(image), atol=1e-3)
