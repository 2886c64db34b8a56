"""Compiled multi-scale deformable attention kernels (models/ops/csrc) against the PyTorch path: the CPU kernel
and the torch.library operator.

* CPU kernel: float64 gradcheck; float32 / bfloat16 / float16 forward and gradients against the
  PyTorch path; out-of-range, boundary and NaN locations; thread-count independence.
* The operator: opcheck (schema, fake tensor, autograd registration), torch.compile (aot_eager, fullgraph),
  autocast; the dispatch switch (MSDA_IMPL).

The self-check and build fallbacks are in test_ms_deform_attn_selfcheck.py, the CUDA kernels in
test_ms_deform_attn_cuda.py, the shared fixtures and tolerances in msda_kernel_helpers.py. The first run builds
the CPU extension (cached in the torch extensions folder).
"""
from __future__ import annotations

import pytest
import torch

from models.ops import MSDeformAttn, implementation, kernel_status, ms_deform_attn, ms_deform_attn_func
from models.ops import ms_deform_attn_pytorch
from test_ms_deform_attn import naive_ms_deform_attn
from msda_kernel_helpers import assert_close_scaled, compare_with_reference, forward_and_grads, kernel_inputs


# ------------------------------------------------------------------------------------------------
# CPU kernel


def test_cpu_gradcheck_float64(cpu_kernel):
    # Locations spread past the borders so that cells with missing corners are checked too.
    for dim in (4, 32):  # dynamic D and the D = 32 specialisation
        value, shapes, starts, locations, weights = kernel_inputs(batch=1, heads=2, dim=dim, queries=3, points=2,
                                                                  shapes=((4, 5), (2, 3)), dtype=torch.float64,
                                                                  spread=(-0.1, 1.1))
        inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
        assert torch.autograd.gradcheck(lambda v, l, w: cpu_kernel(v, shapes, starts, l, w), inputs,  # noqa: E741
                                        eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim", [32, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cpu_matches_pytorch(cpu_kernel, dtype, dim):
    compare_with_reference(cpu_kernel, kernel_inputs(dim=dim, dtype=dtype), dtype, f"cpu {dtype} D={dim}")


def test_cpu_mixed_dtypes_as_under_autocast(cpu_kernel):
    """bfloat16 value with float32 locations and weights (what autocast produces): the kernel reads
    locations in float32, returns bfloat16, and gives each input its gradient in its own dtype."""
    value, shapes, starts, locations, weights = kernel_inputs(dtype=torch.float32)
    args = (value.bfloat16(), shapes, starts, locations, weights)
    compare_with_reference(cpu_kernel, args, torch.bfloat16, "cpu bf16 value / fp32 locations")


def test_cpu_boundary_and_out_of_range_locations(cpu_kernel):
    """Exact borders, pixel centres, far outside, huge and NaN locations: outside samples contribute
    nothing and get zero gradient; on the interior the gradients are grid_sample's."""
    value, shapes, starts, locations, weights = kernel_inputs(dtype=torch.float64, queries=6, points=4)
    special = torch.tensor([0.0, 1.0, -5.0, 5.0, 0.5, 1e-9, 1 - 1e-9, -0.1, 1.1, 0.25, 1e30, -1e30],
                           dtype=torch.float64)
    pick = torch.randint(0, len(special), locations.shape, generator=torch.Generator().manual_seed(1))
    locations = special[pick]
    out = cpu_kernel(value, shapes, starts, locations, weights)
    torch.testing.assert_close(out, naive_ms_deform_attn(value, shapes, locations.clamp(-10, 10), weights))
    grad = torch.randn_like(out)
    _, grads = forward_and_grads(cpu_kernel, value, shapes, starts, locations, weights, grad)
    _, ref_grads = forward_and_grads(lambda v, s, i, l, w: ms_deform_attn_pytorch(v, s, l, w),  # noqa: E741
                                     value, shapes, starts, locations.clamp(-10, 10), weights, grad)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)

    far = torch.full_like(locations, 3.0)
    assert cpu_kernel(value, shapes, starts, far, weights).abs().max() == 0
    nan = locations.clone()
    nan[:, :, :, :, 0] = float("nan")  # NaN samples are skipped (grid_sample would propagate NaN)
    keep = weights.clone()
    keep[:, :, :, :, 0] = 0
    torch.testing.assert_close(cpu_kernel(value, shapes, starts, nan, weights),
                               cpu_kernel(value, shapes, starts, locations, keep))


def test_cpu_noncontiguous_and_int32_inputs(cpu_kernel):
    value, shapes, starts, locations, weights = kernel_inputs(dtype=torch.float64)
    expected = cpu_kernel(value, shapes, starts, locations, weights)
    strided_value = value.transpose(0, 1).contiguous().transpose(0, 1)
    strided_locations = locations.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not strided_value.is_contiguous() and not strided_locations.is_contiguous()
    actual = cpu_kernel(strided_value, shapes.int(), starts.int(), strided_locations, weights)
    torch.testing.assert_close(actual, expected)


def test_cpu_result_does_not_depend_on_thread_count(cpu_kernel):
    """The backward splits queries into per-thread grad_value buffers; any split sums the same."""
    args = kernel_inputs(batch=1, heads=1, queries=40, dtype=torch.float64)
    grad = torch.randn(1, 40, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(forward_and_grads(cpu_kernel, *args, grad))
    finally:
        torch.set_num_threads(threads)
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        for g, r in zip(grads, results[0][1]):
            torch.testing.assert_close(g, r)


def test_cpu_rejects_levels_outside_value(cpu_kernel):
    value, shapes, starts, locations, weights = kernel_inputs(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="does not fit"):
        cpu_kernel(value[:, :-1], shapes, starts, locations, weights)
    with pytest.raises(RuntimeError, match="sampling_locations"):
        cpu_kernel(value, shapes, starts, locations[..., :1], weights)


def test_cpu_empty_inputs(cpu_kernel):
    value, shapes, starts, locations, weights = kernel_inputs(queries=0, dtype=torch.float32)
    out, grads = forward_and_grads(cpu_kernel, value, shapes, starts, locations, weights,
                                   torch.zeros(2, 0, 3 * 32))
    assert out.shape == (2, 0, 96) and grads[0].abs().sum() == 0


# ------------------------------------------------------------------------------------------------
# The operator: opcheck, torch.compile, autocast, dispatch


def test_opcheck(cpu_kernel):
    value, shapes, starts, locations, weights = kernel_inputs(batch=1, heads=2, dim=4, queries=3, points=2,
                                                              shapes=((4, 5), (2, 3)), dtype=torch.float64)
    args = (value.requires_grad_(), shapes, starts, locations.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(torch.ops.sparse_detr.ms_deform_attn.default, args)


def test_torch_compile_fullgraph(cpu_kernel):
    attn = MSDeformAttn(d_model=64, n_levels=2, n_heads=2, n_points=3).double()
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.tensor([0, 48])
    query = torch.randn(2, 5, 64, dtype=torch.float64)
    value = torch.randn(2, 60, 64, dtype=torch.float64)
    ref = torch.rand(2, 5, 2, 2, dtype=torch.float64)

    def run(module):
        q = query.clone().requires_grad_()
        out = module(q, ref, value, shapes, starts)[0]
        out.square().sum().backward()
        return out.detach(), q.grad

    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    eager_out, eager_grad = run(attn)
    compiled_out, compiled_grad = run(compiled)
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_autocast_cpu_bfloat16(cpu_kernel):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=64, n_levels=2, n_heads=2, n_points=3)
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.tensor([0, 48])
    query, value, ref = torch.randn(2, 5, 64), torch.randn(2, 60, 64), torch.rand(2, 5, 2, 2)
    expected = attn(query, ref, value, shapes, starts)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(query, ref, value, shapes, starts)[0]
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert_close_scaled(out, expected, 3e-2, "autocast output")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in attn.parameters())


def test_dispatch_and_msda_impl(cpu_kernel, monkeypatch):
    calls = []
    original = ms_deform_attn_func.ms_deform_attn_pytorch

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(ms_deform_attn_func, "ms_deform_attn_pytorch", spy)
    args = kernel_inputs(dtype=torch.float64)
    monkeypatch.delenv("MSDA_IMPL", raising=False)
    assert implementation("cpu") == "kernel"
    with_kernel = ms_deform_attn(*args)
    assert not calls
    monkeypatch.setenv("MSDA_IMPL", "pytorch")
    assert implementation("cpu") == "pytorch"
    assert kernel_status("cpu").state == "disabled"
    torch.testing.assert_close(ms_deform_attn(*args), with_kernel)
    assert calls
    monkeypatch.setenv("MSDA_IMPL", "kernel")
    with pytest.raises(RuntimeError, match="MSDA_IMPL=kernel"):
        implementation("meta")
