"""Pre-build the compiled multi-scale deformable attention kernels.

    python -m models.ops.build                # CPU; CUDA too when nvcc and a GPU (or TORCH_CUDA_ARCH_LIST) exist
    python -m models.ops.build --device cpu
    python -m models.ops.build --device cuda --arch "8.0;9.0"     # cross-build without a GPU

Builds land in the torch extensions cache ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)
where the first ``ms_deform_attn`` call finds them, so that call does not pay the compile time.
Exit status: 0 when every requested build succeeded (auto mode skips CUDA with a note when it
cannot be built), 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

from . import _extension


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.ops.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "all"], default="auto",
                        help="auto: cpu, and cuda when it can be built; all: cpu and cuda, failing if either fails")
    parser.add_argument("--arch", default=None,
                        help="GPU targets, e.g. '8.0;9.0' (sets TORCH_CUDA_ARCH_LIST; default: the visible GPUs)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    args = parser.parse_args(argv)
    if args.arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch

    devices = ["cpu", "cuda"] if args.device in ("auto", "all") else [args.device]
    ok = True
    for device in devices:
        missing = _extension.missing_prerequisites(device)
        if missing and args.device == "auto" and device == "cuda":
            print(f"[skip] cuda: missing {'; '.join(missing)}")
            continue
        folder = _extension.build_directory(device)
        extra = ""
        if device == "cuda":
            extra = f", TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<visible GPUs>')}"
        print(f"[build] {device}: {folder}{extra}", flush=True)
        start = time.perf_counter()
        status = _extension.load(device, verbose=args.verbose, warn=False)
        seconds = time.perf_counter() - start
        if status.loaded:
            print(f"[ok] {device}: {status.library} ({seconds:.1f} s)")
        else:
            ok = False
            print(f"[failed] {device} ({status.state}): {status.reason}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
