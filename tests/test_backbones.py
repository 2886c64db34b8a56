"""Backbones: Swin-T (official layout, weights files, any input size, frozen stages) and the ResNet variants
(channels, dilation, SCRL weights)."""
import pytest
import timm
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from main import parse_args
from models import build_model
from models.backbone import ResNetBackbone, WeightsUnavailableError, build_backbone
from util.errors import InputError
from models.swin import SwinBackbone, shifted_window_mask
from util.misc import nested_tensor_from_tensor_list

from test_checkpoint_layouts import read_layout
from tiny_flags import BACKBONES_SPARSE_DETR as SPARSE_DETR, BACKBONES_TINY as TINY

SWIN = ["--device", "cpu", "--backbone", "swin_tiny"]
# Parameters the reference freezes with ImageNet weights: patch embedding, stage 1 and its patch merging.
SWIN_T_EARLY_PARAMETERS = 304086


# ------------------------------------------------------------------------------------------------
# Swin-T


def test_swin_sparse_detr_runs_and_its_official_layout_loads_strictly():
    shapes, total, trainable = read_layout("swint_sparse_detr")
    torch.manual_seed(0)
    model, criterion, _ = build_model(parse_args([*SWIN, "--backbone_from_scratch", *SPARSE_DETR]))
    # Forward and backward on small images (enough tokens for the 300 two-stage proposals).
    outputs = model(nested_tensor_from_tensor_list([torch.randn(3, 128, 128), torch.randn(3, 100, 120)]))
    assert outputs["pred_logits"].shape == (2, 300, 91)
    assert outputs["spatial_shapes"].tolist() == [[16, 16], [8, 8], [4, 4], [2, 2]]
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
               {"labels": torch.tensor([], dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    losses = criterion(outputs, targets)
    total_loss = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total_loss.backward()
    assert torch.isfinite(total_loss) and model.backbone[0].body.patch_embed.proj.weight.grad is not None

    state_dict = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == shapes
    # The backbone's entries come in the official order too (timm's patch merging sits in the next stage).
    assert [k for k in state_dict if k.startswith("backbone.")] == [k for k in shapes if k.startswith("backbone.")]
    model.load_state_dict({k: torch.zeros(shape) for k, shape in shapes.items()}, strict=True)
    body = model.backbone[0].body
    assert body.layers[1].downsample.reduction.weight.abs().sum() == 0  # official layers.0.downsample
    # relative_position_index is derived from the window, not taken from the file.
    assert body.layers[0].blocks[0].attn.relative_position_index.max() == 13 * 13 - 1
    # The header counts every parameter as trainable: the reference's Swin from scratch freezes nothing.
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def test_swin_backbone_shapes_masks_and_any_input_size():
    torch.manual_seed(0)
    backbone = SwinBackbone(name="swin_tiny", freeze_early_layers=False).eval()
    assert backbone.num_channels == [192, 384, 768] and backbone.strides == [8, 16, 32]
    samples = nested_tensor_from_tensor_list([torch.randn(3, 65, 97), torch.randn(3, 33, 20)])
    with torch.no_grad():
        features = backbone(samples)
    assert [tuple(f.tensors.shape) for f in features] == [(2, 192, 9, 13), (2, 384, 5, 7), (2, 768, 3, 4)]
    assert not features[0].mask[0].any() and features[0].mask[1, :, 3:].all() and not features[0].mask[1, :4, :2].any()
    assert all(torch.isfinite(f.tensors).all() for f in features)
    with torch.no_grad():
        tiny = backbone.body(torch.randn(1, 3, 1, 1))
    assert [tuple(x.shape[-2:]) for x in tiny] == [(1, 1)] * 3
    sdetr = SwinBackbone(return_layers=(3, 4))  # SDETR reads C4 and C5
    assert sdetr.num_channels == [384, 768] and sdetr.strides == [16, 32]


def test_swin_equals_timm_where_no_padding_is_needed():
    """At 224x224 no stage pads, so the detection order (pad, then shift) and timm's agree exactly."""
    torch.manual_seed(0)
    body = SwinBackbone(name="swin_tiny", freeze_early_layers=False).body.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = body(x)
        theirs = body.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    for i, (a, b) in enumerate(zip(ours, theirs), 1):
        expected = getattr(body, f"norm{i}")(b.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(a, expected)


def test_shifted_window_mask_separates_the_wrapped_regions():
    mask = shifted_window_mask(7, 7, 7, 3)
    assert mask.shape == (1, 49, 49) and set(mask.unique().tolist()) == {0.0, -100.0}
    assert mask[0, 0, 1] == 0 and mask[0, 0, 48] == -100  # (0, 0) and (6, 6) lie in different regions
    assert shifted_window_mask(8, 15, 7, 3).shape == (2 * 3, 49, 49)  # padded to 14 x 21


def _official_release(backbone: SwinBackbone) -> dict:
    """What the official Swin ImageNet release holds: official names, the classifier's final norm and head,
    the shifted blocks' attention masks, no detection norms."""
    state_dict = {k: v.clone() for k, v in backbone.body.state_dict().items() if not k.startswith("norm")}
    state_dict.update({"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768),
                       "head.weight": torch.zeros(1000, 768), "head.bias": torch.zeros(1000),
                       "layers.0.blocks.1.attn_mask": torch.zeros(64, 49, 49)})
    return state_dict


def test_swin_loads_the_official_imagenet_release_and_freezes_stage_1(tmp_path):
    torch.manual_seed(1)
    source = SwinBackbone(freeze_early_layers=False)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": _official_release(source)}, path)
    args = parse_args([*SWIN, "--backbone_weights", str(path)])
    backbone = build_backbone(args)[0]
    loaded = backbone.body.state_dict()
    for key, value in source.body.state_dict().items():
        if not key.startswith("norm"):
            assert torch.equal(loaded[key], value), key
    frozen = {n for n, p in backbone.body.named_parameters() if not p.requires_grad}
    assert sum(p.numel() for n, p in backbone.body.named_parameters() if n in frozen) == SWIN_T_EARLY_PARAMETERS
    assert "patch_embed.proj.weight" in frozen and "layers.1.downsample.reduction.weight" in frozen
    assert "layers.1.blocks.0.attn.qkv.weight" not in frozen and "norm1.weight" not in frozen
    finetuned = build_backbone(parse_args([*SWIN, "--backbone_weights", str(path), "--finetune_early_layers"]))
    assert all(p.requires_grad for p in finetuned.parameters())
    assert not any(p.requires_grad for p in SwinBackbone(train_backbone=False).parameters())  # --lr_backbone 0


def test_swin_loads_a_timm_checkpoint(tmp_path):
    torch.manual_seed(2)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    path = tmp_path / "timm_swin_tiny.pth"
    torch.save(reference.state_dict(), path)  # timm names: patch merging at the start of stages 2-4
    body = build_backbone(parse_args([*SWIN, "--backbone_weights", str(path)]))[0].body.eval()
    assert torch.equal(body.layers[1].downsample.reduction.weight, reference.layers[1].downsample.reduction.weight)
    # timm's classifier skips the shift of its last stage at 224 (7x7 map, one window) where the detection Swin
    # keeps it, so compare stage 3.
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = body(x)[1]
        theirs = reference.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
    torch.testing.assert_close(ours, body.norm2(theirs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_swin_weights_errors(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="--backbone_weights.*--backbone_from_scratch"):
        build_backbone(parse_args(SWIN))
    missing = tmp_path / "nowhere" / "swin.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_backbone(parse_args([*SWIN, "--backbone_weights", str(missing)]))
    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet)
    with pytest.raises(InputError, match="resnet18.pth does not hold"):
        build_backbone(parse_args([*SWIN, "--backbone_weights", str(resnet)]))
    with pytest.raises(SystemExit, match="--dilation"):
        parse_args([*SWIN, "--backbone_from_scratch", "--dilation"])


def test_swin_checkpoints_round_trip_through_the_official_names():
    torch.manual_seed(3)
    flags = [*SWIN, "--backbone_from_scratch", *TINY]
    model, _, _ = build_model(parse_args(flags))
    state_dict = model.state_dict()
    assert "backbone.0.body.layers.0.downsample.reduction.weight" in state_dict
    assert "backbone.0.body.layers.3.downsample.reduction.weight" not in state_dict
    torch.manual_seed(4)
    other, _, _ = build_model(parse_args(flags))
    other.load_state_dict(state_dict, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(state_dict.values(), other.state_dict().values()))
    model.eval()
    other.eval()
    images = [torch.randn(3, 64, 96)]
    with torch.no_grad():
        torch.testing.assert_close(model(images)["pred_boxes"], other(images)["pred_boxes"])


# ------------------------------------------------------------------------------------------------
# ResNets


@pytest.mark.parametrize("name,channels", [("resnet18", [128, 256, 512]), ("resnet34", [128, 256, 512]),
                                           ("resnet50", [512, 1024, 2048]), ("resnet101", [512, 1024, 2048])])
def test_resnet_variants_build_with_their_channels(name, channels):
    args = parse_args(["--backbone", name, "--backbone_from_scratch", *TINY, "--num_feature_levels", "4"])
    model, _, _ = build_model(args)
    assert model.backbone.num_channels == channels and model.backbone.strides == [8, 16, 32]
    assert [proj[0].in_channels for proj in model.input_proj] == channels + [channels[-1]]
    with torch.no_grad():
        features, _ = model.backbone.eval()(nested_tensor_from_tensor_list([torch.randn(3, 64, 96)]))
    assert [tuple(f.tensors.shape[1:]) for f in features] == [(c, 64 // s, 96 // s)
                                                               for c, s in zip(channels, (8, 16, 32))]


@pytest.mark.parametrize("name,dilation", [("resnet18", False), ("resnet50", True)])
def test_resnet_forward_equals_torchvision_modules(name, dilation):
    """The forward (frozen BatchNorm folded into the convolutions, channels-last) gives torchvision's
    module-by-module values and gradients, from the same state dict."""
    torch.manual_seed(0)
    backbone = ResNetBackbone(name=name, dilation=dilation).double()
    with torch.no_grad():  # frozen statistics away from the identity, as ImageNet weights have
        for module in backbone.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    plain = ResNetBackbone(name=name, dilation=dilation, channels_last=False).double()
    plain.load_state_dict(backbone.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 48, dtype=torch.double)
    ours, theirs = backbone.feature_maps(x), list(plain.body(x).values())
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in ours)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(plain.feature_maps(x), theirs)
    (sum(f.sum() for f in ours) + sum(f.sum() for f in theirs)).backward()
    grads = {name: p.grad for name, p in plain.named_parameters() if p.grad is not None}
    assert grads and not any(name.startswith(("conv1", "layer1")) for name in grads)  # frozen stem and layer1
    torch.testing.assert_close({name: p.grad for name, p in backbone.named_parameters() if p.grad is not None}, grads)


@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
def test_dilation_halves_the_last_stride(name):
    backbone = build_backbone(parse_args(["--backbone", name, "--backbone_from_scratch", "--dilation", *TINY,
                                          "--num_feature_levels", "4"]))
    assert backbone.strides == [8, 16, 16]
    with torch.no_grad():
        features, _ = backbone.eval()(nested_tensor_from_tensor_list([torch.randn(3, 64, 96)]))
    assert features[-1].tensors.shape[-2:] == features[-2].tensors.shape[-2:] == (4, 6)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_dilation_needs_a_bottleneck_resnet(name):
    with pytest.raises(SystemExit, match="--dilation needs a bottleneck ResNet"):
        parse_args(["--backbone", name, "--backbone_from_scratch", "--dilation", *TINY])


def test_scrl_checkpoint_initialises_the_resnet50(tmp_path):
    torch.manual_seed(5)
    reference = {k: torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in torchvision.models.resnet50().state_dict().items()}
    encoder = {"conv1.": "encoder.0.", "bn1.": "encoder.1.", "layer1.": "encoder.4.", "layer2.": "encoder.5.",
               "layer3.": "encoder.6.", "layer4.": "encoder.7."}
    online = {new + key[len(old):]: value for key, value in reference.items()
              for old, new in encoder.items() if key.startswith(old)}
    online["projector.0.weight"] = torch.randn(8, 2048)  # SCRL's projection head: not a backbone weight
    path = tmp_path / "scrl_resnet50.pth"
    torch.save({"online_network_state_dict": online, "target_network_state_dict": online}, path)
    backbone = build_backbone(parse_args(["--backbone", "resnet50", "--scrl_pretrained_path", str(path), *TINY]))
    body = backbone[0].body
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer4.2.conv3.weight",
                "layer4.2.bn3.weight"):
        assert torch.equal(body.state_dict()[key], reference[key]), key
    # SCRL weights count as pretrained: the stem and layer1 stay frozen, as with ImageNet weights.
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    not_scrl = tmp_path / "not_scrl.pth"
    torch.save({"model": {}}, not_scrl)
    with pytest.raises(InputError, match="not an SCRL checkpoint"):
        build_backbone(parse_args(["--backbone", "resnet50", "--scrl_pretrained_path", str(not_scrl), *TINY]))


def test_trainable_batch_norm_equals_torchvision_and_updates_its_statistics():
    """--backbone_norm batch: torchvision's BatchNorm2d forward and gradients (batch statistics in training,
    running ones in evaluation), and the running statistics move in training."""
    args = parse_args(["--backbone", "resnet18", "--backbone_from_scratch", "--backbone_norm", "batch", *TINY])
    torch.manual_seed(0)
    backbone = build_backbone(args)[0].double()
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    plain = ResNetBackbone(name="resnet18", return_layers=[int(n[-1]) for n in backbone.body.return_layers],
                           channels_last=False, batch_norm=True, freeze_early_layers=False).double()
    plain.load_state_dict(backbone.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 48, dtype=torch.double)
    for mode in ("train", "eval"):
        backbone.train(mode == "train"), plain.train(mode == "train")
        before = norms[0].running_mean.clone()
        ours, theirs = backbone.feature_maps(x), list(plain.body(x).values())
        torch.testing.assert_close(ours, theirs)
        assert (not torch.equal(before, norms[0].running_mean)) == (mode == "train")
    backbone.zero_grad(), plain.zero_grad()
    backbone.train(), plain.train()
    (sum(f.sum() for f in backbone.feature_maps(x)) + sum(f.sum() for f in plain.body(x).values())).backward()
    grads = {name: p.grad for name, p in plain.named_parameters() if p.grad is not None}
    assert "body.bn1.weight" in grads  # the norms train, the stem's included
    torch.testing.assert_close({name: p.grad for name, p in backbone.named_parameters()}, grads)


@pytest.mark.parametrize("flags,message", [
    (["--backbone", "swin_tiny"], "--backbone_norm batch applies to ResNets"),
    (["--backbone", "resnet18", "--grad_checkpoint"], "update the BatchNorm running statistics twice"),
])
def test_batch_norm_flag_combinations_fail_at_start_up(flags, message):
    with pytest.raises(SystemExit, match=message):
        parse_args([*flags, "--backbone_from_scratch", "--backbone_norm", "batch", *TINY])
