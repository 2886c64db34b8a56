"""Cost of the models: parameters, multiply-adds and inference time.

    python tools/benchmark.py model [--device cpu] [--threads 2] [--height 850 --width 1040]
    python tools/benchmark.py op ...            # the deformable-attention op (tools/bench_op.py)

Multiply-adds are ``torch.utils.flop_counter.FlopCounterMode`` total / 2: the matmul and conv
multiply-adds the Sparse DETR paper's GFLOPs column counts (bilinear sampling is not counted).
Models are full size (ResNet-50, 6+6 layers, 300 queries), randomly initialised, in eval mode.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from main import parse_args  # noqa: E402
from models import build_model  # noqa: E402

SPARSE = ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head", "--use_enc_aux_loss"]
MODELS = {
    "deformable_detr": [],
    "deformable_detr_refine_two_stage": ["--with_box_refine", "--two_stage"],
    "efficient_detr": ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head"],
    **{f"sparse_detr_rho{rho}": SPARSE + ["--rho", str(rho)] for rho in (0.1, 0.2, 0.3, 0.4, 0.5)},
}
DEFAULT_MODELS = ["deformable_detr_refine_two_stage", "sparse_detr_rho0.1", "sparse_detr_rho0.5"]


def build(name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    args = parse_args(["--device", device, "--backbone_from_scratch", *MODELS[name]])
    model, _, _ = build_model(args)
    return model.to(device).eval()


def multiply_adds(model: torch.nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops() / 2


def seconds_per_image(model: torch.nn.Module, images: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median wall time of a forward pass divided by the batch size (synchronised on GPU)."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            if images.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(images)
            if images.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times) / images.shape[0]


def model_benchmark(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="parameters, GMACs and seconds per image of full-size models")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=tuple(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--height", type=int, default=850)
    parser.add_argument("--width", type=int, default=1040)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = torch.randn(args.batch_size, 3, args.height, args.width, device=args.device)
    print(f"device {args.device}, {args.threads} threads, batch {args.batch_size}, image {args.height}x{args.width}")
    print("| model | params (M) | GMACs | s / image |")
    print("|---|---|---|---|")
    for name in args.models:
        model = build(name, args.device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gmacs = multiply_adds(model, images[:1]) / 1e9
        seconds = seconds_per_image(model, images, args.warmup, args.repeats)
        print(f"| {name} | {params:.2f} | {gmacs:.1f} | {seconds:.2f} |", flush=True)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("model", "op"):
        raise SystemExit("usage: python tools/benchmark.py {model,op} [options]  (--help after the command)")
    if argv[0] == "model":
        model_benchmark(argv[1:])
    else:
        from bench_op import main as op_benchmark
        op_benchmark(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
