"""herd eval perplexity: window arithmetic, the sliding-window score against a per-token reference, the command."""
import json
import math
import subprocess
import sys

import pytest
import torch

from herd.config import preset
from herd.eval.perplexity import perplexity, windows
from herd.model import Transformer


@pytest.fixture(scope="module")
def model():
    return Transformer(preset("debug")).init_weights(std=0.3, seed=7).eval()


@pytest.mark.parametrize("n,window,stride", [(50, 16, 16), (50, 16, 5), (50, 16, 1), (17, 16, 8), (3, 16, 16),
                                             (40, 2, 1), (33, 8, 8)])
def test_every_position_scored_once(n, window, stride):
    scored = [p for _, end, first in windows(n, window, stride) for p in range(first, end)]
    if stride == window:    # non-overlapping: each window's first token is context only
        assert scored == [p for p in range(1, n) if p % window]
    else:
        assert scored == list(range(1, n))
    assert all(end - start <= window for start, end, _ in windows(n, window, stride))


def test_bad_windows_are_refused():
    for window, stride in ((1, 1), (8, 0), (8, 9)):
        with pytest.raises(ValueError, match="window"):
            windows(10, window, stride)


def per_token_reference(model, ids, window, stride):
    """Each scored token's logprob from its own forward over exactly the tokens its window shows before it."""
    nll, n = 0.0, 0
    for start, end, first in windows(len(ids), window, stride):
        for p in range(first, end):
            with torch.inference_mode():
                logits = model(ids[start:p][None])[0, -1]
            nll -= float(logits.log_softmax(-1)[ids[p]])
            n += 1
    return math.exp(nll / n), n


@pytest.mark.parametrize("stride", [None, 7, 1])
def test_perplexity_equals_per_token_reference(model, stride):
    ids = torch.randint(3, 500, (45,), generator=torch.Generator().manual_seed(3))
    got = perplexity(model, ids, 16, stride)
    ppl, n = per_token_reference(model, ids, 16, stride or 16)
    assert got.tokens == n and got.ppl == pytest.approx(ppl, rel=1e-4)


def test_sliding_window_with_the_whole_text_in_view_equals_one_forward(model):
    ids = torch.randint(3, 500, (30,))
    one = perplexity(model, ids, 64)
    with torch.inference_mode():
        logp = model(ids[None])[0].log_softmax(-1)
    nll = -float(logp[:-1].gather(-1, ids[1:, None]).sum())
    assert one.tokens == 29 and one.nll == pytest.approx(nll, rel=1e-5)
    assert perplexity(model, ids, 64, 3).nll == pytest.approx(nll, rel=1e-5)


def test_too_short_is_refused(model):
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, torch.tensor([5]), 16)


def test_command_prints_and_writes_json(tmp_path):
    from tiny_chat import CORPUS, write_tiny_chat_model

    folder = write_tiny_chat_model(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(CORPUS))
    out = tmp_path / "ppl.json"
    r = subprocess.run([sys.executable, "-m", "herd.cli", "eval", "perplexity", str(folder), str(text), "--window",
                        "32", "--stride", "16", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["window"] == 32 and res["stride"] == 16 and res["tokens"] == res["text_tokens"] - 1
    assert f"{res['ppl']:.4f}" in r.stdout
