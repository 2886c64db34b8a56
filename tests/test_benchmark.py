"""tools/benchmark.py model: every measurement on a tiny model, its table, JSON lines and skipped modes; the peak
memory of training steps (tools/bench_memory.py) and the rows with --grad_checkpoint."""
import json
import sys

import pytest
import torch

from tools import benchmark
from tiny_flags import BENCHMARK_TINY as TINY

# --system_malloc: keep_freed_memory would change this test process's malloc for the tests after it.
QUICK = ["--device", "cpu", "--system_malloc", "--height", "64", "--width", "96", "--warmup", "0", "--repeats", "1",
         "--batch_sizes", "1", "2", "--train_batch_size", "1", "--model_args", TINY]


def read_table(out: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and body rows of the markdown table in ``out``."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert set(cells[1]) == {"---"}
    return cells[0], cells[2:]


@pytest.fixture
def quick_children(monkeypatch):
    """The memory-measuring child processes skip loading the compiled attention kernel (seconds each)."""
    monkeypatch.setenv("MSDA_IMPL", "pytorch")


def test_model_benchmark_measures_everything(capsys, tmp_path, quick_children):
    jsonl = tmp_path / "rows.jsonl"
    benchmark.model_benchmark(["--models", "sparse_detr_rho0.1", *QUICK, "--amp", "off", "fp16", "bf16",
                               "--jsonl", str(jsonl)])
    out = capsys.readouterr().out
    header, rows = read_table(out)
    assert header == ["model", "params (M)", "GMACs", "FPS batch 1", "FPS batch 2"] + [
        f"train {what} amp {amp}" for amp in ("off", "fp16", "bf16") for what in ("img/s", "peak MiB", "step MiB")]
    assert len(rows) == 1 and rows[0][0] == "sparse_detr_rho0.1"
    record = json.loads(jsonl.read_text())
    assert record["model_args"] == TINY.split() and record["height"] == 64 and not record["kept_freed_memory"]
    assert "threads, system malloc; torch" in out
    assert 10 < record["params_m"] < 12  # ResNet-18 (11.2 M) and a tiny transformer
    assert 0.05 < record["gmacs"] < 1
    for key in ("fps_bs1", "fps_bs2", "train_images_per_s_off", "train_images_per_s_bf16", "train_step_mib_off",
                "train_step_mib_bf16"):
        assert record[key] > 0, key
    assert record["train_peak_mib_off"] > record["train_step_mib_off"]  # the peak includes the model and torch
    # fp16 autocast runs on this torch's CPU; had it not, the note would say so.
    assert record["train_images_per_s_fp16"] is not None or "train --amp fp16: skipped" in out
    printed = [float(cell) if cell != "n/a" else None for cell in rows[0][1:]]
    keys = ["params_m", "gmacs", "fps_bs1", "fps_bs2"] + [
        f"train_{what}_{amp}" for amp in ("off", "fp16", "bf16") for what in ("images_per_s", "peak_mib", "step_mib")]
    assert printed == [None if record[k] is None else pytest.approx(record[k], abs=0.6) for k in keys]


def test_unsupported_amp_mode_is_skipped_with_a_note(capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "amp_unsupported", lambda device, amp: "no such autocast" if amp == "fp16" else None)
    benchmark.model_benchmark(["--models", "deformable_detr", *QUICK, "--measure", "train", "--amp", "off", "fp16"])
    out = capsys.readouterr().out
    header, rows = read_table(out)
    assert header == ["model", "train img/s amp off", "train peak MiB amp off", "train step MiB amp off",
                      "train img/s amp fp16", "train peak MiB amp fp16", "train step MiB amp fp16"]
    assert float(rows[0][1]) > 0 and rows[0][4:] == ["n/a"] * 3
    assert "note: deformable_detr, train --amp fp16: skipped (no such autocast)" in out


def test_amp_support_defaults_and_targets():
    assert benchmark.parse_model_benchmark_args(["--device", "cpu"]).amp == ["off", "bf16"]  # CPU fp16 is emulated
    assert benchmark.amp_unsupported(torch.device("cpu"), "off") is None
    assert benchmark.amp_unsupported(torch.device("cpu"), "bf16") is None
    targets = benchmark.random_targets(3, num_classes=5, device=torch.device("cpu"))
    for target in targets:
        cx, cy, w, h = target["boxes"].unbind(1)
        assert ((cx - w / 2 >= 0) & (cx + w / 2 <= 1) & (cy - h / 2 >= 0) & (cy + h / 2 <= 1)).all()
        assert ((target["labels"] >= 1) & (target["labels"] < 5)).all()


def test_reference_backbone_yardstick_is_inference_only(capsys):
    benchmark.model_benchmark(["--models", "reference_r50_backbone", *QUICK, "--amp", "off"])
    out = capsys.readouterr().out
    header, rows = read_table(out)
    assert header == ["model", "params (M)", "GMACs", "FPS batch 1", "FPS batch 2", "train img/s amp off",
                      "train peak MiB amp off", "train step MiB amp off"]
    name, params, gmacs, fps1, fps2, train, peak, step = rows[0]
    assert name == "reference_r50_backbone" and float(params) == pytest.approx(23.5, abs=0.1)  # ResNet-50 to C5
    # 64x96 is 0.122 of ImageNet's 224x224, at which ResNet-50 to C5 has 4.09 GMACs.
    assert float(gmacs) == pytest.approx(4.09 * 64 * 96 / 224**2, rel=0.05)
    assert float(fps1) > 0 and float(fps2) > 0 and train == peak == step == "n/a"
    assert "note: reference_r50_backbone: inference only" in out


def test_models_are_timed_in_turn():
    calls = []
    seconds = benchmark.median_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                       torch.device("cpu"), warmup=2, repeats=3)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up per function, then rounds
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())


def test_memory_rows_without_and_with_grad_checkpoint(capsys, tmp_path, quick_children):
    """--measure memory: no timing, one fresh process per cell, a row per --grad_checkpoint setting whose child
    builds the model with the flag."""
    jsonl = tmp_path / "rows.jsonl"
    benchmark.model_benchmark(["--models", "deformable_detr", *QUICK, "--measure", "memory", "--amp", "off",
                               "--grad_checkpoint", "off", "on", "--jsonl", str(jsonl)])
    header, rows = read_table(capsys.readouterr().out)
    assert header == ["model", "train peak MiB amp off", "train step MiB amp off"]
    assert [row[0] for row in rows] == ["deformable_detr", "deformable_detr +grad_checkpoint"]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["grad_checkpoint"] for r in records] == [False, True]
    assert all(r["train_peak_mib_off"] > r["train_step_mib_off"] > 0 for r in records)
    opts = benchmark.parse_model_benchmark_args(QUICK)
    child = benchmark.memory_child_command("deformable_detr", "off", opts, grad_checkpoint=True)
    assert child[2] == "train-memory" and "--system_malloc" in child
    only_flag = benchmark.memory_child_command("deformable_detr", "off",
                                               benchmark.parse_model_benchmark_args([]), grad_checkpoint=True)
    assert "--model_args=--grad_checkpoint" in only_flag  # a bare "--grad_checkpoint" value would fail to parse
    assert benchmark.parse_model_benchmark_args(only_flag[3:]).model_args == ["--grad_checkpoint"]


def test_peak_rss_of_a_fresh_process_sees_a_freed_allocation():
    """A 200 MiB tensor made and freed by each step: the fresh process's peak RSS counts it (the current RSS
    after the steps would not), and not the peak of this larger pytest process (which ru_maxrss inherits
    across exec); a failing child gives its last error line."""
    from tools.bench_memory import in_fresh_process

    # One small op first: the first op's lazy initialisation is not the step's.
    code = ("import json, sys, torch; sys.path.insert(0, {root!r}); from tools.bench_memory import step_memory; "
            "torch.ones(8).add_(1).sum(); "
            "print(json.dumps(step_memory(lambda: torch.ones(50 * 2**20).add_(1).sum(), torch.device('cpu'))))")
    root = str(benchmark.Path(benchmark.__file__).resolve().parents[1])
    memory = in_fresh_process([sys.executable, "-c", code.format(root=root)])
    # Above: shared-library pages that other processes' memory pressure evicted before the step come back in it.
    assert 195 < memory["step_mib"] < 600 and memory["peak_mib"] > memory["step_mib"] + 200
    with pytest.raises(RuntimeError, match="exited with 1: boom"):
        in_fresh_process([sys.executable, "-c", "raise SystemExit('boom')"])
