"""Users of the reference code at home: a Swin-T checkpoint written by the reference, with its optimizer state,
resumes here (the reference lists the Swin parameters in the official order, timm in its own)."""
from __future__ import annotations

import pytest
import torch

import runner
from main import parse_args
from models import build_model
from models.swin import official_to_timm
from util import checkpoint as ckpt
from util.errors import InputError
from util.process import DistContext

SWIN_TINY_DETECTOR = ("--device cpu --backbone swin_tiny --backbone_from_scratch --hidden_dim 32 --nheads 2 "
                      "--enc_layers 1 --dec_layers 1 --dim_feedforward 32 --num_queries 5 --num_classes 3 "
                      "--num_feature_levels 2 --lr_scaling none").split()
BODY = "backbone.0.body."


def reference_order(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters in the reference's order: that of the official state-dict names (which the
    layout tests pin to the released checkpoints), each mapped back to our module by its timm name."""
    params = []
    for key in model.state_dict():
        name = BODY + official_to_timm(key[len(BODY):]) if key.startswith(BODY) else key
        try:
            param = model.get_parameter(name)
        except AttributeError:  # a buffer
            continue
        if param.requires_grad and all(param is not p for _, p in params):
            params.append((name, param))
    return params


def reference_optimizer_state(model: torch.nn.Module, args) -> dict:
    """An AdamW state as the reference writes it: its three groups over parameters in its order, after one step
    whose gradient identifies each parameter (its position in our named_parameters, plus one)."""
    number = {id(p): i + 1.0 for i, (_, p) in enumerate(model.named_parameters())}
    groups = [[], [], []]
    for name, param in reference_order(model):
        group = 2 if runner.match_name_keywords(name, args.lr_linear_proj_names) else \
            1 if runner.match_name_keywords(name, args.lr_backbone_names) else 0
        groups[group].append(param)
        param.grad = torch.full_like(param, number[id(param)])
    optimizer = torch.optim.AdamW([{"params": g, "lr": lr} for g, lr in zip(groups, (2e-4, 2e-5, 2e-5))],
                                  weight_decay=0.0)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return optimizer.state_dict()


def test_a_reference_written_swin_optimizer_state_resumes_on_the_right_parameters():
    args = parse_args(SWIN_TINY_DETECTOR)
    model, _, _ = build_model(args)
    order = [name for name, _ in reference_order(model)]
    timm_order = [name for name, p in model.named_parameters() if p.requires_grad]
    assert order != timm_order  # the patch merging parameters sit elsewhere: the case this test is about
    saved = {"optimizer": reference_optimizer_state(model, args), "lr_scheduler": None, "epoch": 3}
    optimizer = runner.build_optimizer(model, args, args.lr, args.lr_backbone)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    saved["lr_scheduler"] = scheduler.state_dict()
    ckpt.restore_training_state(saved, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                                start_epoch=0, lr_drop=args.lr_drop, batch_size=args.batch_size, ctx=DistContext(),
                                source="reference.pth")
    number = {id(p): i + 1.0 for i, (_, p) in enumerate(model.named_parameters())}
    for param in (p for group in optimizer.param_groups for p in group["params"]):
        moment = optimizer.state[param]["exp_avg"]  # 0.1 x the gradient after one AdamW step
        assert torch.allclose(moment, torch.full_like(param, 0.1 * number[id(param)]))
    for param in model.parameters():
        param.grad = torch.ones_like(param) if param.requires_grad else None
    optimizer.step()  # the first step after resuming runs


def test_an_optimizer_state_in_another_order_is_refused_with_the_fix():
    args = parse_args(SWIN_TINY_DETECTOR)
    model, _, _ = build_model(args)
    saved = reference_optimizer_state(model, args)
    # An optimizer over timm's order (what this project built before following the reference's order).
    trainable = [p for n, p in model.named_parameters() if p.requires_grad
                 and not runner.match_name_keywords(n, args.lr_linear_proj_names + args.lr_backbone_names)]
    backbone = [p for n, p in model.named_parameters() if p.requires_grad
                and runner.match_name_keywords(n, args.lr_backbone_names)
                and not runner.match_name_keywords(n, args.lr_linear_proj_names)]
    linear = [p for n, p in model.named_parameters() if p.requires_grad
              and runner.match_name_keywords(n, args.lr_linear_proj_names)]
    optimizer = torch.optim.AdamW([{"params": trainable}, {"params": backbone}, {"params": linear}])
    optimizer.load_state_dict(saved)
    with pytest.raises(InputError, match=r"the optimizer state of reference.pth does not fit: parameter \d+ of group "
                                         r"1 has shape .* use --finetune with this checkpoint instead of --resume"):
        ckpt.check_optimizer_state_fits(optimizer, "reference.pth")
