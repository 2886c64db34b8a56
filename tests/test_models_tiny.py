"""Tiny random-weight models of every variant: forward, losses, backward on CPU."""
import pytest
import torch

from main import parse_args
from models import build_model
from util.misc import nested_tensor_from_tensor_list
from tiny_flags import MODELS_TINY as TINY, MODELS_SPARSE as SPARSE

VARIANTS = {
    "deformable": [],
    "refine": ["--with_box_refine"],
    "refine_two_stage": ["--with_box_refine", "--two_stage"],
    "efficient": ["--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head"],
    "sparse_rho0.3": SPARSE + ["--rho", "0.3"],
    "sparse_rho1": SPARSE + ["--rho", "1.0"],
    "sparse_objectness": SPARSE + ["--rho", "0.3", "--token_selection", "objectness"],
    "enc_aux_dense": ["--use_enc_aux_loss"],
    "no_aux_loss": ["--no_aux_loss"],
    "one_level": ["--num_feature_levels", "1"],
    "two_levels": ["--num_feature_levels", "2"],
}


def tiny_model(*flags):
    torch.manual_seed(0)
    return build_model(parse_args([*TINY, *flags]))


def make_batch(sizes=((64, 96), (96, 64)), num_boxes=(2, 0), num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    targets = []
    for (h, w), n in zip(sizes, num_boxes):
        centres = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        sizes_wh = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        targets.append({"labels": torch.randint(1, num_classes, (n,), generator=g),
                        "boxes": torch.cat([centres, sizes_wh], 1), "orig_size": torch.tensor([h, w])})
    return nested_tensor_from_tensor_list(images), targets


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward(variant):
    model, criterion, postprocessors = tiny_model(*VARIANTS[variant])
    samples, targets = make_batch()
    outputs = model(samples)
    assert outputs["pred_logits"].shape == (2, 8, 5) and outputs["pred_boxes"].shape == (2, 8, 4)
    losses = criterion(outputs, targets)
    assert {k for k in losses if k.startswith("loss_")} == set(criterion.weight_dict)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert sum(g is not None for g in grads) > 0.9 * len(grads)
    model.eval()
    with torch.no_grad():
        detections = postprocessors["bbox"](model(samples), torch.stack([t["orig_size"] for t in targets]))
    assert detections[0]["boxes"].shape == (min(100, 8 * 5), 4)


def test_images_without_objects():
    model, criterion, _ = tiny_model(*SPARSE, "--rho", "0.2")
    samples, targets = make_batch(num_boxes=(0, 0))
    losses = criterion(model(samples), targets)
    assert all(torch.isfinite(v) for k, v in losses.items() if k.startswith("loss_"))
    assert losses["loss_bbox"].item() == 0 and losses["class_error"].item() == 100


@pytest.mark.parametrize("sizes", [((64, 64),), ((32, 32), (128, 160)), ((40, 200), (200, 40))],
                         ids=["single", "unequal", "padding_exceeds_content"])
@pytest.mark.parametrize("rho", [0.05, 0.5, 1.0])
def test_sparse_token_counts(sizes, rho):
    """Each image keeps int(valid_tokens * rho) + 1 tokens; the batch gathers the largest count."""
    model, criterion, _ = tiny_model(*SPARSE, "--rho", str(rho))
    samples, targets = make_batch(sizes=sizes, num_boxes=(1,) * len(sizes))
    outputs = model(samples)
    valid = (~outputs["mask_flatten"]).sum(1)
    expected = (valid * rho).int() + 1
    assert torch.equal(outputs["sparse_token_nums"], expected.int())
    num_tokens = outputs["mask_flatten"].shape[1]
    assert outputs["backbone_topk_proposals"].shape[1] == min(int(expected.max()), num_tokens)
    for image in range(len(sizes)):
        # The image's own kept tokens are all valid (padding has the lowest score).
        own = outputs["backbone_topk_proposals"][image, :min(int(expected[image]), int(valid[image]))]
        assert not outputs["mask_flatten"][image, own].any()
    losses = criterion(outputs, targets)
    assert torch.isfinite(losses["loss_mask_prediction"])


def test_sparse_encoder_writes_back_only_each_images_own_tokens():
    """With unequal images, tokens past an image's own count keep their backbone values."""
    model, _, _ = tiny_model(*SPARSE, "--rho", "0.1", "--num_feature_levels", "1")
    encoder = model.transformer.encoder
    encoder.class_embed = encoder.bbox_embed = None
    src = torch.randn(2, 10, 64)
    pos = torch.zeros(2, 10, 64)
    shapes = torch.tensor([[2, 5]])
    kept = torch.tensor([[0, 1, 2], [3, 4, 5]])
    counts = torch.tensor([3, 1])
    memory = encoder(src, pos, shapes, torch.tensor([0]), torch.ones(2, 1, 2), torch.zeros(2, 10, dtype=torch.bool),
                     kept_index=kept, kept_counts=counts)["memory"]
    changed = (memory != src).any(-1)
    assert changed[0, :3].all() and not changed[0, 3:].any()
    assert changed[1, 3] and not changed[1, 4:].any() and not changed[1, :3].any()


def test_rho_one_updates_every_valid_token_like_the_dense_encoder():
    """rho = 1 keeps every token of an unpadded image: the sparse encoder equals the dense one."""
    model, _, _ = tiny_model(*SPARSE, "--rho", "1.0", "--num_feature_levels", "1")
    encoder = model.transformer.encoder
    encoder.class_embed = encoder.bbox_embed = None
    src, pos = torch.randn(1, 10, 64), torch.randn(1, 10, 64)
    args = (src, pos, torch.tensor([[2, 5]]), torch.tensor([0]), torch.ones(1, 1, 2), torch.zeros(1, 10, dtype=torch.bool))
    dense = encoder(*args)["memory"]
    sparse = encoder(*args, kept_index=torch.randperm(10)[None], kept_counts=torch.tensor([10]))["memory"]
    torch.testing.assert_close(sparse, dense)


COEFFICIENTS = ["--cls_loss_coef", "3", "--bbox_loss_coef", "4", "--giou_loss_coef", "1.5",
                "--mask_prediction_coef", "0.5", "--set_cost_class", "1.25", "--set_cost_bbox", "2.5",
                "--set_cost_giou", "0.75", "--focal_alpha", "0.3"]


def test_every_loss_and_matching_coefficient_flag_reaches_the_criterion():
    """Each weight of the criterion is the value of its flag (not a default), per loss name."""
    _, criterion, _ = tiny_model(*SPARSE, "--rho", "0.3", *COEFFICIENTS)
    by_name = {"loss_ce": 3.0, "loss_bbox": 4.0, "loss_giou": 1.5, "loss_mask_prediction": 0.5}
    for key, weight in criterion.weight_dict.items():
        base = next(name for name in by_name if key == name or key.startswith(name + "_"))
        assert weight == by_name[base], key
    assert criterion.weight_dict["loss_mask_prediction"] == 0.5
    matcher = criterion.matcher
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (1.25, 2.5, 0.75)
    assert criterion.focal_alpha == 0.3


def test_more_two_stage_queries_than_tokens_is_a_clear_error():
    """64-pixel images give 85 tokens over 4 levels: the default 300 two-stage queries cannot be chosen."""
    from util.errors import InputError
    model, _, _ = build_model(parse_args([*TINY, *SPARSE, "--rho", "0.1", "--num_queries", "300"]))
    samples, _ = make_batch(sizes=((64, 64), (64, 48)))
    with pytest.raises(InputError, match=r"the images give \d+ tokens \(8x8 \+ 4x4 \+ 2x2 \+ 1x1 over the feature "
                                         r"levels\), fewer than the 300 two-stage proposals"):
        model(samples)
