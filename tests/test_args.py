"""Command-line flags: defaults per model and start-up validation of combinations."""
import pytest

from main import parse_args


def test_reference_defaults():
    args = parse_args(["--device", "cpu"])
    assert (args.lr, args.lr_backbone, args.batch_size, args.epochs, args.lr_drop) == (2e-4, 2e-5, 2, 50, 40)
    assert (args.num_queries, args.dim_feedforward, args.enc_n_points, args.dec_n_points) == (300, 1024, 4, 4)
    assert (args.set_cost_class, args.set_cost_bbox, args.set_cost_giou) == (2, 5, 2)
    assert (args.cls_loss_coef, args.bbox_loss_coef, args.giou_loss_coef, args.focal_alpha) == (2, 5, 2, 0.25)
    assert args.lr_linear_proj_names == ["reference_points", "sampling_offsets"] and args.lr_linear_proj_mult == 0.1
    assert args.num_classes == 91 and args.rho == 0 and args.aux_loss


def test_explicit_values_win_over_model_defaults():
    assert parse_args(["--device", "cpu", "--lr", "1e-3"]).lr == 1e-3


@pytest.mark.parametrize("flags,message", [
    (["--eff_query_init"], "--eff_query_init needs --two_stage"),
    (["--eff_specific_head"], "--eff_specific_head needs --two_stage"),
    (["--two_stage"], "--two_stage needs --with_box_refine"),
    (["--rho", "0.1"], "--rho needs --two_stage"),
    (["--rho", "1.5", "--two_stage", "--with_box_refine"], "--rho must be in [0, 1]"),
    (["--rho", "-0.1", "--two_stage", "--with_box_refine"], "--rho must be in [0, 1]"),
    (["--model", "detr", "--two_stage"], "--two_stage belongs to the Deformable DETR family"),
    (["--model", "detr", "--rho", "0.1"], "--rho belongs to Sparse DETR"),
    (["--two_stage", "--with_box_refine", "--token_selection", "objectness"],
     "--token_selection objectness chooses the tokens of Sparse DETR's sparse encoder: it needs --rho > 0"),
    (["--hidden_dim", "100"], "must be divisible by --nheads"),
    (["--eval"], "--eval evaluates a checkpoint: add --resume PATH"),
    (["--backbone_from_scratch", "--backbone_weights", "w.pth"], "--backbone_from_scratch contradicts"),
    (["--enc_layers", "0"], "--enc_layers must be at least 1"),
])
def test_invalid_combinations_fail_at_start_up_naming_the_fix(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--device", "cpu", *flags])
    assert message in str(exc.value)


def test_unknown_flag_is_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--masks"])
    assert "unrecognized arguments: --masks" in capsys.readouterr().err


def test_unavailable_imagenet_weights_name_the_fixes(monkeypatch):
    """Offline: the error names --backbone_weights and --backbone_from_scratch, not a deep traceback."""
    import urllib.error

    import main
    from torchvision.models import ResNet18_Weights

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(SystemExit) as exc:
        main.main(parse_args(["--device", "cpu", "--backbone", "resnet18", "--coco_path", "/nonexistent"]))
    message = str(exc.value)
    assert message.startswith("error: Could not get the ImageNet weights of resnet18")
    assert "--backbone_weights PATH" in message and "--backbone_from_scratch" in message


# Command lines as the references' READMEs and configs give them (their paths replaced by ours).
REFERENCE_COMMAND_LINES = {
    "sparse_detr_swint_config": "--backbone swin-t --with_box_refine --two_stage --eff_query_init --eff_specific_head "
                                "--rho 0.1 --use_enc_aux_loss --backbone_from_scratch",
    "sparse_detr_direct": "--with_box_refine --two_stage --eff_query_init --eff_specific_head --rho 0.1 "
                          "--use_enc_aux_loss --cache_mode --batch_size 3",
    "sparse_detr_eval": "--with_box_refine --two_stage --eff_query_init --eff_specific_head --rho 0.1 "
                        "--use_enc_aux_loss --resume ckpt.pth --eval",
    "sparse_detr_scrl": "--with_box_refine --two_stage --rho 0.1 --scrl_pretrained_path scrl.pth",
    "deformable_detr": "--dataset_file coco --coco_path data/coco --with_box_refine --two_stage --num_feature_levels 4",
    "detr_eval": "--model detr --batch_size 2 --no_aux_loss --eval --resume detr-r50.pth --coco_path data/coco",
}


@pytest.mark.parametrize("name", REFERENCE_COMMAND_LINES)
def test_reference_command_lines_parse(name):
    args = parse_args(["--device", "cpu", *REFERENCE_COMMAND_LINES[name].split()])
    if name == "sparse_detr_swint_config":
        assert args.backbone == "swin_tiny"  # the reference's "swin-t"
    assert args.dataset_file == "coco"
