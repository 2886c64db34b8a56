"""Peak memory of training steps, for ``benchmark.py model --measure train`` / ``memory``.

* CUDA: ``torch.cuda.max_memory_allocated`` over the steps (tensors only, not the caching allocator's
  reserve), measured in the benchmark's process after resetting the peak.
* CPU: the process's peak resident set size (Linux's ``VmHWM``), which holds every earlier model of a
  process: each cell runs in a fresh process (``benchmark.py train-memory``), which prints one JSON line.
  Not ``ru_maxrss``: Linux carries into it the peak of the process image that ``exec`` replaced, here the
  benchmark's own process, which can be the larger one (see util/memory.py).

Both report ``peak_mib`` (the peak) and ``step_mib``: the peak minus the memory in use just before the first
step (model, batch, interpreter), i.e. what the steps themselves add: activations, gradients and the
optimiser's state (and, on CPU, the code and thread pools that the first forward and backward load, some
tens of MiB, alike with and without ``--grad_checkpoint``). Two steps: the second is the larger one (the first step's gradients and the AdamW moments
are alive during its forward).
"""
from __future__ import annotations

import json
import subprocess
from typing import Callable

import torch

from util.memory import MIB, current_rss_mib, peak_rss_mib

STEPS = 2


def step_memory(step: Callable[[], None], device: torch.device, steps: int = STEPS) -> dict[str, float]:
    """``{"peak_mib", "step_mib"}`` of ``steps`` calls of ``step`` on ``device`` (see the module docstring). On
    CPU the peak is the process's: call it in a fresh process."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device) / MIB
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / MIB
    else:
        before = current_rss_mib()
        for _ in range(steps):
            step()
        peak = peak_rss_mib()
    return {"peak_mib": peak, "step_mib": peak - before}


def in_fresh_process(command: list[str], timeout: float = 3600) -> dict[str, float]:
    """The JSON object that ``command`` (a Python process) prints on its last output line; RuntimeError with
    the end of its error output when it fails."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the memory-measuring process exited with {result.returncode}: {tail[:300]}")
    return json.loads(lines[-1])
