"""Prompt scoring in the engine (prompt_logprobs) against the reference: the model's own full forward log-softmax."""
import pytest
import torch

from herd import engine as engine_module
from herd.config import preset
from herd.engine import ContextLengthError, Engine, SamplingParams, generate
from herd.model import Transformer


@pytest.fixture(scope="module")
def model():
    cfg = preset("debug")
    return Transformer(cfg).init_weights(std=0.3, seed=5).eval()


def reference(model, prompt, k):
    """(logprob of each prompt token given the ones before it, top-k ids) from one plain forward, no cache."""
    with torch.inference_mode():
        logp = model(torch.tensor([prompt]))[0].log_softmax(-1)               # (T, V)
    chosen = logp[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]     # (T-1,)
    return chosen, logp[:-1].topk(k, -1)


def check(req, model):
    k = req.params.prompt_logprobs
    assert req.prompt_logprobs[0] is None and len(req.prompt_logprobs) == len(req.prompt)
    chosen, top = reference(model, req.prompt, max(k, 1))
    got = torch.tensor([e["logprob"] for e in req.prompt_logprobs[1:]])
    torch.testing.assert_close(got, chosen, atol=1e-4, rtol=0)
    for j, e in enumerate(req.prompt_logprobs[1:]):
        if k == 0:
            assert e["top"] == []
            continue
        ids, lps = zip(*e["top"])
        torch.testing.assert_close(torch.tensor(lps), top.values[j], atol=1e-4, rtol=0)
        # ids may swap only between near-ties
        assert list(ids) == top.indices[j].tolist() or torch.allclose(top.values[j][:-1], top.values[j][1:], atol=1e-4)


@pytest.mark.parametrize("prefill_chunk", [512, 7])
def test_batched_scoring_equals_full_forward(model, prefill_chunk):
    """Prompts of different lengths (right padding), one batched prefill, also in 7-token pieces that cross the
    16-token attention chunks; a 1-token prompt has only its None."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 40, 18, 1)]
    reqs = generate(model, prompts, SamplingParams(max_tokens=0, prompt_logprobs=3), prefill_chunk=prefill_chunk)
    for r in reqs:
        assert r.output == [] and r.finish_reason == "length"
        check(r, model)


def test_scoring_pieces_shrink_to_bound_the_logits(model, monkeypatch):
    """With room for only 4 positions' logits, two prompts are prefilled 2 tokens at a time while both score, then
    the longer one 4 at a time; same values."""
    V = model.config.vocab_size
    monkeypatch.setattr(engine_module, "SCORING_LOGITS_BYTES", 2 * 4 * 2 * V)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda tokens, **kw: calls.append(tokens.shape) or forward(tokens, **kw))
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (30, 11)]
    reqs = generate(model, prompts, SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert calls == [(2, 2)] * 6 + [(1, 4)] * 4 + [(1, 2)], calls       # 11 = 5 * 2 + 1; 30 = 6 * 2 + 4 * 4 + 2
    for r in reqs:
        check(r, model)


def test_score_and_generate_in_one_batch(model):
    """A scored-only request frees its row after prefill; a request that scores and generates gets both, and its
    tokens (and their logprobs) equal a plain run's."""
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (12, 25)]
    plain = generate(model, [prompts[1]], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2))[0]
    engine = Engine(model, max_batch=2)
    only = engine.add(prompts[0], SamplingParams(max_tokens=0, prompt_logprobs=0))
    both = engine.add(prompts[1], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=2))
    events = engine.step()
    assert only.finished and only.row is not None and engine.rows[only.row] is None
    assert [r for r, _ in events] == [both]
    while engine.has_work():
        engine.step()
    check(only, model)
    check(both, model)
    assert both.output == plain.output
    torch.testing.assert_close(torch.tensor([e["logprob"] for e in both.logprobs]),
                               torch.tensor([e["logprob"] for e in plain.logprobs]), atol=1e-5, rtol=0)


def test_scoring_limits(model):
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=0).validate()
    with pytest.raises(ValueError, match="prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=21).validate()
    engine = Engine(model, max_batch=1, max_seq_len=16)
    full = torch.randint(3, 512, (16,)).tolist()
    req = engine.add(full, SamplingParams(max_tokens=0, prompt_logprobs=0))   # a scored prompt may fill the context
    while engine.has_work():
        engine.step()
    check(req, model)
    with pytest.raises(ContextLengthError, match="at most 15 prompt tokens"):
        engine.add(full, SamplingParams(max_tokens=1, prompt_logprobs=0))
