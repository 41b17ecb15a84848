"""scripts/length_generalization.py's pieces: the task's data is what it claims, and the test-time path (the engine's
KV cache in prefill pieces) scores the same logits as one plain forward."""
import importlib.util
from pathlib import Path

import pytest
import torch

from herd.model import Transformer

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("length_generalization",
                                                  ROOT / "scripts" / "length_generalization.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batches_ask_each_stated_fact_once():
    lg = load_script()
    tokens, targets = lg.make_batch(6, 96, torch.Generator().manual_seed(0))
    assert tokens.shape == targets.shape == (6, 96) and bool((tokens[:, 0] == lg.BOS).all())
    tail = 2 * lg.N_PAIRS
    for row, target in zip(tokens, targets):
        hay = row[:-tail]
        facts = {int(t - lg.FACTS.start) // lg.N_VALUES: int(t - lg.FACTS.start) % lg.N_VALUES
                 for t in hay if t in lg.FACTS}
        assert len(facts) == lg.N_PAIRS                                     # distinct keys, each stated once
        asked = row[-tail::2] - lg.KEYS.start
        answers = row[-tail + 1::2] - lg.VALUES.start
        assert sorted(asked.tolist()) == sorted(facts)
        assert all(facts[int(k)] == int(v) for k, v in zip(asked, answers))
        scored = target != -100                                             # only the value after each question
        assert torch.equal(scored.nonzero()[:, 0], torch.arange(96 - tail, 96, 2))
        assert torch.equal(target[scored], row[-tail + 1::2])
        assert not bool(((hay > 1) & (hay < lg.FACTS.start)).any())         # no key or value token in the haystack


def test_cached_piecewise_scoring_equals_one_forward():
    lg = load_script()
    for kind in ("irope", "rope"):
        model = Transformer(lg.make_config(kind, train_len=64)).init_weights(std=0.3, seed=1).eval()
        tokens, _ = lg.make_batch(2, 300, torch.Generator().manual_seed(1))     # past the 16-token chunks
        with torch.inference_mode():
            full = model(tokens)[:, -2 * lg.N_PAIRS:]
            cached = lg.query_logits(model, tokens, piece=37)
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_unknown_model_is_refused_by_name():
    lg = load_script()
    with pytest.raises(SystemExit, match="unknown nope; expected some of irope, irope_last, rope, irope_8"):
        lg.main(["--models", "irope,nope", "--out", "/dev/null"])
