"""Process setup: distribution (torchrun environment), logging, device, seeds and random states."""
from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process stands: rank, world size, local rank; ``owns_group`` when run() started the group."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistContext:
    """Join the process group described by torchrun's RANK / WORLD_SIZE / LOCAL_RANK (NCCL for CUDA,
    gloo for CPU); a single process when they are absent or WORLD_SIZE is 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size < 2:
        return DistContext(rank, world_size, local_rank)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
    use_cuda = device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return DistContext(rank, world_size, local_rank, owns_group=True)


def setup_logging(ctx: DistContext) -> None:
    """Root logging for the run: INFO on rank 0, WARNING elsewhere (a no-op where logging is configured)."""
    prefix = f"[rank {ctx.rank}] " if ctx.distributed else ""
    logging.basicConfig(level=logging.INFO if ctx.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")


def resolve_device(device_name: str, ctx: DistContext) -> torch.device:
    """``torch.device`` of ``--device``; in a distributed CUDA run, the GPU of this process's local rank."""
    device = torch.device(device_name)
    if device.type == "cuda" and ctx.distributed:
        device = torch.device("cuda", ctx.local_rank)
    return device


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator the training reads (torch CPU/CUDA, numpy, random)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run the block without disturbing the random streams of training (evaluation, probes)."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
