"""--cache_mode: each process caches only its share of the images and samples from it (issue #16, item 3).

Bugs caught: every process caching every image (8 x the memory on an 8-GPU node); a sampler that draws images a
process did not cache (silently read from disk) or that drops or doubles images in an epoch; a single-process
run whose order changes with --cache_mode.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import runner  # noqa: E402
from datasets import build_dataset, coco  # noqa: E402
from datasets.samplers import NodeShareSampler, in_cache_share  # noqa: E402
from tools.make_synthetic_coco import make_synthetic_coco  # noqa: E402
from util.errors import InputError  # noqa: E402
from util.process import DistContext  # noqa: E402


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache_share")
    make_synthetic_coco(root, num_train=10, num_val=4, seed=0, size=64)
    return root


def data_args(coco_root: Path, **overrides) -> SimpleNamespace:
    values = dict(dataset_file="coco", coco_path=str(coco_root), cache_mode=True, num_classes=None,
                  strict_data=False, scales=[64], max_size=96, val_size=64, batch_size=1, num_workers=0, seed=3)
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.mark.parametrize("local_size", [1, 2, 3])
def test_each_local_rank_caches_only_its_share_and_the_node_caches_all(coco_root, local_size):
    cached = []
    for local_rank in range(local_size):
        dataset = build_dataset("train", data_args(coco_root), cache_share=(local_rank, local_size))
        share = {image_id for index, image_id in enumerate(dataset.ids) if index % local_size == local_rank}
        assert set(dataset._cache) == share
        cached += list(dataset._cache)
    assert sorted(cached) == sorted(dataset.ids)  # once per node, no image twice


def test_images_outside_the_share_still_load_from_disk(coco_root):
    dataset = build_dataset("train", data_args(coco_root), cache_share=(1, 2))
    assert dataset.ids[0] not in dataset._cache
    image, target = dataset[0]
    assert image.shape[0] == 3 and int(target["image_id"]) == dataset.ids[0]


@pytest.mark.parametrize("world_size,local_size,dataset_size", [(4, 2, 12), (4, 2, 13), (6, 3, 20), (2, 2, 7),
                                                               (4, 4, 9)])
def test_an_epoch_draws_every_image_from_the_process_that_cached_it(world_size, local_size, dataset_size):
    samplers = [NodeShareSampler(dataset_size, world_size=world_size, rank=rank, local_size=local_size, seed=5)
                for rank in range(world_size)]
    for epoch in (0, 1):
        drawn = Counter()
        for rank, sampler in enumerate(samplers):
            sampler.set_epoch(epoch)
            indices = list(sampler)
            assert len(indices) == len(sampler) == -(-dataset_size // world_size)  # same step count everywhere
            assert all(in_cache_share(i, rank % local_size, local_size) for i in indices)
            drawn.update(indices)
        assert set(drawn) == set(range(dataset_size))  # every image, padding repeats only a few
        assert sum(drawn.values()) - dataset_size < world_size
        if dataset_size % world_size == 0 and dataset_size % local_size == 0:
            assert set(drawn.values()) == {1}
    first = [list(s) for s in samplers]
    for sampler in samplers:
        sampler.set_epoch(0)
    assert [list(s) for s in samplers] != first  # the order changes with the epoch


def test_one_process_keeps_the_order_of_a_run_without_cache_mode():
    for epoch in (0, 4):
        share = NodeShareSampler(17, world_size=1, rank=0, local_size=1, seed=11)
        plain = DistributedSampler(range(17), num_replicas=1, rank=0, shuffle=True, seed=11)
        share.set_epoch(epoch)
        plain.set_epoch(epoch)
        assert list(share) == list(plain)


def test_training_loader_of_a_rank_loads_only_cached_images(coco_root, monkeypatch):
    ctx = DistContext(rank=3, world_size=4, local_rank=1, local_size=2)
    args = data_args(coco_root)
    dataset = build_dataset("train", args, cache_share=(ctx.local_rank, ctx.local_size))
    loader = runner.build_data_loader(dataset, args, ctx, train=True, device=torch.device("cpu"))
    decode_image = coco.decode_image

    def decode_cached_only(source):
        assert isinstance(source, bytes), f"{source} read from disk"
        return decode_image(source)

    monkeypatch.setattr(coco, "decode_image", decode_cached_only)
    loader.batch_sampler.set_epoch(0)
    seen = [int(t["image_id"]) for _, targets in loader for t in targets]
    assert seen and set(seen) <= set(dataset._cache)


def test_fewer_images_than_processes_per_node_is_a_clear_error():
    with pytest.raises(InputError, match="drop --cache_mode"):
        NodeShareSampler(3, world_size=4, rank=0, local_size=4)
