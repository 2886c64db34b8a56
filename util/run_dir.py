"""The output folder of a run: checked at start-up, never silently reused, held by one run at a time.

    claim_output_dir(path, resume_from=..., overwrite=...)   -> RunLock (held until released or the process ends)

- A folder that already holds a run (a checkpoint or log.txt) is refused unless the run resumes one of its own
  checkpoints, or ``--overwrite`` moves its files (and its console log train.log) aside into
  ``overwritten-<time>/`` (nothing is deleted). Resuming another folder's checkpoint into it is refused too:
  log.txt would mix two models' records.
- A folder that cannot be written is refused before any training.
- The lock is an ``flock`` on ``<output_dir>/.lock``, which the kernel drops when the process ends however it
  ends: a killed run never leaves a stale lock that blocks ``--resume auto`` (only a stale file, harmless). The
  file records the holder's pid, host and start time, to name them to a second run; a clean end removes it.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional

from util.errors import InputError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
CONSOLE_LOG = "train.log"  # the console's lines (runner.py); moved aside with the run, but alone it is no run
# What else a run writes: moved aside with it by --overwrite, but alone they make no run (a start that died
# writes config.json and train.log).
RUN_COMPANIONS = ("config.json", CONSOLE_LOG, "eval.json", "eval_ema.json")


def run_files(output_dir: Path) -> list[Path]:
    """The files that make ``output_dir`` hold a run: its checkpoints, log.txt and the TensorBoard folder tb/."""
    return sorted([*output_dir.glob("checkpoint*.pth"), *output_dir.glob("log.txt"),
                   *[p for p in output_dir.glob("tb") if p.is_dir()]])


class RunLock:
    """An exclusive lock on an output folder (see the module docstring); ``release()`` or process exit frees it."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise InputError naming the run that holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise InputError(f"another run is using --output_dir {self.path.parent} ({self.holder()}): wait for "
                                 "it to finish or stop it, or choose another --output_dir") from None
            # The holder before us unlinks the file as it releases: a lock on an unlinked file guards nothing.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        """``"pid 123 on host h, started ..."``, as the holder recorded it."""
        try:
            holder = json.loads(self.path.read_text())
            return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its pid is not recorded yet"

    def release(self) -> None:
        """Remove the lock file and drop the lock (closing the descriptor drops the flock)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def check_writable(output_dir: Path) -> None:
    """Raise InputError unless ``output_dir`` is (or can be made) a folder this process can write to."""
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output_dir {output_dir} is a file, not a folder: name a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(f"cannot write to --output_dir {output_dir} ({error.strerror}): choose a folder you can "
                         "write to, or fix its permissions") from None


def move_aside(output_dir: Path, files: list[Path]) -> Path:
    """Move ``files`` of ``output_dir`` into a new ``overwritten-<time>/`` folder inside it; returns the folder."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = output_dir / f"overwritten-{stamp}"
    suffix = 1
    while folder.exists():
        folder = output_dir / f"overwritten-{stamp}-{suffix}"
        suffix += 1
    folder.mkdir()
    for path in files:
        path.rename(folder / path.name)
    return folder


def is_own_checkpoint(output_dir: Path, resume_from: Optional[Path]) -> bool:
    """Whether ``resume_from`` is a file directly in ``output_dir`` (one of that folder's checkpoints)."""
    return resume_from is not None and resume_from.resolve().parent == output_dir.resolve()


def claim_output_dir(output_dir: Path, *, resume_from: Optional[Path], overwrite: bool) -> RunLock:
    """Check, lock and prepare ``output_dir`` for a training run (rank 0 alone calls it).

    ``resume_from``: the checkpoint this run continues (``--resume``), or None. A folder holding a run is taken
    when ``resume_from`` is one of its own checkpoints; otherwise it is refused, unless ``overwrite`` moves its
    files aside.
    """
    check_writable(output_dir)
    lock = RunLock(output_dir).acquire()
    try:
        existing = run_files(output_dir)
        if existing and not is_own_checkpoint(output_dir, resume_from):
            names = ", ".join(p.name for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
            if not overwrite:
                raise InputError(held_run_problem(output_dir, existing, names, resume_from))
            existing += [output_dir / name for name in RUN_COMPANIONS if (output_dir / name).is_file()]
            folder = move_aside(output_dir, existing)
            logger.warning("--overwrite: moved the previous run's %d files (%s) into %s", len(existing), names, folder)
    except BaseException:
        lock.release()
        raise
    return lock


def held_run_problem(output_dir: Path, existing: list[Path], names: str, resume_from: Optional[Path]) -> str:
    """Why a run may not use ``output_dir``, which holds the run files ``existing`` (``names``), and the fixes."""
    overwrite = "start over with --overwrite (which moves the old files aside, deleting nothing)"
    if resume_from is not None:
        return (f"--output_dir {output_dir} already holds another run ({names}), and --resume {resume_from} is not "
                f"one of its checkpoints: its log.txt would mix two runs' records. Continue {resume_from} in a new "
                f"--output_dir, continue the folder's own run with --resume auto, or {overwrite}")
    if not any(p.name.startswith("checkpoint") for p in existing):
        return (f"--output_dir {output_dir} already holds a run ({names}) but no checkpoint to continue it from: "
                f"choose a new --output_dir, or {overwrite}")
    return (f"--output_dir {output_dir} already holds a run ({names}): continue it with --resume auto, choose a new "
            f"--output_dir, or {overwrite}")
