"""Benchmark multi-scale deformable attention: pure PyTorch vs the compiled kernel.

Median forward and forward+backward wall times per implementation and dtype at COCO shapes:
batch 2, four levels 100x152, 50x76, 25x38, 13x19 (S = 20,197 tokens), 8 heads x 32 channels,
4 points per level, for

* ``encoder``: every token is a query (Q = 20,197), reference points at the token centres;
* ``sparse``:  Sparse DETR's encoder at rho = 0.1 (Q = 2,020 of those tokens, chosen at random);
* ``decoder``: Q = 300 object queries at random reference points.

Sampling offsets are Gaussian with a 2-pixel spread per level (like a trained model's, roughly),
attention weights a softmax over the 16 samples of a head. Both implementations get the same
tensors (value, locations and weights all in the benchmarked dtype).

On CUDA the table adds the memory-traffic floor: forward = bytes of value + locations + weights +
output, forward+backward = that plus grad_output, value, locations and weights read again and
grad_value, grad_locations and grad_weights written, each divided by ``--bandwidth`` (H100 SXM
HBM3: 3.35e12 B/s). The kernels gather, so they cannot reach it; it is the scale to compare to.

    python tools/bench_op.py --device cpu --threads 2
    python tools/bench_op.py --device cuda --dtypes float32 float16 bfloat16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEVELS = ((100, 152), (50, 76), (25, 38), (13, 19))
HEADS, CHANNELS, POINTS, BATCH = 8, 32, 4, 2
TOKENS = sum(h * w for h, w in LEVELS)
CASES = {"encoder": TOKENS, "sparse": round(0.1 * TOKENS), "decoder": 300}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
H100_BANDWIDTH = 3.35e12


def make_inputs(case: str, dtype: torch.dtype, device: torch.device, batch: int = BATCH, seed: int = 0):
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights for a case."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    levels = len(LEVELS)
    queries = CASES[case]
    value = torch.randn(batch, TOKENS, HEADS, CHANNELS, generator=g)
    if case == "decoder":
        reference = torch.rand(batch, queries, 2, generator=g)
    else:
        centres = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                        indexing="xy"), -1).reshape(-1, 2) for h, w in LEVELS])
        if case == "sparse":
            index = torch.stack([torch.randperm(TOKENS, generator=g)[:queries].sort().values for _ in range(batch)])
        else:
            index = torch.arange(TOKENS).expand(batch, -1)
        reference = centres[index]
    pixel = torch.tensor([[w, h] for h, w in LEVELS], dtype=torch.float32)  # (x, y) size of each level
    offsets = torch.randn(batch, queries, HEADS, levels, POINTS, 2, generator=g) * 2.0 / pixel[:, None, :]
    locations = reference[:, :, None, None, None, :] + offsets
    weights = torch.randn(batch, queries, HEADS, levels * POINTS, generator=g).softmax(-1)
    weights = weights.view(batch, queries, HEADS, levels, POINTS)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(value), shapes.to(device), starts.to(device), cast(locations), cast(weights)


def _synchronize(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def median_seconds(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> float:
    sync = _synchronize(device)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def implementations(device: torch.device, wanted: list[str]) -> dict[str, Optional[Callable]]:
    """name -> op(value, shapes, starts, locations, weights), or None (with a printed reason)."""
    from models.ops import _extension
    from models.ops.ms_deform_attn_func import ms_deform_attn_pytorch

    table: dict[str, Optional[Callable]] = {}
    for name in wanted:
        if name == "pytorch":
            table[name] = lambda v, s, i, l, w: ms_deform_attn_pytorch(v, s, l, w)  # noqa: E731, E741
        elif name == "kernel":
            start = time.perf_counter()
            status = _extension.load(device.type, warn=False)
            if status.loaded:
                print(f"# kernel for {device.type}: {status.library} (build/load {time.perf_counter() - start:.1f} s)")
                table[name] = torch.ops.sparse_detr.ms_deform_attn
            else:
                print(f"# kernel for {device.type} unavailable ({status.state}): {status.reason}")
                table[name] = None
        else:
            raise ValueError(f"unknown implementation {name!r}")
    return table


def traffic_floor_bytes(inputs, output) -> tuple[int, int]:
    value, _, _, locations, weights = inputs
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    forward = nbytes(value) + nbytes(locations) + nbytes(weights) + nbytes(output)
    backward = nbytes(output) + 2 * (nbytes(value) + nbytes(locations) + nbytes(weights))
    return forward, forward + backward


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = implementations(device, args.impls)
    results = []
    for case in args.cases:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            inputs = make_inputs(case, dtype, device)
            grad = torch.randn(BATCH, CASES[case], HEADS * CHANNELS, generator=torch.Generator().manual_seed(1))
            grad = grad.to(device=device, dtype=dtype)
            for name, op in impls.items():
                row = {"case": case, "queries": CASES[case], "dtype": dtype_name, "impl": name,
                       "forward_ms": None, "forward_backward_ms": None, "error": None}
                results.append(row)
                if op is None:
                    row["error"] = "unavailable"
                    continue

                def forward(op=op):
                    with torch.no_grad():
                        op(*inputs)

                leaves = [inputs[0].detach().requires_grad_(), inputs[3].detach().requires_grad_(),
                          inputs[4].detach().requires_grad_()]

                def forward_backward(op=op):
                    for leaf in leaves:
                        leaf.grad = None
                    op(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2]).backward(grad)

                try:
                    row["forward_ms"] = 1e3 * median_seconds(forward, device, args.repeats, args.warmup)
                    row["forward_backward_ms"] = 1e3 * median_seconds(forward_backward, device, args.repeats,
                                                                      args.warmup)
                except (RuntimeError, NotImplementedError) as error:
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                if device.type == "cuda":
                    with torch.no_grad():
                        out = torch.empty(BATCH, CASES[case], HEADS * CHANNELS, device=device, dtype=dtype)
                    fwd_bytes, total_bytes = traffic_floor_bytes(inputs, out)
                    row["forward_floor_ms"] = 1e3 * fwd_bytes / args.bandwidth
                    row["forward_backward_floor_ms"] = 1e3 * total_bytes / args.bandwidth
            del inputs, grad
    return results


def format_table(results: list[dict], device: torch.device) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    header = ["case", "Q", "dtype", "impl", "fwd ms", "fwd+bwd ms", "fwd x", "fwd+bwd x"]
    if device.type == "cuda":
        header += ["fwd floor ms", "fwd+bwd floor ms"]
    rows = [header]
    baseline = {(r["case"], r["dtype"]): r for r in results if r["impl"] == "pytorch"}
    for r in results:
        base = baseline.get((r["case"], r["dtype"]))

        def speedup(key):
            if base is None or base[key] is None or r[key] is None:
                return "-"
            return f"{base[key] / r[key]:.2f}"

        row = [r["case"], str(r["queries"]), r["dtype"], r["impl"], fmt(r["forward_ms"]),
               fmt(r["forward_backward_ms"]), speedup("forward_ms"), speedup("forward_backward_ms")]
        if device.type == "cuda":
            row += [fmt(r.get("forward_floor_ms")), fmt(r.get("forward_backward_floor_ms"))]
        if r["error"]:
            row.append(r["error"])
        rows.append(row)
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(widths[i]) if i < len(widths) else cell for i, cell in enumerate(row))
             for row in rows]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU); 0 keeps the default")
    parser.add_argument("--impls", nargs="+", default=["pytorch", "kernel"], choices=["pytorch", "kernel"])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="default: float32 bfloat16 on CPU, float32 float16 bfloat16 on CUDA")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (median); default 5 CPU, 50 CUDA")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first; default 1 CPU, 5 CUDA")
    parser.add_argument("--bandwidth", type=float, default=H100_BANDWIDTH,
                        help="GPU memory bandwidth in B/s for the traffic floor (default: H100 SXM, 3.35e12)")
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    if args.dtypes is None:
        args.dtypes = ["float32", "float16", "bfloat16"] if gpu else ["float32", "bfloat16"]
    if args.repeats is None:
        args.repeats = 50 if gpu else 5
    if args.warmup is None:
        args.warmup = 5 if gpu else 1
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    print(f"# {where}; torch {torch.__version__}; B={BATCH}, levels {LEVELS}, {HEADS} heads x {CHANNELS}, "
          f"{POINTS} points; median of {args.repeats} (after {args.warmup} warm-up)")
    results = run(args)
    print(format_table(results, device))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
