"""Supervised pairs for `herd train`: JSONL lines {"prompt": ..., "completion": ...} -> one padded row per pair with
the loss on the completion only (and its end-of-sequence token), the form instruction tuning and generative
classifiers (a guard that answers `safe` / `unsafe`) are trained in.

Unlike data.py's packed stream, rows are never packed or cut: a pair longer than the sequence length is refused,
naming its line, so no completion is ever trained without its prompt. The prompt is encoded with special-token text
parsed (a chat or guard template written out as text), the completion as plain text.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .data import DataError, TokenLoader, jsonl_objects, read_text

IGNORE = -100          # target id cross-entropy skips (torch's default ignore_index)


def is_pairs(paths) -> bool:
    """Whether the data files are prompt/completion JSONL (all of them), judged by each file's first line."""
    kinds = set()
    for path in map(Path, paths or []):
        first = next((l for l in read_text(path).split("\n") if l.strip()), "") if path.suffix == ".jsonl" else ""
        try:
            obj = json.loads(first) if first else None
        except json.JSONDecodeError:
            obj = None
        kinds.add(isinstance(obj, dict) and "prompt" in obj and "completion" in obj)
    if len(kinds) > 1:
        raise DataError("mixed data: some files are prompt/completion JSONL and some are not; train on one kind")
    return kinds == {True}


def load_pairs(paths, tok, vocab_size: int, seq_len: int) -> np.ndarray:
    """(N, 2, seq_len + 1) int32: row 0 the input ids (right-padded), row 1 the targets (IGNORE except on the
    completion and its end token). DataError names the file and line of a pair that is malformed or too long."""
    pad = tok.token_id("<|finetune_right_pad|>") if hasattr(tok, "token_id") else None
    pad = pad if pad is not None else 0
    eos = tok.eos_ids[:1]
    rows = []
    for path in map(Path, paths):
        for n, obj in jsonl_objects(path, read_text(path)):
            if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("prompt", "completion")):
                raise DataError(f'{path}: line {n} needs string fields "prompt" and "completion"')
            prompt = tok.encode(obj["prompt"], allow_special=True)
            completion = tok.encode(obj["completion"], allow_special=False) + eos
            ids = prompt + completion
            if len(ids) > seq_len + 1:
                raise DataError(f"{path}: line {n} is {len(ids)} tokens, more than --seq-len {seq_len} + 1; shorten "
                                "the pair or raise --seq-len (pairs are never cut)")
            row = np.full((2, seq_len + 1), IGNORE, dtype=np.int32)
            row[0] = pad
            row[0, :len(ids)] = ids
            row[1, len(prompt):len(ids)] = completion                 # targets: row 1 is shifted by the loader
            rows.append(row)
    if not rows:
        raise DataError(f"{', '.join(map(str, paths))}: no prompt/completion pairs")
    out = np.stack(rows)
    if int(out[:, 0].max()) >= vocab_size:
        raise DataError(f"the tokenizer produced id {int(out[:, 0].max())} but the model's vocab_size is {vocab_size}")
    return out


class PairLoader(TokenLoader):
    """TokenLoader's order, sharding and resumable position over pair rows instead of stream windows. A batch is
    trimmed to its longest row, so short pairs cost little."""

    def __init__(self, rows: np.ndarray, seq_len: int, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.rows = torch.from_numpy(rows.astype(np.int64))                 # (N, 2, T + 1)
        self.seq_len, self.batch_size, self.rank, self.world = seq_len, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.n_windows = len(rows)
        if self.n_windows < batch_size * world:
            raise DataError(f"{self.n_windows} pairs are fewer than one global batch ({batch_size} x {world} "
                            "rank(s)); add data or lower --batch-size")
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def windows(self, ids: torch.Tensor):
        rows = self.rows[ids]                                              # (B, 2, T + 1)
        x, y = rows[:, 0, :-1], rows[:, 1, 1:]                             # targets shifted by one
        used = int((y != IGNORE).any(0).nonzero().max()) + 1               # last column any row still needs
        return x[:, :used], y[:, :used]
