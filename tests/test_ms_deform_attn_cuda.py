"""The CUDA kernels, checked three ways:

- on a GPU (skipped without one): forward / backward against the PyTorch path in float32, float16, bfloat16,
  float64 gradcheck, boundaries;
- without a GPU: the real host code and kernels (ms_deform_attn_cuda.cpp and _kernels.cu) compiled as C++
  against the CUDA stand-ins of tests/cuda_emulation (each block runs as host threads, warp shuffles and
  atomics emulated) and compared with the PyTorch path, which checks the host code's checks and launch sizes
  and the kernels' indexing, lane layouts and reductions;
- compile-only with the machine's nvcc for sm_80 and sm_90 (skipped without nvcc), so a build break shows up
  in CI without a GPU.
"""
from __future__ import annotations

import hashlib
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from models.ops import MSDeformAttn, _extension, _library, implementation
from msda_kernel_helpers import (EMULATION, EMULATION_LIBRARY, assert_close_scaled, compare_with_reference,
                                 forward_and_grads, kernel_inputs, needs_cuda)


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
