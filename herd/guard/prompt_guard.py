"""Llama Prompt Guard 2 (86M mDeBERTa-v3 / 22M DeBERTa-v3-xsmall sequence classifiers, spec 8.2) through transformers'
DeBERTa-v2 (the optional `guard` extra; herd writes no DeBERTa of its own). Knows nothing of Llama Guard or HTTP.

A text longer than one window is scored the way the reference scans long inputs: its tokens are cut into
non-overlapping windows of 512 tokens ([CLS] + 510 text tokens + [SEP]), every window is classified, and the
text's score is the maximum over windows of P(malicious) = softmax(logits)[label 1]. An injection hidden at the end
of a long tool result is therefore seen, where truncating to the first 512 tokens would miss it.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .verdict import GuardError, Verdict, check_text

WINDOW = 512          # tokens per window, special tokens included (the models' context)


class PromptGuard:
    """A sequence classifier and its tokenizer. `check(text)` -> Verdict (flagged when the max window score
    reaches `threshold`); `window_scores(text)` -> P(malicious) of each window."""

    def __init__(self, model, tokenizer, name: str = "prompt-guard", threshold: float = 0.5, batch_size: int = 8):
        self.model, self.tok, self.name = model.eval(), tokenizer, name
        self.threshold, self.batch_size = threshold, batch_size
        cfg = model.config
        self.window = min(WINDOW, getattr(cfg, "max_position_embeddings", WINDOW) or WINDOW)
        labels = {str(v).lower(): int(k) for k, v in (getattr(cfg, "id2label", None) or {}).items()}
        # Prompt Guard 2: 0 BENIGN, 1 MALICIOUS; read the index from the config when it names the label
        self.malicious = labels.get("malicious", 1)
        if self.malicious >= cfg.num_labels:
            raise GuardError(f"{name}: the classifier has {cfg.num_labels} label(s); a prompt guard needs label "
                             f"{self.malicious} (malicious)")
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise GuardError(f"{name}: the tokenizer has no [CLS] / [SEP] token to frame a window with")

    def windows(self, text: str) -> list[list[int]]:
        """Token ids of each window: [CLS] + up to window - 2 text tokens + [SEP], non-overlapping."""
        ids = self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]   # no "longer than 512" warning
        n = self.window - 2
        return [[self.tok.cls_token_id] + ids[s:s + n] + [self.tok.sep_token_id]
                for s in range(0, max(len(ids), 1), n)]

    def window_scores(self, text: str) -> list[float]:
        return self._scores(self.windows(check_text(text)))

    @torch.inference_mode()
    def _scores(self, windows: list[list[int]]) -> list[float]:
        device = next(self.model.parameters()).device
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        scores = []
        for b in range(0, len(windows), self.batch_size):
            batch = windows[b:b + self.batch_size]
            T = max(map(len, batch))
            ids = torch.full((len(batch), T), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for i, w in enumerate(batch):                      # right padding, masked out
                ids[i, :len(w)], mask[i, :len(w)] = torch.tensor(w), 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            scores += logits.softmax(-1)[:, self.malicious].tolist()
        return scores

    def check(self, text: str) -> Verdict:
        start = time.perf_counter()
        windows = self.windows(check_text(text))
        score = max(self._scores(windows))
        return Verdict(flagged=score >= self.threshold, score=score, guard=self.name,
                       seconds=time.perf_counter() - start, tokens=sum(map(len, windows)))


def load_prompt_guard(path: str | Path, device="cpu", **kw) -> PromptGuard:
    """An HF sequence-classification folder (config.json + model.safetensors + tokenizer files)."""
    path = Path(path)
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        raise GuardError("Prompt Guard runs on transformers' DeBERTa: pip install 'herd[guard]'") from None
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin"))
        raise GuardError(f"{path}: no safetensors weights" + (f" (only {', '.join(pickled)}: herd never unpickles "
                                                              "files; convert them to safetensors)" if pickled else ""))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).to(device)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise GuardError(f"cannot load the prompt guard {path}: {e}") from None
    kw.setdefault("name", path.name)
    return PromptGuard(model, tok, **kw)


__all__ = ["PromptGuard", "WINDOW", "load_prompt_guard"]
