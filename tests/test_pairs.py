"""Prompt/completion pairs in `herd train` (herd/pairs.py): one padded row per pair, loss on the completion only,
never cut, exact resume, and a model that learns a prompt's answer."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from herd.train.data import ByteTokenizer, DataError
from herd.train.pairs import IGNORE, PairLoader, is_pairs, load_pairs
from test_train import run

KEYS = {"red": "warm", "blue": "cold", "green": "calm", "black": "dark"}


def write_pairs(path, n=160, seed=0):
    rnd = random.Random(seed)
    lines = []
    for _ in range(n):
        key = rnd.choice(list(KEYS))
        noise = "".join(rnd.choice("abcdefghij ") for _ in range(rnd.randint(5, 20)))
        lines.append(json.dumps({"prompt": f"{noise} colour {key} =", "completion": f" {KEYS[key]}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rows_mask_the_prompt(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ab", "completion": "cd"}) + "\n")
    rows = load_pairs([path], ByteTokenizer(), 512, 8)
    assert rows.shape == (1, 2, 9)
    assert rows[0, 0].tolist() == [97, 98, 99, 100, 257, 0, 0, 0, 0]          # a b c d <eos> pad...
    assert rows[0, 1].tolist() == [IGNORE, IGNORE, 99, 100, 257, IGNORE, IGNORE, IGNORE, IGNORE]
    loader = PairLoader(rows, 8, 1, shuffle=False)
    x, y, _ = loader.next_batch()
    # inputs a b c d, targets shifted: predict c after b, d after c, <eos> after d; trimmed to the used columns
    assert x.tolist() == [[97, 98, 99, 100]] and y.tolist() == [[IGNORE, 99, 100, 257]]


def test_bad_pairs(tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x" * 50, "completion": "y"}) + "\n")
    with pytest.raises(DataError, match="line 1 is 52 tokens, more than --seq-len 16"):
        load_pairs([long], ByteTokenizer(), 512, 16)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": 3}) + "\n")
    with pytest.raises(DataError, match='line 1 needs string fields "prompt" and "completion"'):
        load_pairs([bad], ByteTokenizer(), 512, 16)
    text = tmp_path / "t.txt"
    text.write_text("plain text")
    assert not is_pairs([text]) and is_pairs([long])
    with pytest.raises(DataError, match="mixed data"):
        is_pairs([long, text])
    # a JSON string may hold U+2028 raw: still one line
    sep = tmp_path / "sep.jsonl"
    sep.write_text(json.dumps({"prompt": "a\u2028b", "completion": "c"}, ensure_ascii=False) + "\n")
    assert load_pairs([sep], ByteTokenizer(), 512, 16).shape[0] == 1


def test_training_learns_the_completion_only(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = run(tmp_path, "--steps", 80, "--lr", "3e-3", "--seq-len", 48, "--batch-size", 16, data=data)
    # the prompts are random letters: a loss over them could not go near 0; over the answers it can
    assert out["last"]["ce"] < 0.2, out["last"]
    import herd
    from herd.engine import generate_reference
    model = herd.load(out["checkpoint"]).eval()
    tok = ByteTokenizer()
    right = 0
    for key, want in KEYS.items():
        ids = tok.encode(f"hij ab colour {key} =", bos=True)
        got = tok.decode(generate_reference(model, ids, len(want) + 2, eos_ids=[257]))
        right += got == f" {want}"
    assert right >= 3


def test_resume_with_pairs_is_exact(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=40)
    flags = ("--seq-len", 48, "--batch-size", 4)
    run(tmp_path, "--steps", 4, "--save-every", 2, "--keep", 5, *flags, data=data, out="full")
    run(tmp_path, "--resume", tmp_path / "full" / "checkpoints" / "step_000002", "--steps", 4, *flags, data=data,
        out="resumed")
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
