"""Export a detector to ONNX, and check it in onnxruntime against PyTorch.

    python tools/export_onnx.py --resume exps/r50_sparse_detr_rho_0.1/checkpoint.pth --out sparse_detr.onnx --verify
    python tools/export_onnx.py --resume r50_sparse_detr_0.1.pth --config configs/r50_sparse_detr_rho_0.1.sh \\
        --out sparse_detr.onnx --verify                   # an official checkpoint: its config gives the flags
    python tools/export_onnx.py --resume ckpt.pth --out m.onnx -- --with_box_refine --two_stage   # or flags

The model is rebuilt from the ``args`` stored in the checkpoint (ours store them), from ``--config`` (a
configs/*.sh script) or from the main.py flags after ``--``. ``--random_init`` exports a seeded random model
of those flags instead (to check the export itself; nothing to deploy). The graph's inputs, outputs and the
preprocessing it expects are described in models/export.py; the README's "Deploy" section runs it.

The export is traced at the model's own size (``--val_size`` / ``--max_size`` of a 4:3 image) unless
``--export_size`` says otherwise; each step (trace, convert, optimize, write, verify) is printed with its
time, the exporter's own messages only with ``--verbose``. The file's metadata (``metadata_props``) say how
to use it: class names, size rule, mean and std, the model's arguments, rho, opset (``tools/onnx_predict.py``
reads them).

``--verify`` runs onnxruntime and PyTorch on random images of the model's own sizes (4:3, 3:4 and 16:9
images resized by its size rule; or ``--verify_sizes``), prints the largest absolute difference of the logits
and of the boxes per size, and fails (exit status 1) above ``--tolerance``. Sparse DETR's kept tokens are
compared first: a token swapped for another at the top-rho boundary because their scores tie to the last
bits is no error; the outputs are then compared with onnxruntime's kept tokens (models/export_check.py).
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

from datasets.transforms import get_resize_hw  # noqa: E402
from inference import Detector  # noqa: E402
from models.export import (DEFAULT_OPSET, DEFAULT_TOLERANCE, INPUT_NAMES, MAX_SIDE, OnnxDetector,  # noqa: E402
                           export_onnx, min_side, onnx_metadata)
from models.export_check import describe, verify_onnx  # noqa: E402
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
    parser.add_argument("--export_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="size of the example images the export traces (the graph accepts others; default: the "
                             "model's size of a 4:3 image, e.g. 800 1066)")
    parser.add_argument("--categories", default="", metavar="JSON",
                        help="COCO-format annotation file whose categories name the classes in the file's metadata "
                             "(default: COCO's names for 91-class models, else none)")
    parser.add_argument("--with_mask", action="store_true",
                        help="the graph also takes pixel_mask [B, H, W] (True on padding), for padded batches")
    parser.add_argument("--weights", default="raw", choices=("raw", "ema"),
                        help="the checkpoint's trained weights, or their moving average (--ema_decay runs)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="unpickle the checkpoint without restriction (only for files you trust)")
    parser.add_argument("--verify", action="store_true", help="compare onnxruntime with PyTorch after exporting")
    parser.add_argument("--verify_sizes", type=int, nargs="+", default=None, metavar="PX",
                        help="H W pairs to verify at (default: the model's sizes of 4:3, 3:4 and 16:9 images)")
    parser.add_argument("--verify_batch", type=int, default=1, help="images per verified batch")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest max-abs difference of logits and of boxes that --verify accepts (float32)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch and onnxruntime (0: all)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the exporter's own messages (e.g. 'Skipping constant folding'), hidden by default")
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


def build_detector(args: argparse.Namespace, model_flags: list[str]) -> Detector:
    """The model to export (``inference.Detector``, eval mode, CPU), with its description (the checkpoint's, or
    that of the flags given) and class names."""
    flags = args.config or model_flags
    categories = args.categories or None
    if args.random_init:
        return Detector.from_flags(flags, device="cpu", categories=categories)
    return Detector.from_checkpoint(args.resume, flags, device="cpu", weights=args.weights,
                                    trust=args.trust_checkpoint, categories=categories)


# Aspect ratios (w, h) of the images the default export and check use: a landscape photo, a portrait, a video frame.
ASPECTS = ((4, 3), (3, 4), (16, 9))


def own_sizes(val_size: int, max_size: int) -> list[tuple[int, int]]:
    """(H, W) of 4:3, 3:4 and 16:9 images after the model's resize (datasets/transforms.py), without repeats."""
    sizes = []
    for w, h in ASPECTS:
        size = get_resize_hw((w * 1000, h * 1000), val_size, max_size)
        if size not in sizes:
            sizes.append(size)
    return sizes


def verify_sizes(args: argparse.Namespace, own: list[tuple[int, int]], export_size: tuple[int, int], low: int
                 ) -> list[tuple[int, int]]:
    """``--verify_sizes``, else the model's own sizes; where those are all the export size (a model of square
    64-px images), one more size, 16 px taller and 32 px wider, checks that H and W are not frozen."""
    if args.verify_sizes:
        return list(zip(args.verify_sizes[0::2], args.verify_sizes[1::2]))
    sizes = [(max(low, h), max(low, w)) for h, w in own]
    if all(size == export_size for size in sizes):
        sizes.append((export_size[0] + 16, export_size[1] + 32))
    return sizes


def print_steps(export_size: tuple[int, int]):
    """The ``progress`` of ``export_onnx``: one line, "exporting at HxW: trace... 9.1 s, convert... 4.0 s, ..."."""
    def progress(step: str, seconds: Optional[float]) -> None:
        if seconds is None:
            prefix = f"exporting at {export_size[0]}x{export_size[1]}: " if step == "trace" else ", "
            print(f"{prefix}{step}...", end="", flush=True)
        else:
            print(f" {seconds:.1f} s", end="\n" if step == "write" else "", flush=True)
    return progress


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args, model_flags = parse_cli(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    check_out_path(out)
    try:
        detector = build_detector(args, model_flags)
        description = detector.description
        graph = OnnxDetector(model=detector.model, postprocessor=detector.postprocessor).eval()
        low = min_side(graph.model)
        val_size, max_size = detector.val_size, detector.max_size
        own = own_sizes(val_size, max_size)
        export_size = tuple(args.export_size) if args.export_size else tuple(max(low, side) for side in own[0])
        inputs = INPUT_NAMES[:2 if args.with_mask else 1]
        metadata = onnx_metadata(class_names=detector.class_names, num_classes=description.num_classes,
                                 val_size=val_size, max_size=max_size, mean=description.mean, std=description.std,
                                 description=description.to_dict(), rho=description.rho, opset=args.opset,
                                 inputs=inputs)
        start = time.perf_counter()
        names = export_onnx(graph, out, example_size=export_size, opset=args.opset, with_mask=args.with_mask,
                            metadata=metadata, verbose=args.verbose, progress=print_steps(export_size))
    except (FileNotFoundError, InputError) as err:
        raise SystemExit(f"error: {one_line(err)}") from None
    except PermissionError as err:
        raise SystemExit(f"error: --out {out}: {err.strerror}; choose a writable path") from None
    names_note = (f"{len(detector.class_names)} class names" if detector.class_names
                  else "no class names (--categories names them)")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, opset {args.opset}, {time.perf_counter() - start:.0f} s): "
          f"inputs {', '.join(inputs)} (batch 1-64, H and W in [{low}, {MAX_SIDE}] px); outputs {', '.join(names)}; "
          f"metadata: size rule {val_size}/{max_size}, {names_note}")
    if not args.verify:
        return []
    sizes = verify_sizes(args, own, export_size, low)
    start = time.perf_counter()
    print(f"verifying at {', '.join(f'{h}x{w}' for h, w in sizes)}...", flush=True)
    records = verify_onnx(out, graph, sizes, tolerance=args.tolerance, batch=args.verify_batch,
                          with_mask=args.with_mask, threads=args.threads)
    for record in records:
        print(describe(record))
    failed = [r for r in records if not r["ok"]]
    if failed:
        raise SystemExit(f"error: onnxruntime and PyTorch differ by more than --tolerance {args.tolerance:g} (or in "
                         f"kept tokens beyond a tie) at {', '.join(f'{h}x{w}' for h, w in (r['size'] for r in failed))}")
    print(f"verified: onnxruntime matches PyTorch within {args.tolerance:g} at {len(records)} sizes "
          f"({time.perf_counter() - start:.1f} s)")
    return records


if __name__ == "__main__":
    main()
