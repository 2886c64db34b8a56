"""Faults lose nothing: stop signals save a mid-epoch checkpoint that resumes exactly, an epoch restarts at any
batch, and a real training process killed at random points ends with the weights and the log of an
uninterrupted run. Killed writes, corrupt checkpoints, non-finite steps and determinism: test_step_faults.py."""
from __future__ import annotations

import json
import logging
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import engine
import epochs
import runner
import main
from main import parse_args
from datasets.resumable import EpochBatchSampler, SeededSamples
from util import checkpoint as ckpt
from util import process

from test_engine import TINY as ENGINE_TINY, coco_root  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
# test_engine.py's tiny Deformable DETR on 64-pixel images (8 training images in 4 steps of 2), logging every
# step so that the kill test can wait for one; a later --num_workers overrides its 0.
TINY = [*ENGINE_TINY, "--log_every", "1"]


def tiny_args(coco_root: Path, *extra: str):
    return parse_args([*TINY, "--num_workers", "0", "--coco_path", str(coco_root), *extra])


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_runs(out: Path, reference: Path) -> None:
    """Bitwise equal final weights, moving average (--ema_decay) and optimiser moments, and the same log.txt."""
    got, expected = load(out / "checkpoint.pth"), load(reference / "checkpoint.pth")
    assert got["epoch"] == expected["epoch"] and got["progress"] is None
    assert_same_tensors(got["model"], expected["model"])
    assert ("model_ema" in got) == ("model_ema" in expected)
    if "model_ema" in expected:
        assert_same_tensors(got["model_ema"], expected["model_ema"])
    for param, state in expected["optimizer"]["state"].items():
        assert_same_tensors(got["optimizer"]["state"][param], state)
    assert (out / "log.txt").read_text() == (reference / "log.txt").read_text()


def main_error(args) -> str:
    """The message main.py exits with."""
    with pytest.raises(SystemExit) as info:
        main.main(args)
    return str(info.value.code)


def signal_during_step(monkeypatch, call: int, signum: int = signal.SIGTERM) -> None:
    """Make this process receive ``signum`` in the middle of the ``call``-th training step."""
    real_step, calls = engine.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", step)


# ----------------------------------------------------------------------------------------------
# Stop signals


@pytest.mark.parametrize("ema", [[], ["--ema_decay", "0.7"]], ids=["weights", "with_ema"])
def test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes_exactly(coco_root, tmp_path, monkeypatch, caplog, ema):
    """With --ema_decay, the mid-epoch checkpoint holds the moving average and the resumed run continues it."""
    caplog.set_level(logging.INFO)
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    runner.run(tiny_args(coco_root, *ema, "--epochs", "2", "--num_workers", "1", "--output_dir", str(reference)))

    handler_before = signal.getsignal(signal.SIGTERM)
    signal_during_step(monkeypatch, call=3)
    with pytest.raises(process.TrainingStopped) as info:
        runner.run(tiny_args(coco_root, *ema, "--epochs", "2", "--output_dir", str(out), "--resume", "auto"))
    assert info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is handler_before  # restored
    assert "received SIGTERM: stopping after the current or next training step" in caplog.text
    assert (f"stopped by SIGTERM in epoch 0 after 3 of 4 iterations; {out / 'checkpoint.pth'} holds the run: to "
            "continue it, run the same command with --resume auto") in caplog.text
    saved = load(out / "checkpoint.pth")
    assert saved["epoch"] == 0 and saved["progress"]["step"] == 3 and not (out / "log.txt").exists()
    assert ("model_ema" in saved) == bool(ema)

    monkeypatch.undo()
    caplog.clear()
    runner.run(tiny_args(coco_root, *ema, "--epochs", "2", "--output_dir", str(out), "--resume", "auto"))
    assert "training continues at epoch 0, iteration 3" in caplog.text
    assert_same_runs(out, reference)  # the reference loaded its data with a worker, these runs with none


def test_main_exits_with_128_plus_the_signal_number(coco_root, tmp_path, monkeypatch):
    signal_during_step(monkeypatch, call=1, signum=signal.SIGINT)
    with pytest.raises(SystemExit) as info:
        main.main(tiny_args(coco_root, "--epochs", "1", "--output_dir", str(tmp_path)))
    assert info.value.code == 130
    assert load(tmp_path / "checkpoint.pth")["progress"]["step"] == 1


def test_a_second_sigint_stops_at_once_but_not_torchruns_forwarded_copy(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(process.time, "monotonic", lambda: now[0])
    previous = signal.getsignal(signal.SIGINT)
    with process.StopRequest() as stop:
        assert not stop.agreed()
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT and stop.agreed()
        signal.raise_signal(signal.SIGINT)  # the copy torchrun forwards at once: ignored
        signal.raise_signal(signal.SIGTERM)  # further SIGTERMs: ignored
        now[0] += process.DUPLICATE_SIGNAL_S
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def _stop_worker(rank: int, port: int, coco_root: str, out: str) -> None:
    """Rank 1 alone receives SIGTERM, during its second step of four: both processes must stop after it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank == 1:
        real_step, calls = engine.train_step, []

        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_step(*args, **kwargs)

        engine.train_step = step
    try:
        runner.run(parse_args([*TINY, "--num_workers", "0", "--batch_size", "1", "--coco_path", coco_root,
                               "--epochs", "1", "--output_dir", out]))
    except process.TrainingStopped as stop:
        Path(out, f"rank{rank}.exit").write_text(str(stop.exit_code))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_every_process_stops_at_the_same_step(coco_root, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_stop_worker, args=(port, str(coco_root), str(tmp_path)), nprocs=2, join=True)
    # Rank 0 got no signal itself: it stopped on rank 1's, with SIGTERM's status.
    assert [(tmp_path / f"rank{r}.exit").read_text() for r in (0, 1)] == ["143", "143"]
    saved = load(tmp_path / "checkpoint.pth")
    assert saved["progress"]["step"] == 2 and len(saved["rng_state"]) == 2


# ----------------------------------------------------------------------------------------------
# Data that an epoch can restart from at any batch


class RandomDraws(torch.utils.data.Dataset):
    """Each sample: its index and a draw from Python's random, as an augmentation makes."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[int, float]:
        return index, random.random()


def test_an_epoch_started_at_batch_k_gives_the_full_epochs_batches_from_k_on():
    data = SeededSamples(RandomDraws(), seed=5)
    sampler = EpochBatchSampler(torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, seed=5), 3)
    sampler.set_epoch(2)
    full = [[data[key] for key in batch] for batch in sampler]
    assert len(full) == 3 and sorted(i for batch in full for i, _ in batch) != list(range(9))  # shuffled, 1 dropped
    sampler.set_epoch(2, start=2)
    assert len(sampler) == 1 and [[data[key] for key in batch] for batch in sampler] == full[2:]
    sampler.set_epoch(3)
    assert [[data[key] for key in batch] for batch in sampler] != full  # another epoch, another order

    state = random.getstate()
    assert data[(2, 4)] == data[(2, 4)] != data[(3, 4)]  # the draws depend on (seed, epoch, index) alone
    assert random.getstate() == state  # and leave the caller's stream alone


def test_a_mid_epoch_checkpoint_resumed_with_another_global_batch_continues_after_as_many_images(caplog):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 40)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    saved = {"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(), "epoch": 3,
             "args": parse_args(["--device", "cpu", "--batch_size", "2"]), "rng_state": [None, None],
             "progress": {"step": 6, "totals": {"loss": (12.0, 6)}, "nonfinite": 1}}
    args = parse_args(["--device", "cpu", "--batch_size", "3"])
    state = ckpt.restore_training_state(saved, optimizer, scheduler, scaler, start_epoch=args.start_epoch,
                                        lr_drop=args.lr_drop, batch_size=args.batch_size, ctx=process.DistContext(),
                                        source="c.pth")
    assert (state.start_epoch, state.progress.step, state.progress.totals) == (3, 8, {"loss": (12.0, 6)})
    assert ("stopped epoch 3 after 6 global batches of 4 images; with 3 images per global batch now, it continues "
            "at batch 8") in caplog.text


BROKEN_SAMPLE = """
from torch.utils.data import DataLoader, Dataset
import engine
from util.process import ignore_stop_signals
class Broken(Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, index):
        if index == 2:
            raise RuntimeError("broken sample")
        return index
loader = DataLoader(Broken(), batch_size=1, num_workers=1, worker_init_fn=ignore_stop_signals)
with engine.shut_down_workers_after(loader) as batches:
    for batch in batches:
        pass
"""


def test_a_failing_run_with_workers_that_ignore_sigterm_still_exits():
    """The interpreter's exit ends leftover workers with SIGTERM and waits: the loops shut them down first."""
    result = subprocess.run([sys.executable, "-c", BROKEN_SAMPLE], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "RuntimeError: broken sample" in result.stderr


# ----------------------------------------------------------------------------------------------
# A real training process killed at random points


class TrainingProcess:
    """``main.py`` in its own process group (so that a signal reaches its DataLoader workers too, as from a
    scheduler); a thread collects its log lines."""

    def __init__(self, flags: list[str]):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *flags], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.text: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.text.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 120) -> bool:
        """Wait for the ``count``-th log line matching ``pattern``; False when the process ends first."""
        deadline = time.monotonic() + timeout
        while count > 0:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                return False
            count -= bool(re.search(pattern, line))
        return True

    def send(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)

    def finish(self, timeout: float = 120) -> int:
        self.proc.wait(timeout)
        return self.proc.returncode


def kill_at(run: TrainingProcess, out: Path, phase: str, signum: int, rng: random.Random) -> bool:
    """Send ``signum`` to ``run`` in ``phase``: mid-step (a random time after one of the next 3 steps), during
    the end-of-epoch checkpoint write (once its temporary file shows), or during the evaluation. False when
    the run ended before."""
    if phase == "step":
        if not run.wait_for(r"epoch \d+ \[\s*\d+/", count=rng.randint(1, 3)):
            return False
        time.sleep(rng.uniform(0, 0.1))
    elif phase == "write":
        if not run.wait_for(r"epoch \d+ done: "):
            return False
        deadline = time.monotonic() + 5
        while not any(out.glob(".checkpoint*.tmp")) and time.monotonic() < deadline and run.proc.poll() is None:
            time.sleep(0.002)
    else:
        if not run.wait_for(r"eval \["):
            return False
        time.sleep(rng.uniform(0, 0.05))
    run.send(signum)
    return True


def test_a_training_process_killed_at_random_points_ends_as_an_uninterrupted_run(coco_root, tmp_path):
    """With a moving average of the weights (--ema_decay), which must survive every kill as well."""
    epochs = 7  # enough that the kills below never reach the end of training
    flags = [*TINY, "--coco_path", str(coco_root), "--deterministic", "--epochs", str(epochs), "--ema_decay", "0.7"]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = TrainingProcess([*flags, "--num_workers", "2", "--output_dir", str(reference)])

    rng = random.Random(1234)
    # SIGTERM mid-step: see test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes_exactly.
    plans = [("step", signal.SIGKILL), ("write", signal.SIGKILL), ("write", signal.SIGTERM), ("eval", signal.SIGKILL),
             ("eval", signal.SIGTERM)]
    rng.shuffle(plans)
    done = []
    for number, (phase, signum) in enumerate(plans):
        run = TrainingProcess([*flags, "--num_workers", str(number % 2), "--output_dir", str(out),
                               "--resume", "auto"])
        try:
            assert kill_at(run, out, phase, signum, rng), f"the run ended before {phase}: {''.join(run.text)[-3000:]}"
            code = run.finish()
        finally:
            if run.proc.poll() is None:
                run.send(signal.SIGKILL)
        expected = 128 + signal.SIGTERM if signum == signal.SIGTERM else -signal.SIGKILL
        assert code == expected, f"{phase}, {signum.name}: exit {code}\n{''.join(run.text)[-3000:]}"
        done.append((phase, signum.name))

    last = TrainingProcess([*flags, "--num_workers", "1", "--output_dir", str(out), "--resume", "auto"])
    assert last.finish() == 0, "".join(last.text)[-3000:]
    assert uninterrupted.finish() == 0, "".join(uninterrupted.text)[-3000:]
    assert len(done) == 5
    assert_same_runs(out, reference)
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == list(range(epochs))
    for key in ("model", "model_ema"):
        assert_same_tensors(load(out / "checkpoint0004.pth")[key], load(reference / "checkpoint0004.pth")[key])
    assert all("test_ema_coco_eval_bbox" in json.loads(line) for line in (out / "log.txt").read_text().splitlines())
    assert not list(out.glob(".*.tmp"))


def test_a_stop_signal_during_evaluation_stops_the_evaluation(coco_root, tmp_path, monkeypatch, caplog):
    """SIGTERM in the first evaluation batch: the evaluation stops there (no training step follows), the epoch's
    checkpoint stays, and --resume auto redoes the evaluation and writes the record."""
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    runner.run(tiny_args(coco_root, "--epochs", "2", "--output_dir", str(reference)))
    real_update, steps = engine.CocoEvaluator.update, []

    def update_then_signal(self, predictions):
        real_update(self, predictions)
        os.kill(os.getpid(), signal.SIGTERM)

    real_step = engine.train_step
    monkeypatch.setattr(engine, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    monkeypatch.setattr(engine.CocoEvaluator, "update", update_then_signal)
    with pytest.raises(process.TrainingStopped) as info:
        runner.run(tiny_args(coco_root, "--epochs", "2", "--output_dir", str(out)))
    assert info.value.exit_code == 143 and len(steps) == 4  # epoch 0's four steps, none of epoch 1
    assert "stopped by SIGTERM during the evaluation after epoch 0" in caplog.text
    assert load(out / "checkpoint.pth")["epoch"] == 0 and not (out / "log.txt").exists()
    monkeypatch.undo()
    runner.run(tiny_args(coco_root, "--epochs", "2", "--output_dir", str(out), "--resume", "auto"))
    assert_same_runs(out, reference)


def test_resume_auto_reads_past_a_damaged_log_and_says_when_the_run_is_finished(coco_root, tmp_path, caplog):
    out = tmp_path / "run"
    runner.run(tiny_args(coco_root, "--epochs", "1", "--output_dir", str(out)))
    with (out / "log.txt").open("ab") as f:
        f.write(b"\x00\xff\xfe garbage\nnull\n")
    caplog.set_level(logging.INFO)
    runner.run(tiny_args(coco_root, "--epochs", "2", "--output_dir", str(out), "--resume", "auto"))
    assert "log.txt: skipped 2 lines that are not JSON records (lines 2, 3)" in caplog.text
    assert [r["epoch"] for r in epochs.read_log_records(out / "log.txt")] == [0, 1]
    caplog.clear()
    main.main(tiny_args(coco_root, "--epochs", "2", "--output_dir", str(out), "--resume", "auto"))  # exit status 0
    assert f"{out / 'checkpoint.pth'} is a finished run (2 epochs of 2): nothing to train" in caplog.text
