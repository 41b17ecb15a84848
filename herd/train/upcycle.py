"""Sparse upcycling (https://arxiv.org/abs/2212.05055): grow a Llama-4-style MoE from a dense checkpoint.

Each dense SwiGLU FFN(x) = sum_j w2[:, j] * silu(w1[j] . x) * (w3[j] . x) is a sum over its F hidden units, so it
splits exactly into two half-width SwiGLUs. The first half becomes the shared expert (always on, sees x unscaled,
as in Llama 4); the second half is copied into every routed expert (Llama 4's own experts and shared expert are
each half the dense FFN width: 8192 vs 16384).

The routed expert sees g * x with g = sigmoid(top router logit) (spec 2.5), not x. The copies therefore get w1 and
w3 divided by g0, the gate value the router gives at step 0, so Expert(g0 * x) equals the dense half exactly. The
router starts small and random (logits ~ N(0, router_logit_std)): tokens spread over the experts from step 0 and g
stays within a fraction of a percent of g0, so the step-0 function is the dense one up to that gate jitter. With
router_logit_std = 0 the gate is exactly sigmoid(0) = 0.5 and the MoE equals the dense model to float rounding (but
every token picks expert 0 until the router learns). Attention, norms and embeddings are copied unchanged.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from ..checkpoint import build_meta
from ..config import MoEConfig, ModelConfig


def upcycled_config(dense: ModelConfig, n_experts: int, top_k: int = 1, moe_every: int = 1) -> ModelConfig:
    """The dense config as a Llama-4 text config with MoE FFNs. Llama 4's iRoPE, chunked attention, QK-norm and
    temperature tuning stay off: they would change the attention function the dense weights were trained for."""
    cfg = copy.deepcopy(dense)
    cfg.moe = MoEConfig(n_experts=n_experts, top_k=top_k, expert_dim=math.ceil(dense.ffn_dim / 2))
    cfg.moe_every, cfg.moe_layer_ids = moe_every, None
    cfg.nope_every, cfg.rope_layers, cfg.attn_chunk_size = 0, None, None
    cfg.use_qk_norm = cfg.attn_temperature_tuning = False
    cfg.source = "llama4_text"
    cfg.__post_init__()
    return cfg


def expected_top_logit(n_experts: int, std: float, samples: int = 200_000) -> float:
    """E[max of n_experts N(0, std^2) logits], by a fixed-seed Monte Carlo (the top-1 logit the router picks)."""
    if std == 0 or n_experts == 1:
        return 0.0
    g = torch.Generator().manual_seed(0)
    return float(torch.randn(samples, n_experts, generator=g).max(-1).values.mean()) * std


@torch.no_grad()
def upcycle(dense, n_experts: int, top_k: int = 1, moe_every: int = 1, router_logit_std: float = 0.005,
            seed: int = 0):
    """A new Transformer: the dense model's weights, with its FFNs on MoE layers split into shared + routed experts.

    router_logit_std: the std of the step-0 router logits. The router weight is N(0, s^2) with s chosen from the
    layer's ffn_norm weight w: the normalized input has |x| ~ |w|, so logits have std ~ s * |w|.
    """
    cfg = upcycled_config(dense.config, n_experts, top_k, moe_every)
    model = build_meta(cfg)
    model.to_empty(device="cpu")
    dense_sd = dense.state_dict()
    sd = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    g0 = torch.sigmoid(torch.tensor(expected_top_logit(n_experts, router_logit_std))).item()
    for name in sd:
        if name in dense_sd:
            sd[name] = dense_sd[name].float().clone()
    F_dense, F_half = cfg.ffn_dim, cfg.moe.expert_dim
    for i, spec in enumerate(cfg.layers):
        if not spec.is_moe:
            continue
        p, q = f"layers.{i}.feed_forward.", f"layers.{i}.ffn_norm.weight"
        w1, w3, w2 = (dense_sd[p + n + ".weight"].float() for n in ("w1", "w3", "w2"))   # (F, D) (F, D) (D, F)
        if F_dense % 2:      # odd width: one zero hidden unit pads the halves to the same size (its w2 column is 0)
            w1, w3 = F.pad(w1, (0, 0, 0, 1)), F.pad(w3, (0, 0, 0, 1))
            w2 = F.pad(w2, (0, 1))
        sd[p + "shared_expert.w1.weight"], sd[p + "shared_expert.w3.weight"] = w1[:F_half], w3[:F_half]
        sd[p + "shared_expert.w2.weight"] = w2[:, :F_half]
        E = n_experts
        sd[p + "experts.w1"] = (w1[F_half:] / g0).expand(E, -1, -1).clone()        # (E, F/2, D)
        # top-k > 1 sums k routed outputs: each copy then carries 1/k of the routed half (SwiGLU is linear in w3)
        sd[p + "experts.w3"] = (w3[F_half:] / g0 / top_k).expand(E, -1, -1).clone()
        sd[p + "experts.w2"] = w2[:, F_half:].expand(E, -1, -1).clone()             # (E, D, F/2)
        norm = dense_sd[q].float().norm().clamp(min=1e-6)
        sd[p + "router.weight"] = torch.randn(E, cfg.dim, generator=g) * (router_logit_std / norm)
    model.load_state_dict(sd, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


@torch.no_grad()
def closeness(dense, moe, tokens: torch.Tensor) -> dict:
    """How far the upcycled model is from the dense one on `tokens` (B, T): logit differences, KL(dense || moe) per
    token, and how often both pick the same next token."""
    a, b = dense(tokens).float(), moe(tokens).float()
    kl = F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"tokens": tokens.numel(), "max_abs_logit_diff": float((a - b).abs().max()),
            "mean_abs_logit_diff": float((a - b).abs().mean()), "logit_scale": float(a.abs().mean()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
