"""Activation checkpointing (``--grad_checkpoint``): a block's forward keeps only its inputs, and backward runs
it again to get the activations it needs. Less memory for about one more forward of each block.

Modules take ``grad_checkpoint`` at construction and call their blocks through :func:`run_block`. It is
active only while training with gradients enabled: evaluation and ``torch.no_grad()`` run the blocks as
they are. The gradients equal those without it: ``torch.utils.checkpoint`` (non-reentrant) restores the
random state (dropout draws the same masks) and the autocast state when it runs a block again.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointing(module: nn.Module, grad_checkpoint: bool) -> bool:
    """Whether ``module`` (built with ``grad_checkpoint``) checkpoints its blocks now: in training mode with
    gradients enabled."""
    return grad_checkpoint and module.training and torch.is_grad_enabled()


def trains(module: nn.Module) -> bool:
    """Whether some parameter of ``module`` trains: a frozen block (e.g. a frozen backbone stage) saves no
    activations for backward, so checkpointing it would only add a forward."""
    return any(p.requires_grad for p in module.parameters())


def run_block(block: Callable[..., Any], *inputs: Any, active: bool) -> Any:
    """``block(*inputs)``, under a non-reentrant activation checkpoint when ``active``."""
    if not active:
        return block(*inputs)
    return checkpoint(block, *inputs, use_reentrant=False)
