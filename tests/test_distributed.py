"""Distributed training on CPU (gloo): data-parallel gradients equal single-process ones, and a 2-node launch
through tools/run_dist_launch.sh on loopback."""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import engine
import runner
from main import parse_args
from models import build_model
from tools.make_synthetic_coco import make_synthetic_coco
from util.misc import nested_tensor_from_tensor_list
from tiny_flags import DISTRIBUTED_TINY_SPARSE as TINY_SPARSE

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")

WORLD_SIZE = 2
IMAGES_PER_PROCESS = 2
BOXES_PER_IMAGE = (1, 2, 3, 4)  # rank 0 holds 3 boxes, rank 1 7: the loss normaliser must be the global mean


def global_batch() -> tuple[list[torch.Tensor], list[dict]]:
    """WORLD_SIZE * IMAGES_PER_PROCESS images of one size (no padding differs between the shards) and targets."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for n in BOXES_PER_IMAGE:
        images.append(torch.randn(3, 64, 64, generator=g, dtype=torch.float64))
        centres = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.3 + 0.1
        targets.append({"labels": torch.randint(1, 4, (n,), generator=g), "boxes": torch.cat([centres, sizes], 1),
                        "orig_size": torch.tensor([64, 64])})
    return images, targets


def gradients(model: torch.nn.Module, criterion: torch.nn.Module, images, targets) -> dict[str, torch.Tensor]:
    """Gradients of the weighted loss of one step on (images, targets), by parameter name."""
    model.train()
    criterion.train()
    loss = engine.weighted_loss(criterion(model(nested_tensor_from_tensor_list(images)), targets),
                                criterion.weight_dict)
    loss.backward()
    module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, init_file: str, weights: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        model, criterion, _ = build_model(parse_args(TINY_SPARSE))
        model.double().load_state_dict(torch.load(weights))
        images, targets = global_batch()
        shard = slice(rank * IMAGES_PER_PROCESS, (rank + 1) * IMAGES_PER_PROCESS)
        images, targets = images[shard], targets[shard]
        args = parse_args(TINY_SPARSE + ["--batch_size", str(IMAGES_PER_PROCESS)])
        ddp = runner.wrap_distributed(model, criterion, list(zip(images, targets)), batch_size=args.batch_size,
                                      device=torch.device("cpu"))
        grads = gradients(ddp, criterion, images, targets)
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


def test_two_process_gradients_equal_single_process_on_the_global_batch(tmp_path):
    """One step of 2 gloo processes x 2 images (DistributedDataParallel built by the engine) gives the gradients
    of one process on the 4 images: DDP averages the processes' gradients and the criterion divides each
    process's loss by the box count averaged over processes, so the mean of the 2 gradients is the gradient of
    the global sum divided by the global box count. Float64 throughout."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(parse_args(TINY_SPARSE))
    model.double()
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    images, targets = global_batch()
    expected = gradients(model, criterion, images, targets)

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path / "weights.pth"), str(tmp_path / "grads.pth")),
             nprocs=WORLD_SIZE, join=True)
    got = torch.load(tmp_path / "grads.pth")

    assert set(got) == set(expected)
    assert any(name.startswith("backbone.0") for name in got)  # the backbone trains too
    assert any("enc_mask_predictor" in name for name in got)  # Sparse DETR's scoring network
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-7, atol=1e-10, msg=name)
    # Not a vacuous equality: normalising each shard's loss by its own box count (3 and 7) instead of the mean
    # over processes (5) gives other gradients.
    local = []
    for rank in range(WORLD_SIZE):
        model.zero_grad(set_to_none=True)
        shard = slice(rank * IMAGES_PER_PROCESS, (rank + 1) * IMAGES_PER_PROCESS)
        local.append(gradients(model, criterion, images[shard], targets[shard]))
    shard_normalised = torch.cat([((local[0][k] + local[1][k]) / 2).flatten() for k in expected])
    assert not torch.allclose(shard_normalised, torch.cat([g.flatten() for g in expected.values()]), rtol=1e-3)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_launch_on_loopback(tmp_path):
    """tools/run_dist_launch.sh twice, as node 0 and node 1 of a 2-node x 1-process job, both on 127.0.0.1."""
    data, out = tmp_path / "coco", tmp_path / "run"
    make_synthetic_coco(data, num_train=8, num_val=4, seed=0, size=64)
    command = ["bash", str(ROOT / "tools" / "run_dist_launch.sh"), "2", "python", "main.py", *TINY_SPARSE,
               "--batch_size", "2", "--num_workers", "0", "--lr_scaling", "none", "--scales", "64", "--val_size",
               "64", "--max_size", "64", "--log_every", "1", "--coco_path", str(data), "--output_dir", str(out),
               "--epochs", "1"]
    env = {**os.environ, "PYTHON": sys.executable, "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    nodes = [subprocess.Popen(command, cwd=ROOT, env={**env, "NODE_RANK": str(node)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=150)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.communicate()
    for node, (process, text) in enumerate(zip(nodes, outputs)):
        assert process.returncode == 0, f"node {node} exited with {process.returncode}:\n{text[-4000:]}"

    # Node 0 runs global rank 0 (which alone logs at INFO), node 1 rank 1.
    assert "[rank 0]" in outputs[0] and "[rank 0]" not in outputs[1]
    assert "epoch 0 [" not in outputs[1] and "COCO box AP" not in outputs[1]  # progress and AP table: rank 0 only
    lines = (out / "log.txt").read_text().splitlines()
    assert len(lines) == 1  # written once, by rank 0
    record = json.loads(lines[0])
    assert record["epoch"] == 0 and math.isfinite(record["train_loss"])
    assert len(record["test_coco_eval_bbox"]) == 12
    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert len(checkpoint["rng_state"]) == 2  # both processes took part
    # Each process trained on its half of the 8 images: 2 steps of 2 images each.
    assert re.search(r"epoch 0 \[2/2\]", outputs[0])
