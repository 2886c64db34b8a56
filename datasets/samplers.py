"""``--cache_mode`` sharding: each process caches and samples only its share of the images.

Without sharding, every process of a node would cache every image (8 x 19 GB for COCO train on an 8-GPU
node). As in Deformable DETR's reference, image ``i`` belongs to the local rank ``i % local_size`` of every
node, which caches it; the nodes then split each local rank's share between them. So a node caches the
dataset once, and an epoch still shows every image once (a few repeated to even out the shares).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler

from util.errors import InputError


def in_cache_share(index: int, local_rank: int, local_size: int) -> bool:
    """Whether the process of ``local_rank`` (of ``local_size`` per node) caches the image at ``index``."""
    return index % local_size == local_rank


class NodeShareSampler(Sampler[int]):
    """Indices of a ``dataset_size``-image dataset for process ``rank`` of ``world_size`` (``local_size`` per
    node), drawn from its cache share only (:func:`in_cache_share`).

    The epoch's order is ``torch.randperm`` seeded with ``seed + epoch`` (``shuffle``) or the identity, as
    DistributedSampler's: with one process the two give the same order. Every process gets
    ``ceil(dataset_size / world_size)`` indices; a share shorter than that is padded with its own first indices.
    Same interface as DistributedSampler (``set_epoch``, ``len``) for ``datasets.resumable.EpochBatchSampler``.
    """

    def __init__(self, dataset_size: int, *, world_size: int, rank: int, local_size: int, shuffle: bool = True,
                 seed: int = 0):
        if world_size % local_size:
            raise ValueError(f"world size {world_size} is not a multiple of the processes per node {local_size}")
        if dataset_size < local_size:
            raise InputError(f"--cache_mode: the dataset has {dataset_size} images, fewer than the {local_size} "
                             "processes per node that share them: drop --cache_mode")
        self.dataset_size = dataset_size
        self.local_size = local_size
        self.local_rank = rank % local_size
        self.num_nodes = world_size // local_size
        self.node = rank // local_size
        self.num_samples = math.ceil(dataset_size / world_size)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        share = [i for i in order if in_cache_share(i, self.local_rank, self.local_size)]
        needed = self.num_samples * self.num_nodes
        if share:
            share = (share * math.ceil(needed / len(share)))[:needed]
        return iter(share[self.node::self.num_nodes])

    def __len__(self) -> int:
        return self.num_samples
