"""Shared pieces of the compiled-kernel tests (test_ms_deform_attn_kernels.py, _selfcheck.py, _cuda.py): the
kernel fixtures, the tolerances and the comparison with the PyTorch path in float64 on the same inputs.

Tolerances (max |actual - expected| <= tol * max |expected| per tensor, expected from the PyTorch path
in float64 on the same, already rounded inputs): float64 1e-10, float32 1e-5, bfloat16 1e-2,
float16 2e-3. Kernels accumulate in float32 (float64 for float64), so the low-precision error is
essentially the final rounding of each output to bfloat16 / float16.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.ops import _extension, ms_deform_attn_pytorch
from test_ms_deform_attn import random_inputs

REPO = Path(__file__).resolve().parents[1]
EMULATION = REPO / "tests" / "cuda_emulation"
EMULATION_LIBRARY = "sparse_detr_cuda_emulation"
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def require_kernel(device_type: str) -> None:
    """Skip when the machine lacks a build prerequisite; fail when the build itself breaks."""
    status = _extension.load(device_type, warn=False)
    if status.state == "missing":
        pytest.skip(f"{device_type} kernel cannot be built here: {status.reason}")
    assert status.loaded, f"{device_type} kernel failed to build or load:\n{status.reason}"


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, what
    scale = max(expected.abs().max().item(), 1e-12)
    error = (actual - expected).abs().max().item()
    assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol} * {scale:.3g}"


def kernel_inputs(batch=2, heads=3, dim=32, queries=7, points=3, shapes=((6, 9), (3, 5), (2, 2), (1, 1)),
                  dtype=torch.float32, device="cpu", spread=(-0.15, 1.15)):
    return random_inputs(batch=batch, heads=heads, dim=dim, queries=queries, points=points, shapes=shapes,
                         dtype=dtype, device=device, spread=spread)


def forward_and_grads(op, value, shapes, starts, locations, weights, grad):
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    out = op(leaves[0], shapes, starts, leaves[1], leaves[2])
    out.backward(grad)
    return out.detach(), [leaf.grad for leaf in leaves]


def reference(value, shapes, starts, locations, weights, grad):
    """PyTorch path in float64 on the given (possibly low-precision) inputs."""
    cast = [t.detach().double() for t in (value, locations, weights)]
    return forward_and_grads(lambda v, s, i, l, w: ms_deform_attn_pytorch(v, s, l, w),  # noqa: E741
                             cast[0], shapes, starts, cast[1], cast[2], grad.double())


def compare_with_reference(op, args, dtype, what):
    value, shapes, starts, locations, weights = args
    grad = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3],
                       generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(value.device)
    out, grads = forward_and_grads(op, value, shapes, starts, locations, weights, grad.to(value.dtype))
    ref_out, ref_grads = reference(value, shapes, starts, locations, weights, grad)
    assert out.dtype == value.dtype
    assert [g.dtype for g in grads] == [value.dtype, locations.dtype, weights.dtype]
    tol = TOLERANCE[dtype]
    assert_close_scaled(out, ref_out, tol, f"{what} output")
    for name, g, r in zip(("grad_value", "grad_locations", "grad_weights"), grads, ref_grads):
        assert_close_scaled(g, r, tol, f"{what} {name}")
