"""Process setup: distribution (torchrun environment), logging, device, CPU memory reuse, seeds and random
states, deterministic algorithms, and stopping cleanly on SIGTERM / SIGINT."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from util.errors import InputError
from util.misc import all_gather_object, any_process

logger = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process stands: rank, world size, local rank, processes on this node (``local_size``);
    ``owns_group`` when run() started the group."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistContext:
    """Join the process group described by torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (NCCL for CUDA,
    gloo for CPU); a single process when they are absent or WORLD_SIZE is 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # torchrun sets LOCAL_WORLD_SIZE (tools/run_dist_slurm.sh too); without it, assume one process per node.
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world_size < 2:
        return DistContext(rank, world_size, local_rank, local_size=local_size)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, local_size=local_size)
    use_cuda = device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return DistContext(rank, world_size, local_rank, owns_group=True, local_size=local_size)


# Flags that may differ between the processes of a run: where each node keeps the data, its loader processes.
NODE_LOCAL_FLAGS = ("coco_path", "num_workers")


def differing_flags(per_rank: Sequence[Mapping[str, Any]]) -> list[str]:
    """One ``"--epochs is 3 on rank 0 but 5 on rank 1"`` per flag whose value differs among ``per_rank`` (each
    process's flags, by rank), in rank 0's order."""
    names = list(dict.fromkeys(name for flags in per_rank for name in flags))
    problems = []
    for name in names:
        values = [flags.get(name, "(absent)") for flags in per_rank]
        if all(value == values[0] for value in values):
            continue
        others: dict[str, list[int]] = {}
        for rank, value in enumerate(values):
            if value != values[0]:
                others.setdefault(repr(value), []).append(rank)
        where = "; ".join(f"{value} on rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}"
                          for value, ranks in others.items())
        problems.append(f"--{name} is {values[0]!r} on rank 0 but {where}")
    return problems


def check_same_flags(flags: Mapping[str, Any]) -> None:
    """Under torchrun, raise InputError on every process when the processes were started with different flags
    (other than :data:`NODE_LOCAL_FLAGS`), naming them: otherwise different models end in DDP's shape errors
    and different epoch counts in a hang or "Connection closed". One digest per process is compared; the flags
    themselves are gathered only when the digests differ. A no-op in a single process."""
    compared = {name: value for name, value in flags.items() if name not in NODE_LOCAL_FLAGS}
    digest = hashlib.sha256(repr(sorted(compared.items())).encode()).hexdigest()
    if len(set(all_gather_object(digest))) <= 1:
        return
    problems = differing_flags(all_gather_object(compared))
    shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
    raise InputError(f"the processes of this run were started with different flags: {shown}. Start every node "
                     "(every process) with the same command")


def log_format(ctx: DistContext) -> str:
    """The format of the run's log lines (console and train.log): time, [rank] under torchrun, level, logger."""
    prefix = f"[rank {ctx.rank}] " if ctx.distributed else ""
    return f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"


def setup_logging(ctx: DistContext, level: str = "INFO") -> None:
    """Root logging for the run: ``level`` (``--log_level``) on rank 0, WARNING elsewhere (a no-op where logging
    is configured)."""
    level_number = logging.getLevelName(level)
    logging.basicConfig(level=level_number if ctx.rank == 0 else max(level_number, logging.WARNING),
                        format=log_format(ctx))


@contextlib.contextmanager
def console_copy(path: os.PathLike, ctx: DistContext) -> Iterator[None]:
    """Append the run's log lines at INFO and above (what rank 0's console shows) to ``path`` as well, until the
    block ends: the console survives a closed terminal. Appends, so that a resumed run continues the file."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(log_format(ctx)))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def resolve_device(device_name: str, ctx: DistContext) -> torch.device:
    """``torch.device`` of ``--device``; in a distributed CUDA run, the GPU of this process's local rank."""
    device = torch.device(device_name)
    if device.type == "cuda" and ctx.distributed:
        device = torch.device("cuda", ctx.local_rank)
    return device


def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse freed memory instead of returning it to the OS; True where it could.

    PyTorch allocates every CPU tensor with malloc, and glibc serves large blocks (always those over 32 MiB)
    with a fresh ``mmap`` that ``free`` unmaps, so each large activation is page-faulted and zeroed by the
    kernel again on every forward: about 100,000 page faults, 0.3 s of CPU time, per Sparse DETR forward
    at 850x1040 (see docs/benchmarks.md). Serving everything from the heap and never trimming it removes
    them; the price is that the process keeps its peak memory, and what fragmentation adds to it (a few
    blocks of the largest size in use: a freed block is reused once a free one fits it with its alignment
    padding). A no-op (False) off glibc.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


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


# ----------------------------------------------------------------------------------------------
# Determinism


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """With ``enabled``: torch's deterministic algorithms (an op without one raises), deterministic cuDNN
    without autotuning, and the cuBLAS workspace setting its deterministic mode needs. Restores the previous
    settings on exit; a no-op when not ``enabled``."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    # Read by cuBLAS when its first handle is created, i.e. at the first matrix product on the GPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[1], previous[2]
        if previous[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


# ----------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# torchrun forwards the Ctrl-C that already reached its workers: a second SIGINT this soon is that copy.
DUPLICATE_SIGNAL_S = 1.0


class TrainingStopped(Exception):
    """Training stopped early on a signal after saving what it could (the message was logged).

    ``exit_code`` is 128 + the signal number, as for a process killed by that signal: 143 for SIGTERM,
    130 for SIGINT.
    """

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


class StopRequest:
    """While entered (``with StopRequest() as stop``), the first SIGTERM or SIGINT only sets ``signum``: the
    training loop stops at its next check. A later SIGINT (one second or more after the first) raises
    ``KeyboardInterrupt`` at once; further SIGTERMs are ignored. The previous handlers come back on exit.
    Signals can only be caught on the main thread: elsewhere this changes nothing."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: one not set from Python
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self._received_at = signum, time.monotonic()
            logger.warning("received %s: stopping after the current or next training step (a second Ctrl-C / "
                           "SIGINT stops at once, without saving)", signal.Signals(signum).name)
        elif signum == signal.SIGINT and time.monotonic() - self._received_at >= DUPLICATE_SIGNAL_S:
            raise KeyboardInterrupt

    def agreed(self) -> bool:
        """Whether any process received a stop signal (one all-reduce when distributed: every process must call
        it at the same point, and then all stop at the same step)."""
        return any_process(self.signum is not None)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM / SIGINT sent to the whole process group (a scheduler, Ctrl-C)
    are for the main process, which ends its workers itself; a worker killed by one would make the main
    process fail before it saves its checkpoint."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
