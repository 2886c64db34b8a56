"""Export a detector to ONNX, and check it in onnxruntime against PyTorch.

    python tools/export_onnx.py --resume exps/r50_sparse_detr_rho_0.1/checkpoint.pth --out sparse_detr.onnx --verify
    python tools/export_onnx.py --resume r50_sparse_detr_0.1.pth --config configs/r50_sparse_detr_rho_0.1.sh \\
        --out sparse_detr.onnx --verify                   # an official checkpoint: its config gives the flags
    python tools/export_onnx.py --resume ckpt.pth --out m.onnx -- --with_box_refine --two_stage   # or flags

The model is rebuilt from the ``args`` stored in the checkpoint (ours store them), from ``--config`` (a
configs/*.sh script) or from the main.py flags after ``--``. ``--random_init`` exports a seeded random model
of those flags instead (to check the export itself; nothing to deploy). The graph's inputs, outputs and the
preprocessing it expects are described in models/export.py; the README's "Deploy" section runs it.

``--verify`` runs onnxruntime and PyTorch on random images of three sizes other than the export size (or
``--verify_sizes``), prints the largest absolute difference of the logits and of the boxes per size, and
fails (exit status 1) above ``--tolerance``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.export import (DEFAULT_OPSET, DEFAULT_TOLERANCE, MAX_SIDE, OnnxDetector,  # noqa: E402
                           default_verify_sizes, export_onnx, min_side, verify_onnx)
from inference import Detector  # noqa: E402
from util.checkpoint import CheckpointMismatchError  # noqa: E402
from util.errors import InputError  # noqa: E402

logger = logging.getLogger(__name__)


def parse_cli(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    model_flags: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, model_flags = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", default="", metavar="CKPT", help="checkpoint to export (ours or official)")
    parser.add_argument("--random_init", action="store_true",
                        help="export a seeded random model of the flags instead of a checkpoint (export checks)")
    parser.add_argument("--config", default="", metavar="SCRIPT",
                        help="configs/*.sh script whose main.py flags build the model (instead of flags after --)")
    parser.add_argument("--out", required=True, metavar="ONNX", help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (16 or later: GridSample)")
    parser.add_argument("--export_size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"),
                        help="size of the example images the export traces (the graph accepts others)")
    parser.add_argument("--with_mask", action="store_true",
                        help="the graph also takes pixel_mask [B, H, W] (True on padding), for padded batches")
    parser.add_argument("--weights", default="raw", choices=("raw", "ema"),
                        help="the checkpoint's trained weights, or their moving average (--ema_decay runs)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="unpickle the checkpoint without restriction (only for files you trust)")
    parser.add_argument("--verify", action="store_true", help="compare onnxruntime with PyTorch after exporting")
    parser.add_argument("--verify_sizes", type=int, nargs="+", default=None, metavar="PX",
                        help="H W pairs to verify at (default: three sizes other than --export_size)")
    parser.add_argument("--verify_batch", type=int, default=1, help="images per verified batch")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest max-abs difference of logits and of boxes that --verify accepts (float32)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch and onnxruntime (0: all)")
    args = parser.parse_args(argv)
    if bool(args.resume) == args.random_init:
        parser.error("give --resume CKPT, or --random_init to export a random model of the flags")
    if args.config and model_flags:
        parser.error("give the model flags either after -- or as --config, not both")
    if args.verify_sizes is not None and len(args.verify_sizes) % 2:
        parser.error(f"--verify_sizes takes H W pairs, got {len(args.verify_sizes)} numbers")
    # Checked before the export: --verify would otherwise fail on them after it.
    if args.verify_sizes is not None and min(args.verify_sizes) < 1:
        parser.error(f"--verify_sizes must be positive sizes in pixels, got {' '.join(map(str, args.verify_sizes))}")
    if args.verify_batch < 1:
        parser.error(f"--verify_batch must be at least 1 (images per verified batch), got {args.verify_batch}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0: all the CPU's threads), got {args.threads}")
    return args, model_flags


def check_out_path(out: Path) -> None:
    """SystemExit unless ``out`` can be written (its folder exists or can be made, and is writable)."""
    if out.is_dir():
        raise SystemExit(f"error: --out {out} is a folder: give a file name such as {out / 'model.onnx'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"error: --out {out}: cannot create its folder ({err.strerror}); choose a writable path")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise SystemExit(f"error: --out {out}: not writable; choose a writable path")


def one_line(error: Exception) -> str:
    """An error's message on one line: for a checkpoint that does not fit, its first line and likely cause
    (the tensor listing is left out; tools/predict.py prints it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, CheckpointMismatchError):
        lines = [lines[0]] + [line for line in lines if line.startswith(("likely cause", "Here:"))]
    return " ".join(lines)


def build_detector(args: argparse.Namespace, model_flags: list[str]) -> OnnxDetector:
    """The model to export (``inference.Detector``), in eval mode on the CPU, with its post-processing."""
    flags = args.config or model_flags
    if args.random_init:
        detector = Detector.from_flags(flags, device="cpu")
    else:
        detector = Detector.from_checkpoint(args.resume, flags, device="cpu", weights=args.weights,
                                            trust=args.trust_checkpoint)
    return OnnxDetector(model=detector.model, postprocessor=detector.postprocessor).eval()


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args, model_flags = parse_cli(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    check_out_path(out)
    try:
        detector = build_detector(args, model_flags)
        low = min_side(detector.model)
        start = time.perf_counter()
        names = export_onnx(detector, out, example_size=tuple(args.export_size), opset=args.opset,
                            with_mask=args.with_mask)
    except (FileNotFoundError, InputError) as err:
        raise SystemExit(f"error: {one_line(err)}") from None
    except PermissionError as err:
        raise SystemExit(f"error: --out {out}: {err.strerror}; choose a writable path") from None
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, opset {args.opset}, {time.perf_counter() - start:.0f} s): "
          f"inputs {'images, pixel_mask' if args.with_mask else 'images'} (batch 1-64, H and W in [{low}, {MAX_SIDE}] "
          f"px); outputs {', '.join(names)}")
    if not args.verify:
        return []
    if args.verify_sizes:
        sizes = list(zip(args.verify_sizes[0::2], args.verify_sizes[1::2]))
    else:
        sizes = default_verify_sizes(tuple(args.export_size), low)
    records = verify_onnx(out, detector, sizes, tolerance=args.tolerance, batch=args.verify_batch,
                          with_mask=args.with_mask, threads=args.threads)
    for record in records:
        kept = f", kept tokens {record['kept_counts']} (onnx {record['onnx_kept_counts']})" if "kept_counts" in record else ""
        if record["reordered_queries"]:
            kept += f", {record['reordered_queries']} queries in another order (near-equal proposal scores)"
        if "padded_logits_diff" in record:
            kept += f" (padded images, not held to the tolerance: logits {record['padded_logits_diff']:.2e})"
        print(f"verify {record['size'][0]}x{record['size'][1]}: max |logits diff| {record['logits_diff']:.2e}, "
              f"max |boxes diff| {record['boxes_diff']:.2e}{kept}: {'ok' if record['ok'] else 'FAILED'}")
    failed = [r for r in records if not r["ok"]]
    if failed:
        raise SystemExit(f"error: onnxruntime and PyTorch differ by more than --tolerance {args.tolerance:g} (or in "
                         f"kept tokens) at {', '.join(f'{h}x{w}' for h, w in (r['size'] for r in failed))}")
    print(f"verified: onnxruntime matches PyTorch within {args.tolerance:g} at {len(records)} sizes")
    return records


if __name__ == "__main__":
    main()
