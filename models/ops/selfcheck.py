"""The compiled kernels check themselves against the PyTorch reference before their first use.

The first time :func:`~models.ops.ms_deform_attn_func.choose_implementation` would hand a (device, dtype) to a
compiled kernel, :func:`kernel_agrees` runs the kernel and :func:`~models.ops.reference.ms_deform_attn_pytorch`
(in float64) on a small random problem, forward and backward: three levels of unequal, non-square sizes,
sampling points on and beyond the borders of each map, and points whose pixel coordinates are exactly -1, 0,
H - 1 and H (W - 1 and W for x), where a kernel's inside/outside test must agree with ``grid_sample``. A
kernel that disagrees beyond the dtype's tolerance logs one error naming the device, the dtype and the
largest difference, and the process uses the PyTorch path for that (device, dtype) from then on: a wrong
kernel costs speed, never correctness.

Each process checks its own device (under torchrun, every rank its GPU). ``MSDA_SELFCHECK=0`` turns the
check off. Cost: one check is a few milliseconds on the CPU (docs/benchmarks.md, "Kernel self-check").
"""
from __future__ import annotations

import logging
import os
import time

import torch
from torch import Tensor

from .reference import ms_deform_attn_pytorch

logger = logging.getLogger(__name__)

ENV_SELFCHECK = "MSDA_SELFCHECK"
# Largest difference from the float64 reference allowed per dtype, relative to the largest reference value (at
# least 1) of the output or gradient compared.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
_verdicts: dict[tuple[str, int, torch.dtype], bool] = {}


def run_kernel(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
               attention_weights: Tensor) -> Tensor:
    """The compiled operator, as :func:`ms_deform_attn` calls it (tests replace this to inject a fault)."""
    return torch.ops.sparse_detr.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                                attention_weights)


def exact_border_locations(height: int, width: int, count: int) -> Tensor:
    """``count`` normalised (x, y) locations [count, 2] whose pixel coordinates (``x * W - 0.5``, as the kernels
    and ``grid_sample`` compute them) are exactly -1, 0, W - 1 or W in x and -1, 0, H - 1 or H in y: the first 16
    take every pair, the rest repeat them. Exact in every dtype for sides that are powers of two."""
    index = torch.arange(count)
    pixels_x = torch.tensor([-1.0, 0.0, width - 1.0, float(width)])[index % 4]
    pixels_y = torch.tensor([-1.0, 0.0, height - 1.0, float(height)])[(index // 4) % 4]
    return torch.stack([(pixels_x + 0.5) / width, (pixels_y + 0.5) / height], -1)


def check_problem(device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, ...]:
    """``(value [2, S, 2, 8], spatial_shapes [3, 2], level_start_index [3], locations [2, 7, 2, 3, 3, 2],
    weights [2, 7, 2, 3, 3])``: levels 5x7, 4x8, 1x2; the first point of every level on or past a border, the
    second point of the 4x8 and 1x2 levels exactly on the border pixels (:func:`exact_border_locations`; their
    sides are powers of two, so that the pixel coordinates stay exact)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[5, 7], [4, 8], [1, 2]])
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    value = torch.randn(2, int(shapes.prod(1).sum()), 2, 8, generator=generator)
    locations = torch.rand(2, 7, 2, 3, 3, 2, generator=generator) * 1.2 - 0.1
    # On, just inside and beyond each border; none at a pixel centre, where the gradient has a kink.
    border = torch.tensor([0.0, 1.0, -0.05, 1.05, 0.02, 0.98])
    locations[:, :, :, :, 0] = border[torch.randint(0, len(border), locations[:, :, :, :, 0].shape,
                                                    generator=generator)]
    # Exactly on the border pixels: at -1 and at H (W) a point is just outside, with a non-zero gradient at -1;
    # at 0 and H - 1 (W - 1) it sits on a pixel centre, where the kernels and grid_sample both take the
    # derivative towards the next pixel (floor).
    for level in (1, 2):
        height, width = shapes[level].tolist()
        locations[:, :, :, level, 1] = exact_border_locations(height, width, 2 * 7 * 2).view(2, 7, 2, 2)
    weights = torch.rand(2, 7, 2, 3, 3, generator=generator).softmax(-1)
    return (value.to(device, dtype), shapes.to(device), starts.to(device), locations.to(device, dtype),
            weights.to(device, dtype))


def largest_difference(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """``(largest difference, where)`` between the kernel in ``dtype`` and the float64 reference, over the output
    and the gradients of value, locations and weights; each relative to its largest reference value (>= 1)."""
    value, shapes, starts, locations, weights = check_problem(device, dtype)
    cotangent = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1)).to(device)
    results = {}
    for name, inputs in (("kernel", (value, locations, weights)),
                         ("reference", (value.double(), locations.double(), weights.double()))):
        inputs = [t.detach().requires_grad_() for t in inputs]
        # Its own saved-tensor hooks: the first use may come inside an activation checkpoint (--grad_checkpoint),
        # whose hooks would otherwise count this graph's tensors as the block's, and find them missing when the
        # block runs again in backward (without the check, done by then).
        with torch.enable_grad(), torch.autocast(device.type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor):
            if name == "kernel":
                output = run_kernel(inputs[0], shapes, starts, inputs[1], inputs[2])
            else:
                output = ms_deform_attn_pytorch(inputs[0], shapes, inputs[1], inputs[2])
            grads = torch.autograd.grad((output * cotangent.to(output.dtype)).sum(), inputs)
        results[name] = (output.detach(), *grads)
    worst, where = 0.0, "output"
    for label, got, want in zip(("output", "grad of value", "grad of locations", "grad of weights"),
                                results["kernel"], results["reference"]):
        difference = float((got.double() - want).abs().max()) / max(1.0, float(want.abs().max()))
        if difference > worst:
            worst, where = difference, label
    return worst, where


def kernel_agrees(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the compiled kernel for ``device_type`` (this process's current device) and ``dtype`` agrees
    with the reference; checked once per (device, dtype) and process, True when ``MSDA_SELFCHECK=0``."""
    if os.environ.get(ENV_SELFCHECK, "1") == "0":
        return True
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device(
        device_type)
    key = (device.type, device.index or 0, dtype)
    if key not in _verdicts:
        started = time.perf_counter()
        difference, where = largest_difference(device, dtype)
        _verdicts[key] = difference <= TOLERANCE.get(dtype, TOLERANCE[torch.float32])
        if _verdicts[key]:
            logger.debug("ms_deform_attn self-check on %s %s passed (largest difference %.2g, %.1f ms)", device,
                         dtype, difference, 1e3 * (time.perf_counter() - started))
        else:
            logger.error("ms_deform_attn self-check: the compiled kernel on %s for %s tensors differs from the "
                         "PyTorch reference by %.3g in the %s (tolerance %.1g); this process uses the PyTorch path "
                         "for them instead (slower, correct). Please report it with your GPU and CUDA versions.",
                         device, str(dtype).replace("torch.", ""), difference, where,
                         TOLERANCE.get(dtype, TOLERANCE[torch.float32]))
    return _verdicts[key]
