"""The batch-1 decode step's small steps in C++ (decode.cpp): RMSNorm, the q/k/v preparation (rotary, QK-norm,
attention temperature), one query's attention over the KV cache and SiLU gating; and fp32 matrices kept in the
layout a one-row product reads fastest.

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
- HerdLinear (fp32 nn.Linear) and HerdExperts (fp32 model.Experts): the same weights transposed (see the classes),
  few-row products through kernels.cpp's `fp32_mm`.
- HerdBlock (model.Block): a layer whose matrices are all herd's (packed int4 / int8, or HerdLinear's fp32), dense or
  a top-1 MoE of HerdExperts or kernels.py's HerdInt4Experts / HerdInt8Experts / HerdGGUFExperts, runs a decode step
  as one C++ call (`decode_layer`: the steps above plus the matmuls, the routing, the cache slot write and the
  residuals); a batched decode step of B rows (each its own position and cache row) as one `decode_layer_rows` call,
  every matrix one product of all B rows, a MoE's rows grouped by expert; Block.forward, its twin, everywhere else.
- HerdTransformer (model.Transformer, the root, retyped in place): a batch-1 decode step whose layers all take the
  one call runs them all in one C++ call (`decode_step` over a `LayerStack`, the layers' weights checked once);
  Transformer.forward (HerdBlock by HerdBlock), its twin, everywhere else.
Where the extension cannot run (extension.status()) `use_decode_kernels` swaps nothing. tests/test_decode.py checks each
C++ step against its torch twin and whole decode steps against the unswapped model.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..model import (MoE, Block, Experts, RMSNorm, Transformer, apply_rope, attention_mask, rms_normalize, rope_angles,
                     rope_frequencies)
from ..quantize import set_module
from . import kernels
from .extension import ext
from .fuse import FusedAttention, FusedFeedForward, retype

_EMPTY = torch.empty(0)
_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)      # what attend_one reads
# A prefill piece runs as rows of one cache row (HerdBlock._piece_call_args) while T x (its last position + 1) stays
# under this: the rows' attention (decode.cpp, each key read once for all of them) costs ~T x position, and from
# some length on the twin's SDPA does as well. Measured on SmolLM2 (AVX2, 2 threads, a noisy VM: +-10% between runs),
# a piece's step, rows against twin: T=16 at position 1000 49.5 vs 73.5 ms, at 2000 67.5 vs 97.1, at 3900 101.7 vs
# 120.6; T=64 at 1000 183.0 vs 202.4, at 2000 248.1 vs 253.2, at 3000 305.8 vs 307.0, at 3900 354.4 vs 351.1.
PIECE_ROW_KEYS = 131072
# Up to this many rows fp32 products run kernels.cpp's fp32_mm, from here on torch's GEMM. Measured one row at a time
# over 160 MB of matrices (cold caches) at the tiny MoE's and the 8192-row vocab head's shapes: at 2 threads 10-60 us
# faster per matrix than x @ w_t (no OpenMP region per call), at 1 thread the same within noise.
FP32_MM_ROWS = 4


class HerdRMSNorm(RMSNorm):
    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu":
            return ext().rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class HerdAttention(FusedAttention):
    def forward(self, x, pos, rope, kv_cache=None):
        if kv_cache is None or x.shape[:2] != (1, 1) or x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x, pos, rope, kv_cache)
        p = int(pos)                                                      # the one host read of this layer
        if p < 0:                                                         # a padding row: the twin handles it
            return super().forward(x, pos, rope, kv_cache)
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        cos_sin, q_scale = self.rotation_and_q_scale(rope, p)
        q, k, v = ext().decode_qkv(self.wqkv(x).reshape(-1), cos_sin, H, K, self.spec.qk_norm,
                                          self.norm_eps, q_scale)
        k, v, k_pos = kv_cache.update(self.layer_id, k.view(1, 1, K, D), v.view(1, 1, K, D), pos)
        if type(k) is torch.Tensor and k.dtype in _CACHE_DTYPES and k[0].is_contiguous():
            out = ext().attend_one(q, k[0], v[0], k_pos[0], p, self.chunk_size or 0)      # (H*D,)
            return self.wo(out.view(1, 1, H * D))
        return self.wo(self.attend(q.view(1, 1, H, D), k, v, pos, k_pos))

    # The last rotation's cos_sin: (rope, cos_sin). Every RoPE layer of a step gets the same rope tensor (made
    # afresh by each Transformer.forward), so it is viewed once per step, not per layer (~5 us each). Compared by
    # identity while the memo holds the tensor; one tuple, replaced whole, so threads running other models only
    # miss it.
    _rotation: tuple = (None, None)

    def cos_sin(self, rope) -> torch.Tensor:
        """rope (B, T, 1, D/2) complex -> (B * T, D) fp32 pairs (cos, sin), as decode_qkv reads them."""
        memo = HerdAttention._rotation
        if memo[0] is not rope:
            memo = HerdAttention._rotation = (rope, torch.view_as_real(rope).reshape(-1, self.head_dim))
        return memo[1]

    def rotation_and_q_scale(self, rope, p: int):
        """decode_qkv's cos_sin (its D/2 pairs, here as (1, D)) from the step's rotation (empty on NoPE layers) and
        q scale: the NoPE temperature of position p, on the host (model.attention_temperature computes it in
        torch)."""
        cos_sin = self.cos_sin(rope) if self.spec.uses_rope else _EMPTY
        return cos_sin, self.q_scale(p)

    def rotations_and_q_scales(self, rope, pos):
        """rotation_and_q_scale for a decode step of B rows at positions pos (B, 1): cos_sin (B, D) from rope
        (B, 1, 1, D/2) (empty on NoPE layers), q scales (B,) fp32 (empty without temperature tuning), each the same
        number as the row's batch-1 step gets (the host formula, rounded to fp32 once)."""
        cos_sin = self.cos_sin(rope) if self.spec.uses_rope else _EMPTY
        if not self.spec.temperature_tuning:
            return cos_sin, _EMPTY
        return cos_sin, torch.tensor([self.q_scale(p) for p in pos.reshape(-1).tolist()], dtype=torch.float32)

    def q_scale(self, p: int) -> float:
        """The NoPE temperature of position p, on the host in double (1.0 without temperature tuning)."""
        if not self.spec.temperature_tuning:
            return 1.0
        return 1.0 + self.attn_scale * math.log1p(math.floor((p + 1.0) / self.floor_scale))


class HerdFeedForward(FusedFeedForward):
    def forward(self, x):
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        return self.w2(ext().silu_mul(self.w13(x).contiguous()))          # (..., 2F) -> (..., F)


class HerdLinear(nn.Module):
    """An fp32 nn.Linear without bias holding its weight transposed, weight_t (in, out) contiguous: y = x @ weight_t.
    Why: torch's one-row fp32 product reads an (in, out) matrix faster than the (out, in) one nn.Linear keeps.
    Measured on the tiny Llama 4 MoE of bench/speed.py (78 MB of fp32 matrices per token, every matmul of a decode
    step back to back): 7.2 vs 9.3 ms at 1 thread, 5.3 vs 6.0 ms at 2. Twin: F.linear(x, weight_t.t())."""

    def __init__(self, weight_t: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        self.weight_t = nn.Parameter(weight_t, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """(out, in), as nn.Linear's: a view, for code reading the weight's dtype, device or shape."""
        return self.weight_t.t()

    def forward(self, x):
        if x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() <= FP32_MM_ROWS * self.in_features:
            return ext().fp32_mm(x.reshape(-1, self.in_features).contiguous(),
                                        self.weight_t).view(*x.shape[:-1], self.out_features)
        return x @ self.weight_t


class HerdExperts(nn.Module):
    """model.Experts (fp32) with each expert's gate and up fused and every matrix transposed: w13_t (E, D, 2F),
    w2_t (E, F, D), so a routed token's expert is two one-row products reading their matrices in order (see
    HerdLinear) and one `silu_mul`. Twin: Experts.forward."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.n_experts = experts.w1.shape[0]
        w13_t = torch.cat([experts.w1, experts.w3], dim=1).transpose(1, 2).contiguous()     # (E, D, 2F)
        self.w13_t = nn.Parameter(w13_t, requires_grad=False)
        self.w2_t = nn.Parameter(experts.w2.transpose(1, 2).contiguous(), requires_grad=False)  # (E, F, D)

    def expert(self, e: int, seg):                                    # seg (n, D) -> (n, D)
        if seg.shape[0] <= FP32_MM_ROWS:
            return ext().fp32_mm(ext().silu_mul(ext().fp32_mm(seg.contiguous(), self.w13_t[e])),
                                        self.w2_t[e])
        return ext().silu_mul(seg.contiguous() @ self.w13_t[e]) @ self.w2_t[e]

    def forward(self, x, expert_idx, gate):
        if x.dtype != torch.float32 or x.device.type != "cpu":
            w13 = self.w13_t.transpose(1, 2)
            F_ = w13.shape[1] // 2
            return ops.run_experts(x, expert_idx, gate, w13[:, :F_], self.w2_t.transpose(1, 2), w13[:, F_:])
        return ops.dispatch_experts(x, expert_idx, gate, self.n_experts, self.expert)


class HerdBlock(Block):
    """A decoder layer whose matrices are all herd's (packed int4 / int8 from kernels.py, or HerdLinear's fp32), norms
    HerdRMSNorm, attention HerdAttention and feed-forward HerdFeedForward or a top-1 MoE of HerdExperts (or
    kernels.py's HerdInt4Experts / HerdInt8Experts / HerdGGUFExperts) with a HerdLinear router and a HerdFeedForward
    shared expert: a batch-1 decode step runs the whole layer in one C++ call (`decode_layer`), which writes this
    token's key and value to the slot the cache names (KVCache.decode_slot) and attends over it; a decode step of B
    rows, none of them padding, in one `decode_layer_rows` call (KVCache.decode_slots: each row's cache row, slot and
    slots read). Anything else (prefill, padding rows, int8 keys, other modules) runs Block.forward, its twin. Why:
    the ~15 Python-level calls per layer cost ~5 ms of a SmolLM2 decode step (30 layers); at 16 rows the twin's torch
    attention, cache scatter and dispatch took ~80 of a 196 ms step."""

    _layer_args = None      # (the modules they were read from, decode_layer's per-layer arguments or None)

    def forward(self, x, pos, rope, kv_cache=None):
        if x.shape[0] == 1:
            args = self._one_call_args(x, pos, rope, kv_cache)
            if args is not None:
                return ext().decode_layer(*args).view_as(x)
            args = self._piece_call_args(x, pos, rope, kv_cache)
            if args is not None:
                return ext().decode_layer_rows(*args).view_as(x)
        args = self._rows_call_args(x, pos, rope, kv_cache)
        if args is not None:
            return ext().decode_layer_rows(*args).view_as(x)
        return super().forward(x, pos, rope, kv_cache)

    def _one_call_args(self, x, pos, rope, kv_cache):
        """decode_layer's arguments for a batch-1 decode step (x (1, 1, dim)) in a cache row given as a slice, or
        None."""
        common = self._decode_step(x, kv_cache, "decode_slot")
        if common is None or x.shape[0] != 1:
            return None
        attn, layer = common
        p = int(pos)
        if p < 0:
            return None
        cache = kv_cache.decode_slot(attn.layer_id, p)
        if cache is None:
            return None
        cos_sin, q_scale = attn.rotation_and_q_scale(rope, p)
        return (x.reshape(1, -1), *layer, cos_sin, attn.n_heads, attn.n_kv_heads, attn.spec.qk_norm, q_scale, *cache,
                p, attn.chunk_size or 0)

    def _rows_call_args(self, x, pos, rope, kv_cache):
        """decode_layer_rows' arguments for a decode step of B rows (x (B, 1, dim), every position >= 0, each row its
        own cache row: KVCache.decode_slots), or None. From kernels.DEQUANT_ROWS rows on, None: there the packed
        modules' dequantized dense matmuls (the twin's) beat the kernels, whose cost grows with the rows."""
        common = self._decode_step(x, kv_cache, "decode_slots")
        if common is None or x.shape[0] >= kernels.DEQUANT_ROWS:
            return None
        attn, layer = common
        cache = kv_cache.decode_slots(attn.layer_id, pos)
        if cache is None:
            return None
        cos_sin, q_scales = attn.rotations_and_q_scales(rope, pos)
        return (x.reshape(x.shape[0], -1), *layer, cos_sin, attn.n_heads, attn.n_kv_heads, attn.spec.qk_norm,
                q_scales, *cache, pos.reshape(-1), attn.chunk_size or 0)

    def _piece_call_args(self, x, pos, rope, kv_cache):
        """decode_layer_rows' arguments for new tokens of one sequence (x (1, T, dim), 1 < T < DEQUANT_ROWS: a
        prefill piece beside decoding streams, a short prompt, a chat turn) as T rows of its one cache row
        (KVCache.piece_slots), or None, also from PIECE_ROW_KEYS on. Why: the twin's per-layer torch calls and SDPA
        cost a 4-token piece 25 ms at position 100 on SmolLM2 (AVX2, 2 threads), the rows 13.8."""
        T = x.shape[1]
        if not 1 < T < kernels.DEQUANT_ROWS or T * (int(pos[0, -1]) + 1) > PIECE_ROW_KEYS:
            return None
        rows = x.reshape(T, 1, x.shape[-1])                                           # (T, 1, dim): a token a row
        common = self._decode_step(rows, kv_cache, "piece_slots")
        if common is None:
            return None
        attn, layer = common
        cache = kv_cache.piece_slots(attn.layer_id, pos)
        if cache is None:
            return None
        cos_sin, q_scales = attn.rotations_and_q_scales(rope, pos.reshape(T, 1))
        return (rows.reshape(T, -1), *layer, cos_sin, attn.n_heads, attn.n_kv_heads, attn.spec.qk_norm, q_scales,
                *cache, pos.reshape(-1), attn.chunk_size or 0)

    def _decode_step(self, x, kv_cache, slot_method: str):
        """(the attention module, the layer's per-step-invariant arguments) when x (B, 1, dim) is a decode step the
        one-call layer can take with a cache offering `slot_method`, else None."""
        if (kv_cache is None or not hasattr(kv_cache, slot_method) or x.dim() != 3 or x.shape[1] != 1
                or x.dtype != torch.float32 or self.training):
            return None
        parts = _parts(self)
        if self._layer_args is None or self._layer_args[0] != parts:
            self._layer_args = (parts, _layer_args(*parts))
        layer = self._layer_args[1]
        return None if layer is None else (parts[2], layer)

    def _apply(self, fn, recurse=True):
        self._layer_args = None             # .to() / .float() ... may replace the tensors the arguments hold
        return super()._apply(fn, recurse)


class HerdTransformer(Transformer):
    """A model whose batch-1 decode step runs every layer in one C++ call (`decode_step`) when all of them are
    HerdBlocks that take the one-call layer: the layers' weights are checked once into a `LayerStack`, and a step
    passes only its position, rotation, q scales and cache rows. Anything else runs Transformer.forward (HerdBlock
    by HerdBlock), its twin. Why: per layer, the module call, HerdBlock's arguments and decode_layer's 40 arguments
    and checks cost ~25 us, ~0.7 ms of a 6.4 ms SmolLM2 step (AVX2, 2 threads). The root model is retyped in place
    (use_decode_kernels): callers hold it."""

    _stack = None      # (_ASSIGNMENTS when built, the LayerStack or None, the layers' attention modules)
    _freqs = None      # rope_frequencies(config), made once

    def forward(self, tokens, *, input_pos=None, kv_cache=None, embeddings=None, logit_index=None, images=None):
        if (tokens.shape == (1, 1) and embeddings is None and images is None and input_pos is not None
                and kv_cache is not None and hasattr(kv_cache, "decode_slot_all") and not self.training):
            h = self._one_call_step(tokens, input_pos, kv_cache)
            if h is not None:
                if logit_index is not None:
                    h = h[torch.arange(1, device=h.device), logit_index][:, None]     # (1, 1, dim), as the twin
                return self.output(self.norm(h)).float()
        return super().forward(tokens, input_pos=input_pos, kv_cache=kv_cache, embeddings=embeddings,
                               logit_index=logit_index, images=images)

    def _one_call_step(self, tokens, input_pos, kv_cache):
        """The layers' output (1, 1, dim) for one decode token through decode_step, or None where it cannot run."""
        p = int(input_pos)
        stack = self._layer_stack() if p >= 0 else None
        if stack is None:
            return None
        rows = kv_cache.decode_slot_all(p)
        h = self.embed(tokens)
        if rows is None or h.dtype != torch.float32 or h.device.type != "cpu":
            return None
        freqs = self._freqs
        if freqs is None or freqs.device != tokens.device:            # the same values Transformer.forward makes
            freqs = self._freqs = rope_frequencies(self.config, tokens.device)
        attns = self._stack[2]
        cos_sin = attns[0].cos_sin(rope_angles(input_pos, freqs))     # (1, D): this position's (cos, sin) pairs
        out = ext().decode_step(stack, h.reshape(1, -1), cos_sin, [a.q_scale(p) for a in attns], *rows, p)
        return out.view(1, 1, -1)

    def _layer_stack(self):
        """The LayerStack of the layers as they are now, or None when a layer cannot take the one call. Rebuilt
        after any module, parameter or buffer assignment anywhere (_ASSIGNMENTS), not checked layer by layer each
        step: comparing 30 layers' modules cost ~130 us of a SmolLM2 step, its caches cold from the weights."""
        if self._stack is not None and self._stack[0] == _ASSIGNMENTS[0]:
            return self._stack[1]
        stack, attns = None, None
        if all(type(layer) is HerdBlock for layer in self.layers):
            parts = [_parts(layer) for layer in self.layers]
            args = [_layer_args(*p) for p in parts]
            if all(a is not None for a in args):
                attns = [p[2] for p in parts]
                stack = ext().layer_stack([(*a, at.n_heads, at.n_kv_heads, at.spec.qk_norm, at.chunk_size or 0,
                                            at.spec.uses_rope) for a, at in zip(args, attns)])
        self._stack = (_ASSIGNMENTS[0], stack, attns)
        return stack

    def _apply(self, fn, recurse=True):
        self._stack = None                  # .to() / .float() ... may replace the tensors the stack holds
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # copy.deepcopy: the stack is a C++ object over this model's own tensors (it cannot be copied); the copy
        # builds its own at its first step
        state = dict(super().__getstate__())
        state.pop("_stack", None)
        return state


# Module, parameter and buffer assignments anywhere in the process (nn.Module.__setattr__ and register_* call torch's
# global registration hooks): HerdTransformer's LayerStack is current while this count has not moved.
_ASSIGNMENTS = [0]


def _count_assignment(module, name, value):
    _ASSIGNMENTS[0] += 1


for _register in (nn.modules.module.register_module_module_registration_hook,
                  nn.modules.module.register_module_parameter_registration_hook,
                  nn.modules.module.register_module_buffer_registration_hook):
    _register(_count_assignment)


def _parts(block: HerdBlock) -> tuple:
    """The modules decode_layer reads, through the module dicts: nn.Module's attribute lookup costs ~1 us here, and
    a layer's arguments read ~25 of them (~1.1 ms of a 30-layer SmolLM2 step). Compared by identity, so replacing
    any of them rebuilds the arguments."""
    m = block._modules
    attn, ffn = m["attention"], m["feed_forward"]
    a, f = attn._modules, ffn._modules
    mlp = f.get("shared_expert", ffn)                    # a MoE's shared expert holds its w13 / w2
    return (m["attention_norm"], m["ffn_norm"], attn, a.get("wqkv"), a.get("wo"), ffn, mlp, mlp._modules.get("w13"),
            mlp._modules.get("w2"), f.get("router"), f.get("experts"))


def _layer_args(attn_norm, ffn_norm, attn, wqkv, wo, ffn, mlp, w13, w2, router, experts) -> tuple | None:
    """decode_layer's arguments that stay the same from step to step (the norms, eps, the matrices, a MoE's router
    and experts), or None if the layer cannot take the one call."""
    if (type(attn) is not HerdAttention or type(attn_norm) is not HerdRMSNorm or type(ffn_norm) is not HerdRMSNorm
            or attn_norm.eps != attn.norm_eps or ffn_norm.eps != attn.norm_eps or type(mlp) is not HerdFeedForward
            or not all(_layer_matrix(w) for w in (wqkv, wo, w13, w2))
            or not _fp32_cpu(attn_norm.weight, ffn_norm.weight)):
        return None
    if type(ffn) is MoE:
        routed = _experts_args(experts)
        if ffn.top_k != 1 or type(router) is not HerdLinear or not _fp32_cpu(router.weight_t) or routed is None:
            return None
        routed = (router.weight_t, *routed)
    else:
        routed = (_EMPTY, _EMPTY, _EMPTY, _EMPTY, _EMPTY, 0, 0, _EMPTY, 0)
    return (attn_norm.weight, ffn_norm.weight, attn.norm_eps, *_matrix_args(wqkv), *_matrix_args(wo),
            *_matrix_args(w13), *_matrix_args(w2), *routed)


def _layer_matrix(mod) -> bool:
    """A matrix decode_layer can take: herd's packed int4 / int8, or HerdLinear's fp32 on the CPU."""
    return type(mod) in _PACKED or (type(mod) is HerdLinear and _fp32_cpu(mod.weight_t))


def _matrix_args(mod) -> tuple:
    """(data, row scale or empty, out dim, group size) of a layer matrix for decode_layer: a HerdInt8Linear's stream
    and row scales, a HerdInt4Linear's stream, a HerdLinear's fp32 (in, out) weight."""
    if type(mod) is kernels.HerdInt8Linear:
        return mod.stream, mod.scale, mod.out_features, 0
    if type(mod) is HerdLinear:
        return mod.weight_t, _EMPTY, mod.out_features, 0
    return mod.stream, _EMPTY, mod.out_features, mod.group_size


def _experts_args(experts) -> tuple | None:
    """(w13, its row scales or empty, w2, its row scales or empty, hidden dim, group size, w3 or empty, GGML type or
    0) of routed experts for decode_layer, each matrix stacked per expert: HerdExperts' fp32, kernels.py's int8 / int4
    streams, or HerdGGUFExperts' GGUF blocks (w13 the gate alone, w3 the up); None for experts it does not take."""
    if type(experts) is HerdExperts and _fp32_cpu(experts.w13_t, experts.w2_t):
        return experts.w13_t, _EMPTY, experts.w2_t, _EMPTY, experts.w2_t.shape[1], 0, _EMPTY, 0
    if type(experts) is kernels.HerdInt8Experts:
        return experts.w13, experts.w13_scale, experts.w2, experts.w2_scale, experts.hidden_dim, 0, _EMPTY, 0
    if type(experts) is kernels.HerdInt4Experts:
        return experts.w13, _EMPTY, experts.w2, _EMPTY, experts.hidden_dim, experts.group_size, _EMPTY, 0
    if type(experts) is kernels.HerdGGUFExperts:
        return (experts.w1, _EMPTY, experts.w2, _EMPTY, experts.hidden_dim, 0, experts.w3,
                kernels.GGML_TYPE[experts.qtype])
    return None


_PACKED = (kernels.HerdInt4Linear, kernels.HerdInt8Linear)


def _fp32_cpu(*tensors) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def _herd_version(mod: nn.Module, tied: set[int]) -> nn.Module | None:
    """The decode-path module replacing `mod`, or None to keep it."""
    if type(mod) in _SUBCLASSES:
        return retype(mod, _SUBCLASSES[type(mod)], ())
    if type(mod) is nn.Linear and mod.bias is None and _fp32_cpu(mod.weight) and id(mod.weight) not in tied:
        return HerdLinear(mod.weight.detach().t().contiguous())
    if type(mod) is Experts and _fp32_cpu(mod.w1, mod.w2, mod.w3):
        return HerdExperts(mod)
    return None


_SUBCLASSES = {RMSNorm: HerdRMSNorm, FusedAttention: HerdAttention, FusedFeedForward: HerdFeedForward,
               Block: HerdBlock}


@torch.no_grad()
def use_decode_kernels(model: torch.nn.Module) -> int:
    """Swap, in place, every RMSNorm, FusedAttention and FusedFeedForward for its Herd* subclass (same weights) and
    every fp32 CPU nn.Linear (bias-free, not sharing its matrix with an embedding) and Experts for HerdLinear /
    HerdExperts (transposed copies; each original is dropped as it is replaced). Returns how many were swapped; 0
    where the extension cannot run here (extension.status())."""
    if ext() is None:
        return 0
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = [name for name, _ in model.named_modules() if name]
    count = 0
    for name in names:                  # one module at a time: a replaced matrix is freed before the next is copied
        new = _herd_version(model.get_submodule(name), tied)
        if new is not None:
            set_module(model, name, new)
            count += 1
    if type(model) is Transformer:      # the root in place: its callers hold it (HerdTransformer adds no state)
        model.__class__ = HerdTransformer
        count += 1
    return count


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
    """q (H*D,), k and v (S, K, D), k_pos (S,) -> (H*D,): ops.attention_reference under model.attention_mask."""
    S, K, D = k.shape
    mask = attention_mask(torch.tensor([[q_pos]]), k_pos[None], chunk or None)       # (1, 1, 1, S)
    out = ops.attention_reference(q.view(1, -1, 1, D), k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask)
    return out.reshape(-1)
