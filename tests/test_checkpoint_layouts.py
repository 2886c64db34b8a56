"""Official checkpoints load strictly: the state-dict layouts of the released full-size models."""
import re

import pytest
import torch

from main import parse_args
from models import build_model

from reference import require_fixtures

LAYOUTS = {
    "r50_deformable_detr": [],
    "r50_deformable_detr_refine_two_stage": ["--with_box_refine", "--two_stage"],
    "r50_efficient_detr": ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head"],
    "r50_sparse_detr": ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head",
                        "--rho", "0.1", "--use_enc_aux_loss"],
}


def read_layout(name: str) -> tuple[dict[str, tuple[int, ...]], int, int]:
    """Keys and shapes of a layout file, and its header's total and trainable parameter counts."""
    lines = (require_fixtures() / "checkpoint_layouts" / f"{name}.keys.txt").read_text().splitlines()
    total, trainable = map(int, re.match(r"# \S+: (\d+) parameters .*?, (\d+) trainable", lines[0]).groups())
    shapes = {}
    for line in lines[1:]:
        key, shape = line.split(" ", 1)
        shapes[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
    return shapes, total, trainable


@pytest.mark.parametrize("name", LAYOUTS)
def test_official_layout_loads_strictly(name, monkeypatch):
    monkeypatch.setattr("models.backbone._load_imagenet_weights", lambda name: None)
    shapes, total, trainable = read_layout(name)
    model, _, _ = build_model(parse_args(["--device", "cpu", *LAYOUTS[name]]))
    state_dict = {key: torch.zeros(shape) for key, shape in shapes.items()}
    model.load_state_dict(state_dict, strict=True)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    # Our checkpoints use the same layout, so they are interchangeable with the official ones.
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
