"""The kernels' self-check at first use (models/ops/selfcheck.py), and the fallbacks when a build fails or
MSDA_IMPL names an unknown path; importing models.ops builds nothing."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from models.ops import _extension, implementation, kernel_status, ms_deform_attn, ms_deform_attn_pytorch
from models.ops import selfcheck
from msda_kernel_helpers import REPO, kernel_inputs


# ----------------------------------------------------------------------------------------------
# Self-check at first use


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_the_cpu_kernel_passes_its_self_check(cpu_kernel, dtype, monkeypatch):
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    difference, _ = selfcheck.largest_difference(torch.device("cpu"), dtype)
    assert difference <= selfcheck.TOLERANCE[dtype]
    assert selfcheck.kernel_agrees("cpu", dtype) and implementation("cpu", dtype) == "kernel"


@pytest.mark.parametrize("fault", ["swapped_xy", "off_by_a_little", "wrong_gradient"])
def test_a_faulty_kernel_is_caught_and_the_process_falls_back(cpu_kernel, monkeypatch, caplog, fault):
    """A kernel fault injected through ``selfcheck.run_kernel``: one error naming device, dtype and difference,
    then the PyTorch path for that (device, dtype) only."""
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.delenv("MSDA_IMPL", raising=False)
    kernel = selfcheck.run_kernel

    class ScaledGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.01

    def faulty(value, shapes, starts, locations, weights):
        if fault == "swapped_xy":
            return kernel(value, shapes, starts, locations.flip(-1), weights)
        if fault == "off_by_a_little":
            return kernel(value, shapes, starts, locations, weights) + 1e-3
        return kernel(ScaledGradient.apply(value), shapes, starts, locations, weights)

    monkeypatch.setattr(selfcheck, "run_kernel", faulty)
    assert implementation("cpu", torch.float32) == "pytorch"
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error.startswith("ms_deform_attn self-check: the compiled kernel on cpu for float32 tensors differs from "
                            "the PyTorch reference by ")
    assert "this process uses the PyTorch path for them instead (slower, correct)" in error
    assert implementation("cpu", torch.float32) == "pytorch"  # decided once: no second check, no second error
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    monkeypatch.setenv("MSDA_IMPL", "kernel")
    with pytest.raises(RuntimeError, match="failed its self-check"):
        implementation("cpu", torch.float32)
    monkeypatch.setenv(selfcheck.ENV_SELFCHECK, "0")
    assert implementation("cpu", torch.float64) == "kernel"  # the check off: the kernel is trusted


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_the_check_problem_has_points_exactly_on_the_border_pixels(dtype):
    """Catches a self-check whose points never land exactly on -1, 0, H - 1 or H (W) in pixels, where a kernel's
    inside test (``px >= -1`` against ``px > -1``) decides: on the 4x8 and 1x2 levels, every (x, y) pair of those
    pixel coordinates occurs, exactly, in every dtype the kernels take."""
    _, shapes, _, locations, _ = selfcheck.check_problem(torch.device("cpu"), dtype)
    assert shapes.tolist()[1:] == [[4, 8], [1, 2]]
    for level, (height, width) in ((1, (4, 8)), (2, (1, 2))):
        xy = locations[:, :, :, level].float().reshape(-1, 2)
        pixels = torch.stack([xy[:, 0] * width - 0.5, xy[:, 1] * height - 0.5], -1)
        pairs = {(x, y) for x, y in pixels.tolist()}
        assert {(x, y) for x in (-1.0, 0.0, width - 1.0, float(width))
                for y in (-1.0, 0.0, height - 1.0, float(height))} <= pairs


def test_a_kernel_that_drops_points_on_the_minus_one_border_fails_its_self_check(cpu_kernel, monkeypatch):
    """A kernel that leaves out the points at pixel -1 (whose corner at 0 has weight 0 but a gradient), as
    ``px > -1`` instead of ``>= -1`` in its inside test would: emulated by moving those points just outside."""
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    kernel = selfcheck.run_kernel

    def border_dropped(value, shapes, starts, locations, weights):
        sizes = shapes.flip(-1).view(1, 1, 1, -1, 1, 2).to(locations.dtype)  # (W, H) per level
        on_minus_one = (locations * sizes - 0.5 == -1).any(-1, keepdim=True)
        return kernel(value, shapes, starts, torch.where(on_minus_one, locations - 1 / sizes, locations), weights)

    monkeypatch.setattr(selfcheck, "run_kernel", border_dropped)
    difference, where = selfcheck.largest_difference(torch.device("cpu"), torch.float64)
    assert difference > selfcheck.TOLERANCE[torch.float64] and where == "grad of locations"


def builds_fail_for_lack_of(monkeypatch, prerequisite: str) -> None:
    """A process that has loaded and warned about nothing yet, where every kernel build lacks ``prerequisite``."""
    monkeypatch.setattr(_extension, "_status", {})
    monkeypatch.setattr(_extension, "_warned_values", set())
    monkeypatch.setattr(_extension, "_warned_devices", set())

    def missing(device_type, verbose):
        raise _extension.MissingPrerequisite(prerequisite)

    monkeypatch.setattr(_extension, "_build", missing)


def warning_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    builds_fail_for_lack_of(monkeypatch, "ninja (pip install ninja)")
    monkeypatch.delenv("MSDA_IMPL", raising=False)
    with caplog.at_level(logging.WARNING, logger="models.ops._extension"):
        assert implementation("cpu") == "pytorch"
        assert implementation("cpu") == "pytorch"
        value, shapes, starts, locations, weights = kernel_inputs(dtype=torch.float64)
        torch.testing.assert_close(ms_deform_attn(value, shapes, starts, locations, weights),
                                   ms_deform_attn_pytorch(value, shapes, locations, weights))
    warnings = warning_messages(caplog)
    assert len(warnings) == 1
    assert "python -m models.ops.build" in warnings[0]
    assert "missing: ninja" in warnings[0]
    assert kernel_status("cpu").state == "missing"


def test_unknown_msda_impl_value_does_not_silence_the_cuda_fallback_warning(monkeypatch, caplog):
    """MSDA_IMPL=cuda is no choice (warned about once, taken as auto); the CUDA kernel then being unavailable
    is a warning of its own, not one already given because the value and the device type are both "cuda"."""
    builds_fail_for_lack_of(monkeypatch, "a visible CUDA device or TORCH_CUDA_ARCH_LIST naming the GPU targets")
    monkeypatch.setenv("MSDA_IMPL", "cuda")
    with caplog.at_level(logging.WARNING, logger="models.ops._extension"):
        assert implementation("cuda") == "pytorch"
        assert implementation("cuda") == "pytorch"
    warnings = warning_messages(caplog)
    assert len(warnings) == 2, warnings
    assert warnings[0] == "MSDA_IMPL='cuda' is not one of auto, pytorch, kernel; using auto"
    assert "unavailable for cuda tensors (missing: a visible CUDA device" in warnings[1]
    assert kernel_status("cuda").state == "missing"


def test_import_builds_nothing_and_prebuild_command(cpu_kernel):
    """A fresh process: importing models.ops tries no build; then the pre-build entry point
    (models/ops/build.py's main, what `python -m models.ops.build --device cpu` runs) finds the
    CPU extension, cached by now."""
    script = ("import sys, models.ops as o; from models.ops import _extension, build; "
              "assert not _extension._status, _extension._status; "
              "assert all(s.state in ('not tried', 'disabled') for s in o.kernel_status().values()); "
              "sys.exit(build.main(['--device', 'cpu']))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[ok] cpu" in done.stdout
