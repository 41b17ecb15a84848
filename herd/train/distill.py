"""Knowledge distillation (https://arxiv.org/abs/1503.02531): pure losses on temperature-softened logits (full
vocabulary, or the teacher's top-k), the on-disk format of the teacher's top-k cache, and the tokenizer check.

Letters: B batch, T positions, V vocabulary, K cached teacher entries per position.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

CACHE_FORMAT = "herd-teacher-topk-v1"
PROBE = ("The quick brown fox jumps over 13 lazy dogs. Ünïcödé, 日本語, emoji 🙂\n"
         "def square(x):\n    return x ** 2  # code, numbers 3.14159 and URLs https://example.com/a?b=c")


class DistillError(ValueError):
    """A teacher/student pair or a cache that cannot be used together, and why."""


# ---- losses --------------------------------------------------------------------------------------------------------
def kl_full(student_logits, teacher_logits, temperature: float = 1.0):
    """Mean over positions of KL(p_teacher || p_student), both softmax(logits / temperature) over the whole
    vocabulary, times temperature^2 so gradients keep their size as the temperature changes (Hinton et al.)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)                # (B, T, V)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="none").sum(-1).mean() * t * t


def kl_topk(student_logits, teacher_logprobs, teacher_ids, temperature: float = 1.0):
    """The same with only the teacher's top-K entries (sparse distillation): the teacher distribution is
    renormalized over its K tokens (softmax(logprob / temperature) is exact there, the log-sum-exp cancels), the
    student's full-vocabulary log-probabilities are read at those ids. student (B, T, V); teacher (B, T, K)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, teacher_ids.long())   # (B, T, K)
    p_log = F.log_softmax(teacher_logprobs.float() / t, dim=-1)                              # (B, T, K)
    return (p_log.exp() * (p_log - s)).sum(-1).mean() * t * t


# ---- tokenizer check -----------------------------------------------------------------------------------------------
def check_same_tokenizer(teacher_tok, student_tok, teacher_vocab: int, student_vocab: int):
    """Distillation compares the two models token id by token id: same vocabulary size and the same ids for a probe
    string that covers words, digits, accents, CJK, emoji, code and whitespace. Raises DistillError naming the
    difference."""
    problems = []
    if teacher_vocab != student_vocab:
        problems.append(f"vocab_size {teacher_vocab} (teacher) vs {student_vocab} (student)")
    a, b = teacher_tok.encode(PROBE), student_tok.encode(PROBE)
    if a != b:
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        problems.append(f"the probe text {PROBE[:30]!r}... encodes to {len(a)} vs {len(b)} ids, first difference "
                        f"at token {i}: teacher {a[i:i + 4]} vs student {b[i:i + 4]}")
    if problems:
        raise DistillError("teacher and student do not share a tokenizer: " + "; ".join(problems) +
                           ". Distill into a student built with the teacher's tokenizer (--tokenizer TEACHER) and "
                           "vocab_size.")


# ---- teacher top-k cache ---------------------------------------------------------------------------------------
@torch.inference_mode()
def build_teacher_cache(teacher, loader, k: int, path: Path, teacher_name: str, data_fingerprint: str,
                        batch_size: int = 8, autocast_dtype=None, progress: bool = True):
    """Run the teacher once over every window of the loader's token stream; keep its top-k log-probabilities.

    File: one safetensors with "logprobs" float32 (W, T, K) and "ids" int32 (W, T, K), W = loader.n_windows, and
    metadata {format, teacher, data, seq_len, k, vocab_size} that `TeacherCache` checks before use."""
    from tqdm import tqdm

    W, T = loader.n_windows, loader.seq_len
    logprobs = torch.empty(W, T, k, dtype=torch.float32)
    ids = torch.empty(W, T, k, dtype=torch.int32)
    device = next(teacher.parameters()).device
    for start in tqdm(range(0, W, batch_size), desc="teacher top-k", unit="batch", disable=not progress):
        win = torch.arange(start, min(start + batch_size, W))
        x, _ = loader.windows(win)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = teacher(x.to(device))
        top = F.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        logprobs[win], ids[win] = top.values.cpu(), top.indices.int().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    meta = {"format": CACHE_FORMAT, "teacher": teacher_name, "data": data_fingerprint, "seq_len": str(T),
            "k": str(k), "vocab_size": str(teacher.config.vocab_size)}
    save_file({"logprobs": logprobs, "ids": ids}, str(tmp), metadata=meta)
    tmp.replace(path)


class TeacherCache:
    """Read access to a cache file, one window at a time through safetensors' memory map."""

    def __init__(self, path: Path, data_fingerprint: str, seq_len: int, vocab_size: int):
        self.path = Path(path)
        self._f = safe_open(str(self.path), framework="pt")
        meta = self._f.metadata() or {}
        want = {"format": CACHE_FORMAT, "data": data_fingerprint, "seq_len": str(seq_len),
                "vocab_size": str(vocab_size)}
        bad = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if bad:
            raise DistillError(f"{self.path}: teacher cache made for other data or another model "
                               f"({', '.join(f'{k} {a!r} != {b!r}' for k, (a, b) in bad.items())}); delete it to "
                               "rebuild")
        self.k = int(meta["k"])
        self._lp, self._ids = self._f.get_slice("logprobs"), self._f.get_slice("ids")

    def lookup(self, windows: torch.Tensor):
        """(logprobs (B, T, K) float32, ids (B, T, K) int64) for window ids (B,)."""
        rows = windows.tolist()
        lp = torch.cat([self._lp[i:i + 1] for i in rows])
        ids = torch.cat([self._ids[i:i + 1] for i in rows]).long()
        return lp, ids
