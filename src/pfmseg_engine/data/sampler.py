"""A shuffling sampler whose order depends only on (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Shuffle ``length`` indices with a generator seeded by (seed, epoch).

    A DataLoader's default shuffling consumes the global RNG, so an interrupted and resumed run would
    see a different order. Here epoch ``e`` always yields the same permutation, which makes resuming
    reproduce the uninterrupted run.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True):
        self.length, self.seed, self.shuffle, self.epoch = int(length), int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.length))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())
