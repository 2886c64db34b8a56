"""DETR and SDETR: small random-weight runs and their flags (parity is in test_parity.py)."""
import pytest
import torch

from main import get_args_parser, validate_args
from models import build_model
from tiny_flags import DETR_TINY as TINY

NUM_CLASSES = 5
TINY_MODEL = {
    "detr": ["--enc_layers", "2", "--dec_layers", "3", "--nheads", "4"],
    "sdetr": ["--sdetr_stage1_enc_layers", "1", "--sdetr_stage1_dec_layers", "2", "--sdetr_stage1_enc_heads", "4",
              "--sdetr_stage1_dec_heads", "4", "--sdetr_stage2_enc_layers", "1", "--sdetr_stage2_dec_layers", "2",
              "--sdetr_stage2_dec_heads", "2"],
}
NUM_DECODER_OUTPUTS = {"detr": 3, "sdetr": 4}


def tiny_args(model: str, *extra: str):
    return validate_args(get_args_parser().parse_args(["--model", model, *TINY, *TINY_MODEL[model], *extra]))


def tiny_batch():
    """Two small images of different sizes (the second is padded), the second without objects."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 64, 96, generator=generator), torch.randn(3, 80, 48, generator=generator)]
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.25, 0.7, 0.2, 0.2]]), "labels": torch.tensor([1, 4])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("model_name", ["detr", "sdetr"])
def test_tiny_forward_backward(model_name, pre_norm):
    torch.manual_seed(0)
    args = tiny_args(model_name, *(["--pre_norm"] if pre_norm else []))
    model, criterion, postprocessors = build_model(args)
    model.train()
    images, targets = tiny_batch()
    outputs = model(images)

    batch, queries = len(images), args.num_queries
    assert outputs["pred_logits"].shape == (batch, queries, NUM_CLASSES + 1)
    assert outputs["pred_boxes"].shape == (batch, queries, 4)
    assert ((outputs["pred_boxes"] >= 0) & (outputs["pred_boxes"] <= 1)).all()
    assert len(outputs["aux_outputs"]) == NUM_DECODER_OUTPUTS[model_name] - 1
    for aux in outputs["aux_outputs"]:
        assert aux["pred_logits"].shape == outputs["pred_logits"].shape
        assert aux["pred_boxes"].shape == outputs["pred_boxes"].shape

    losses = criterion(outputs, targets)
    assert {k for k in losses if k.startswith("loss_")} == set(criterion.weight_dict)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    assert torch.isfinite(total)
    total.backward()
    for name, param in model.named_parameters():
        if param.requires_grad and not name.startswith("backbone"):
            assert param.grad is not None and torch.isfinite(param.grad).all(), name

    encoder_norms = [k for k in model.state_dict() if ".encoder.norm." in k]
    assert bool(encoder_norms) == pre_norm

    model.eval()
    with torch.no_grad():
        detections = postprocessors["bbox"](model(images), torch.tensor([[64, 96], [80, 48]]))
    assert [d["scores"].shape[0] for d in detections] == [queries, queries]
    assert all(d["boxes"].shape == (queries, 4) for d in detections)
    assert all(((d["labels"] >= 0) & (d["labels"] < NUM_CLASSES)).all() for d in detections)


@pytest.mark.parametrize("model_name", ["detr", "sdetr"])
def test_loss_keys_equal_weight_dict_keys(model_name):
    """With and without auxiliary losses, the criterion returns exactly the weighted losses (plus metrics)."""
    images, targets = tiny_batch()
    for extra in ([], ["--no_aux_loss"]):
        torch.manual_seed(0)
        model, criterion, _ = build_model(tiny_args(model_name, *extra))
        losses = criterion(model(images), targets)
        assert {k for k in losses if k.startswith("loss_")} == set(criterion.weight_dict)
        expected_groups = NUM_DECODER_OUTPUTS[model_name] if not extra else 1
        assert len(criterion.weight_dict) == 3 * expected_groups


def test_backbone_levels_per_model():
    """DETR reads C5 only, SDETR C4 and C5, the multi-level Deformable family C3-C5."""
    torch.manual_seed(0)
    detr, _, _ = build_model(tiny_args("detr"))
    sdetr, _, _ = build_model(tiny_args("sdetr"))
    assert detr.backbone.strides == [32] and detr.backbone.num_channels == [512]
    assert sdetr.backbone.strides == [16, 32] and sdetr.backbone.num_channels == [256, 512]
    assert sdetr.input_proj1.in_channels == 512 and sdetr.input_proj2.in_channels == 256
    deformable_args = validate_args(get_args_parser().parse_args(
        ["--device", "cpu", "--backbone_from_scratch", "--backbone", "resnet18"]))
    from models.backbone import backbone_layers
    assert backbone_layers(deformable_args.model, deformable_args.num_feature_levels) == (2, 3, 4)
    assert backbone_layers(deformable_args.model, 1) == (4,)


def test_sdetr_stage_defaults_are_the_reference():
    """Stage 1: 3 + 3 layers of 8 heads; stage 2: 3 single-head encoder layers and 3 decoder layers of 8 heads."""
    args = validate_args(get_args_parser().parse_args(["--model", "sdetr", "--device", "cpu"]))
    assert (args.sdetr_stage1_enc_layers, args.sdetr_stage1_enc_heads) == (3, 8)
    assert (args.sdetr_stage1_dec_layers, args.sdetr_stage1_dec_heads) == (3, 8)
    assert (args.sdetr_stage2_enc_layers, args.sdetr_stage2_enc_heads) == (3, 1)
    assert (args.sdetr_stage2_dec_layers, args.sdetr_stage2_dec_heads) == (3, 8)
    from models.transformer import build_sdetr_transformers
    args.hidden_dim, args.dim_feedforward = 16, 16
    stage1, stage2 = build_sdetr_transformers(args)
    heads = [[layer.self_attn.num_heads for layer in t.encoder.layers] for t in (stage1, stage2)]
    assert heads == [[8, 8, 8], [1, 1, 1]]
    assert [layer.multihead_attn.num_heads for layer in stage2.decoder.layers] == [8, 8, 8]


@pytest.mark.parametrize("argv, message", [
    (["--model", "detr", "--sdetr_stage2_enc_layers", "2"], "belongs to SDETR"),
    (["--model", "deformable", "--pre_norm"], "belongs to DETR/SDETR"),
    (["--model", "sdetr", "--hidden_dim", "36", "--sdetr_stage1_dec_heads", "8"],
     "divisible by --sdetr_stage1_dec_heads"),
    (["--model", "sdetr", "--sdetr_stage1_dec_layers", "0"], "at least 1"),
])
def test_invalid_detr_flags(argv, message):
    with pytest.raises(SystemExit, match=message):
        validate_args(get_args_parser().parse_args([*argv, "--device", "cpu"]))
