"""Properties of the models that hold without recorded fixtures (test_parity.py needs them; these do not): each
test is an invariant of a tiny random model or a small case computed by hand, and names the bug it catches."""
from __future__ import annotations

import math

import pytest
import torch

from models import build_model
from models.criterion import sigmoid_focal_loss
from models.ops import MSDeformAttn

from test_models_detr import tiny_args as detr_args, tiny_batch as detr_batch
from test_models_tiny import make_batch, tiny_model

EFFICIENT_DETR = ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head"]


def decoder_inputs(model: torch.nn.Module, samples) -> tuple[tuple, dict]:
    """The positional arguments the deformable decoder gets in one forward of ``model``, and the transformer's
    output dict: (tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, valid_ratios,
    padding_mask, level_shapes)."""
    seen = {}
    hooks = [model.transformer.decoder.register_forward_pre_hook(lambda module, args: seen.update(args=args)),
             model.transformer.register_forward_hook(lambda module, args, out: seen.update(out=out))]
    try:
        with torch.no_grad():
            model(samples)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["args"], seen["out"]


# ----------------------------------------------------------------------------------------------
# The deformable transformer


def test_decoder_reference_boxes_are_detached_between_layers():
    """Catches the next layer's reference boxes left attached (the reference detaches them): the last layer's
    boxes would then train the first layer's box head. Layer 0's own boxes do reach it (its last linear layer:
    the others start behind zero weights)."""
    model, _, _ = tiny_model("--with_box_refine")
    samples, _ = make_batch()
    first_head = model.transformer.decoder.bbox_embed[0]
    model(samples)["pred_boxes"].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in first_head.parameters())
    model.zero_grad(set_to_none=True)
    model(samples)["aux_outputs"][0]["pred_boxes"].sum().backward()
    assert any(p.grad is not None and p.grad.any() for p in first_head.parameters())


def test_valid_ratios_are_each_levels_unpadded_share_per_axis():
    """Catches H and W swapped in the valid ratios ((w, h) order, each over its own axis): by hand on two
    non-square levels, then in a model, where an image 64 high and 96 wide, padded to 96 x 96, has 2/3 of each
    map's rows valid at strides 8, 16 and 32 (its transposed companion 2/3 of the columns)."""
    transformer = tiny_model("--num_feature_levels", "2")[0].transformer
    masks = [torch.zeros(2, 4, 8, dtype=torch.bool), torch.zeros(2, 2, 3, dtype=torch.bool)]
    masks[0][0, 3:] = True  # image 0, level 0: 3 of 4 rows, 5 of 8 columns
    masks[0][0, :, 5:] = True
    masks[1][0, :, 2:] = True  # level 1: 2 of 2 rows, 2 of 3 columns
    srcs = [torch.zeros(2, 64, *mask.shape[1:]) for mask in masks]
    levels = transformer.flatten_levels(srcs, masks, srcs)
    expected = torch.tensor([[[5 / 8, 3 / 4], [2 / 3, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    torch.testing.assert_close(levels.valid_ratios, expected, rtol=0, atol=1e-7)
    assert levels.valid_sizes.tolist() == [[[5, 3], [2, 2]], [[8, 4], [3, 2]]]

    model, _, _ = tiny_model()
    samples, _ = make_batch(sizes=((64, 96), (96, 64)))
    valid_ratios = decoder_inputs(model, samples)[0][6]
    for level in range(3):
        torch.testing.assert_close(valid_ratios[:, level], torch.tensor([[1.0, 2 / 3], [2 / 3, 1.0]]), rtol=0,
                                   atol=1e-7)


def test_efficient_detr_queries_are_the_encoder_memory_of_the_best_proposals():
    """Catches Efficient DETR's query contents taken from anything but the encoder's output (the backbone
    tokens, the position embedding's half): each query's content is, bit for bit, the memory row of the token
    whose proposal ranks at its place by its best class score."""
    model, _, _ = tiny_model(*EFFICIENT_DETR)
    model.eval()
    samples, _ = make_batch(sizes=((64, 96), (96, 64)))
    (tgt, _, _, memory, *_), out = decoder_inputs(model, samples)
    best = torch.topk(out["enc_outputs_class"].max(-1)[0], tgt.shape[1], dim=1)[1]
    expected = torch.gather(memory, 1, best[..., None].expand(-1, -1, memory.shape[-1]))
    assert torch.equal(tgt, expected)


def test_decoder_ignores_the_memory_under_the_padding():
    """Catches a decoder that attends to padded tokens (its cross-attention given no padding mask): whatever the
    memory holds there, the decoder's output is the same, bit for bit, while the same change on unmasked tokens
    changes it (the sampling points do reach the padded columns: the references lie at the valid border)."""
    model, _, _ = tiny_model("--num_feature_levels", "1")
    model.eval()
    decoder = model.transformer.decoder
    g = torch.Generator().manual_seed(0)
    shapes, starts = torch.tensor([[4, 6]]), torch.tensor([0])
    padding = torch.zeros(1, 4, 6, dtype=torch.bool)
    padding[:, :, 3:] = True  # the right half
    tgt, query_pos = torch.randn(1, 5, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    # x = 0.95 of the valid half: pixel 2.35 of 6, between the last valid column and the first padded one.
    references = torch.stack([torch.full((1, 5), 0.95), torch.rand(1, 5, generator=g)], -1)
    memory = torch.randn(1, 24, 64, generator=g)
    garbage = memory.clone()
    garbage.view(1, 4, 6, 64)[:, :, 3:] = 100 * torch.randn(1, 4, 3, 64, generator=g)

    def decode(mem, mask):
        with torch.no_grad():
            return decoder(tgt, query_pos, references, mem, shapes, starts, torch.tensor([[[0.5, 1.0]]]),
                           mask.flatten(1))["hs"]

    assert torch.equal(decode(memory, padding), decode(garbage, padding))
    no_padding = torch.zeros_like(padding)
    assert not torch.allclose(decode(memory, no_padding), decode(garbage, no_padding))


def test_box_offsets_are_halved_by_the_reference_box_size():
    """Catches offsets inside a reference box scaled by its full size (or its (h, w)): a box (cx, cy, w, h) =
    (0.5, 0.4, 0.2, 0.6) with 2 points places offset (1, -2) at (0.5 + 1/2 * 0.2 / 2, 0.4 - 2/2 * 0.6 / 2) =
    (0.55, 0.1) and offset (2, 1) at (0.6, 0.55)."""
    attention = MSDeformAttn(d_model=8, n_levels=1, n_heads=1, n_points=2)
    with torch.no_grad():
        attention.sampling_offsets.weight.zero_()
        attention.sampling_offsets.bias.copy_(torch.tensor([1.0, -2.0, 2.0, 1.0]))
    box = torch.tensor([0.5, 0.4, 0.2, 0.6]).view(1, 1, 1, 4)
    _, locations, _ = attention(torch.randn(1, 1, 8), box, torch.randn(1, 6, 8), torch.tensor([[2, 3]]),
                                torch.tensor([0]))
    torch.testing.assert_close(locations.view(2, 2), torch.tensor([[0.55, 0.1], [0.6, 0.55]]))


# ----------------------------------------------------------------------------------------------
# Losses


def test_focal_loss_weights_positives_by_alpha_and_negatives_by_one_minus_alpha():
    """Catches alpha and 1 - alpha swapped in the classification loss: by hand, a positive at logit 0 (p = 1/2)
    costs alpha * (1/2)^2 * ln 2, a negative at logit 2 costs (1 - alpha) * sigmoid(2)^2 * softplus(2); the sum
    (one query) is divided by the number of boxes."""
    logits = torch.tensor([[[0.0, 2.0]]], dtype=torch.float64)
    targets = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    p = 1 / (1 + math.exp(-2.0))
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * p ** 2 * math.log(1 + math.exp(2.0))) / 2
    assert sigmoid_focal_loss(logits, targets, num_boxes=2, alpha=0.25).item() == pytest.approx(expected, rel=1e-12)


def test_detr_no_object_weight_sits_on_the_last_class():
    """Catches --eos_coef weighting a real class (the first) instead of "no object", the last of num_classes + 1:
    query 0 matched to class 1 and query 1 unmatched give (1 * l_0 + eos * l_1) / (1 + eos), by hand."""
    _, criterion, _ = build_model(detr_args("detr", "--eos_coef", "0.3"))
    assert torch.equal(criterion.empty_weight, torch.tensor([1.0] * 5 + [0.3]))
    logits = torch.tensor([[[0.1, 2.0, -1.0, 0.5, 0.0, 0.3], [0.4, -0.2, 1.0, 0.0, 0.7, 1.5]]])
    matched = (torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), torch.tensor([[0.5, 0.5, 0.2, 0.2]]))
    loss = criterion.loss_labels({"pred_logits": logits}, matched, num_boxes=1.0, log=False)["loss_ce"]
    l0 = torch.logsumexp(logits[0, 0], 0) - logits[0, 0, 1]
    l1 = torch.logsumexp(logits[0, 1], 0) - logits[0, 1, 5]
    torch.testing.assert_close(loss, (l0 + 0.3 * l1) / 1.3)


# ----------------------------------------------------------------------------------------------
# SDETR


def test_sdetr_stage_two_starts_from_stage_ones_last_decoder_output():
    """Catches stage 2's decoder starting from another of stage 1's layers (or from zeros): the ``tgt`` it gets is
    stage 1's last (normalised) decoder output, which differs from its first."""
    torch.manual_seed(0)
    model, _, _ = build_model(detr_args("sdetr"))
    model.eval()
    seen = {}
    hooks = [model.mytransformer1.register_forward_hook(lambda module, args, out: seen.update(stage1=out[0])),
             model.mytransformer2.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs=kwargs),
                                                            with_kwargs=True)]
    with torch.no_grad():
        model(detr_batch()[0])
    for hook in hooks:
        hook.remove()
    stage1 = seen["stage1"]
    assert stage1.shape[0] == 2 and not torch.equal(stage1[0], stage1[-1])
    assert seen["kwargs"].get("tgt") is not None and torch.equal(seen["kwargs"]["tgt"], stage1[-1])
