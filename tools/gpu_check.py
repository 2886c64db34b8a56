"""Prove the GPU path on a machine with a CUDA GPU, in one command (`make gpu-check`, about 6 minutes):

    python tools/gpu_check.py OUT_DIR            # or: make gpu-check GPU_CHECK_OUT=OUT_DIR

Steps, each with its own time limit, in this order:

1. ``build``       the CUDA kernel (``python -m models.ops.build --device cuda``);
2. ``self_check``  the kernel against the PyTorch reference per dtype (``models/ops/selfcheck.py``);
3. ``cuda_tests``  every CUDA test of the suite (``pytest -k cuda``; a skip counts as a failure here);
4. ``bench_op``    ``tools/bench_op.py --device cuda`` at COCO shapes, fp32 / fp16 / bf16, with the
                   memory-traffic floor;
5. ``benchmark``   ``tools/benchmark.py model --device cuda``: FPS at batch 1 and 4, training images/s per
                   ``--amp``;
6. ``train_amp``   20 training steps of a small Sparse DETR on synthetic data with ``--amp bf16`` and with
                   ``--amp fp16``: every loss finite, peak memory recorded;
7. ``deterministic`` two ``--deterministic`` runs of 10 steps: bitwise equal weights.

OUT_DIR receives ``report.md`` (one table row per step: ok / FAILED, seconds, what it found), ``results.jsonl``
(one JSON object per step: ``step``, ``ok``, ``seconds``, ``summary``, ``details``) and the raw output of each
step (``<step>.log``, ``benchmark.jsonl``). Exit status 0 when every step passed, 1 otherwise, 2 without CUDA
(one line, nothing run). Steps 6 and 7 also run on the CPU (``--device cpu``, as the tests do).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A small Sparse DETR that trains in seconds: the GPU path of every piece (backbone, sparse encoder, DAM,
# two-stage decoder, the attention kernel) without the cost of the full model.
SMALL_MODEL = ("--backbone resnet18 --backbone_from_scratch --hidden_dim 64 --nheads 2 --enc_layers 2 --dec_layers 2 "
               "--dim_feedforward 64 --num_queries 20 --num_classes 4 --with_box_refine --two_stage --eff_query_init "
               "--eff_specific_head --rho 0.3 --use_enc_aux_loss --lr_scaling none --num_workers 0 --log_every 10 "
               "--scales 128 --val_size 128 --max_size 128").split()


@dataclass
class StepResult:
    """One step of the check: whether it passed, how long it took, a one-line summary and details."""
    step: str
    ok: bool
    seconds: float
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


def run_command(command: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """Run ``command`` in the repository, its output into ``log``; ``(exit status, output)`` (124 on timeout)."""
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output, status = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = f"{expired.stdout or ''}{expired.stderr or ''}\n[timed out after {timeout:.0f} s]"
        status = 124
    log.write_text(" ".join(command) + "\n\n" + (output if isinstance(output, str) else output.decode()))
    return status, output


def last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def step_build(out: Path) -> StepResult:
    status, output = run_command([sys.executable, "-m", "models.ops.build", "--device", "cuda"], out / "build.log",
                                 timeout=300)
    return StepResult("build", status == 0, 0.0, last_line(output))


def step_self_check(out: Path) -> StepResult:
    import torch

    from models.ops import selfcheck
    differences = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        difference, where = selfcheck.largest_difference(torch.device("cuda"), dtype)
        differences[str(dtype).replace("torch.", "")] = {"difference": difference, "where": where,
                                                         "tolerance": selfcheck.TOLERANCE[dtype]}
    ok = all(d["difference"] <= d["tolerance"] for d in differences.values())
    summary = ", ".join(f"{name} {d['difference']:.2g}" for name, d in differences.items())
    return StepResult("self_check", ok, 0.0, f"largest relative difference: {summary}", differences)


def step_cuda_tests(out: Path) -> StepResult:
    status, output = run_command([sys.executable, "-m", "pytest", "-q", "-rs", "tests", "-k", "cuda"],
                                 out / "cuda_tests.log", timeout=300)
    skipped = "skipped" in last_line(output)
    return StepResult("cuda_tests", status == 0 and not skipped, 0.0, last_line(output))


def step_bench_op(out: Path) -> StepResult:
    status, output = run_command([sys.executable, "tools/bench_op.py", "--device", "cuda", "--dtypes", "float32",
                                  "float16", "bfloat16", "--repeats", "20"], out / "bench_op.log", timeout=240)
    table = [line for line in output.splitlines() if line.startswith("|")]
    return StepResult("bench_op", status == 0, 0.0, f"{len(table)} table lines (bench_op.log)", {"table": table})


def step_benchmark(out: Path) -> StepResult:
    jsonl = out / "benchmark.jsonl"
    status, output = run_command([sys.executable, "tools/benchmark.py", "model", "--device", "cuda", "--repeats",
                                  "20", "--warmup", "5", "--jsonl", str(jsonl)], out / "benchmark.log", timeout=300)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.is_file() else []
    return StepResult("benchmark", status == 0 and bool(rows), 0.0, f"{len(rows)} models measured (benchmark.log)",
                      {"rows": rows})


def synthetic_data(folder: Path, num_train: int) -> Path:
    from tools.make_synthetic_coco import make_synthetic_coco
    make_synthetic_coco(folder, num_train=num_train, num_val=4, seed=0, size=128)
    return folder


def train(data: Path, out: Path, device: str, *flags: str) -> dict[str, Any]:
    """One epoch of the small model (``runner.run``); its log record plus the peak memory on CUDA."""
    import torch

    import runner
    from main import parse_args
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    record = runner.run(parse_args([*SMALL_MODEL, "--device", device, "--coco_path", str(data), "--epochs", "1",
                                    "--output_dir", str(out), *flags]))
    if device == "cuda":
        record["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def step_train_amp(out: Path, device: str = "cuda", steps: int = 20, amps: tuple[str, ...] = ("bf16", "fp16")
                   ) -> StepResult:
    details, problems = {}, []
    with tempfile.TemporaryDirectory() as folder:
        data = synthetic_data(Path(folder) / "data", num_train=2 * steps)
        for amp in amps:
            record = train(data, Path(folder) / amp, device, "--amp", amp, "--batch_size", "2")
            losses = {k: v for k, v in record.items() if k.startswith("train_loss")}
            bad = [k for k, v in losses.items() if not math.isfinite(v)]
            if bad or record.get("train_nonfinite_steps", 0):
                problems.append(f"{amp}: non-finite {bad or record['train_nonfinite_steps']}")
            details[amp] = {"train_loss": record["train_loss"], "nonfinite_steps": record["train_nonfinite_steps"],
                            "scaler_skipped_steps": record.get("train_skipped_steps"),
                            "peak_memory_mib": record.get("peak_memory_mib")}
    summary = "; ".join(problems) or ", ".join(f"{amp} loss {d['train_loss']:.3f}" for amp, d in details.items())
    return StepResult("train_amp", not problems, 0.0, summary, details)


def step_deterministic(out: Path, device: str = "cuda", steps: int = 10) -> StepResult:
    import torch

    from util.checkpoint import load_checkpoint
    with tempfile.TemporaryDirectory() as folder:
        data = synthetic_data(Path(folder) / "data", num_train=2 * steps)
        weights = []
        for run in ("first", "second"):
            train(data, Path(folder) / run, device, "--deterministic", "--batch_size", "2")
            weights.append(load_checkpoint(Path(folder) / run / "checkpoint.pth")["model"])
    differing = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    summary = "bitwise equal weights" if not differing else f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    return StepResult("deterministic", not differing, 0.0, summary, {"differing": differing[:20]})


STEPS: dict[str, Callable[[Path], StepResult]] = {
    "build": step_build, "self_check": step_self_check, "cuda_tests": step_cuda_tests, "bench_op": step_bench_op,
    "benchmark": step_benchmark, "train_amp": step_train_amp, "deterministic": step_deterministic,
}


def run_step(name: str, out: Path, function: Optional[Callable[[Path], StepResult]] = None) -> StepResult:
    """A step, timed; an exception is the step's failure, not the end of the check."""
    started = time.perf_counter()
    try:
        result = (function or STEPS[name])(out)
    except Exception as error:  # noqa: BLE001 - a failing step is reported, the others still run
        result = StepResult(name, False, 0.0, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    result.seconds = time.perf_counter() - started
    return result


def write_report(out: Path, results: list[StepResult], machine: str) -> Path:
    """``report.md`` (the table) and ``results.jsonl`` (the raw results) in ``out``."""
    with (out / "results.jsonl").open("w") as f:
        for result in results:
            f.write(json.dumps(asdict(result)) + "\n")
    passed = sum(r.ok for r in results)
    lines = [f"# GPU check: {passed} of {len(results)} steps passed", "", f"Machine: {machine}", "",
             "| step | result | seconds | what it found |", "|---|---|---|---|"]
    lines += [f"| {r.step} | {'ok' if r.ok else 'FAILED'} | {r.seconds:.1f} | {r.summary.replace('|', '/')} |"
              for r in results]
    tables = [r for r in results if r.step == "bench_op" and r.details.get("table")]
    if tables:
        lines += ["", "## tools/bench_op.py --device cuda", "", *tables[0].details["table"]]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def describe_machine() -> str:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; {os.cpu_count()} CPU cores"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", metavar="OUT_DIR", help="folder for report.md, results.jsonl and the step logs")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS), help="the steps to run")
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): run it on a machine with one",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.steps:
        print(f"[gpu-check] {name} ...", flush=True)
        results.append(run_step(name, out))
        print(f"[gpu-check] {name}: {'ok' if results[-1].ok else 'FAILED'} ({results[-1].seconds:.0f} s) "
              f"{results[-1].summary}", flush=True)
    report = write_report(out, results, describe_machine())
    print(f"[gpu-check] {sum(r.ok for r in results)} of {len(results)} steps passed: {report}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
