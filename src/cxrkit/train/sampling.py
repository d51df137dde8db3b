"""The training sampler: a seeded shuffle (or class-balanced oversampling), sharded across processes.

The order of every epoch is a pure function of ``(seed, epoch)``, so a resumed run sees exactly the batches an
uninterrupted one would have seen.
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

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        else:
            order = torch.randperm(self.n, generator=generator)
        order = order.tolist()
        order += order[: self.per_rank * self.world_size - self.n]
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        return self.per_rank
