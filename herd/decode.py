"""The batch-1 decode step's small steps in C++ (decode.cpp): RMSNorm, the q/k/v preparation (rotary, QK-norm,
attention temperature) and one query's attention over the KV cache.

Why: at batch 1 these are a few hundred numbers each, and every torch op costs a few microseconds of dispatch
whatever its size. Measured in SmolLM2's decode step (packed Q4_1, 1 thread): ~60 torch ops per layer between the
matmuls, ~9 ms of a ~22 ms step; torch's RMSNorm alone took ~25 us per 576-vector. Here a layer's attention block
is one C++ call before the cache write and one after.

Modules (swapped in by `use_decode_kernels` after fusing, in place):
- HerdRMSNorm (model.RMSNorm): fp32 rows through `rms_norm`; anything else through RMSNorm.forward, its twin.
- HerdAttention (fuse.FusedAttention): a single fp32 token with a KV cache, i.e. a batch-1 decode step, runs
  wqkv -> `decode_qkv` -> the cache's update -> `attend_one` -> wo; every other call (prefill, batches, padding)
  runs Attention.forward, its twin. An int8 (ops.QuantizedKV) cache still takes the C++ q/k/v preparation, then
  Attention.attend.
- HerdFeedForward (fuse.FusedFeedForward, MoE shared experts included): silu(gate) * up in one call (`silu_mul`).
Where the extension cannot run (kernels.status()) `use_decode_kernels` swaps nothing. tests/test_decode.py checks each
C++ step against its torch twin and whole decode steps against the unswapped model.
"""
from __future__ import annotations

import math

import torch

from . import kernels
from .fuse import FusedAttention, FusedFeedForward, _retype
from .model import RMSNorm, apply_rope, attention_mask, attention_temperature, rms_normalize
from .quantize import _set_module

_NO_ROPE = torch.empty(0)


class HerdRMSNorm(RMSNorm):
    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu":
            return kernels._ext.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class HerdAttention(FusedAttention):
    def forward(self, x, pos, rope, kv_cache=None):
        if kv_cache is None or x.shape[:2] != (1, 1) or x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x, pos, rope, kv_cache)
        p = int(pos)                                                      # the one host read of this layer
        if p < 0:                                                         # a padding row: the twin handles it
            return super().forward(x, pos, rope, kv_cache)
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        cos_sin = torch.view_as_real(rope).reshape(D // 2, 2) if self.spec.uses_rope else _NO_ROPE   # (D/2, 2)
        q_scale = (1.0 + self.attn_scale * math.log1p(math.floor((p + 1.0) / self.floor_scale))
                   if self.spec.temperature_tuning else 1.0)
        q, k, v = kernels._ext.decode_qkv(self.wqkv(x).reshape(-1), cos_sin, H, K, self.spec.qk_norm,
                                          self.norm_eps, q_scale)
        k, v, k_pos = kv_cache.update(self.layer_id, k.view(1, 1, K, D), v.view(1, 1, K, D), pos)
        if type(k) is torch.Tensor and k.dtype in (torch.float32, torch.bfloat16) and k[0].is_contiguous():
            out = kernels._ext.attend_one(q, k[0], v[0], k_pos[0], p, self.chunk_size or 0)      # (H*D,)
            return self.wo(out.view(1, 1, H * D))
        return self.wo(self.attend(q.view(1, 1, H, D), k, v, pos, k_pos))


class HerdFeedForward(FusedFeedForward):
    def forward(self, x):
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        return self.w2(kernels._ext.silu_mul(self.w13(x).contiguous()))          # (..., 2F) -> (..., F)


_SWAPS = {RMSNorm: HerdRMSNorm, FusedAttention: HerdAttention, FusedFeedForward: HerdFeedForward}


@torch.no_grad()
def use_decode_kernels(model: torch.nn.Module) -> int:
    """Swap, in place, every RMSNorm, FusedAttention and FusedFeedForward for its Herd* subclass (same weights,
    nothing copied). Returns how many were swapped; 0 where the extension cannot run here (kernels.status())."""
    if not kernels.available():
        return 0
    swaps = [(name, _retype(mod, _SWAPS[type(mod)], ())) for name, mod in model.named_modules() if type(mod) in _SWAPS]
    for name, new in swaps:
        _set_module(model, name, new)
    return len(swaps)


# ---- twins: the same steps in torch, as model.py computes them ------------------------------------------------------
def decode_qkv_reference(qkv, rotation, n_heads: int, n_kv_heads: int, qk_norm: bool, eps: float, q_scale: float):
    """qkv ((H + 2K) * D,) fp32, rotation complex (D/2,) or None -> q (H*D,), k (K*D,), v (K*D,)."""
    D = qkv.numel() // (n_heads + 2 * n_kv_heads)
    q, k, v = qkv.view(1, 1, -1, D).split((n_heads, n_kv_heads, n_kv_heads), dim=2)
    if rotation is not None:
        q, k = apply_rope(q, rotation), apply_rope(k, rotation)
    if qk_norm:
        q, k = rms_normalize(q, eps), rms_normalize(k, eps)
    return (q * q_scale).reshape(-1), k.reshape(-1), v.reshape(-1)


def attend_one_reference(q, k, v, k_pos, q_pos: int, chunk: int):
    """q (H*D,), k and v (S, K, D), k_pos (S,) -> (H*D,): softmax(q k^T / sqrt(D)) v under model.attention_mask."""
    S, K, D = k.shape
    H = q.numel() // D
    mask = attention_mask(torch.tensor([[q_pos]]), k_pos[None], chunk or None)       # (1, 1, 1, S)
    kr = k.float().repeat_interleave(H // K, dim=1).transpose(0, 1)                     # (H, S, D)
    vr = v.float().repeat_interleave(H // K, dim=1).transpose(0, 1)
    scores = (q.view(H, 1, D) @ kr.transpose(1, 2)) / math.sqrt(D)                      # (H, 1, S)
    scores = scores.masked_fill(~mask[0], float("-inf"))
    return (scores.softmax(-1) @ vr).reshape(-1)
