"""Compiled multi-scale deformable attention kernels (models/ops/csrc) against the PyTorch path.

* CPU kernel: float64 gradcheck; float32 / bfloat16 / float16 forward and gradients against the
  PyTorch path; out-of-range, boundary and NaN locations; thread-count independence.
* CUDA kernels, checked three ways:
  - on a GPU (skipped without one): forward / backward against the PyTorch path in float32,
    float16, bfloat16, float64 gradcheck, boundaries;
  - without a GPU: the real host code and kernels (ms_deform_attn_cuda.cpp and _kernels.cu) compiled
    as C++ against the CUDA stand-ins of tests/cuda_emulation (each block runs as host threads, warp
    shuffles and atomics emulated) and compared with the PyTorch path, which checks the host code's
    checks and launch sizes and the kernels' indexing, lane layouts and reductions;
  - compile-only with the machine's nvcc for sm_80 and sm_90 (skipped without nvcc), so a build
    break shows up in CI without a GPU.
* The torch.library operator: opcheck (schema, fake tensor, autograd registration), torch.compile
  (aot_eager, fullgraph), autocast; the dispatch switch (MSDA_IMPL, fallback warnings) and that
  importing models.ops builds nothing.

Tolerances (max |actual - expected| <= tol * max |expected| per tensor, expected from the PyTorch path
in float64 on the same, already rounded inputs): float64 1e-10, float32 1e-5, bfloat16 1e-2,
float16 2e-3. Kernels accumulate in float32 (float64 for float64), so the low-precision error is
essentially the final rounding of each output to bfloat16 / float16.

The first run builds the CPU extension and the emulation (cached in the torch extensions folder).
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from models.ops import MSDeformAttn, _extension, implementation, kernel_status, ms_deform_attn, ms_deform_attn_pytorch
from models.ops import _library, ms_deform_attn_func, selfcheck
from test_ms_deform_attn import naive_ms_deform_attn, random_inputs

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


@pytest.fixture(scope="module")
def cpu_kernel():
    require_kernel("cpu")
    return torch.ops.sparse_detr.ms_deform_attn


@pytest.fixture(scope="module")
def cuda_kernel():
    require_kernel("cuda")
    return torch.ops.sparse_detr.ms_deform_attn


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


# ------------------------------------------------------------------------------------------------
# CUDA kernels on a GPU


@needs_cuda
@pytest.mark.parametrize("dim", [32, 8, 48, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_pytorch(cuda_kernel, dtype, dim):
    compare_with_reference(cuda_kernel, kernel_inputs(dim=dim, dtype=dtype, device="cuda"), dtype,
                           f"cuda {dtype} D={dim}")


@needs_cuda
def test_cuda_gradcheck_float64(cuda_kernel):
    for dim in (4, 32):
        value, shapes, starts, locations, weights = kernel_inputs(batch=1, heads=2, dim=dim, queries=3, points=2,
                                                                  shapes=((4, 5), (2, 3)), dtype=torch.float64,
                                                                  device="cuda", spread=(-0.1, 1.1))
        inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
        assert torch.autograd.gradcheck(lambda v, l, w: cuda_kernel(v, shapes, starts, l, w), inputs,  # noqa: E741
                                        eps=1e-6, atol=1e-6, nondet_tol=1e-12)


@needs_cuda
def test_cuda_boundaries_and_cpu_agreement(cuda_kernel, cpu_kernel):
    value, shapes, starts, locations, weights = kernel_inputs(dtype=torch.float64, queries=6, points=4)
    special = torch.tensor([0.0, 1.0, -5.0, 5.0, 0.5, 1e-9, 1 - 1e-9, -0.1, 1.1, 0.25, 1e30, float("nan")],
                           dtype=torch.float64)
    locations = special[torch.randint(0, len(special), locations.shape, generator=torch.Generator().manual_seed(1))]
    grad = torch.randn(2, 6, 96, dtype=torch.float64)
    cpu = forward_and_grads(cpu_kernel, value, shapes, starts, locations, weights, grad)
    gpu = forward_and_grads(cuda_kernel, value.cuda(), shapes.cuda(), starts.cuda(), locations.cuda(),
                            weights.cuda(), grad.cuda())
    torch.testing.assert_close(gpu[0].cpu(), cpu[0])
    for g, c in zip(gpu[1], cpu[1]):
        torch.testing.assert_close(g.cpu(), c)


@needs_cuda
def test_cuda_module_autocast_and_dispatch(cuda_kernel):
    assert implementation("cuda") == "kernel"
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=256, n_levels=2, n_heads=8, n_points=4).cuda()
    shapes = torch.tensor([[16, 20], [8, 10]], device="cuda")
    starts = torch.tensor([0, 320], device="cuda")
    query, value = torch.randn(2, 50, 256, device="cuda"), torch.randn(2, 400, 256, device="cuda")
    ref = torch.rand(2, 50, 2, 2, device="cuda")
    expected = attn(query, ref, value, shapes, starts)[0]
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            out = attn(query, ref, value, shapes, starts)[0]
        out.float().sum().backward()
        assert_close_scaled(out, expected, 3e-2, f"autocast {dtype}")


# ------------------------------------------------------------------------------------------------
# CUDA kernels without a GPU: host emulation and nvcc compile


@pytest.fixture(scope="module")
def cuda_emulation():
    """The real CUDA host code and kernels built as C++ for CPU tensors: ms_deform_attn_cuda.cpp as it is
    (tests/cuda_emulation/include first on the include path stands in for the CUDA runtime and c10/cuda) and
    the kernels file through cuda_emulation's wrapper, registered as sparse_detr_cuda_emulation::ms_deform_attn
    and ::ms_deform_attn_backward with the schemas of the sparse_detr operators."""
    missing = _extension.missing_prerequisites("cpu")
    if missing:
        pytest.skip("cannot build C++ here: " + "; ".join(missing))
    with _extension._quiet_cpp_extension_import():
        from torch.utils import cpp_extension
    sources = [_extension.CSRC / "ms_deform_attn_cuda.cpp", EMULATION / "ms_deform_attn_cuda_kernels_emulated.cpp"]
    files = [*sources, _extension.CSRC / "ms_deform_attn_cuda_kernels.cu",
             *(_extension.CSRC / name for name in _extension._HEADERS), *sorted(EMULATION.rglob("*.h"))]
    digest = hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()[:10]
    library = torch.library.Library(EMULATION_LIBRARY, "DEF")
    library.define(_library._FORWARD_SCHEMA)
    library.define(_library._BACKWARD_SCHEMA)
    with _extension._path_with(_extension._ninja_dir()):
        cpp_extension.load(name=f"sparse_detr_msda_cuda_emulation_{digest}", sources=[str(f) for f in sources],
                           extra_include_paths=[str(EMULATION / "include"), str(_extension.CSRC)],
                           extra_cflags=["-O1", f"-DMSDA_CUDA_LIBRARY={EMULATION_LIBRARY}", "-DMSDA_CUDA_DEVICE=CPU"],
                           is_python_module=False, with_cuda=False)
    yield getattr(torch.ops, EMULATION_LIBRARY)
    del library  # the definitions live as long as the Library object


@pytest.mark.parametrize("dim,dtype", [(3, torch.float64), (8, torch.float64), (32, torch.float64),
                                       (48, torch.float32), (300, torch.float64), (32, torch.bfloat16),
                                       (16, torch.float16)])
def test_cuda_kernel_logic_in_host_emulation(cuda_emulation, dim, dtype):
    """Lane groups of 4 / 8 / 16 / 32, several channels per lane, channel chunks (D > 256),
    warp-shuffle reductions and atomics, against the PyTorch path (including outside samples)."""
    ops = cuda_emulation

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, locations, weights):
            ctx.save_for_backward(value, shapes, starts, locations, weights)
            return ops.ms_deform_attn(value, shapes, starts, locations, weights)

        @staticmethod
        def backward(ctx, grad):
            value, shapes, starts, locations, weights = ctx.saved_tensors
            gv, gl, gw = ops.ms_deform_attn_backward(grad.contiguous(), value, shapes, starts, locations, weights)
            return gv, None, None, gl, gw

    args = kernel_inputs(batch=2, heads=3, dim=dim, queries=5, points=2, shapes=((5, 7), (2, 3), (1, 1)),
                         dtype=dtype)
    compare_with_reference(Op.apply, args, dtype, f"emulated cuda {dtype} D={dim}")


def _nvcc_compile_commands(tmp_path: Path) -> list[list[str]]:
    from models.ops._extension import CSRC, find_nvcc

    with _extension._quiet_cpp_extension_import():
        from torch.utils import cpp_extension

    torch_include = Path(cpp_extension.include_paths()[0])
    includes = [f"-I{CSRC}"]
    api_include = torch_include / "torch" / "csrc" / "api" / "include"
    for folder in (torch_include, api_include, sysconfig.get_paths()["include"]):
        includes += ["-isystem", str(folder)]
    flags = [*cpp_extension.COMMON_NVCC_FLAGS, "-std=c++20", "--compiler-options", "-fPIC"]
    gencode = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    nvcc = find_nvcc()
    commands = [[nvcc, "-c", str(CSRC / "ms_deform_attn_cuda_kernels.cu"), "-o", str(tmp_path / "kernels.o"),
                 *gencode, *flags, *includes]]
    if (torch_include / "c10" / "cuda" / "CUDAGuard.h").is_file():  # CUDA builds of torch ship these
        # The host side (ATen + c10/cuda) through nvcc, which adds the toolkit's include folder.
        commands.append([nvcc, "-c", str(CSRC / "ms_deform_attn_cuda.cpp"), "-o", str(tmp_path / "host.o"),
                         "-std=c++20", "--compiler-options", "-fPIC", *includes])
    return commands


@pytest.mark.skipif(_extension.find_nvcc() is None, reason="nvcc (CUDA toolkit) not found")
def test_cuda_sources_compile_with_nvcc_for_sm80_sm90(tmp_path):
    start = time.perf_counter()
    jobs = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            for cmd in _nvcc_compile_commands(tmp_path)]
    for cmd, job in jobs:
        output, _ = job.communicate(timeout=900)
        assert job.returncode == 0, f"{' '.join(cmd)}\n{output[-6000:]}"
    assert (tmp_path / "kernels.o").stat().st_size > 0
    print(f"nvcc compile: {time.perf_counter() - start:.1f} s")
