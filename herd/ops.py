"""Fast paths used by model.py, each beside the plain reference twin it is tested against (tests/test_ops.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ---- attention ----------------------------------------------------------------------------------------------------
def attention(q, k, v, mask):
    """q (B, H, T, D), k and v (B, K, S, D) with H a multiple of K, mask bool (B, 1, T, S) -> (B, H, T, D).
    torch's fused SDPA (flash / memory-efficient kernels where the device has them)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def attention_causal(q, k, v):
    """`attention` of T queries over the same T keys under a plain causal mask (key j visible to query i iff j <= i),
    without building or reading a (T, T) mask. Measured at 512 tokens, 9 heads, fp32: ~10-20% faster than the same
    call with the mask, and no faster than with no mask at all (torch's CPU kernel does not skip the masked half).
    k, v: tensors or `QuantizedKV`."""
    k, v = _dense(k, q.dtype), _dense(v, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def attention_one_query(q, k, v, mask):
    """`attention` for one query per row (a decode step): q (B, H, 1, D), k and v (B, K, S, D), mask (B, 1, 1, S) or
    None -> (B, H, 1, D). The H/K query heads sharing a kv head are the rows of one matmul against it, so every key
    and value is read once; torch's CPU flash kernel reads a kv head once per query head. Measured in SmolLM2 decode
    after 512 tokens (9 heads on 3 kv heads, 1 thread): its attention took ~210 us per layer against ~65 us to
    stream the layer's keys and values once. Scores and softmax in fp32."""
    B, H, _, D = q.shape
    K = k.shape[1]
    qg = q.reshape(B, K, H // K, D)                                      # (B, K, H/K, D): heads grouped by kv head
    scores = (qg @ k.transpose(-1, -2)).float() * D ** -0.5              # (B, K, H/K, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))                # (B, 1, 1, S) broadcasts over heads
    return (scores.softmax(-1).to(v.dtype) @ v).reshape(B, H, 1, D)


def attention_reference(q, k, v, mask):
    """The same as `attention`, written out: repeat kv heads, softmax(q k^T / sqrt(D)) v."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)   # (B, H, S, D)
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).type_as(q)


# Keys per block of `attention_blockwise`: bounds the (T, block) mask and scores whatever the context length.
KV_BLOCK = 8192


def attention_blockwise(q, k, v, mask_fn, block_size: int | None = None):
    """`attention` for any key range, without a (T, S) mask or score matrix at full size: keys are visited in blocks
    and merged with an online log-sum-exp (FlashAttention's softmax rescaling, https://arxiv.org/abs/2205.14135).
    Block j gives o_j and lse_j; then out = sum_j exp(lse_j - lse) o_j with lse = logsumexp_j lse_j.

    q (B, H, T, D); k, v (B, K, S, D) tensors or `QuantizedKV`; mask_fn(start, end) -> the `attention` mask of keys
    start..end-1, bool (B, 1, T, end - start), or None when every query sees all of them -> (B, H, T, D).
    block_size defaults to KV_BLOCK; one block is exactly `attention`. Blocks no query sees are skipped (old chunks on
    chunked layers).
    """
    S, block_size = k.shape[2], block_size or KV_BLOCK
    if S <= block_size:
        attend = attention_one_query if q.shape[2] == 1 else attention
        return attend(q, _dense(k, q.dtype), _dense(v, q.dtype), mask_fn(0, S))
    out = lse = None
    for start in range(0, S, block_size):
        end = min(start + block_size, S)
        mask = mask_fn(start, end)
        if mask is not None and not mask.any():
            continue
        o, l = _attend_block(q, _dense(k[:, :, start:end], q.dtype), _dense(v[:, :, start:end], q.dtype), mask)
        if out is None:
            out, lse = o.float(), l
            continue
        new = torch.logaddexp(lse, l)
        out = out * (lse - new).exp()[..., None] + o.float() * (l - new).exp()[..., None]
        lse = new
    return out.type_as(q)


def _attend_block(q, k, v, mask):
    """Attention of q (B, H, T, D) over one key block k, v (B, K, s, D) with mask (B, 1, T, s) or None (all visible)
    -> (out (B, H, T, D), lse (B, H, T) fp32).
    NOTE: a query row that sees no key of the block gets lse = -1e30 (finite, so merging never makes 0 * inf)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)      # (B, H, s, D)
    bias = None
    if mask is not None:
        bias = torch.where(mask, q.new_zeros(()), q.new_full((), float("-inf")))      # (B, 1, T, s)
    if q.device.type == "cpu":
        # torch's fused CPU flash kernel; unlike public SDPA it also returns the log-sum-exp (natural log)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias)
    else:
        out, lse = _attend_block_math(q, k, v, bias)
    if bias is not None:
        lse = torch.where(mask.any(-1), lse, -1e30)                                    # (B, 1, T) over heads
    return out, lse.float()


# ---- int8 keys and values -------------------------------------------------------------------------------------------
class QuantizedKV:
    """Keys or values stored as int8 with one fp32 scale per token and head: x ~= values * scale, values (..., D)
    int8, scale (..., 1). Slices and transposes (never along D) like the tensor it stands for, so attention can
    dequantize one key block at a time (kv_cache.KVCache holds its global layers this way when asked)."""

    def __init__(self, values: torch.Tensor, scale: torch.Tensor):
        self.values, self.scale = values, scale

    @property
    def shape(self):
        return self.values.shape

    def __getitem__(self, idx):
        return QuantizedKV(self.values[idx], self.scale[idx])

    def transpose(self, a: int, b: int):
        return QuantizedKV(self.values.transpose(a, b), self.scale.transpose(a, b))

    def dequantize(self, dtype):
        return (self.values.float() * self.scale).to(dtype)


def quantize_kv(x) -> QuantizedKV:
    """Symmetric absmax int8 over the last dim (one scale per token and head): error <= scale / 2 per element."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return QuantizedKV((x.float() / scale).round().clamp(-127, 127).to(torch.int8), scale)


def _attend_block_math(q, k, v, bias):
    """What the fused kernel computes, in fp32 (devices without it): q (B, H, T, D), k, v (B, H, s, D), additive bias
    (B, 1, T, s) or None -> (out, lse)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5             # (B, H, T, s)
    if bias is not None:
        scores = scores + bias
    lse = scores.logsumexp(-1)
    return ((scores - lse[..., None]).nan_to_num(nan=float("-inf")).exp() @ v.float()).type_as(q), lse


def _dense(x, dtype):
    """Cached keys or values in the queries' dtype: int8 ones dequantized, a cache kept in another dtype than the
    activations (Engine(cache_dtype=...)) cast."""
    return x.dequantize(dtype) if isinstance(x, QuantizedKV) else x.to(dtype)


# ---- mixture of experts ---------------------------------------------------------------------------------------
# Legend: N tokens, E experts, K top-k, D model dim, F expert hidden dim.
def run_experts(x, expert_idx, gate, w1, w2, w3):
    """Sparse dispatch: each token goes through its chosen expert(s) only.

    x (N, D); expert_idx, gate (N, K); w1, w3 (E, F, D); w2 (E, D, F) -> (N, D).
    Token copies are sorted by expert, so each expert runs one matmul over its contiguous group; experts with no
    tokens cost nothing. The loop is over experts (at most E iterations), never over tokens.
    """
    def expert(e, seg):                                              # seg (n, D) -> (n, D)
        return (F.silu(seg @ w1[e].t()) * (seg @ w3[e].t())) @ w2[e].t()
    return dispatch_experts(x, expert_idx, gate, w1.shape[0], expert)


def run_experts_grouped(x, expert_idx, gate, w1, w2, w3):
    """`run_experts` as three grouped GEMMs (torch.nn.functional.grouped_mm): the copies sorted by expert are one
    (N*K, D) matrix cut into per-expert row groups by offsets that stay on the device. No loop over experts and no
    host sync (run_experts reads the counts back to the host to slice), so a GPU runs the MoE in a fixed number of
    kernels (CUTLASS grouped GEMM for bf16 on sm90+). Same arguments and result as run_experts."""
    N, D = x.shape
    K, E = expert_idx.shape[1], w1.shape[0]
    flat_expert = expert_idx.reshape(-1)                             # (N*K,)
    order = flat_expert.argsort(stable=True)
    xs = x[order // K] * gate.reshape(-1, 1)[order]                  # (N*K, D) grouped by expert, gate on the input
    experts = torch.arange(E, device=x.device, dtype=flat_expert.dtype)
    offs = torch.searchsorted(flat_expert[order], experts, right=True).to(torch.int32)   # (E,) group ends
    # w1, w3 (E, F, D) -> (E, D, F) views: x @ w.T per group, the column-major B operand the kernels want
    h = (F.silu(F.grouped_mm(xs, w1.transpose(1, 2), offs=offs))
         * F.grouped_mm(xs, w3.transpose(1, 2), offs=offs))        # (N*K, F)
    out = F.grouped_mm(h, w2.transpose(1, 2), offs=offs)             # (N*K, D)
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return unsorted.view(N, K, D).sum(dim=1)


def grouped_mm_runs(x) -> bool:
    """Whether run_experts_grouped runs for activations x: torch's grouped GEMM takes any float dtype on the CPU but
    only bf16 on CUDA (its meta kernel says so too)."""
    return hasattr(F, "grouped_mm") and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


def dispatch_experts(x, expert_idx, gate, n_experts: int, expert):
    """The sparse dispatch of `run_experts` for any expert implementation (quantize.py's packed experts use it):
    `expert(e, seg)` maps the (n, D) gated inputs routed to expert e to their (n, D) outputs."""
    N, D = x.shape
    K = expert_idx.shape[1]
    if N * K == 1:      # one token, top-1 (a batch-1 decode step): its expert directly, no sort, count or scatter
        return expert(int(expert_idx), x * gate)
    flat_expert = expert_idx.reshape(-1)                             # (N*K,)
    order = flat_expert.argsort(stable=True)                         # copies grouped by expert
    token = order // K                                               # source token of each sorted copy
    xs = x[token] * gate.reshape(-1, 1)[order]                       # (N*K, D), gate scales the INPUT
    counts = torch.bincount(flat_expert, minlength=n_experts).tolist()
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        out[start:start + n] = expert(e, xs[start:start + n])       # (n, D)
        start += n
    unsorted = torch.empty_like(out)
    unsorted[order] = out                                            # back to (token, k) order
    return unsorted.view(N, K, D).sum(dim=1)


def run_experts_reference(x, expert_idx, gate, w1, w2, w3):
    """Every expert on every token, inputs scaled by a dense gate that is 0 off the chosen experts (the HF and
    llama-models formulation; SwiGLU(0) = 0 makes it equal to the sparse one). Test reference only."""
    E = w1.shape[0]
    dense_gate = torch.zeros(x.shape[0], E, dtype=x.dtype, device=x.device).scatter(1, expert_idx, gate)  # (N, E)
    out = torch.zeros_like(x)
    for e in range(E):
        xe = x * dense_gate[:, e:e + 1]
        out += (F.silu(xe @ w1[e].t()) * (xe @ w3[e].t())) @ w2[e].t()
    return out
