"""Position encodings of image feature maps."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from util.misc import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of the (y, x) position of every unpadded pixel.

    Coordinates are cumulative counts of valid pixels, normalised to ``[0, scale]`` by the valid
    height/width, so padding does not shift the encoding. ``offset`` is subtracted from the counts
    before normalising: 0 in DETR, 0.5 in Deformable DETR (pixel centres).

    Returns [B, 2 * num_pos_feats, H, W] (y features first, then x), computed in float32.
    """

    def __init__(self, *, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi,
                 offset: float = 0.0):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self.offset = offset

    def forward(self, features: NestedTensor) -> Tensor:
        not_mask = ~features.mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=not_mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: a row and a column embedding (at most 50 x 50 positions).

    Returns [B, 2 * num_pos_feats, H, W] (x features first, then y), as DETR.
    """

    def __init__(self, *, num_pos_feats: int = 128, max_size: int = 50):
        super().__init__()
        self.max_size = max_size
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, features: NestedTensor) -> Tensor:
        x = features.tensors
        h, w = x.shape[-2:]
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"learned position embedding covers at most {self.max_size}x{self.max_size} positions, "
                             f"got a {h}x{w} feature map; use --position_embedding sine")
        x_emb = self.col_embed(torch.arange(w, device=x.device))
        y_emb = self.row_embed(torch.arange(h, device=x.device))
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, -1, -1), y_emb.unsqueeze(1).expand(-1, w, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(x.shape[0], -1, -1, -1)


def build_position_encoding(args) -> nn.Module:
    num_pos_feats = args.hidden_dim // 2
    if args.position_embedding == "sine":
        offset = 0.0 if args.model in ("detr", "sdetr") else 0.5
        return PositionEmbeddingSine(num_pos_feats=num_pos_feats, scale=args.position_embedding_scale,
                                     offset=offset)
    if args.position_embedding == "learned":
        return PositionEmbeddingLearned(num_pos_feats=num_pos_feats)
    raise ValueError(f"unknown --position_embedding {args.position_embedding!r}; choose sine or learned")
