"""Plot the loss and AP curves of one or more training runs in one PNG, e.g. to compare Sparse DETR's rho:

    python tools/plot_logs.py exps/r50_sparse_detr_rho_0.1 exps/r50_sparse_detr_rho_0.3 --out rho.png

Each run is a folder holding ``log.txt`` (or that file itself): one JSON object per epoch with ``epoch``,
``train_loss``, ``test_loss``, ``test_coco_eval_bbox`` (the 12 COCO numbers: AP, AP50, ...) and other
``train_*`` / ``test_*`` values. Panels: train (solid) and test (dashed) loss, AP and AP50, then one per
``--keys`` entry (e.g. ``--keys loss_ce loss_mask_prediction`` plots train and test of each). The legend names
each run by its folder. ``--weights ema`` plots the test values of the moving average of the weights instead
(``test_ema_*``, runs trained with ``--ema_decay``), ``--weights both`` both (the average dotted).
"""
from __future__ import annotations

import argparse
import json
import math
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

logger = logging.getLogger(__name__)


def log_path(run: str | Path) -> Path:
    path = Path(run)
    return path / "log.txt" if path.is_dir() else path


def read_log(run: str | Path) -> list[dict[str, Any]]:
    """The epoch records of a run, one per epoch (the last one written wins, as after a resume), by epoch.

    Lines that are not JSON objects with an integer ``epoch`` are skipped with one warning; SystemExit if the
    file is missing, is not text, or holds no epoch record at all."""
    path = log_path(run)
    if not path.is_file():
        raise SystemExit(f"no log.txt in {run}" if Path(run).is_dir() else f"log not found: {run}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SystemExit(f"{path} is not a text log (byte {err.start} is not UTF-8): give a run folder or its "
                         "log.txt, one JSON object per epoch") from None
    records: dict[int, dict[str, Any]] = {}
    skipped = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            records[epoch] = record
        else:
            skipped.append(number)
    if not records:
        raise SystemExit(f"{path} holds no epoch record (a JSON object with an integer \"epoch\" per line): is it "
                         "the log.txt of a training run?")
    if skipped:
        logger.warning("%s: %d lines are not JSON objects with an integer \"epoch\", skipped (e.g. line %s)", path,
                       len(skipped), ", ".join(map(str, skipped[:3])))
    return [records[epoch] for epoch in sorted(records)]


def figure_path(out: str | Path) -> Path:
    """``out`` with ".png" appended when it has no extension; SystemExit if matplotlib cannot write its
    extension."""
    out = Path(out)
    if not out.suffix:
        return out.with_name(out.name + ".png")
    supported = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in supported:
        raise SystemExit(f"--out {out}: cannot write {out.suffix!r} images; use one of "
                         f"{', '.join('.' + kind for kind in sorted(supported))} (e.g. .png)")
    return out


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """Each run's folder name, with its parent's where two runs share a name."""
    folders = [log_path(run).resolve().parent for run in runs]
    names = [folder.name for folder in folders]
    return [f"{folder.parent.name}/{name}" if names.count(name) > 1 else name for folder, name in zip(folders, names)]


def _series(records: Sequence[dict[str, Any]], key: str, index: Optional[int] = None) -> tuple[list, list]:
    epochs, values = [], []
    for record in records:
        value = record.get(key)
        if index is not None:
            value = value[index] if isinstance(value, (list, tuple)) and len(value) > index else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            epochs.append(record["epoch"])
            values.append(value)
    return epochs, values


# The test values of each --weights choice: (key prefix, line style, legend suffix).
TEST_SERIES = {"raw": [("test", "--", "test")], "ema": [("test_ema", ":", "test EMA")],
               "both": [("test", "--", "test"), ("test_ema", ":", "test EMA")]}
Curve = tuple[str, Optional[int], str, str]  # key, index in its list value (or None), line style, legend suffix


def panel_curves(keys: Sequence[str] = (), weights: str = "raw") -> list[tuple[str, list[Curve]]]:
    """The panels: (title, curves). Loss (train and test), AP and AP50 (test), then train and test of each of
    ``keys``; the test curves of the weights (``raw``: ``test_*``), their moving average (``ema``: ``test_ema_*``)
    or ``both``."""
    tests = TEST_SERIES[weights]
    panels: list[tuple[str, list[Curve]]] = [
        ("loss", [("train_loss", None, "-", "train")] + [(f"{p}_loss", None, s, n) for p, s, n in tests]),
        ("AP", [(f"{p}_coco_eval_bbox", 0, s.replace("--", "-"), n) for p, s, n in tests]),
        ("AP50", [(f"{p}_coco_eval_bbox", 1, s.replace("--", "-"), n) for p, s, n in tests]),
    ]
    for key in keys:
        key = key.removeprefix("train_").removeprefix("test_ema_").removeprefix("test_")
        panels.append((key, [(f"train_{key}", None, "-", "train")] + [(f"{p}_{key}", None, s, n) for p, s, n in tests]))
    return panels


def plot_logs(runs: Sequence[str | Path], out: str | Path, keys: Sequence[str] = (), weights: str = "raw") -> Path:
    """Write the image ``out`` comparing ``runs`` (".png" appended to a name without extension); returns its
    path. ``weights``: see :func:`panel_curves`; SystemExit for ``ema`` / ``both`` when no run has EMA values."""
    out = figure_path(out)
    logs = [read_log(run) for run in runs]
    labels = run_labels(runs)
    if weights != "raw" and not any(key.startswith("test_ema_") for records in logs for r in records for key in r):
        raise SystemExit(f"--weights {weights}: no test_ema_* values in these logs (the runs were trained without "
                         "--ema_decay); plot their weights with --weights raw")
    panels = panel_curves(keys, weights)
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, curves) in zip(axes.flat, panels):
        drawn = False
        for run_index, (records, label) in enumerate(zip(logs, labels)):
            for key, index, style, series in curves:
                epochs, values = _series(records, key, index)
                if not epochs:
                    continue
                split = f" ({series})" if len(curves) > 1 else ""
                ax.plot(epochs, values, style, color=colors[run_index % len(colors)], marker="." if
                        len(epochs) < 30 else None, label=f"{label}{split}")
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no {title} in these logs", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (or their log.txt files)")
    parser.add_argument("--out", required=True, metavar="PNG",
                        help="image to write (.png appended to a name without extension)")
    parser.add_argument("--keys", nargs="*", default=[], metavar="KEY",
                        help="more train_/test_ values to plot, one panel each (e.g. loss_ce class_error)")
    parser.add_argument("--weights", default="raw", choices=tuple(TEST_SERIES),
                        help="test values of the trained weights (raw: test_*), of their moving average (ema: "
                             "test_ema_*, runs with --ema_decay) or both")
    args = parser.parse_args(argv)
    out = plot_logs(args.runs, args.out, args.keys, args.weights)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
