"""Every README code block that claims to run does run.

The convention: a fenced block tagged ``python``, ``bash`` or ``sh`` runs, in README order, unless the line
just above its fence is ``<!-- not run: <reason> -->`` (a GPU, COCO, a downloaded checkpoint, minutes of
training...). Untagged blocks are listings (console output, the layout), not code.

The blocks run in a sandbox: a temporary folder that links every top-level entry of the checkout (so
``python tools/...`` and ``from models...`` work as in a checkout) and holds tiny stand-ins for the files the
README names: ``exps/r50_sparse_detr_rho_0.1/checkpoint.pth`` is a tiny Sparse DETR (random weights, its args
stored, 64-px size rule), ``dog.jpg`` and ``cat.png`` are synthetic images. ``python`` is this interpreter;
bash blocks run with ``set -e``, python blocks as scripts; files a block writes stay for the next.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
RUN_TAGS = {"python": "python", "bash": "bash", "sh": "bash"}
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```(\S*)\s*$")
# What the README's runnable blocks are about; a block elsewhere that runs must be listed here too, so that a
# marker lost in an edit shows as a failure here, not as minutes of a training run in CI.
RUNNABLE_SECTIONS = {"Deploy"}
TINY_SPARSE = ["--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "2",
               "--dec_layers", "1", "--dim_feedforward", "32", "--num_queries", "8", "--num_classes", "5",
               "--enc_n_points", "2", "--dec_n_points", "2", "--num_feature_levels", "2", "--with_box_refine",
               "--two_stage", "--eff_query_init", "--eff_specific_head", "--rho", "0.3", "--use_enc_aux_loss",
               "--val_size", "64", "--max_size", "96", "--device", "cpu"]


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, from 1
    tag: str
    code: str
    section: str  # the "## " heading above it
    not_run: Optional[str]  # the reason, for a block marked not run

    @property
    def runs(self) -> bool:
        return self.tag in RUN_TAGS and self.not_run is None


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, with their tag, section and not-run reason."""
    blocks, lines = [], text.splitlines()
    section, start, tag, previous = "", None, "", ""
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if start is None:
            if line.startswith("## "):
                section = line[3:].strip()
            if fence:
                start, tag, marker = number, fence.group(1), NOT_RUN.match(previous.strip())
                reason = marker.group(1) if marker else None
        elif line.rstrip() == "```":
            blocks.append(Block(line=start, tag=tag, code="\n".join(lines[start:number - 1]) + "\n", section=section,
                                not_run=reason))
            start = None
        previous = line
    if start is not None:
        raise ValueError(f"README line {start}: code block never closed")
    return blocks


def test_readme_parser_by_hand():
    """Catches: a marker that skips more than its own block, a reason lost, untagged listings run, a section
    missed."""
    text = ("## One\n<!-- not run: needs COCO -->\n```bash\nexit 1\n```\n\n```bash\necho ok\n```\n## Two\n"
            "```\nINFO a listing\n```\n```python\nprint(1)\n```\n")
    blocks = readme_blocks(text)
    assert [(b.line, b.tag, b.section, b.not_run, b.runs) for b in blocks] == [
        (3, "bash", "One", "needs COCO", False), (7, "bash", "One", None, True), (11, "", "Two", None, False),
        (14, "python", "Two", None, True)]
    assert blocks[1].code == "echo ok\n"


def test_every_block_either_runs_or_says_why_not():
    """Catches: a not-run marker without a reason, a runnable block in a section this test has no stand-ins for
    (COCO training would start in CI), and a README where nothing runs (the parser or the markers broken)."""
    blocks = readme_blocks((ROOT / "README.md").read_text())
    assert all(b.not_run for b in blocks if b.not_run is not None)
    assert [(b.line, b.section) for b in blocks if b.runs and b.section not in RUNNABLE_SECTIONS] == []
    assert sum(b.runs and b.tag == "python" for b in blocks) >= 2 and sum(b.runs and b.tag == "bash" for b in blocks) >= 1


def make_sandbox(folder: Path) -> None:
    """Links to the checkout's top-level entries, and the tiny stand-ins of the files the README names."""
    from main import parse_args
    from models import build_model
    from tools.make_synthetic_coco import make_synthetic_coco
    for entry in ROOT.iterdir():
        if entry.name not in {".git", "outputs", "exps", ".venv", ".pytest_cache"}:
            (folder / entry.name).symlink_to(entry)
    args = parse_args(TINY_SPARSE + ["--backbone_from_scratch"])
    torch.manual_seed(0)
    model, _, _ = build_model(args, load_backbone_weights=False)
    checkpoint = folder / "exps" / "r50_sparse_detr_rho_0.1" / "checkpoint.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "args": args}, checkpoint)
    make_synthetic_coco(folder / "data", num_train=1, num_val=2, seed=0, size=96)
    val_images = sorted((folder / "data" / "val2017").iterdir())
    shutil.copy(val_images[0], folder / "dog.jpg")
    from PIL import Image
    Image.open(val_images[1]).save(folder / "cat.png")


def test_readme_blocks_run(tmp_path):
    """Catches: README code that does not run as written (the onnxruntime snippet's broadcast error, a renamed
    flag or function, a file a later block needs that an earlier one no longer writes)."""
    make_sandbox(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MSDA_IMPL": "pytorch", "PYTHONPATH": ""}  # the PyTorch attention: no kernel build in a sandbox
    ran = 0
    for block in readme_blocks((ROOT / "README.md").read_text()):
        if not block.runs:
            continue
        command = ([sys.executable, "-c", block.code] if RUN_TAGS[block.tag] == "python"
                   else ["bash", "-e", "-c", block.code])
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (f"README line {block.line} ({block.section}) failed:\n{block.code}\n"
                                        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
        ran += 1
    assert ran >= 3
