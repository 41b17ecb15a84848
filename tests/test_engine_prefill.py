"""Chunked prefill interleaved with decoding, and the shared-prefix cache: same tokens and logits as a cold,
one-shot prefill; a long prompt never stalls the running streams; a cache entry never serves another prefix."""
import pytest
import torch

from herd.engine import MIN_PREFILL_PIECE, Engine, SamplingParams, generate
from herd.prefix_cache import PrefixCache

from test_engine import tiny

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3)


def run(engine, prompts, params=GREEDY):
    reqs = [engine.add(p, params) for p in prompts]
    while engine.has_work():
        engine.step()
    return reqs


def assert_same(a, b, atol=1e-4):
    """Same greedy tokens and the same logprobs of them (and of the top alternatives)."""
    assert a.output == b.output
    for x, y in zip(a.logprobs, b.logprobs):
        assert abs(x["logprob"] - y["logprob"]) < atol
        assert [t for t, _ in x["top"]] == [t for t, _ in y["top"]]


@pytest.mark.parametrize("kind", ["llama4", "llama3"])
def test_chunked_prefill_equals_one_shot(kind):
    """Pieces of 1, 5 and 16 tokens (the debug model's attention chunk is 16: pieces straddle ring layers' chunks
    and NoPE layers' global attention) give the one-shot prefill's logprobs and tokens."""
    model = tiny(kind)
    prompt = torch.randint(3, 512, (45,)).tolist()
    one_shot = run(Engine(model, max_batch=1, prefix_cache_mib=0), [prompt])[0]
    assert len(set(one_shot.output)) > 3
    for piece in (1, 5, 16):
        assert_same(run(Engine(model, max_batch=1, prefill_chunk=piece, prefix_cache_mib=0), [prompt])[0], one_shot)


def test_long_prompt_interleaves_with_decoding():
    """A 90-token prompt arriving while two requests decode is prefilled a budget of step_tokens at a time: every
    step still gives each running stream its next token, and every answer equals its solo run."""
    model = tiny("llama4")
    short = [torch.randint(3, 512, (n,)).tolist() for n in (6, 9)]
    long_prompt = torch.randint(3, 512, (90,)).tolist()
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    engine = Engine(model, max_batch=3, step_tokens=18, prefix_cache_mib=0)
    running = [engine.add(p, params) for p in short]
    engine.step()                                   # both prefilled, first tokens out
    calls, forward = [], model.forward
    model.forward = lambda tokens, **kw: calls.append(tuple(tokens.shape)) or forward(tokens, **kw)
    try:
        late = engine.add(long_prompt, params)
        steps = 0
        while not late.output:
            before = [len(r.output) for r in running]
            engine.step()
            steps += 1
            assert [len(r.output) for r in running] == [n + 1 for n in before], "a running stream stalled"
        while engine.has_work():
            engine.step()
    finally:
        del model.forward
    prefill_pieces = [T for B, T in calls if T > 1]
    assert max(prefill_pieces) == 16 and steps == 6, calls     # 18 - 2 decoding rows per step: 5 * 16 + 10
    for r, p in zip(running + [late], short + [long_prompt]):
        assert r.output == generate(model, [p], params, prefix_cache_mib=0)[0].output


def test_default_budget_follows_measured_speeds():
    """Without step_tokens the budget is what the measured prefill rate runs in two decode steps' time, within
    [MIN_PREFILL_PIECE, prefill_chunk]."""
    engine = Engine(tiny("llama4"), max_batch=2, prefill_chunk=64)
    assert engine._prefill_budget(1) == MIN_PREFILL_PIECE       # nothing measured yet
    engine._decode_seconds, engine._prefill_rate = 0.010, 2000.0
    assert engine._prefill_budget(1) == 40
    engine._prefill_rate = 1e6
    assert engine._prefill_budget(1) == 64


def test_prefix_cache_hit_equals_cold_prefill():
    """The second prompt shares 40 tokens (a system prompt) with the first: it reuses them (five 8-token blocks)
    from the cache, and its tokens and logprobs equal a cold prefill's. Ring layers (16-token chunks) and NoPE
    layers both restored. (Blocks are cached while a ring still holds them: pieces of 8 here; Llama 4's chunks are
    8192 tokens.)"""
    model = tiny("llama4")
    system = torch.randint(3, 512, (40,)).tolist()
    first, second = system + [7, 8, 9], system + [11, 12]
    engine = Engine(model, max_batch=1, prefill_chunk=8, prefix_block=8)
    run(engine, [first])
    assert engine.prefix_cache.hit_tokens == 0
    warm = run(engine, [second])[0]
    assert engine.prefix_cache.hit_tokens == 40
    cold = run(Engine(model, max_batch=1, prefill_chunk=8, prefix_cache_mib=0), [second])[0]
    assert_same(warm, cold)


def test_prefix_cache_block_size_and_hits_in_a_batch():
    """Blocks of 8 tokens: a prompt equal to a cached one but for its last token reuses every whole block before
    that token; requests in one batch (rows 0..2) each restore into their own row."""
    model = tiny("llama4")
    base = torch.randint(3, 512, (35,)).tolist()
    engine = Engine(model, max_batch=3, prefix_block=8, prefill_chunk=8)
    run(engine, [base])
    variants = [base[:34] + [t] for t in (5, 6, 7)]
    warm = run(engine, variants)
    assert engine.prefix_cache.hit_tokens == 3 * 32
    cold = run(Engine(model, max_batch=3, prefix_cache_mib=0), variants)
    for w, c in zip(warm, cold):
        assert_same(w, c)


def test_prefix_cache_never_shares_across_prefixes():
    """Two prompts whose second block is the same but first block differs: no hit, and the block is cached twice
    (one entry per parent)."""
    model = tiny("llama4")
    tail = torch.randint(3, 512, (8,)).tolist()
    a = torch.randint(3, 512, (8,)).tolist() + tail + [1]
    b = torch.randint(3, 512, (8,)).tolist() + tail + [1]
    engine = Engine(model, max_batch=1, prefix_block=8, prefill_chunk=8)
    run(engine, [a])
    warm = run(engine, [b])[0]
    assert engine.prefix_cache.hit_tokens == 0
    assert sum(block.tokens == tuple(tail) for block in engine.prefix_cache.blocks.values()) == 2
    assert_same(warm, run(Engine(model, max_batch=1, prefix_cache_mib=0), [b])[0])


def test_prefix_cache_eviction_and_bounds():
    """Least recently used leaves go first, a block whose parent was evicted is not cached (it could never be
    found), bytes stay under the bound, a block larger than the bound is refused."""
    kv = lambda: ([torch.zeros(4, 2, 8)], [torch.zeros(4, 2, 8)])       # 512 bytes per block
    cache = PrefixCache(block_tokens=4, max_bytes=1536)
    a = cache.add(None, [1, 2, 3, 4], *kv())
    b = cache.add(a, [5, 6, 7, 8], *kv())
    c = cache.add(None, [9, 9, 9, 9], *kv())
    assert cache.nbytes == 1536 and len(cache.match([1, 2, 3, 4, 5, 6, 7, 8, 0], 9)) == 2     # a, b just used
    d = cache.add(None, [3, 3, 3, 3], *kv())            # over the bound: c, the least recently used leaf, goes
    assert c.key not in cache.blocks and d.key in cache.blocks and cache.nbytes == 1536
    cache.add(None, [4, 4, 4, 4], *kv())                 # next: b (a has a child until b goes)
    assert b.key not in cache.blocks and cache.add(b, [1, 1, 1, 1], *kv()) is None
    assert cache.nbytes <= 1536
    assert PrefixCache(block_tokens=4, max_bytes=100).add(None, [1, 2, 3, 4], *kv()) is None
    with pytest.raises(ValueError, match="block is 4 tokens"):
        cache.add(None, [1, 2], *kv())


def test_prefix_cache_off_for_int8_keys_and_scoring_reads_no_hits():
    model = tiny("llama4")
    assert Engine(model, max_batch=1, kv_int8=True).prefix_cache is None
    prompt = torch.randint(3, 512, (70,)).tolist()
    engine = Engine(model, max_batch=1, prefix_block=8, prefill_chunk=8)
    run(engine, [prompt])
    assert len(engine.prefix_cache.blocks) == 8
    scored = run(engine, [prompt + [5]], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert engine.prefix_cache.hit_tokens == 0 and len(scored.prompt_logprobs) == 71
