"""Warnings about events that can repeat for thousands of images, logged with a running count."""
from __future__ import annotations

import logging
from collections import Counter


def is_log_count(count: int) -> bool:
    """Whether the ``count``-th occurrence is logged: the 1st, 10th, 100th, 1000th, ..."""
    return count >= 1 and str(count).rstrip("0") == "1"


class CountedWarnings:
    """Per kind of event, a count; the 1st, 10th, 100th, ... occurrence is logged as a warning with the count so
    far, so that 10,000 odd images cost five log lines. Counts are per process (each DataLoader worker keeps its
    own), ``counts[kind]`` holds them."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.counts: Counter[str] = Counter()

    def warn(self, kind: str, message: str) -> None:
        """Count one ``kind`` event; log ``message`` with the count when :func:`is_log_count`."""
        self.counts[kind] += 1
        count = self.counts[kind]
        if is_log_count(count):
            plural = "" if count == 1 else "s"
            self.logger.warning("%s (%d such image%s so far in this process)", message, count, plural)
