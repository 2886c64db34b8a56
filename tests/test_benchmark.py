"""tools/benchmark.py model: every measurement on a tiny model, its table, JSON lines and skipped modes."""
import json

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


def test_model_benchmark_measures_everything(capsys, tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    benchmark.model_benchmark(["--models", "sparse_detr_rho0.1", *QUICK, "--amp", "off", "fp16", "bf16",
                               "--jsonl", str(jsonl)])
    out = capsys.readouterr().out
    header, rows = read_table(out)
    assert header == ["model", "params (M)", "GMACs", "FPS batch 1", "FPS batch 2", "train img/s amp off",
                      "train img/s amp fp16", "train img/s amp bf16"]
    assert len(rows) == 1 and rows[0][0] == "sparse_detr_rho0.1"
    record = json.loads(jsonl.read_text())
    assert record["model_args"] == TINY.split() and record["height"] == 64 and not record["kept_freed_memory"]
    assert "threads, system malloc; torch" in out
    assert 10 < record["params_m"] < 12  # ResNet-18 (11.2 M) and a tiny transformer
    assert 0.05 < record["gmacs"] < 1
    for key in ("fps_bs1", "fps_bs2", "train_images_per_s_off", "train_images_per_s_bf16"):
        assert record[key] > 0, key
    # fp16 autocast runs on this torch's CPU; had it not, the note would say so.
    assert record["train_images_per_s_fp16"] is not None or "train --amp fp16: skipped" in out
    printed = [float(cell) if cell != "n/a" else None for cell in rows[0][1:]]
    keys = ["params_m", "gmacs", "fps_bs1", "fps_bs2", "train_images_per_s_off", "train_images_per_s_fp16",
            "train_images_per_s_bf16"]
    assert printed == [None if record[k] is None else pytest.approx(record[k], abs=0.06) for k in keys]


def test_unsupported_amp_mode_is_skipped_with_a_note(capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "amp_unsupported", lambda device, amp: "no such autocast" if amp == "fp16" else None)
    benchmark.model_benchmark(["--models", "deformable_detr", *QUICK, "--measure", "train", "--amp", "off", "fp16"])
    out = capsys.readouterr().out
    header, rows = read_table(out)
    assert header == ["model", "train img/s amp off", "train img/s amp fp16"]
    assert float(rows[0][1]) > 0 and rows[0][2] == "n/a"
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
    assert header == ["model", "params (M)", "GMACs", "FPS batch 1", "FPS batch 2", "train img/s amp off"]
    name, params, gmacs, fps1, fps2, train = rows[0]
    assert name == "reference_r50_backbone" and float(params) == pytest.approx(23.5, abs=0.1)  # ResNet-50 to C5
    # 64x96 is 0.122 of ImageNet's 224x224, at which ResNet-50 to C5 has 4.09 GMACs.
    assert float(gmacs) == pytest.approx(4.09 * 64 * 96 / 224**2, rel=0.05)
    assert float(fps1) > 0 and float(fps2) > 0 and train == "n/a"
    assert "note: reference_r50_backbone: inference only" in out


def test_models_are_timed_in_turn():
    calls = []
    seconds = benchmark.median_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                       torch.device("cpu"), warmup=2, repeats=3)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up per function, then rounds
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
