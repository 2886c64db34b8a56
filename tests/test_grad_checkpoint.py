"""--grad_checkpoint: the same loss and gradients as without it on every variant (dropout on, backbone training),
far fewer activations kept by the forward, and no effect outside training."""
from __future__ import annotations

import re

import pytest
import torch

import models.activation_checkpoint as activation_checkpoint

from engine import weighted_loss
from main import parse_args
from models import build_model
from tiny_flags import GRAD_CHECKPOINT_TINY as TINY

REFINE = ["--with_box_refine"]
TWO_STAGE = [*REFINE, "--two_stage"]
EFFICIENT = [*TWO_STAGE, "--eff_query_init", "--eff_specific_head"]
VARIANTS = {
    "deformable": [],
    "refine": REFINE,
    "two_stage": TWO_STAGE,
    "efficient": EFFICIENT,
    "sparse_detr": [*EFFICIENT, "--rho", "0.3", "--use_enc_aux_loss"],
    "detr": ["--model", "detr"],
    "detr_pre_norm": ["--model", "detr", "--pre_norm"],
    "sdetr": ["--model", "sdetr", "--sdetr_stage1_enc_layers", "2", "--sdetr_stage2_dec_layers", "2"],
}


def batch():
    """Two images of unequal sizes (padding: Sparse DETR keeps another number of tokens in each) and targets."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 72, 88, generator=g), torch.randn(3, 56, 96, generator=g)]
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.5]])}]
    return images, targets


def parameter_storages(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def saved_activation_bytes(model: torch.nn.Module, run):
    """(run(), bytes of the tensors autograd keeps for backward while ``run`` runs, parameters not counted);
    a checkpointed block's inner tensors go to the checkpoint's own hooks, not to these."""
    params, kept = parameter_storages(model), {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(kept.values())


# Every encoder and decoder layer (deformable, DETR, both SDETR stages) and every backbone stage (all train here).
CHECKPOINTED = re.compile(r"(.*\.)?(encoder|decoder)\.layers\.\d+|backbone\.0\.body\.layer\d")


def training_step(flags: list[str], grad_checkpoint: bool, model_hook=lambda model: None):
    """(loss, {name: gradient}, saved activation bytes) of one training forward and backward, dropout on."""
    args = parse_args([*TINY, *flags, *(["--grad_checkpoint"] if grad_checkpoint else [])])
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    model_hook(model)
    model.train()
    images, targets = batch()
    torch.manual_seed(1)  # the dropout masks
    outputs, saved = saved_activation_bytes(model, lambda: model(images))
    loss = weighted_loss(criterion(outputs, targets), criterion.weight_dict)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, saved


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(variant, monkeypatch):
    """Catches a checkpointed block that draws other dropout masks (RNG state not restored), a block that is
    checkpointed with a wrong argument order, a write-back inside the sparse encoder's checkpoint gone wrong,
    and a module that never got the flag (each layer and stage, the scoring network and the two-stage
    proposal heads must run under a checkpoint)."""
    loss, grads, saved = training_step(VARIANTS[variant], grad_checkpoint=False)
    blocks, real_checkpoint = [], activation_checkpoint.checkpoint

    def spy(block, *inputs, **kwargs):
        if isinstance(block, torch.nn.Module):  # a layer
            blocks.append(id(block))
        elif hasattr(block, "__self__"):  # a pass of the transformer's over all tokens
            blocks.append(block.__name__)
        else:  # a backbone stage's function
            blocks.append(id(inputs[0]))
        return real_checkpoint(block, *inputs, **kwargs)

    monkeypatch.setattr(activation_checkpoint, "checkpoint", spy)
    expected = []
    loss_ckpt, grads_ckpt, saved_ckpt = training_step(
        VARIANTS[variant], grad_checkpoint=True,
        model_hook=lambda model: expected.extend(id(m) for n, m in model.named_modules() if CHECKPOINTED.fullmatch(n)))
    flags = VARIANTS[variant]
    expected += ["score_tokens"] * ("--rho" in flags) + ["token_proposal_heads"] * ("--two_stage" in flags)
    assert len(expected) > 6 and set(blocks) == set(expected)
    assert torch.equal(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    assert any(".layer2." in name for name in grads)  # the backbone trains (--backbone_from_scratch)
    for name, grad in grads.items():  # bitwise: the same operations run again on the same inputs
        assert torch.equal(grads_ckpt[name], grad), name
    assert saved_ckpt < 0.5 * saved, (saved_ckpt, saved)


def test_checkpointing_is_off_in_evaluation_and_without_grad():
    """Catches checkpointing that runs in eval mode (recomputation for nothing)."""
    flags = VARIANTS["sparse_detr"]
    images, _ = batch()
    saved = {}
    for grad_checkpoint in (False, True):
        torch.manual_seed(0)
        model = build_model(parse_args([*TINY, *flags, *(["--grad_checkpoint"] if grad_checkpoint else [])]))[0]
        model.eval()
        _, saved[grad_checkpoint] = saved_activation_bytes(model, lambda: model(images))
    assert saved[True] == saved[False] > 0


def test_swin_stages_checkpointed_give_the_same_gradients():
    """Swin-T (stochastic depth 0.2: random per block): catches a checkpointed stage that draws other drop-path
    masks, and stages that are not checkpointed at all."""
    from models.swin import SwinBackbone
    from util.misc import nested_tensor_from_tensor_list

    images, _ = batch()
    results = {}
    for grad_checkpoint in (False, True):
        torch.manual_seed(0)
        backbone = SwinBackbone(freeze_early_layers=False, grad_checkpoint=grad_checkpoint).train()
        samples = nested_tensor_from_tensor_list(images)
        torch.manual_seed(1)
        maps, saved = saved_activation_bytes(backbone, lambda: backbone(samples))
        sum(m.tensors.square().mean() for m in maps).backward()
        results[grad_checkpoint] = ({n: p.grad for n, p in backbone.named_parameters()}, saved)
    (grads, saved), (grads_ckpt, saved_ckpt) = results[False], results[True]
    assert all(torch.equal(grads_ckpt[n], g) for n, g in grads.items())
    assert saved_ckpt < 0.5 * saved, (saved_ckpt, saved)


def test_the_kernels_first_use_inside_a_checkpointed_layer(monkeypatch):
    """The compiled kernel's self-check runs at its first use, here inside the first checkpointed encoder layer:
    catches its autograd graph counted as the layer's ("a different number of tensors was saved during the
    original forward and recomputation"). Where no kernel builds, the PyTorch path runs and this passes."""
    from models.ops import selfcheck

    monkeypatch.setattr(selfcheck, "_verdicts", {})  # as in a fresh process
    loss, grads, _ = training_step(VARIANTS["deformable"], grad_checkpoint=True)
    assert torch.isfinite(loss) and grads
