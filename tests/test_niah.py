"""Needle in a haystack: prompt construction, scoring, the context limit, the CLI grid and heatmap."""
import re

import pytest
import torch

from herd.eval import niah
from herd.cli import main
from herd.engine import Request
from herd.tokenizer import load_tokenizer
from tiny_chat import write_tiny_chat_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))


def test_parse_lengths_and_depths():
    assert [niah.parse_length(x) for x in "1k,4K,64k,3000,1m".split(",")] == [1024, 4096, 65536, 3000, 1 << 20]
    with pytest.raises(ValueError, match="bad length"):
        niah.parse_length("4kb")
    with pytest.raises(ValueError, match="between 0 and 1"):
        niah.parse_depths("0,1.5")


@pytest.mark.parametrize("chat", [True, False])
def test_prompt_length_and_needle_depth(tiny_model, chat):
    tok = load_tokenizer(tiny_model)
    needle = niah.Needle("Oslo", "417293")
    longest = max(len(tok.encode(" " + s)) for s in niah.FILLER)
    where = []
    for depth in (0.0, 0.5, 1.0):
        ids = niah.build_prompt(tok, 1000, depth, needle, chat)
        assert 1000 - 2 * longest <= len(ids) <= 1000
        text = tok.decode(ids)
        assert text.count(needle.sentence) == 1 and "secret number of Oslo?" in text.split(needle.sentence)[1]
        where.append(text.index(needle.sentence) / len(text))
    assert where[0] < 0.05 and 0.4 < where[1] < 0.6 and where[2] > 0.9


class EchoEngine:
    """Stands in for the engine: answers with the number in the prompt's needle, except for depth-0 needles at
    the longest length, where it answers wrongly: the grid must show exactly that."""

    def __init__(self, model, max_batch, max_seq_len, prefill_chunk):
        self.max_seq_len = max_seq_len

    def add(self, ids, params):
        text = self.tok.decode(ids)
        number = re.search(r"secret number of \w+ is (\d+)\.", text).group(1)
        first = text.index("secret number") < 0.05 * len(text)
        answer = "000000" if first and self.max_seq_len > 1000 else number
        req = Request(ids, params)
        req.output, req.finish_reason = self.tok.encode(answer), "stop"
        return req

    def step(self):
        return []


def test_grid_scores_and_skips_lengths_past_the_context(tiny_model, monkeypatch):
    tok = load_tokenizer(tiny_model)
    EchoEngine.tok = tok
    monkeypatch.setattr(niah, "Engine", EchoEngine)
    model = type("M", (), {"config": type("C", (), {"max_seq_len": 4096})()})()
    logs = []
    res = niah.run_niah(model, tok, [512, 2048, 8192], [0.0, 0.5, 1.0], samples=2, log=logs.append)
    assert res.accuracy == [[1.0, 0.0, None], [1.0, 1.0, None], [1.0, 1.0, None]]
    assert any("8,192 tokens: exceeds the model's context of 4,096" in m for m in logs)
    grid = niah.format_grid(res)
    assert "n/a" in grid and "mean over the 6 cells run: 0.83" in grid


def test_cli_eval_niah(tiny_model, tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "niah.png"
    main(["eval", "niah", str(tiny_model), "--lengths", "200,8k", "--depths", "0,1", "--out", str(out)])
    printed = capsys.readouterr()
    assert re.search(r"^0\.00\s+\d\.\d\d\s+n/a$", printed.out, re.M)
    assert "exceeds the model's context of 4,096 tokens" in printed.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
