"""Cost and speed of the models: parameters, multiply-adds, inference FPS and training images/s.

    python tools/benchmark.py model --device cpu --threads 2          # every measurement, default models
    python tools/benchmark.py model --device cuda --measure fps train
    python tools/benchmark.py model --device cpu --measure memory --grad_checkpoint off on   # peak memory only
    python tools/benchmark.py op ...                                  # the deformable-attention op (bench_op.py)

Models are full size (ResNet-50, 6+6 layers, 300 queries) unless ``--model_args`` adds ``main.py``
flags; ``models.build_model`` builds them from ``main.parse_args``, randomly initialised, the backbone
frozen as with ImageNet weights (stem and layer1). Every measurement uses one random image of
``--height`` x ``--width``:

* ``cost``:  parameters, and multiply-adds of one image: ``FlopCounterMode`` total / 2, the matmul and
  conv multiply-adds the Sparse DETR paper's GFLOPs column counts (bilinear sampling is not counted);
* ``fps``:   inference frames per second as the paper measures them: eval mode, ``torch.no_grad()``,
  the image repeated to each of ``--batch_sizes`` (batch 4 = the same image 4 times), ``--warmup``
  untimed passes, then the median of ``--repeats`` timed ones (synchronised on GPU); FPS = batch / time.
  The models are timed in turn, one forward each per round, so that drift in the machine's speed
  (tens of percent on a shared CPU) affects them alike;
* ``train``: training images per second for each ``--amp`` mode (default off fp16 bf16 on CUDA, off bf16
  on CPU, where fp16 is emulated): train mode, ``engine.train_step``
  (forward under autocast, losses, backward, gradient clipping, AdamW step) on ``--train_batch_size``
  copies of the image with random valid targets, timed as above, and the peak memory of two such steps
  (``memory`` alone: without the timing): CUDA ``max_memory_allocated``, CPU peak RSS of a fresh process per
  model and mode (``tools/bench_memory.py``); "step" columns: the peak minus the memory in use before the
  first step. A mode the device's autocast does not support is skipped with a printed note.

``--grad_checkpoint off on`` measures the training of every model without and with ``main.py
--grad_checkpoint``, one row each (the second named ``<model> +grad_checkpoint``, its inference cells n/a:
checkpointing is off in evaluation).

``--runtimes`` adds rows for other runtimes of each detector beside PyTorch eager (``fps`` only, CPU for
onnxruntime): ``onnxruntime`` (the ONNX export of models/export.py) and ``compile`` (``torch.compile``), each
checked against eager on the image first (tools/bench_runtimes.py; the agreement is a note under the table).

The default models start with ``reference_r50_backbone``: the reference implementations' ResNet-50 alone
(:class:`ReferenceBackbone`), a lower bound on their models' time, measured in the same run as ours.
On CPU the process keeps freed memory for reuse, as ``main.py`` does (``--system_malloc`` to compare).
The result is a markdown table; ``--jsonl PATH`` also appends one JSON object per model.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import bench_runtimes  # noqa: E402
from tools.bench_memory import in_fresh_process, step_memory  # noqa: E402
from tools.bench_table import (  # noqa: E402
    columns, describe_setup, format_row, table_line, training_columns, write_jsonl)
from engine import train_step  # noqa: E402
from runner import AMP_DTYPES, build_optimizer  # noqa: E402
from main import parse_args  # noqa: E402
from models import build_model  # noqa: E402
from util.misc import NestedTensor, nested_tensor_from_tensor_list  # noqa: E402
from util.process import keep_freed_memory  # noqa: E402

SPARSE = ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head", "--use_enc_aux_loss"]
MODELS = {
    "deformable_detr": [],
    "deformable_detr_refine_two_stage": ["--with_box_refine", "--two_stage"],
    "efficient_detr": ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head"],
    **{f"sparse_detr_rho{rho}": SPARSE + ["--rho", str(rho)] for rho in (0.1, 0.2, 0.3, 0.4, 0.5)},
}
# Not a detector: the reference implementations' backbone alone, a lower bound on their models' time.
YARDSTICK = "reference_r50_backbone"
DEFAULT_MODELS = [YARDSTICK, "deformable_detr_refine_two_stage", "sparse_detr_rho0.1", "sparse_detr_rho0.5"]
MEASUREMENTS = ("cost", "fps", "train", "memory")
GRAD_CHECKPOINT_SUFFIX = " +grad_checkpoint"
BOXES_PER_IMAGE = 7  # about COCO's average


class ReferenceBackbone(torch.nn.Module):
    """The ResNet-50 of the reference implementations (Deformable DETR, Sparse DETR) alone: torchvision's,
    each FrozenBatchNorm2d a separate multiply and add, NCHW memory, up to C5.

    Their models run this and more, so its time bounds theirs from below. Measured in the same run as
    ours, it is the yardstick for "no slower than the reference" on a machine whose speed drifts by
    tens of percent from one minute to the next (docs/benchmarks.md).
    """

    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        self.body = torch.nn.Sequential(*list(resnet.children())[:-2])  # without the pooling and classifier

    def forward(self, samples: NestedTensor) -> torch.Tensor:
        """C5 [B, 2048, H/32, W/32] of the images."""
        return self.body(samples.tensors)


def build(name: str, device: torch.device,
          model_args: list[str]) -> tuple[torch.nn.Module, Optional[torch.nn.Module], Optional[argparse.Namespace]]:
    """(model, criterion, parsed main.py arguments) of ``name``, randomly initialised (seed 0), on ``device``;
    criterion and arguments are None for the yardstick."""
    torch.manual_seed(0)
    if name == YARDSTICK:
        return ReferenceBackbone().to(device), None, None
    args = parse_args(["--device", device.type, *MODELS[name], *model_args])
    model, criterion, _ = build_model(args, load_backbone_weights=False)
    return model.to(device), criterion.to(device), args


def batch_of(image: torch.Tensor, batch_size: int) -> NestedTensor:
    """``batch_size`` copies of one [3, H, W] image, as the model takes them."""
    return nested_tensor_from_tensor_list([image] * batch_size)


def random_targets(batch_size: int, num_classes: int, device: torch.device, seed: int = 0) -> list[dict]:
    """Valid detection targets: ``BOXES_PER_IMAGE`` boxes (normalised cxcywh, inside the image, sides
    0.05-0.5) with labels in 1..num_classes-1, per image."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch_size):
        size = 0.05 + 0.45 * torch.rand(BOXES_PER_IMAGE, 2, generator=g)
        centre = size / 2 + (1 - size) * torch.rand(BOXES_PER_IMAGE, 2, generator=g)
        labels = torch.randint(1, num_classes, (BOXES_PER_IMAGE,), generator=g)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centre, size], 1).to(device)})
    return targets


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                   repeats: int) -> dict[str, float]:
    """Median wall time of each of ``fns``: ``warmup`` untimed calls each, then ``repeats`` timed rounds,
    each round calling every function once in turn, synchronised. Interleaved, so that a machine whose
    speed drifts (a shared CPU) slows every function alike and their ratios hold."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def multiply_adds(model: torch.nn.Module, image: torch.Tensor) -> float:
    """Multiply-adds of one eval forward of ``image``. The model's parameters must not require grad:
    FlopCounterMode's module tracker fails on views of them made under no_grad (the learned queries)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(batch_of(image, 1))
    return counter.get_total_flops() / 2


def inference_fps(models: dict[str, torch.nn.Module], image: torch.Tensor, batch_size: int, warmup: int,
                  repeats: int) -> dict[str, float]:
    """Images per second of each model's forwards (models in eval mode) under ``torch.no_grad()`` of the
    image repeated ``batch_size`` times, the models timed in turn (:func:`median_seconds`)."""
    samples = batch_of(image, batch_size)
    forwards = {name: (lambda model=model: model(samples)) for name, model in models.items()}
    with torch.no_grad():
        seconds = median_seconds(forwards, image.device, warmup, repeats)
    return {name: batch_size / s for name, s in seconds.items()}


def amp_unsupported(device: torch.device, amp: str) -> Optional[str]:
    """Why ``--amp amp`` cannot run on ``device`` (autocast disables itself for a dtype it lacks), or None."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return None
    if not torch.amp.is_autocast_available(device.type):
        return f"autocast is not available on {device.type}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "disabling autocast" warning: the check below says it
            with torch.autocast(device.type, dtype=dtype):
                enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError as error:  # e.g. bfloat16 on a GPU older than Ampere
        return str(error).splitlines()[0]
    return None if enabled else f"{device.type} autocast does not support {dtype}"


def model_flags(opts: argparse.Namespace, grad_checkpoint: bool) -> list[str]:
    """The main.py flags of every model: ``--model_args``, plus ``--grad_checkpoint`` for those rows."""
    return [*opts.model_args, *(["--grad_checkpoint"] if grad_checkpoint else [])]


def training_step(name: str, amp: str, image: torch.Tensor, opts: argparse.Namespace,
                  grad_checkpoint: bool = False) -> tuple[Callable[[], None], list[str]]:
    """(one ``engine.train_step`` of a fresh model ``name`` on ``--train_batch_size`` copies of ``image``, the
    list into which it appends the problem of each step skipped for a non-finite loss)."""
    device = image.device
    model, criterion, args = build(name, device, model_flags(opts, grad_checkpoint))
    model.train()
    criterion.train()
    optimizer = build_optimizer(model, args, args.lr, args.lr_backbone)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    samples = batch_of(image, opts.train_batch_size)
    targets = random_targets(opts.train_batch_size, args.num_classes, device)
    problems = []

    def step() -> None:
        result = train_step(model, criterion, samples, targets, optimizer, device, args.clip_max_norm, scaler,
                            AMP_DTYPES[amp])
        if result.problem:
            problems.append(result.problem)

    return step, problems


def training_images_per_second(name: str, amp: str, image: torch.Tensor, opts: argparse.Namespace,
                               grad_checkpoint: bool = False) -> float:
    """Images per second of ``engine.train_step`` on a fresh model; raises RuntimeError when a step was
    skipped for a non-finite loss, since such a step runs no backward."""
    step, problems = training_step(name, amp, image, opts, grad_checkpoint)
    seconds = median_seconds({name: step}, image.device, opts.warmup, opts.repeats)[name]
    if problems:
        raise RuntimeError(f"{len(problems)} steps skipped: {problems[-1]}")
    return opts.train_batch_size / seconds


def inference_cells(names: list[str], image: torch.Tensor, opts: argparse.Namespace,
                    notes: Optional[list[str]] = None) -> dict[str, dict[str, float]]:
    """The ``cost`` and ``fps`` cells (those ``opts.measure`` asks for) of each model, by name; with other
    ``opts.runtimes`` than eager also the ``fps`` cells of each detector's other runtimes, as rows named
    "<model> (<runtime>)" after it (notes on them appended to ``notes``)."""
    models = {name: build(name, image.device, opts.model_args)[0].requires_grad_(False).eval() for name in names}
    runtimes = getattr(opts, "runtimes", ["eager"])
    with bench_runtimes.temporary_folder() as workdir:
        if "fps" in opts.measure and runtimes != ["eager"]:
            for name in names:
                if name != YARDSTICK:
                    models.update(bench_runtimes.runtime_models(name, models[name], batch_of(image, 1), runtimes,
                                                                notes if notes is not None else [], Path(workdir)))
        if "eager" not in runtimes:
            models = {name: model for name, model in models.items() if name == YARDSTICK or " (" in name}
        return measure_cells(models, image, opts)


def measure_cells(models: dict[str, Callable], image: torch.Tensor, opts: argparse.Namespace
                  ) -> dict[str, dict[str, float]]:
    """``inference_cells`` of the built models (and runtimes, which have no cost cells)."""
    cells: dict[str, dict[str, float]] = {name: {} for name in models}
    if "cost" in opts.measure:
        for name, model in models.items():
            if not isinstance(model, torch.nn.Module):
                cells[name].update(params_m=None, gmacs=None)
                continue
            cells[name]["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
            cells[name]["gmacs"] = multiply_adds(model, image) / 1e9
    if "fps" in opts.measure:
        for batch_size in opts.batch_sizes:
            fps = inference_fps(models, image, batch_size, opts.warmup, opts.repeats)
            for name in models:
                cells[name][f"fps_bs{batch_size}"] = fps[name]
    return cells


def memory_child_command(name: str, amp: str, opts: argparse.Namespace, grad_checkpoint: bool) -> list[str]:
    """The ``benchmark.py train-memory`` command that measures one CPU cell in a fresh process."""
    command = [sys.executable, str(Path(__file__).resolve()), "train-memory", "--models", name, "--amp", amp,
               "--device", opts.device, "--threads", str(opts.threads), "--height", str(opts.height),
               "--width", str(opts.width), "--train_batch_size", str(opts.train_batch_size),
               # One "=" argument: a value like "--grad_checkpoint" would otherwise parse as an option.
               f"--model_args={shlex.join(model_flags(opts, grad_checkpoint))}"]
    return command + (["--system_malloc"] if opts.system_malloc else [])


def training_memory(name: str, amp: str, image: torch.Tensor, opts: argparse.Namespace,
                    grad_checkpoint: bool = False) -> dict[str, float]:
    """``{"peak_mib", "step_mib"}`` of two training steps (``tools/bench_memory.py``): in this process on CUDA,
    in a fresh one on CPU."""
    if image.device.type == "cuda":
        step, _ = training_step(name, amp, image, opts, grad_checkpoint)
        return step_memory(step, image.device)
    return in_fresh_process(memory_child_command(name, amp, opts, grad_checkpoint))


def failure(error: Exception) -> str:
    return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"


def training_cell(name: str, amp: str, image: torch.Tensor, opts: argparse.Namespace,
                  grad_checkpoint: bool = False) -> tuple[dict[str, Optional[float]], str]:
    """(the training cells of model ``name`` under ``--amp amp``: images/s with ``train``, peak and step MiB;
    "" or why some did not run)."""
    cells: dict[str, Optional[float]] = {key: None for key, _, _ in training_columns(opts, amp)}
    reason = amp_unsupported(image.device, amp)
    if reason is not None:
        return cells, reason
    problems = []
    if "train" in opts.measure:
        try:
            cells[f"train_images_per_s_{amp}"] = training_images_per_second(name, amp, image, opts, grad_checkpoint)
        except (RuntimeError, NotImplementedError) as error:  # e.g. an op without this dtype, out of memory
            problems.append(failure(error))
    try:
        memory = training_memory(name, amp, image, opts, grad_checkpoint)
        cells[f"train_peak_mib_{amp}"], cells[f"train_step_mib_{amp}"] = memory["peak_mib"], memory["step_mib"]
    except (RuntimeError, NotImplementedError, subprocess.TimeoutExpired) as error:
        problems.append("memory " + failure(error))
    return cells, "; ".join(problems)


def training_cells(name: str, image: torch.Tensor, opts: argparse.Namespace, notes: list[str],
                   grad_checkpoint: bool = False) -> dict[str, Any]:
    """The training cells of model ``name``, for each ``opts.amp`` mode; a mode that cannot run gets None
    and a line in ``notes``."""
    label = name + (GRAD_CHECKPOINT_SUFFIX if grad_checkpoint else "")
    if name == YARDSTICK:
        notes.append(f"{name}: inference only (a backbone, not a detector)")
        return {key: None for amp in opts.amp for key, _, _ in training_columns(opts, amp)}
    cells = {}
    for amp in opts.amp:
        amp_cells, reason = training_cell(name, amp, image, opts, grad_checkpoint)
        cells.update(amp_cells)
        if reason:
            notes.append(f"{label}, train --amp {amp}: skipped ({reason})")
    return cells


def parse_model_benchmark_args(argv: list[str]) -> argparse.Namespace:
    """Options of ``benchmark.py model``, with the device-dependent defaults filled in."""
    parser = argparse.ArgumentParser(description="parameters, GMACs, inference FPS and training images/s of models")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=(YARDSTICK, *MODELS),
                        help=f"{YARDSTICK} is the reference implementations' ResNet-50 alone (inference only), "
                             "a lower bound on their models' time measured beside ours")
    parser.add_argument("--measure", nargs="+", default=list(MEASUREMENTS), choices=MEASUREMENTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
    parser.add_argument("--system_malloc", action="store_true",
                        help="on CPU, leave glibc's malloc returning freed large blocks to the OS (for comparison); "
                             "by default freed memory is kept for reuse, as main.py does on CPU")
    parser.add_argument("--height", type=int, default=850)
    parser.add_argument("--width", type=int, default=1040)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4], help="inference batch sizes (FPS)")
    parser.add_argument("--train_batch_size", type=int, default=2, help="images per training step")
    parser.add_argument("--amp", nargs="+", default=None, choices=tuple(AMP_DTYPES),
                        help="training precisions, as main.py --amp; default off fp16 bf16 on CUDA, off bf16 on CPU "
                             "(CPUs without AVX512-FP16 emulate fp16: a full training step takes minutes)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first; default 1 on CPU, 10 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (median); default 5 on CPU, 50 on CUDA")
    parser.add_argument("--runtimes", nargs="+", default=["eager"], choices=bench_runtimes.RUNTIMES,
                        help="runtimes timed for each detector (fps): PyTorch eager, onnxruntime (CPU: the ONNX "
                             "export), torch.compile; the others are checked against eager first")
    parser.add_argument("--model_args", default="",
                        help="extra main.py flags for every model, e.g. '--backbone resnet18'")
    parser.add_argument("--grad_checkpoint", nargs="+", default=["off"], choices=("off", "on"),
                        help="train each model without (off) and/or with (on) main.py --grad_checkpoint, one row "
                             "each: e.g. --grad_checkpoint off on to compare their memory and time")
    parser.add_argument("--jsonl", default="", help="also append one JSON object per model to this file")
    opts = parser.parse_args(argv)
    for flag in ("height", "width", "train_batch_size"):
        if getattr(opts, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(opts, flag)}")
    if min(opts.batch_sizes) < 1:
        parser.error(f"--batch_sizes must be at least 1 each, got {' '.join(map(str, opts.batch_sizes))}")
    for flag in ("warmup", "repeats", "threads"):
        lowest = 1 if flag == "repeats" else 0
        if getattr(opts, flag) is not None and getattr(opts, flag) < lowest:
            parser.error(f"--{flag} must be at least {lowest}, got {getattr(opts, flag)}")
    gpu = torch.device(opts.device).type == "cuda"
    opts.warmup = (10 if gpu else 1) if opts.warmup is None else opts.warmup
    opts.repeats = (50 if gpu else 5) if opts.repeats is None else opts.repeats
    opts.amp = (list(AMP_DTYPES) if gpu else ["off", "bf16"]) if opts.amp is None else opts.amp
    opts.model_args = shlex.split(opts.model_args)
    return opts


def model_benchmark(argv: list[str]) -> None:
    """Print the table of ``benchmark.py model`` (each row when its model is measured), then the notes."""
    opts = parse_model_benchmark_args(argv)
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    kept_freed_memory = device.type == "cpu" and not opts.system_malloc and keep_freed_memory()
    image = torch.randn(3, opts.height, opts.width, generator=torch.Generator().manual_seed(0)).to(device)
    cols = columns(opts)
    print(describe_setup(device, opts, kept_freed_memory))
    print(table_line(["model"] + [header for _, header, _ in cols]))
    print(table_line(["---"] * (len(cols) + 1)), flush=True)
    notes: list[str] = []
    # All models' inference first, timed in turn; then each model's training, its row printed when done.
    inference = {}
    if "cost" in opts.measure or "fps" in opts.measure:
        inference = inference_cells(opts.models, image, opts, notes)
    training = "train" in opts.measure or "memory" in opts.measure
    for name in opts.models:
        # The eager rows (without and with --grad_checkpoint), then the model's other runtimes (inference only).
        rows = [{"model": name + (GRAD_CHECKPOINT_SUFFIX if checkpointed else ""), "grad_checkpoint": checkpointed}
                for checkpointed in [setting == "on" for setting in opts.grad_checkpoint]]
        rows += [{"model": runtime, "grad_checkpoint": None} for runtime in inference
                 if runtime.startswith(f"{name} (")]
        for row in rows:
            grad_checkpoint = row.pop("grad_checkpoint")
            if not grad_checkpoint:  # checkpointing is off in evaluation: those cells would repeat the row
                row.update(inference.get(row["model"], {}))
            if training and grad_checkpoint is not None:
                row.update(training_cells(name, image, opts, notes, grad_checkpoint))
            print(format_row(row, cols), flush=True)
            if opts.jsonl:
                write_jsonl(opts, device, kept_freed_memory, row, bool(grad_checkpoint))
    for note in notes:
        print(f"note: {note}")


def train_memory(argv: list[str]) -> None:
    """``benchmark.py train-memory``: one CPU memory cell (the first of ``--models`` and ``--amp``) in this fresh
    process; prints ``{"peak_mib": ..., "step_mib": ...}`` (``tools/bench_memory.py``)."""
    opts = parse_model_benchmark_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if not opts.system_malloc:
        keep_freed_memory()
    image = torch.randn(3, opts.height, opts.width, generator=torch.Generator().manual_seed(0)).to(opts.device)
    step, problems = training_step(opts.models[0], opts.amp[0], image, opts)
    memory = step_memory(step, image.device)
    if problems:
        raise SystemExit(f"error: {len(problems)} steps skipped: {problems[-1]}")
    print(json.dumps(memory))


USAGE = "usage: python tools/benchmark.py {model,op} [options]  (--help after the command)"


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return
    if not argv or argv[0] not in ("model", "op", "train-memory"):
        raise SystemExit(USAGE)
    if argv[0] == "model":
        model_benchmark(argv[1:])
    elif argv[0] == "train-memory":  # run by ``model`` on CPU, one process per cell
        train_memory(argv[1:])
    else:
        from bench_op import main as op_benchmark
        op_benchmark(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
