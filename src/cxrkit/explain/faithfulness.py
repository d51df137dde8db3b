"""Is a heatmap meaningful? Remove what it points at and see whether the model notices.

The check uses the ``grad-cam`` package's ROAD metric (Rong et al. 2022, "A Consistent and Efficient Evaluation
Strategy for Attribution Methods", arXiv:2202.00449): the top ``percent`` % of pixels by heatmap value are replaced
by noisy linear imputation from their neighbours, and the drop in the class probability is measured. The same is
done for random regions of the same size, drawn as random maps at the layer's own grid resolution and upsampled
like the heatmap, so they are blobs of the same kind rather than scattered pixels (which imputation fills in almost
perfectly). A heatmap that explains the prediction makes the probability drop more than a random region does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cxrkit.explain.gradcam import ProbabilityTarget

MARGIN = 0.01  # probability differences below this are treated as no change
VERDICTS = "heatmap drop and its excess over random, each at least MARGIN"
"""The rule of :attr:`Faithfulness.verdict`, kept with explained images so that a change of rule redoes them."""
SEEDING = "per image and class, from its values"
"""How the check's random regions are seeded (:func:`faithfulness`), kept with explained images likewise: they were
seeded per batch before 2026-12-02."""


@dataclass(frozen=True)
class Faithfulness:
    """Probability drops for one image.

    Attributes:
        drop_heatmap: probability before minus after removing the heatmap's top ``percent`` % of pixels.
        drop_random: the same for random regions of the same size (mean over the random maps).
        percent: share of pixels removed.
    """

    drop_heatmap: float
    drop_random: float
    percent: float

    @property
    def score(self) -> float:
        """``drop_heatmap - drop_random``: above 0 when the heatmap points at what the model uses."""
        return self.drop_heatmap - self.drop_random

    @property
    def verdict(self) -> str:
        """``meaningful`` (removing the heatmap's region lowers the probability by at least :data:`MARGIN`, and by
        at least that much more than a random region does), ``inconclusive`` (removing the heatmap's region does not
        lower the probability by :data:`MARGIN` while it does better than random regions: neither removal moves the
        probability, as when a prediction is saturated near 0 or 1, or random regions raise it, as for a class the
        model gives a low probability) or ``no better than random``."""
        if self.score >= MARGIN:
            return "meaningful" if self.drop_heatmap >= MARGIN else "inconclusive"
        if max(abs(self.drop_heatmap), abs(self.drop_random)) < MARGIN:
            return "inconclusive"
        return "no better than random"

    def to_dict(self) -> dict[str, float | str]:
        return {"drop_heatmap": round(self.drop_heatmap, 6), "drop_random": round(self.drop_random, 6),
                "score": round(self.score, 6), "verdict": self.verdict, "percent_removed": self.percent}


def _ranked(maps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Maps turned into per-image ranks in [0, 1], ties broken at random, so a percentile cut removes exactly
    that share of pixels even where a heatmap is flat (Grad-CAM maps are often 0 over most of the image)."""
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    jitter = rng.random(flat.shape) * 1e-9
    order = np.argsort(np.argsort(flat + jitter, axis=1), axis=1)
    return (order / max(flat.shape[1] - 1, 1)).reshape(maps.shape).astype(np.float32)


def random_maps(n: int, grid: tuple[int, int], size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``n`` random maps drawn on ``grid`` and upsampled bilinearly to ``size`` (height, width), like a CAM."""
    import cv2

    return np.stack([cv2.resize(rng.random(grid).astype(np.float32), (size[1], size[0]),
                                interpolation=cv2.INTER_LINEAR) for _ in range(n)])


def faithfulness(model: nn.Module, images: torch.Tensor, heatmaps: np.ndarray, classes: Sequence[int], task: str,
                 temperature: float = 1.0, percent: float = 20.0, n_random: int = 3,
                 grid: tuple[int, int] = (7, 7), seed: int = 0) -> list[Faithfulness]:
    """Probability drops when the heatmaps' top ``percent`` % is removed vs random regions of the same size.

    Args:
        model: the classifier the heatmaps explain (evaluation mode).
        images: the normalised inputs ``[B, 3, H, W]``.
        heatmaps: ``[B, H, W]`` maps of the same images.
        classes: the class index each map explains.
        task: the run's task (softmax or sigmoid probabilities).
        temperature: the run's temperature.
        percent: share of pixels removed, in (0, 100).
        n_random: random regions per image.
        grid: resolution of the random maps (the target layer's feature-map size).
        seed: seeds the random regions and the imputation noise, so results repeat.
    """
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst

    if not 0 < percent < 100:
        raise ValueError(f"percent must be in (0, 100), got {percent}")
    # ROADMostRelevantFirst keeps the pixels under the given percentile of the map and imputes the rest
    metric = ROADMostRelevantFirst(percentile=100 - percent)
    size = tuple(images.shape[-2:])
    results = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's generator is left untouched
        for i, c in enumerate(classes):  # one image at a time, with its own seed: its result is the same in any batch
            image, target = images[i : i + 1], [ProbabilityTarget(int(c), task, temperature)]
            own = _image_seed(seed, image, int(c))
            rng = np.random.default_rng(own)
            torch.manual_seed(own)  # the imputer's noise
            before = float(target[0](model(image)[0]).cpu())
            after_heat = metric(image, _ranked(heatmaps[i : i + 1], rng), target, model, return_diff=False)
            after_random = [metric(image, _ranked(random_maps(1, grid, size, rng), rng), target, model,
                                   return_diff=False) for _ in range(n_random)]
            results.append(Faithfulness(before - float(np.asarray(after_heat, dtype=np.float64)[0]),
                                        before - float(np.mean(np.asarray(after_random, dtype=np.float64))),
                                        percent))
    return results


def _image_seed(seed: int, image: torch.Tensor, target: int) -> int:
    """The check's seed for one image and class: from ``seed`` and the image's values, so that an image gets the
    same random regions whatever else is explained with it, in whatever order, and in a resumed run."""
    digest = hashlib.sha256(f"{seed}:{target}:".encode() + image.detach().float().cpu().numpy().tobytes())
    return int.from_bytes(digest.digest()[:7], "little")


__all__ = ["SEEDING", "VERDICTS", "Faithfulness", "faithfulness", "random_maps"]
