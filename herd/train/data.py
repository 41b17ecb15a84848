"""Training data: text and JSONL files -> token ids -> one packed stream -> fixed windows, shuffled per epoch,
sharded per rank, with a position that can be saved and restored exactly.

Documents are `[bos] ids [eos]` and are packed back to back (no padding, as in GPT-2/nanoGPT pretraining); a
window may start in one document and end in the next. A `.jsonl` file holds one JSON object per line with a
"text" field (what `herd synth` writes); any other file is one plain-text document.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """Unusable training data, naming the file (and line or byte) and what was wrong."""


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then <bos> 256, <eos> 257, <pad> 258: no vocabulary file needed, and it fits
    models with a small vocab_size (the `debug` preset). Selected with `--tokenizer bytes`."""
    vocab_size = 259
    bos_id, eos_ids, add_bos = 256, [257], True

    def encode(self, text: str, *, bos: bool = False, allow_special: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + list(text.encode("utf-8"))

    def decode(self, ids, skip_special: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def read_text(path: str | Path) -> str:
    """A file's text, or a DataError when it is missing, empty (or only whitespace) or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}, line {line}); "
                        "convert it first, e.g. iconv -f latin1 -t utf-8") from None


def read_documents(paths: list[str | Path]) -> list[str]:
    """The documents in these files, or a DataError for an empty, non-UTF-8 or malformed file."""
    if not paths:
        raise DataError("no data files given")
    docs: list[str] = []
    for path in map(Path, paths):
        text = read_text(path)
        if path.suffix != ".jsonl":
            docs.append(text)
            continue
        texts = [t for t in jsonl_strings(path, text, "text") if t.strip()]
        if not texts:
            raise DataError(f'{path}: no line has a non-empty "text"')
        docs += texts
    return docs


def jsonl_objects(path: Path, text: str):
    """(line number, parsed value) of every non-blank JSONL line, or a DataError naming the file and line. Split on
    "\n" only: str.splitlines also breaks at U+2028 / U+0085, which JSON strings may hold raw."""
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not JSON ({e.msg})") from None


def jsonl_strings(path: Path, text: str, field: str) -> list[str]:
    """The string `field` of every non-blank JSONL line, or a DataError naming the file and line."""
    out = []
    for n, obj in jsonl_objects(path, text):
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise DataError(f'{path}: line {n} needs a string field "{field}"')
        out.append(obj[field])
    return out


def tokenize(docs: list[str], tok) -> np.ndarray:
    """One packed int32 stream: [bos] doc [eos] per document (bos/eos where the tokenizer has them)."""
    bos = [tok.bos_id] if tok.bos_id is not None else []
    eos = tok.eos_ids[:1]
    out = []
    for d in docs:
        out.extend(bos)
        out.extend(tok.encode(d, allow_special=True))
        out.extend(eos)
    return np.asarray(out, dtype=np.int32)


def load_tokens(paths: list[str | Path], tok, vocab_size: int) -> np.ndarray:
    tokens = tokenize(read_documents(paths), tok)
    top = int(tokens.max())
    if top >= vocab_size:
        raise DataError(f"the tokenizer produced id {top} but the model's vocab_size is {vocab_size}: use a "
                        "tokenizer that fits the model (--tokenizer), or a config with a larger vocab_size")
    return tokens


def fingerprint(tokens: np.ndarray) -> str:
    """sha256 of the token stream: a resume must see exactly the data the run started with."""
    return hashlib.sha256(tokens.tobytes()).hexdigest()[:16]


class TokenLoader:
    """Windows of seq_len + 1 tokens (stride seq_len, so every token is a target once per epoch). Each epoch visits
    the windows in a fresh permutation seeded by (seed, epoch). A global batch is the next batch_size * world
    windows; rank r takes its own batch_size of them, so 1 process with batch 4 sees the same tokens as 2 ranks
    with batch 2. `state_dict()` is (epoch, index): restoring it continues the exact sequence of batches."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len, self.batch_size, self.rank, self.world = seq_len, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < batch_size * world:
            raise DataError(f"{len(tokens)} tokens make {self.n_windows} windows of {seq_len}+1 tokens, fewer than "
                            f"one global batch ({batch_size} x {world} rank(s)); add data or lower --batch-size / "
                            "--seq-len")
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_windows)
        rng = np.random.default_rng([self.seed, epoch])
        return torch.from_numpy(rng.permutation(self.n_windows))

    def next_batch(self):
        """(x, y, window ids): x and y (batch_size, seq_len) int64, y shifted by one; ids (batch_size,)."""
        g = self.batch_size * self.world
        if self.index + g > self.n_windows:        # drop the ragged end of the epoch
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        ids = self._order[self.index + self.rank * self.batch_size: self.index + (self.rank + 1) * self.batch_size]
        self.index += g
        return (*self.windows(ids), ids)

    def windows(self, ids: torch.Tensor):
        starts = ids * self.seq_len
        rows = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])   # (B, T + 1)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict):
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)
