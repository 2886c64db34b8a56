"""models/token_selection.py: the token-selection seam of Sparse DETR, its two rules (dam, objectness) and a third
rule written here, which the model, the criterion, the console and checkpoints take without any edit elsewhere."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine import train_step
from inference import Detector
from main import parse_args
from models import build_model
from models.criterion import SetCriterion
from models.description import ModelDescription
from models.matcher import HungarianMatcher
from models.token_selection import RULES, ObjectnessSelector, TokenSelector
from util.console import console_losses
from util.misc import nested_tensor_from_tensor_list

from tiny_flags import MODELS_SPARSE, MODELS_TINY

RULE_FLAGS = {"dam": [], "objectness": ["--token_selection", "objectness"]}


def tiny_model(*flags, seed=0):
    torch.manual_seed(seed)
    args = parse_args([*MODELS_TINY, *MODELS_SPARSE, *flags])
    return (*build_model(args, load_backbone_weights=False), args)


def make_batch(sizes, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])}
               for _ in sizes]
    return nested_tensor_from_tensor_list(images), targets


def focal_term(logit: float, target: int, alpha: float = 0.25) -> float:
    """The sigmoid focal loss (gamma 2) of one logit, written out."""
    p = 1 / (1 + math.exp(-logit))
    ce = -math.log(p) if target else -math.log(1 - p)
    p_t = p if target else 1 - p
    return (alpha if target else 1 - alpha) * (1 - p_t) ** 2 * ce


@pytest.mark.parametrize("class_specific", [False, True], ids=["binary", "class_specific"])
def test_objectness_head_loss_equals_the_hand_computed_hungarian_loss(class_specific):
    """The ``_backbone`` group on two tokens and one target of class 2: the token whose box is nearest is matched
    (despite the other's higher objectness) and the three terms equal the focal, L1 and GIoU loss worked out by
    hand. Catches the group left out of the criterion, the target's class used by a binary head (index error) or
    foreground-only labels for a class-specific one, and another matching than the proposals'. The DAM falls
    wholly on token 1, the kept one: the coverage metric is 1 for this rule too."""
    num_classes = 3
    head_classes = num_classes if class_specific else 1
    logits = torch.zeros(1, 2, head_classes)
    logits[0, 1, :] = 2.0  # token 1 is the more object-like, but its box is far from the target
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.3], [0.2, 0.2, 0.1, 0.1]]])
    outputs = {
        "pred_logits": torch.zeros(1, 1, num_classes), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]),
        "backbone_outputs": {"pred_logits": logits, "pred_boxes": boxes},
        # one level of 1x2 tokens; one decoder sampling point at x = 0.75 splats a quarter of its weight on token 1
        "spatial_shapes": torch.tensor([[1, 2]]), "level_start_index": torch.tensor([0]),
        "sampling_locations_dec": torch.tensor([0.75, 0.5]).view(1, 1, 1, 1, 1, 1, 2),
        "attn_weights_dec": torch.ones(1, 1, 1, 1, 1, 1), "mask_flatten": torch.zeros(1, 2, dtype=torch.bool),
        "backbone_topk_proposals": torch.tensor([[1]]), "sparse_token_nums": torch.tensor([1], dtype=torch.int32),
        "backbone_mask_prediction": logits.max(-1)[0],
    }
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    criterion = SetCriterion(num_classes=num_classes, matcher=HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2),
                             weight_dict={}, focal_alpha=0.25, class_specific_proposals=class_specific,
                             token_selection=ObjectnessSelector)
    losses = criterion(outputs, targets)
    # Token 0 is matched; its target class is 2 (class-specific) or 0 (the one foreground class).
    label = 2 if class_specific else 0
    expected_ce = sum(focal_term(float(logits[0, token, c]), int(token == 0 and c == label))
                      for token in range(2) for c in range(head_classes))
    assert losses["loss_ce_backbone"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert losses["loss_bbox_backbone"].item() == pytest.approx(0.1, rel=1e-5)  # |0.3 - 0.2|
    # Target (0.4, 0.4)-(0.6, 0.6) inside the prediction (0.4, 0.35)-(0.6, 0.65): IoU 0.04 / 0.06, no empty hull.
    assert losses["loss_giou_backbone"].item() == pytest.approx(1 - 2 / 3, rel=1e-5)
    assert losses["corr_mask_attn_map_dec_all"].item() == pytest.approx(1.0)


def test_objectness_weights_follow_the_encoder_auxiliary_loss():
    """Catches the ``_backbone`` group weighted by anything but --cls/bbox/giou_loss_coef (the encoder auxiliary
    loss's), or a DAM term left in the weight dict of the objectness rule."""
    _, criterion, _, _ = tiny_model("--rho", "0.3", "--token_selection", "objectness", "--cls_loss_coef", "3",
                                    "--bbox_loss_coef", "4", "--giou_loss_coef", "1.5")
    weights = criterion.weight_dict
    for name, coef in (("loss_ce", 3.0), ("loss_bbox", 4.0), ("loss_giou", 1.5)):
        assert weights[f"{name}_backbone"] == weights[f"{name}_enc_0"] == coef
    assert "loss_mask_prediction" not in weights


# Two images, both padded, in a non-square 128x192 batch. Valid tokens over the strides 8, 16, 32, 64:
# 64x192: 8x24 + 4x12 + 2x6 + 1x3 = 255;  128x128: 16x16 + 8x8 + 4x4 + 2x2 = 340. At rho 0.25 (exact in binary):
# int(255 / 4) + 1 = 64 and int(340 / 4) + 1 = 86.
PADDED_SIZES = ((64, 192), (128, 128))
EXPECTED_COUNTS = [64, 86]


@pytest.mark.parametrize("rule", RULE_FLAGS)
def test_each_image_keeps_its_own_count_of_its_best_scored_valid_tokens(rule):
    """Catches a count from the padded size or the batch's largest image, (H, W) mixed up, padding kept, and
    (objectness) tokens ranked by another score than the head's best class logit (e.g. class 0 alone)."""
    model, criterion, _, _ = tiny_model("--rho", "0.25", *RULE_FLAGS[rule])
    samples, targets = make_batch(PADDED_SIZES)
    outputs = model(samples)
    assert outputs["mask_flatten"].shape == (2, 16 * 24 + 8 * 12 + 4 * 6 + 2 * 3)
    assert outputs["sparse_token_nums"].tolist() == EXPECTED_COUNTS
    kept = outputs["backbone_topk_proposals"]
    assert kept.shape == (2, max(EXPECTED_COUNTS))
    scores = outputs["backbone_outputs"]["pred_logits"].max(-1)[0] if rule == "objectness" else None
    for image, count in enumerate(EXPECTED_COUNTS):
        own = kept[image, :count]
        assert not outputs["mask_flatten"][image, own].any()
        if scores is not None:
            valid_scores = scores[image].masked_fill(outputs["mask_flatten"][image], float("-inf"))
            assert set(own.tolist()) == set(valid_scores.topk(count)[1].tolist())
    losses = criterion(outputs, targets)
    assert 0 <= losses["corr_mask_attn_map_dec_all"].item() <= 1  # the coverage metric, whatever the rule
    assert {k for k in losses if k.startswith("loss_")} == set(criterion.weight_dict)


@pytest.mark.parametrize("rule", RULE_FLAGS)
def test_a_checkpoint_of_each_rule_round_trips(rule, tmp_path):
    """Build, save with its model description, load through ``Detector.from_checkpoint`` (no flags): the same
    rule, parameters and outputs. Catches ``token_selection`` missing from the description (the objectness model
    would be rebuilt as dam and fail to load) and a selector registered under another name than it saves."""
    model, _, _, args = tiny_model("--rho", "0.3", *RULE_FLAGS[rule])
    model.eval()
    description = ModelDescription.from_flags(vars(args))
    assert description.token_selection == rule
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "model_description": description.to_dict()}, path)
    detector = Detector.from_checkpoint(path)
    assert detector.description.token_selection == rule
    assert ("objectness selection" in detector.description.summary()) == (rule == "objectness")
    prefix = {"dam": "transformer.enc_mask_predictor.", "objectness": "transformer.token_selector."}[rule]
    assert any(key.startswith(prefix) for key in detector.model.state_dict())
    samples, _ = make_batch(PADDED_SIZES)
    with torch.no_grad():
        expected, got = model(samples), detector.model(samples)
    for key in ("pred_logits", "pred_boxes", "backbone_mask_prediction", "backbone_topk_proposals"):
        assert torch.equal(got[key], expected[key]), key


def test_a_description_without_token_selection_loads_as_dam():
    """Checkpoints written before the objectness rule have no ``token_selection``: theirs is the DAM rule."""
    stored = ModelDescription(num_queries=8, dim_feedforward=32, two_stage=True, with_box_refine=True,
                              rho=0.1).to_dict()
    del stored["token_selection"]
    assert ModelDescription.from_dict(stored).token_selection == "dam"


class RandomSelector(TokenSelector):
    """A third rule, whole: random scores times a learned scale, and a loss of its own on the scores."""

    name = "random"

    def __init__(self, *, rho: float):
        super().__init__(rho=rho)
        self.scale = nn.Parameter(torch.ones(()))

    @classmethod
    def build(cls, args) -> "RandomSelector":
        return cls(rho=args.rho)

    @classmethod
    def loss_weights(cls, args) -> dict[str, float]:
        return {"loss_random_scale": 0.5}

    def forward(self, features, proposals_unact):
        return {"scores": torch.rand(features.shape[:2], device=features.device) * self.scale}

    @staticmethod
    def losses(outputs, dam):
        return {"loss_random_scale": outputs["backbone_mask_prediction"].square().mean()}


def test_a_rule_written_here_trains_a_step_without_editing_any_other_file(monkeypatch):
    """The seam: registering a rule makes it a --token_selection choice; the model keeps its own count of tokens,
    the criterion weights its loss, the console shows it and its parameter trains. Catches a transformer, criterion
    or console that knows the rules by name."""
    monkeypatch.setitem(RULES, "random", RandomSelector)
    model, criterion, _, _ = tiny_model("--rho", "0.25", "--token_selection", "random")
    assert isinstance(model.transformer.selector, RandomSelector)
    assert any(key.startswith("transformer.token_selector.") for key in model.state_dict())
    assert criterion.weight_dict["loss_random_scale"] == 0.5
    samples, targets = make_batch(PADDED_SIZES)
    assert model(samples)["sparse_token_nums"].tolist() == EXPECTED_COUNTS
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scale_before = model.transformer.selector.scale.item()
    result = train_step(model, criterion, samples, targets, optimizer, torch.device("cpu"))
    assert result.problem is None
    assert model.transformer.selector.scale.item() < scale_before  # its loss pulled the scores down
    shown = console_losses(result.stats)
    assert list(shown)[:4] == ["loss", "loss_ce", "loss_bbox", "loss_giou"] and "loss_random_scale" in shown
    assert "corr_mask_attn_map_dec_all_unscaled" in result.stats
