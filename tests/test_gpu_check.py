"""tools/gpu_check.py: the parts that run without a GPU (the CUDA steps run where one is lent: `make gpu-check`)."""
import json

import pytest
import torch

from tools import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_stops_at_once_with_one_line(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): run it on "
                                       "a machine with one\n")
    assert not (tmp_path / "out").exists()


def test_the_training_steps_run_and_check_finite_losses_on_cpu(tmp_path):
    result = gpu_check.run_step("train_amp", tmp_path,
                                lambda out: gpu_check.step_train_amp(out, device="cpu", steps=2, amps=("bf16",)))
    assert result.ok, result.summary
    assert result.details["bf16"]["nonfinite_steps"] == 0 and result.summary.startswith("bf16 loss ")


def test_the_deterministic_repeat_is_bitwise_on_cpu(tmp_path):
    result = gpu_check.step_deterministic(tmp_path, device="cpu", steps=2)
    assert result.ok and result.summary == "bitwise equal weights"


def test_a_failing_step_is_reported_and_the_report_lists_every_step(tmp_path):
    def broken(out):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    results = [gpu_check.run_step("build", tmp_path, broken),
               gpu_check.StepResult("bench_op", True, 1.5, "12 table lines", {"table": ["| a | b |"]})]
    assert not results[0].ok and results[0].summary == "RuntimeError: CUDA error: an illegal memory access was encountered"
    report = gpu_check.write_report(tmp_path, results, "test machine").read_text()
    assert report.splitlines()[:6] == ["# GPU check: 1 of 2 steps passed", "", "Machine: test machine", "",
                                       "| step | result | seconds | what it found |", "|---|---|---|---|"]
    assert "| build | FAILED |" in report and "| bench_op | ok | 1.5 | 12 table lines |" in report
    assert report.rstrip().endswith("| a | b |")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == ["build", "bench_op"] and rows[0]["ok"] is False
