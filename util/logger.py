"""Metric logging: smoothed values, progress lines with ETA (through ``logging``)."""
from __future__ import annotations

import datetime
import logging
import math
import time
from collections import deque
from typing import Iterable, Iterator, Mapping, Optional

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
    """Named :class:`SmoothedValue` meters, plus :meth:`log_every`, which wraps an iterable and logs
    progress, ETA and the meters every N iterations through :mod:`logging`."""

    def __init__(self, delimiter: str = "  ", log: logging.Logger = logger):
        self.meters: dict[str, SmoothedValue] = {}
        self.delimiter = delimiter
        self.log = log

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

    def log_every(self, iterable: Iterable, every: int, header: str = "", done: int = 0,
                  length: Optional[int] = None) -> Iterator:
        """Yield the items of ``iterable`` (``length`` of them, default ``len(iterable)``), logging after items
        0, every, 2*every, ... and the last one, then the total time. ``done`` items came before ``iterable``
        (a resumed epoch): the count starts there."""
        total = done + (len(iterable) if length is None else length)  # type: ignore[arg-type]
        width = len(str(total))
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        start = end = time.perf_counter()
        for i, item in enumerate(iterable, done):
            data_time.update(time.perf_counter() - end)
            yield item
            iter_time.update(time.perf_counter() - end)
            if i % every == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [header, f"[{i:{width}d}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
                self.log.info("%s", self.delimiter.join(p for p in parts if p))
            end = time.perf_counter()
        elapsed = time.perf_counter() - start
        self.log.info("%s total time: %s (%.4f s / it)", header, datetime.timedelta(seconds=int(elapsed)),
                      elapsed / max(total - done, 1))
