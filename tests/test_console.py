"""util/console.py: the training and evaluation progress lines, the AP table, the peak memory, what a run prints
when its output is not a terminal (Slurm, CI), that only rank 0 prints, and that a run without --tensorboard
never imports tensorboard."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from models.criterion import build_weight_dict, output_group_suffixes
from tiny_flags import ENGINE_SPARSE_DETR, ENGINE_TINY
from tools.make_synthetic_coco import make_synthetic_coco
from util import console
from util.console import Progress, TrainReport, ap_table, log_progress

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"-?\d+\.\d+"


def run_metrics(*, rho: bool) -> dict[str, float]:
    """Every key a Sparse DETR (or, without ``rho``, a two-stage Deformable DETR) run's step stats hold, as
    engine.reduced_loss_stats names them, each with its own value: 1.0, 2.0, ..."""
    suffixes = output_group_suffixes(num_decoder_layers=3, aux_loss=True, two_stage=True,
                                     num_encoder_aux=2 if rho else 0)
    weights = build_weight_dict(suffixes, cls=2.0, bbox=5.0, giou=2.0,
                                selection={"loss_mask_prediction": 1.0} if rho else None)
    raw = [*weights, "class_error", "cardinality_error"]
    if rho:
        raw += ["corr_mask_attn_map_dec_all", "corr_mask_attn_map_dec_0"]
    keys = ["loss", *weights, *(f"{k}_unscaled" for k in raw), "class_error", "grad_norm"]
    return {key: float(i + 1) for i, key in enumerate(keys)}


@pytest.mark.parametrize("rho", [True, False])
def test_train_line_shows_the_last_decoder_layer_losses_and_nothing_else(rho):
    """Catches an auxiliary-layer, encoder, unscaled or metric key on the console line, the value of another key
    printed under a loss's name, and loss_mask_prediction shown (as nan) without --rho."""
    metrics = run_metrics(rho=rho)
    report = TrainReport.now(3, Progress(5, 10, 125.0, 38.25), lr=2e-4, smoothed=metrics)
    line = report.line()
    assert line.startswith("epoch 3 [ 5/10] eta 0:02:05 | 38.2 img/s | lr 2.00e-04 | ")
    shown = dict(re.findall(rf"(\w+) ({NUMBER})(?= |$)", line.split(" | ")[3]))
    expected = ["loss", "loss_ce", "loss_bbox", "loss_giou"] + (["loss_mask_prediction"] if rho else [])
    assert list(shown) == expected
    assert {k: float(v) for k, v in shown.items()} == {k: metrics[k] for k in expected}
    assert not re.search(r"_unscaled|_enc|_\d|class_error|cardinality|corr_|grad_norm", line)
    assert re.search(r"\| peak mem \d+ MiB \((RSS|GPU)\)$", line)
    assert report.scalars() == {"lr": 2e-4, **{k: metrics[k] for k in expected}, "images_per_s": 38.25,
                                "peak_mem_mib": report.peak_mib}


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
def test_peak_memory_on_cpu_is_the_peak_resident_set_in_mib():
    """Catches a unit slip (ru_maxrss is KiB on Linux: bytes or KiB shown as MiB)."""
    mib, source = console.peak_memory()
    status = Path("/proc/self/status").read_text()
    peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    assert source == "RSS"
    assert mib == pytest.approx(peak_kib / 1024, rel=0.05)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("done", [0, 2])
def test_progress_lines_after_every_nth_and_the_last_batch_with_eta_and_images_per_second(monkeypatch, caplog,
                                                                                          done):
    """Catches a line logged before the loop body updated the metrics, a wrong count after a resumed start
    (``done``), an ETA from the wrong number of remaining steps and images per second of one process only."""
    clock = FakeClock()
    monkeypatch.setattr(console.time, "perf_counter", clock)
    caplog.set_level(logging.INFO)
    total = 7
    batches = [(f"samples {i}", ["target"] * 3) for i in range(done, total)]
    seen = []
    for batch in log_progress(batches, name="epoch 0", total=total, every=2, done=done, world_size=2,
                              line=lambda p: f"seen {len(seen)} {p}"):
        seen.append(batch)
        clock.now += 0.5  # each step takes 0.5 s
    lines = [r.getMessage() for r in caplog.records]
    # After indices 0, 2, 4, 6 (those of this run); 6 images (3 per process) in 0.5 s = 12 img/s.
    steps = [s for s in range(done, total) if s % 2 == 0]
    expected = [f"seen {s + 1 - done} [{s + 1}/7] eta 0:00:0{int(0.5 * (total - s - 1))} | 12.0 img/s" for s in steps]
    assert lines[:-1] == expected
    assert lines[-1] == f"epoch 0 done: {total - done} steps in 0:00:0{int(0.5 * (total - done))} (0.500 s / step)"


def test_ap_table_shows_the_twelve_named_stats_in_percent():
    """Catches stats under the wrong names (AR instead of AP), a fraction among percents, and -1 (no ground
    truth) shown as a score."""
    stats = [0.461, 0.652, 0.498, 0.281, -1.0, 0.601, 0.351, 0.552, 0.583, 0.402, 0.623, 0.774]
    title, header, values = ap_table(stats, 5000).splitlines()
    assert title == "COCO box AP and AR of 5000 images, in percent:"
    assert header.split() == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert values.split() == ["46.1", "65.2", "49.8", "28.1", "-", "60.1", "35.1", "55.2", "58.3", "40.2", "62.3",
                              "77.4"]
    assert len(header) == len(values)  # columns aligned


# ----------------------------------------------------------------------------------------------
# A whole run, its output piped (not a terminal), as under Slurm


RUN_MAIN = textwrap.dedent("""
    import runpy, sys
    sys.argv = ["main.py", *sys.argv[1:]]
    runpy.run_path("main.py", run_name="__main__")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "tensorboard" or m.startswith("torch.utils.tensorboard"))
    print("tensorboard modules loaded:", loaded)
""")


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory) -> str:
    """The stdout and stderr of a tiny Sparse DETR run (1 epoch of 4 steps, a line every 2) through pipes."""
    root = tmp_path_factory.mktemp("console")
    make_synthetic_coco(root / "coco", num_train=8, num_val=4, seed=0, size=64)
    flags = [*ENGINE_TINY, *ENGINE_SPARSE_DETR, "--coco_path", str(root / "coco"), "--epochs", "1",
             "--output_dir", str(root / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RUN_MAIN, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_a_piped_run_prints_plain_readable_lines(piped_run):
    """Catches carriage-return updates in a log file, the 60-metric line or pycocotools' 12-line table back on
    the console, and a missing field or AP table."""
    assert "\r" not in piped_run
    progress = [line for line in piped_run.splitlines() if re.search(r"epoch 0 \[", line)]
    field = rf"{NUMBER}"
    assert len(progress) == 3  # after steps 1, 3 and 4 of 4
    for line in progress:
        assert re.search(rf"epoch 0 \[\d/4\] eta \d+:\d\d:\d\d \| run eta \d+:\d\d:\d\d \| {field} img/s \| lr 2\.00e-04 \| loss {field} "
                         rf"loss_ce {field} loss_bbox {field} loss_giou {field} loss_mask_prediction {field} \| "
                         r"peak mem \d+ MiB \(RSS\)$", line), line
    assert re.search(r"eval \[2/2\] eta", piped_run)
    assert re.search(r"COCO box AP and AR of 4 images, in percent:\n +AP +AP50 +AP75 +APs +APm +APl +AR1 +AR10 +AR100 "
                     r"+ARs +ARm +ARl\n( +(\d+\.\d|-)){12}\n", piped_run)
    assert re.search(r"AP per class of 3 classes, in percent, best first:\n +class +AP +AP50 +boxes\n", piped_run)
    assert "_unscaled" not in piped_run.split("training epochs")[1]  # past the arguments line
    assert "averaged stats" not in piped_run and "Average Precision" not in piped_run


def test_a_run_without_tensorboard_never_imports_it(piped_run):
    """Catches a module-level ``import torch.utils.tensorboard`` (the package is optional)."""
    assert "tensorboard modules loaded: []" in piped_run


RANK_LOGGING = textwrap.dedent("""
    import logging, sys
    from util.console import log_progress
    from util.process import DistContext, setup_logging
    setup_logging(DistContext(rank=int(sys.argv[1]), world_size=2))
    for _ in log_progress([(None, [1])], name="epoch 0", total=1, every=1, line=lambda p: f"progress {p}",
                          log=logging.getLogger("engine")):
        pass
""")


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_prints_progress(rank):
    """Catches a logging set-up that lets every torchrun process print its progress lines."""
    done = subprocess.run([sys.executable, "-c", RANK_LOGGING, str(rank)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    assert ("[rank 0] INFO engine: progress [1/1]" in printed) == (rank == 0)
    assert ("progress" in printed) == (rank == 0)
