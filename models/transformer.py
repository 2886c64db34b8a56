"""DETR's transformer: a standard encoder-decoder built on ``nn.MultiheadAttention``.

Differences from ``nn.Transformer``, as in DETR:
    * position encodings are added to the queries and keys of every attention (never to the values);
    * the encoder has no final LayerNorm in the default post-norm mode;
    * the decoder returns the (normalised) output of every layer, for the auxiliary losses;
    * the decoder input may be given (SDETR's second stage) instead of zeros.

Layout inside the encoder and decoder is sequence-first, as ``nn.MultiheadAttention`` expects:
tokens [S, B, C] (S = H * W flattened row by row), queries [Q, B, C]. ``Transformer.forward``
takes and returns batch-first / image tensors.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activation_checkpoint import checkpointing, run_block

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    """Self-attention over the image tokens, then a feed-forward network, each with a residual.

    Post-norm (default): LayerNorm after each residual sum. Pre-norm (``normalize_before``):
    LayerNorm on the input of each block, residual sums left unnormalised.
    """

    def __init__(self, *, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _attend(self, x: Tensor, pos: Optional[Tensor], key_padding_mask: Optional[Tensor]) -> Tensor:
        qk = _with_pos(x, pos)
        return self.dropout1(self.self_attn(qk, qk, x, key_padding_mask=key_padding_mask, need_weights=False)[0])

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src: Tensor, pos: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            src: tokens [S, B, C].
            pos: their position encodings [S, B, C].
            key_padding_mask: [B, S], True on padding (never attended to).

        Returns the updated tokens [S, B, C].
        """
        if self.normalize_before:
            src = src + self._attend(self.norm1(src), pos, key_padding_mask)
            return src + self._feed_forward(self.norm2(src))
        src = self.norm1(src + self._attend(src, pos, key_padding_mask))
        return self.norm2(src + self._feed_forward(src))


class TransformerDecoderLayer(nn.Module):
    """Self-attention among the queries, cross-attention to the encoder memory, then a feed-forward
    network, each with a residual (post-norm by default, pre-norm with ``normalize_before``)."""

    def __init__(self, *, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _self_attend(self, x: Tensor, query_pos: Optional[Tensor]) -> Tensor:
        qk = _with_pos(x, query_pos)
        return self.dropout1(self.self_attn(qk, qk, x, need_weights=False)[0])

    def _cross_attend(self, x: Tensor, memory: Tensor, pos: Optional[Tensor], query_pos: Optional[Tensor],
                      memory_key_padding_mask: Optional[Tensor]) -> Tensor:
        attended = self.multihead_attn(_with_pos(x, query_pos), _with_pos(memory, pos), memory,
                                       key_padding_mask=memory_key_padding_mask, need_weights=False)[0]
        return self.dropout2(attended)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, tgt: Tensor, memory: Tensor, pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            tgt: query contents [Q, B, C].
            memory: encoder output [S, B, C].
            pos: position encodings of the memory [S, B, C].
            query_pos: query position embeddings (the learned object queries) [Q, B, C].
            memory_key_padding_mask: [B, S], True on padding.

        Returns the updated query contents [Q, B, C].
        """
        if self.normalize_before:
            tgt = tgt + self._self_attend(self.norm1(tgt), query_pos)
            tgt = tgt + self._cross_attend(self.norm2(tgt), memory, pos, query_pos, memory_key_padding_mask)
            return tgt + self._feed_forward(self.norm3(tgt))
        tgt = self.norm1(tgt + self._self_attend(tgt, query_pos))
        tgt = self.norm2(tgt + self._cross_attend(tgt, memory, pos, query_pos, memory_key_padding_mask))
        return self.norm3(tgt + self._feed_forward(tgt))


class TransformerEncoder(nn.Module):
    """``num_layers`` independent copies of ``encoder_layer``, then ``norm`` if given (pre-norm only);
    ``grad_checkpoint``: activation checkpointing of each layer in training."""

    def __init__(self, *, encoder_layer: TransformerEncoderLayer, num_layers: int, norm: Optional[nn.Module] = None,
                 grad_checkpoint: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm
        self.grad_checkpoint = grad_checkpoint

    def forward(self, src: Tensor, pos: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """src, pos [S, B, C]; key_padding_mask [B, S] -> memory [S, B, C]."""
        checkpointed = checkpointing(self, self.grad_checkpoint)
        for layer in self.layers:
            src = run_block(layer, src, pos, key_padding_mask, active=checkpointed)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """``num_layers`` independent copies of ``decoder_layer``; ``norm`` (a LayerNorm shared by all
    layers) is applied to every layer's output that is returned. The next layer takes the
    unnormalised output. ``grad_checkpoint``: activation checkpointing of each layer in training."""

    def __init__(self, *, decoder_layer: TransformerDecoderLayer, num_layers: int, norm: nn.Module,
                 return_intermediate: bool = True, grad_checkpoint: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate
        self.grad_checkpoint = grad_checkpoint

    def forward(self, tgt: Tensor, memory: Tensor, pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """tgt, query_pos [Q, B, C]; memory, pos [S, B, C]; memory_key_padding_mask [B, S].

        Returns [num_layers, Q, B, C] (every layer, normalised) with ``return_intermediate``, else
        [1, Q, B, C] (the last layer).
        """
        outputs = []
        checkpointed = checkpointing(self, self.grad_checkpoint)
        for layer in self.layers:
            tgt = run_block(layer, tgt, memory, pos, query_pos, memory_key_padding_mask, active=checkpointed)
            if self.return_intermediate:
                outputs.append(self.norm(tgt))
        if not self.return_intermediate:
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    """DETR's encoder-decoder over one feature map.

    ``encoder_heads`` / ``decoder_heads`` default to ``nhead``; SDETR's second stage uses a
    single-head encoder with an 8-head decoder. Every weight matrix (dim > 1) starts
    Xavier-uniform. ``grad_checkpoint``: activation checkpointing of every encoder and decoder layer in
    training.
    """

    def __init__(self, *, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False, return_intermediate_dec: bool = True,
                 encoder_heads: Optional[int] = None, decoder_heads: Optional[int] = None,
                 grad_checkpoint: bool = False):
        super().__init__()
        encoder_heads = nhead if encoder_heads is None else encoder_heads
        decoder_heads = nhead if decoder_heads is None else decoder_heads
        for what, heads in (("encoder", encoder_heads), ("decoder", decoder_heads)):
            if heads < 1 or d_model % heads:
                raise ValueError(f"{what} heads ({heads}) must divide the model width ({d_model})")
        layer_args = dict(d_model=d_model, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                          normalize_before=normalize_before)
        self.encoder = TransformerEncoder(
            encoder_layer=TransformerEncoderLayer(nhead=encoder_heads, **layer_args),
            num_layers=num_encoder_layers,
            norm=nn.LayerNorm(d_model) if normalize_before else None,
            grad_checkpoint=grad_checkpoint,
        )
        self.decoder = TransformerDecoder(
            decoder_layer=TransformerDecoderLayer(nhead=decoder_heads, **layer_args),
            num_layers=num_decoder_layers,
            norm=nn.LayerNorm(d_model),
            return_intermediate=return_intermediate_dec,
            grad_checkpoint=grad_checkpoint,
        )
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        self.d_model = d_model
        self.nhead = nhead

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor,
                tgt: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """
        Args:
            src: projected feature map [B, C, H, W].
            mask: [B, H, W], True on padding.
            query_embed: object query embeddings [Q, C] (shared by the batch), added to the queries
                of every decoder attention.
            pos_embed: position encoding of the map [B, C, H, W].
            tgt: initial decoder contents [B, Q, C]; zeros when None (DETR).

        Returns:
            hs: decoder outputs [L, B, Q, C] (L decoder layers with intermediate outputs, else 1);
            memory: encoder output [B, C, H, W].
        """
        batch, channels, height, width = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).expand(-1, batch, -1)
        mask = mask.flatten(1)
        tgt = torch.zeros_like(query_embed) if tgt is None else tgt.transpose(0, 1)
        memory = self.encoder(src, pos=pos_embed, key_padding_mask=mask)
        hs = self.decoder(tgt, memory, pos=pos_embed, query_pos=query_embed, memory_key_padding_mask=mask)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).reshape(batch, channels, height, width)


def build_transformer(args) -> Transformer:
    """DETR's transformer from parsed ``main.py`` arguments."""
    return Transformer(
        d_model=args.hidden_dim,
        nhead=args.nheads,
        num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers,
        dim_feedforward=args.dim_feedforward,
        dropout=args.dropout,
        normalize_before=args.pre_norm,
        return_intermediate_dec=True,
        grad_checkpoint=args.grad_checkpoint,
    )


def build_sdetr_transformers(args) -> tuple[Transformer, Transformer]:
    """SDETR's two stages (C5 then C4) from parsed ``main.py`` arguments (``--sdetr_stage*``)."""
    stages = []
    for stage in (1, 2):
        stages.append(Transformer(
            d_model=args.hidden_dim,
            nhead=args.nheads,
            num_encoder_layers=getattr(args, f"sdetr_stage{stage}_enc_layers"),
            num_decoder_layers=getattr(args, f"sdetr_stage{stage}_dec_layers"),
            encoder_heads=getattr(args, f"sdetr_stage{stage}_enc_heads"),
            decoder_heads=getattr(args, f"sdetr_stage{stage}_dec_heads"),
            dim_feedforward=args.dim_feedforward,
            dropout=args.dropout,
            normalize_before=args.pre_norm,
            return_intermediate_dec=True,
            grad_checkpoint=args.grad_checkpoint,
        ))
    return stages[0], stages[1]
