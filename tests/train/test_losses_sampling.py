import numpy as np
import pytest
import torch

from cxrkit.errors import CxrError
from cxrkit.train.losses import MaskedBCEWithLogits, build_loss, class_weights_for
from cxrkit.train.sampling import EpochSampler, WithSeeds, oversampling_weights


def test_balanced_class_weights_follow_sklearn_formula():
    targets = np.array([0] * 25 + [1] * 75)
    weights = class_weights_for("binary", ["NORMAL", "PNEUMONIA"], targets, "balanced")
    assert weights == pytest.approx([100 / (2 * 25), 100 / (2 * 75)])


def test_explicit_class_weights_must_match_labels():
    assert class_weights_for("binary", ["a", "b"], np.array([0, 1]), [100, 1]) == [100.0, 1.0]
    with pytest.raises(CxrError, match="3 values"):
        class_weights_for("binary", ["a", "b"], np.array([0, 1]), [1, 2, 3])


def test_weighted_loss_penalises_the_heavy_class_more():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    wrong_on_class0 = torch.tensor([1, 1])
    heavy0 = build_loss("binary", [100.0, 1.0])(logits, torch.tensor([0, 1]))
    light0 = build_loss("binary", [1.0, 100.0])(logits, torch.tensor([0, 1]))
    assert torch.isfinite(heavy0) and torch.isfinite(light0)
    assert build_loss("binary", [100.0, 1.0])(logits, wrong_on_class0) > 0


def test_masked_bce_ignores_unknown_labels():
    loss = MaskedBCEWithLogits()
    logits = torch.tensor([[10.0, -3.0]])
    known_only = loss(logits[:, :1], torch.tensor([[1.0]]))
    with_unknown = loss(logits, torch.tensor([[1.0, float("nan")]]))
    assert torch.allclose(known_only, with_unknown)
    assert torch.isfinite(with_unknown)


def test_multilabel_balanced_weights_are_neg_over_pos():
    targets = np.array([[1, 0], [0, 0], [0, np.nan], [1, 1]], dtype=np.float32)
    assert class_weights_for("multilabel", ["a", "b"], targets, "balanced") == pytest.approx([1.0, 2.0])


def test_sampler_is_deterministic_per_epoch_and_shards_cover_everything():
    a, b = EpochSampler(10, seed=1), EpochSampler(10, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    shards = [EpochSampler(10, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [i for s in shards for i in s]
    assert sorted(seen) == list(range(10))


def test_item_seeds_follow_seed_and_epoch_and_leave_the_order_alone():
    """WithSeeds pairs the sampler's own order with seeds that depend on (seed, epoch) only, differ between the
    draws of an epoch, and are split across processes with their indices."""
    sampler = EpochSampler(10, seed=1)
    sampler.set_epoch(3)
    pairs = list(WithSeeds(sampler))
    assert [index for index, _ in pairs] == list(sampler) and len(WithSeeds(sampler)) == 10
    again = EpochSampler(10, seed=1)
    again.set_epoch(3)
    assert list(WithSeeds(again)) == pairs
    assert len({seed for _, seed in pairs}) == 10
    sampler.set_epoch(4)
    assert {seed for _, seed in WithSeeds(sampler)}.isdisjoint(seed for _, seed in pairs)
    shards = [EpochSampler(10, seed=1, rank=r, world_size=2) for r in range(2)]
    for shard in shards:
        shard.set_epoch(3)
    assert sorted(pair for shard in shards for pair in WithSeeds(shard)) == sorted(pairs)


def test_oversampling_balances_classes():
    targets = np.array([0] * 90 + [1] * 10)
    sampler = EpochSampler(100, seed=0, weights=oversampling_weights(targets))
    drawn = targets[np.array(list(sampler))]
    assert 0.3 < drawn.mean() < 0.7
