"""Metric logging: smoothed values and their averages over an epoch (progress lines: util/console.py)."""
from __future__ import annotations

import logging
import math
from collections import deque
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from util.misc import comm_device, get_world_size

logger = logging.getLogger(__name__)


class SmoothedValue:
    """A series of numbers: window statistics (median, avg, max, last value) and the global average."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.window: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(float(value))
        self.count += n
        self.total += float(value) * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over processes (the window stays local)."""
        if get_world_size() < 2:
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=comm_device())
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return float(np.median(self.window)) if self.window else math.nan

    @property
    def avg(self) -> float:
        return float(np.mean(self.window)) if self.window else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def max(self) -> float:
        return max(self.window) if self.window else math.nan

    @property
    def value(self) -> float:
        return self.window[-1] if self.window else math.nan

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named :class:`SmoothedValue` meters: window medians for the progress lines, global averages (summed over
    processes by :meth:`synchronize_between_processes`) for log.txt."""

    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = {}
        self.delimiter = delimiter

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def update(self, **values: float | Tensor) -> None:
        for name, value in values.items():
            if isinstance(value, Tensor):
                value = value.item()
            self.meters.setdefault(name, SmoothedValue()).update(float(value))

    def synchronize_between_processes(self) -> None:
        for name in sorted(self.meters):  # the same order on every process
            self.meters[name].synchronize_between_processes()

    def global_averages(self) -> dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def medians(self) -> dict[str, float]:
        """The window median of every meter (what the progress lines show)."""
        return {name: meter.median for name, meter in self.meters.items()}

    def totals(self) -> dict[str, tuple[float, int]]:
        """``(total, count)`` of every meter: what its global average is made of."""
        return {name: (meter.total, meter.count) for name, meter in self.meters.items()}

    def add_totals(self, totals: Mapping[str, tuple[float, int]]) -> None:
        """Continue the global averages of :meth:`totals` (e.g. those of a resumed epoch's first steps)."""
        for name, (total, count) in totals.items():
            meter = self.meters.setdefault(name, SmoothedValue())
            meter.total += total
            meter.count += count

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())
