"""Fused projections for batch-1 CPU speed, applied after loading by swapping modules (model.py stays math only).

- FusedAttention: one `wqkv` matmul (rows: wq, then wk, then wv) instead of three; `Attention.project_qkv` is the
  plain twin it overrides.
- FusedFeedForward: one `w13` matmul (rows: w1 gate, then w3 up) then `w2`; `FeedForward.forward` is its twin.
  MoE shared experts are FeedForwards and are fused too; routed experts (quantize.Int8Experts / Int4Experts)
  already fuse gate and up.
At batch 1 every matmul is a small memory-bound call with a fixed cost (dispatch, bf16 casts, the packed kernels'
thread setup), so fewer, larger calls win; the weights are the same bytes, concatenated along the output rows.

`fuse_linears` concatenates nn.Linear, quantize.Int8Linear or quantize.Int4Linear modules of one kind (Int4 rows are
unpacked from torch's CPU layout, concatenated and repacked, so the fused module computes exactly the same weights).
`fuse_model(model)` swaps every Attention / FeedForward whose projections can be fused; tests/test_gguf_packed.py checks
fused == unfused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Attention, FeedForward
from ..quantize import (COMPUTE_DTYPE, Int4Linear, Int8Linear, aligned_copy, cpu_int4_block, int4_unpack_cpu)


class FusedAttention(Attention):
    """Attention with q, k and v from one matmul: wqkv (H*D + 2*K*D, dim), any linear module kind."""

    def project_qkv(self, x):
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split((H * D, K * D, K * D), dim=-1)
        return q.view(B, T, H, D), k.view(B, T, K, D), v.view(B, T, K, D)     # (B, T, H, D), (B, T, K, D) x2


class FusedFeedForward(FeedForward):
    """SwiGLU with gate and up from one matmul: w13 (2F, dim) = [w1; w3], then w2."""

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)                                # (..., F) each
        return self.w2(F.silu(gate) * up)


def retype(old: nn.Module, cls: type, drop: tuple[str, ...], **modules) -> nn.Module:
    """A module of class `cls` (a subclass of type(old)) holding old's attributes and submodules, minus `drop`,
    plus `modules`. `old` is left unchanged."""
    new = cls.__new__(cls)
    new.__dict__.update(old.__dict__)
    new._modules = {k: v for k, v in old._modules.items() if k not in drop}
    new._parameters, new._buffers = dict(old._parameters), dict(old._buffers)
    for name, mod in modules.items():
        setattr(new, name, mod)
    return new


def can_fuse(mods: list[nn.Module]) -> bool:
    """True if `fuse_linears` can concatenate these modules (same kind, input size, dtype / group size)."""
    first = mods[0]
    if any(type(m) is not type(first) or m.in_features != first.in_features for m in mods):
        return False
    if type(first) is nn.Linear:
        return all(m.bias is None and m.weight.dtype == first.weight.dtype for m in mods)
    if type(first) is Int4Linear:
        return cpu_int4_block() is not None and all(m.group_size == first.group_size for m in mods)
    return type(first) is Int8Linear


@torch.no_grad()
def fuse_linears(mods: list[nn.Module]) -> nn.Module:
    """One linear module whose output is the concatenation of `mods`' outputs (see can_fuse)."""
    first, K = mods[0], mods[0].in_features
    N = sum(m.out_features for m in mods)
    if type(first) is nn.Linear:
        out = nn.Linear(K, N, bias=False, device="meta")
        out.weight = nn.Parameter(torch.cat([m.weight for m in mods]), requires_grad=False)
        return out
    if type(first) is Int8Linear:
        out = Int8Linear(K, N, device="meta")
        out.weight = aligned_copy(torch.cat([m.weight for m in mods]))
        out.scale = torch.cat([m.scale for m in mods])
        return out
    # Int4: back to u (N, K) in 0..15 and (G, N, 2) scales/zeros, concatenated along N, repacked by torch's packer
    u = torch.cat([int4_unpack_cpu(m.weight, cpu_int4_block(), torch.int32) for m in mods])       # (N, K)
    out = Int4Linear(K, N, first.group_size, device="meta")
    out.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
    out.scales_and_zeros = torch.cat([m.scales_and_zeros for m in mods], dim=1).to(COMPUTE_DTYPE).contiguous()
    return out


def fuse_model(model: nn.Module) -> nn.Module:
    """Swap, in place, every Attention for a FusedAttention and every FeedForward for a FusedFeedForward whose
    projections can be fused. Returns the model."""
    swaps = []
    for name, mod in model.named_modules():
        if type(mod) is Attention and can_fuse([mod.wq, mod.wk, mod.wv]):
            swaps.append((name, retype(mod, FusedAttention, ("wq", "wk", "wv"),
                                        wqkv=fuse_linears([mod.wq, mod.wk, mod.wv]))))
        elif type(mod) is FeedForward and can_fuse([mod.w1, mod.w3]):
            swaps.append((name, retype(mod, FusedFeedForward, ("w1", "w3"), w13=fuse_linears([mod.w1, mod.w3]))))
    for name, new in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model
