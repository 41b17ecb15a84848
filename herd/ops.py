"""Fast paths used by model.py, each beside the plain reference twin it is tested against (tests/test_ops.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ---- attention ----------------------------------------------------------------------------------------------------
def attention(q, k, v, mask):
    """q (B, H, T, D), k and v (B, K, S, D) with H a multiple of K, mask bool (B, 1, T, S) -> (B, H, T, D).
    torch's fused SDPA (flash / memory-efficient kernels where the device has them)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def attention_reference(q, k, v, mask):
    """The same as `attention`, written out: repeat kv heads, softmax(q k^T / sqrt(D)) v."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)   # (B, H, S, D)
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).type_as(q)


# ---- mixture of experts ---------------------------------------------------------------------------------------
# Legend: N tokens, E experts, K top-k, D model dim, F expert hidden dim.
def run_experts(x, expert_idx, gate, w1, w2, w3):
    """Sparse dispatch: each token goes through its chosen expert(s) only.

    x (N, D); expert_idx, gate (N, K); w1, w3 (E, F, D); w2 (E, D, F) -> (N, D).
    Token copies are sorted by expert, so each expert runs one matmul over its contiguous group; experts with no
    tokens cost nothing. The loop is over experts (at most E iterations), never over tokens.
    """
    N, D = x.shape
    K = expert_idx.shape[1]
    flat_expert = expert_idx.reshape(-1)                             # (N*K,)
    order = flat_expert.argsort(stable=True)                         # copies grouped by expert
    token = order // K                                               # source token of each sorted copy
    xs = x[token] * gate.reshape(-1, 1)[order]                       # (N*K, D), gate scales the INPUT
    counts = torch.bincount(flat_expert, minlength=w1.shape[0]).tolist()
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        seg = xs[start:start + n]                                    # (n, D)
        h = F.silu(seg @ w1[e].t()) * (seg @ w3[e].t())              # (n, F)
        out[start:start + n] = h @ w2[e].t()                         # (n, D)
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
