"""The training sampler: a seeded shuffle (or class-balanced oversampling), sharded across processes.

The order of every epoch is a pure function of ``(seed, epoch)``, so a resumed run sees exactly the batches an
uninterrupted one would have seen. :class:`WithSeeds` pairs each index with a seed for its random transforms,
drawn from the same ``(seed, epoch)``: augmentation then depends neither on which DataLoader worker reads an image
nor on how long the workers have been running, so it too is the same after resuming, with any number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def oversampling_weights(targets: np.ndarray) -> np.ndarray:
    """Per-sample weights that make every class equally likely (single-label tasks)."""
    counts = np.bincount(targets)
    return 1.0 / counts[targets]


class EpochSampler(Sampler[int]):
    """Shuffle (or draw with ``weights``, with replacement) and keep every ``world_size``-th index from ``rank``."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, weights: np.ndarray | None = None):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0
        self.per_rank = -(-n // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draw(self) -> tuple[list[int], list[int]]:
        """This process's indices of the epoch and a seed for each (distinct per draw, so an image drawn twice by
        oversampling is augmented twice differently)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        else:
            order = torch.randperm(self.n, generator=generator)
        seeds = torch.randint(0, 2**62, (self.n,), generator=generator)  # drawn after the order: it is unchanged
        pad = self.per_rank * self.world_size - self.n
        indices, item_seeds = order.tolist(), seeds.tolist()
        indices, item_seeds = indices + indices[:pad], item_seeds + item_seeds[:pad]
        return indices[self.rank :: self.world_size], item_seeds[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.draw()[0])

    def __len__(self) -> int:
        return self.per_rank


class WithSeeds(Sampler[tuple[int, int]]):
    """The indices of ``sampler`` paired with their seeds, ``(index, seed)``, as keys of an
    :class:`~cxrkit.data.dataset.ImageDataset`; ``sampler.set_epoch`` moves both on."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(*self.sampler.draw())

    def __len__(self) -> int:
        return len(self.sampler)
