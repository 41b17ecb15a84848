"""The Llama 4 vision encoder: image tiles -> one embedding per 2x2 patch group, in the adapter's width. Math only.

Per tile (spec section 4.2-4.4; sizes for the official 336-pixel tiles, 14-pixel patches):
- Patch embedding: non-overlapping 14x14 patches flattened in Unfold order (channel, kernel row, kernel col),
  one Linear without bias (ViT, https://arxiv.org/abs/2010.11929). The class token is appended LAST (index 576).
- Learned absolute position embedding, LayerNorm, then pre-norm LayerNorm blocks with biases, bidirectional
  attention and an exact-GELU MLP.
- 2D RoPE (https://arxiv.org/abs/2104.09864, axial as in Pixtral): the first half of each head's rotary pairs turn
  with the patch column, the second half with the row; coordinates start at 1; the class token is not rotated.
- Pixel shuffle (ratio 0.5): each 2x2 group of patch vectors is concatenated into one token of 4x the width, so a
  tile gives 576 / 4 = 144 tokens; then a two-layer MLP with GELU after both layers.
The projection to the text width (`Transformer.vision_proj`) and the early fusion live in model.py.

Tensor letters: N tiles, P patches per tile (+1 with the class token), D width, H heads, Dh head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ModelConfig, VisionConfig


def vision_rope(cfg: VisionConfig, device=None) -> torch.Tensor:
    """Rotations (P + 1, Dh/2) as unit complex numbers: pair m < Dh/4 turns by (x + 1) f_m, pair Dh/4 + m by
    (y + 1) f_m, with f_m = theta^(-2m / (Dh/2)) and patch n at column x = n mod side, row y = n div side.
    The last row (class token) is 1: no rotation."""
    side, Dh = cfg.patches_per_side, cfg.dim // cfg.n_heads
    freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, Dh // 4, device=device, dtype=torch.float32) * 4 / Dh)  # (Dh/4,)
    n = torch.arange(side * side, device=device)
    x, y = (n % side + 1).float(), (n // side + 1).float()                                  # (P,)
    angles = torch.cat([x[:, None] * freqs, y[:, None] * freqs], dim=-1)                      # (P, Dh/2)
    angles = torch.cat([angles, angles.new_zeros(1, Dh // 2)])                                # (P + 1, Dh/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_vision_rope(x, rope):
    """x (N, P + 1, H, Dh): the interleaved pairs (x[2i], x[2i+1]) as complex numbers times rope (P + 1, Dh/2)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())   # (N, P + 1, H, Dh/2)
    return torch.view_as_real(xc * rope[:, None, :]).flatten(-2).type_as(x)


def pixel_shuffle(x, ratio: float):
    """(N, P, C) -> (N, P * ratio^2, C / ratio^2). With k = 1/ratio, output token r'*(side/k) + c' holds the k x k
    patch group at rows k r'.., columns k c'.., concatenated row by row: for k = 2,
    (X[2r'][2c'], X[2r'][2c'+1], X[2r'+1][2c'], X[2r'+1][2c'+1]) (spec 4.4)."""
    N, P, C = x.shape
    side, k = math.isqrt(P), round(1 / ratio)
    g = side // k
    x = x.view(N, g, k, g, k, C)                                   # (N, r', dr, c', dc, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(N, g * g, k * k * C)  # (N, r' c', dr dc C)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim)
        self.wk = nn.Linear(cfg.dim, cfg.dim)
        self.wv = nn.Linear(cfg.dim, cfg.dim)
        self.wo = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, rope):                                    # x: (N, P + 1, D)
        N, P1, D = x.shape
        q, k, v = (w(x).view(N, P1, self.n_heads, self.head_dim) for w in (self.wq, self.wk, self.wv))
        q, k = apply_vision_rope(q, rope), apply_vision_rope(k, rope)
        # every patch sees every patch of its own tile (no mask); tiles never see each other
        out = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None)   # (N, H, P + 1, Dh)
        return self.wo(out.transpose(1, 2).reshape(N, P1, D))


class VisionFeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attention = VisionAttention(cfg)
        self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = VisionFeedForward(cfg.dim, cfg.ffn_dim)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x, rope):
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))


class PixelShuffleAdapter(nn.Module):
    """Pixel shuffle, then w2(gelu(w1 x)) followed by a second GELU (the output activation is part of Llama 4)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.w1 = nn.Linear(round(cfg.dim / cfg.pixel_shuffle_ratio ** 2), cfg.projector_dim, bias=False)
        self.w2 = nn.Linear(cfg.projector_dim, cfg.projector_dim, bias=False)

    def forward(self, x):                                          # x: (N, P, D)
        return F.gelu(self.w2(F.gelu(self.w1(pixel_shuffle(x, self.ratio)))))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        # NOTE: runs on the meta device like Transformer.__init__: shapes only, no buffers (the RoPE table is
        # rebuilt in forward; it is tiny).
        super().__init__()
        self.config = cfg
        n_patches = cfg.patches_per_side ** 2
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, cfg.dim, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(cfg.dim))
        self.pos_embedding = nn.Parameter(torch.empty(n_patches + 1, cfg.dim))   # row P = class token
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.n_layers))
        self.post_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.adapter = PixelShuffleAdapter(cfg)

    def forward(self, images):
        """images (N, 3, S, S), normalized tiles -> (N * tokens_per_tile, projector_dim), tile by tile."""
        N = images.shape[0]
        p = self.config.patch_size
        x = F.unfold(images.to(self.patch_embed.weight.dtype), kernel_size=p, stride=p)   # (N, 3 p p, P)
        x = self.patch_embed(x.transpose(1, 2))                                           # (N, P, D)
        x = torch.cat([x, self.class_embedding.expand(N, 1, -1)], dim=1)                  # (N, P + 1, D)
        x = self.pre_norm(x + self.pos_embedding)
        rope = vision_rope(self.config, images.device)
        for layer in self.layers:
            x = layer(x, rope)
        x = self.post_norm(x)[:, :-1]                                                     # (N, P, D)
        return self.adapter(x).flatten(0, 1)                                              # (N * P r^2, proj)


def image_token_mask(tokens, images, cfg: ModelConfig) -> torch.Tensor:
    """(B, T) bool mask of the `<|patch|>` positions that take image embeddings, after checking that the tiles
    in `images` fill them exactly. Raises ValueError before any vision compute."""
    if cfg.vision is None:
        raise ValueError("this model is text-only (its config has no vision_config), so it cannot take images")
    S = cfg.vision.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, S, S):
        raise ValueError(f"images must be tiles of shape (n_tiles, 3, {S}, {S}) as images.prepare_images makes "
                         f"them, got {tuple(images.shape)}")
    mask = tokens == cfg.image_token_id
    n_tokens, per_tile = int(mask.sum()), cfg.vision.tokens_per_tile
    if n_tokens != images.shape[0] * per_tile:
        raise ValueError(
            f"the prompt has {n_tokens} image patch tokens (id {cfg.image_token_id}) but the {images.shape[0]} "
            f"image tiles give {images.shape[0] * per_tile} embeddings ({per_tile} per tile); build the prompt with "
            "the token blocks images.prepare_images returns, one per image, in image order")
    return mask
