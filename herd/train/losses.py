"""Training losses: next-token cross-entropy and the two router losses of MoE layers.

Router letters: N tokens, E experts, K top-k. `MoE.forward` keeps its raw router logits (N, E) in
`moe.router_logits` during training forwards; the loop hands them to these functions. The router learns through the
language-model loss too, because its sigmoid gate scales each expert's input; these losses only shape the routing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits, targets):
    """Mean next-token loss; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def expert_counts(router_logits, top_k: int):
    """Tokens sent to each expert (E,) as floats, by the same top-k of the raw logits the MoE routes with."""
    idx = router_logits.detach().topk(top_k, dim=-1).indices                # (N, K)
    return torch.bincount(idx.flatten(), minlength=router_logits.shape[-1]).float()


def load_balancing_loss(router_logits, counts):
    """Switch Transformer auxiliary loss (https://arxiv.org/abs/2101.03961, eq. 4): E * sum_e f_e * P_e, with f_e
    the fraction of routed tokens that went to expert e (no gradient) and P_e the mean softmax probability the
    router gave e (differentiable). Equals 1 (its minimum for a fixed P) when routing is uniform; pushes probability
    away from overloaded experts. `counts` (E,) may be summed over all ranks (global-batch balancing,
    https://arxiv.org/abs/2501.11873), which also makes the loss independent of how the batch is split."""
    E = router_logits.shape[-1]
    f = counts / counts.sum().clamp(min=1)                                  # (E,)
    P = router_logits.float().softmax(-1).mean(0)                          # (E,)
    return E * (f * P).sum()


def router_z_loss(router_logits):
    """ST-MoE z-loss (https://arxiv.org/abs/2202.08906, eq. 5): mean squared log-sum-exp of the router logits.
    Keeps the logits small, so the sigmoid gate stays out of saturation and bf16 routing stays stable."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()
