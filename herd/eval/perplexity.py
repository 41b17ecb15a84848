"""`herd eval perplexity`: a model's perplexity on a token sequence, scored in windows of the context it is given.
Plain forwards (no engine, no cache), so any module that maps tokens (1, T) -> logits (1, T, V) can be scored.

Windows of `window` tokens start every `stride` tokens; each token is scored once, by the first window that holds it
with at least one token before it. stride == window (the default): non-overlapping windows, each starting fresh, the
first token of each window context only (bench/perplexity.py's figures). stride < window: a sliding window, every
scored token after the first window sees at least window - stride tokens before it (lower, closer to the model's
perplexity with unbounded context; window / stride times the compute).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class Perplexity:
    tokens: int          # tokens scored
    nll: float           # their summed negative log-likelihood (nats)
    window: int
    stride: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_token(self) -> float:
        return self.nll / self.tokens / math.log(2)

    def as_dict(self) -> dict:
        return {**asdict(self), "ppl": self.ppl, "bits_per_token": self.bits_per_token}


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window over n tokens; positions first..end-1 are scored, each
    position 1..n-1 exactly once."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window {window}, stride {stride}")
    out, scored_to = [], 1                       # position 0 has nothing before it
    for start in range(0, max(n - 1, 0), stride):
        end = min(start + window, n)
        if end - start >= 2 and end > scored_to:
            out.append((start, end, max(scored_to, start + 1)))
            scored_to = end
        if end == n:
            break
    return out


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int, stride: int | None = None, progress: bool = False) -> Perplexity:
    """ids (N,) long on the model's device."""
    from tqdm import tqdm

    stride = stride or window
    nll, n = 0.0, 0
    for start, end, first in tqdm(windows(len(ids), window, stride), desc="perplexity", disable=not progress):
        logp = model(ids[start:end][None]).log_softmax(-1)[0]                   # (T, V)
        targets = ids[first:end]                                                 # predicted by positions first-1..
        nll -= float(logp[first - 1 - start:end - 1 - start].gather(-1, targets[:, None]).sum())
        n += end - first
    if n == 0:
        raise ValueError(f"{len(ids)} tokens: at least 2 are needed to score one")
    return Perplexity(n, nll, window, stride)
