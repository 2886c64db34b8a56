"""Training data that an epoch can restart from at any batch, for exact resumption of interrupted runs.

The order of epoch ``e`` depends only on ``(seed, e)`` (torch's DistributedSampler, also with one
process) and the augmentation of a sample only on ``(seed, e, index)``: :class:`SeededSamples` seeds
Python's ``random``, which every transform of :mod:`datasets.transforms` draws from, for each sample.
Neither depends on the DataLoader workers, on earlier epochs or on earlier batches, so a run resumed
at batch k loads batch k first and sees exactly the images of an uninterrupted run.
"""
from __future__ import annotations

import random
from typing import Any, Iterator

from torch.utils.data import Dataset, DistributedSampler, Sampler


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``batch_size`` indices of ``sampler`` (an incomplete last batch is dropped), each index as an
    ``(epoch, index)`` key for :class:`SeededSamples`, from batch ``start`` of the epoch set by
    :meth:`set_epoch` on."""

    def __init__(self, sampler: DistributedSampler, batch_size: int):
        self.sampler = sampler
        self.batch_size = batch_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Yield the batches of ``epoch`` from batch ``start`` on."""
        self.sampler.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def batches_per_epoch(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = list(self.sampler)
        for batch in range(self.start, self.batches_per_epoch()):
            yield [(self.epoch, i) for i in indices[batch * self.batch_size:(batch + 1) * self.batch_size]]

    def __len__(self) -> int:
        """The batches still to come in this epoch."""
        return max(0, self.batches_per_epoch() - self.start)


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(epoch, index)`` keys: ``dataset[index]`` with Python's ``random`` seeded from
    ``(seed, epoch, index)`` during the call; the caller's ``random`` stream is left as it was."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        state = random.getstate()
        random.seed(f"{self.seed}/{epoch}/{index}")  # a string seed is hashed: no collisions between keys
        try:
            return self.dataset[index]
        finally:
            random.setstate(state)
