"""The engine against the naive no-cache loop; batching; sampling; bad input."""
import pytest
import torch

from herd.config import ModelConfig, preset
from herd.engine import ContextLengthError, Engine, KVCache, SamplingParams, generate, generate_reference
from herd.sampling import argmax_rows, filter_logits, filter_logits_sorted, sample
from herd.model import Transformer


def tiny(kind: str) -> Transformer:
    cfg = preset("debug")
    if kind == "llama3":
        cfg.moe, cfg.nope_every, cfg.attn_chunk_size, cfg.use_qk_norm = None, 0, None, False
        cfg.attn_temperature_tuning, cfg.source = False, "llama"
    cfg.__post_init__()
    # std 0.3 makes the greedy path depend on the whole context, not one dominant token
    return Transformer(cfg).init_weights(std=0.3, seed=3).eval()


@pytest.mark.parametrize("kind", ["llama4", "llama3"])
def test_cached_greedy_equals_recompute(kind):
    model = tiny(kind)
    prompt = torch.randint(3, 512, (21,)).tolist()
    # 21 + 60 tokens cross five 16-token attention chunks (and a NoPE layer with temperature tuning, floor 8)
    ref = generate_reference(model, prompt, 60)
    for chunk in (512, 7):      # one-shot prefill and prefill in 7-token pieces
        out = generate(model, [prompt], SamplingParams(max_tokens=60, ignore_eos=True), prefill_chunk=chunk)[0]
        assert out.output == ref, f"prefill_chunk={chunk}"
    assert len(set(ref)) > 5, "degenerate model: the comparison would prove little"


@pytest.mark.parametrize("kind", ["llama4", "llama3"])
def test_batched_equals_alone(kind):
    model = tiny(kind)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 33, 18, 1)]
    params = SamplingParams(max_tokens=25, ignore_eos=True)
    batched = [r.output for r in generate(model, prompts, params)]
    alone = [generate(model, [p], params)[0].output for p in prompts]
    assert batched == alone


def test_generate_sizes_its_cache_to_the_request(monkeypatch):
    """generate() on a model whose context is Scout's 10M tokens allocates the longest prompt + max_tokens, not the
    context (a 10M-token global cache here would be ~10 GB), and still decodes as the no-cache loop does."""
    import herd.engine
    sizes = []

    class RecordingCache(KVCache):
        def __init__(self, cfg, batch_size, max_seq_len, *a, **kw):
            sizes.append(max_seq_len)
            super().__init__(cfg, batch_size, max_seq_len, *a, **kw)

    monkeypatch.setattr(herd.engine, "KVCache", RecordingCache)
    model = tiny("llama4")
    model.config.max_seq_len = 10_000_000
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (30, 12)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    out = generate(model, prompts, params)
    assert sizes == [50]
    assert [r.output for r in out] == [generate_reference(model, p, 20) for p in prompts]
    generate(model, prompts, params, max_seq_len=64)            # the caller's own size still wins
    assert sizes == [50, 64]


def test_continuous_batching_join_and_leave():
    """Requests join mid-flight and a cancelled one frees its row; every answer equals the solo run."""
    model = tiny("llama4")
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (9, 14, 30)]
    engine = Engine(model, max_batch=2)
    a, b = engine.add(prompts[0], params), engine.add(prompts[1], params)
    for _ in range(5):
        engine.step()
    engine.cancel(b)
    c = engine.add(prompts[2], params)
    while engine.has_work():
        engine.step()
    assert b.finish_reason == "cancelled" and c.row == b.row
    assert a.output == generate(model, [prompts[0]], params)[0].output
    assert c.output == generate(model, [prompts[2]], params)[0].output


def test_hybrid_cache_is_bounded():
    cfg = preset("debug")
    cache = KVCache(cfg, batch_size=1, max_seq_len=1024)
    slots = [k.shape[1] for k in cache.k]
    assert slots == [16, 16, 16, 1024]      # three chunked RoPE layers keep one chunk, the NoPE layer keeps all


def test_dense_cache_update_equals_general_path():
    """KVCache._update_dense (scatter through views) against the general nonzero/index_put path, which runs when
    the rows are an index tensor: same returned keys and the same buffers, on ring and global layers."""
    cfg = preset("debug")
    torch.manual_seed(0)
    fast, general = KVCache(cfg, 2, 64), KVCache(cfg, 2, 64)
    fast.rows, general.rows = slice(0, 2), torch.tensor([0, 1])
    steps = [torch.arange(0, 12).expand(2, 12)] + [torch.full((2, 1), p) for p in range(12, 40)]
    for pos in steps:                    # a 12-token prefill, then decode across two ring wraps (chunk 16)
        k, v = torch.randn(2, pos.shape[1], cfg.n_kv_heads, cfg.head_dim), torch.randn(2, pos.shape[1],
                                                                                         cfg.n_kv_heads, cfg.head_dim)
        for layer in range(cfg.n_layers):
            a, b = fast.update(layer, k, v, pos), general.update(layer, k, v, pos)
            for x, y in zip(a, b):
                assert torch.equal(x, y)
    for bufs_a, bufs_b in ((fast.k, general.k), (fast.v, general.v), (fast.pos, general.pos)):
        assert all(torch.equal(x, y) for x, y in zip(bufs_a, bufs_b))
    with pytest.raises(ContextLengthError, match="past the cache"):
        fast.update(cfg.n_layers - 1, k, v, torch.full((2, 1), 64))


def test_decode_slot_views_follow_inference_mode():
    """decode_slot keeps each row's views across steps; one made inside inference mode cannot be written in place
    outside it by autograd-tracked values ("A view was created in inference mode ..."), so a batch-1 update outside
    it (a plain forward with the cache, with grad) gets views of its own."""
    cfg = preset("debug")
    cache = KVCache(cfg, 1, 64)
    cache.rows = slice(0, 1)
    k, v = torch.randn(1, 1, cfg.n_kv_heads, cfg.head_dim), torch.randn(1, 1, cfg.n_kv_heads, cfg.head_dim)
    with torch.inference_mode():
        first = cache.decode_slot(0, 3)
        assert cache.decode_slot(0, 4)[0] is first[0]                   # the same views, step after step
        cache.update(0, k, v, torch.tensor([[3]]))
    tracked = (2 * k).requires_grad_()
    keys, _, pos = cache.update(0, tracked, v, torch.tensor([[4]]))    # outside: would raise on the kept views
    assert torch.equal(keys[0, 3], k[0, 0]) and torch.equal(keys[0, 4].detach(), 2 * k[0, 0])
    assert pos[0, :5].tolist() == [-1, -1, -1, 3, 4]


def test_piece_slots_only_for_one_row_of_consecutive_positions():
    """KVCache.piece_slots (a prefill piece as rows of one cache row) refuses what it cannot take: padding, positions
    out of order, several sequences, several cache rows, a ring layer's piece that leaves its chunk (debug preset:
    chunks of 16); a global layer past its slots is a ContextLengthError, as in decode_slots."""
    cfg = preset("debug")
    cache = KVCache(cfg, 2, 64)
    cache.rows = slice(1, 2)
    ring, nope = 0, cfg.n_layers - 1
    rows, slots, n_slots = cache.piece_slots(ring, torch.arange(3, 7)[None])[3:]
    assert rows.tolist() == [1] * 4 and slots.tolist() == [3, 4, 5, 6] and n_slots.tolist() == [16] * 4
    assert cache.piece_slots(nope, torch.arange(3, 7)[None])[5].tolist() == [4, 5, 6, 7]
    for pos in ([[-1, 0, 1]], [[3, 5, 4]], [[3, 4], [3, 4]], [[14, 15, 16]]):
        assert cache.piece_slots(ring, torch.tensor(pos)) is None, pos
    assert cache.piece_slots(nope, torch.tensor([[14, 15, 16]])) is not None
    cache.rows = slice(0, 2)
    assert cache.piece_slots(nope, torch.arange(3, 7)[None]) is None
    cache.rows = slice(1, 2)
    with pytest.raises(ContextLengthError, match="position 64 is past the cache's 64 slots"):
        cache.piece_slots(nope, torch.arange(62, 65)[None])


def test_argmax_rows_matches_torch_argmax():
    """The numpy path against torch's argmax: ties take the first index, a NaN counts as the largest, bf16 rows
    (torch's path), a 49k vocab."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 49152, generator=g)
    logits[1, 7] = logits[1, 900] = logits[1].max() + 1           # a tie: the first one
    logits[2, 5000] = float("nan")
    logits[3] = 0.0                                               # all equal
    assert torch.equal(argmax_rows(logits), logits.argmax(-1))
    assert argmax_rows(logits).tolist()[1:] == [7, 5000, 0]
    assert torch.equal(argmax_rows(logits.bfloat16()), logits.bfloat16().argmax(-1))


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    one = torch.ones(1)
    f = lambda **kw: filter_logits(logits, kw.get("t", one), torch.tensor([kw.get("k", 0)]),
                                   torch.tensor([kw.get("p", 1.0)]), torch.tensor([kw.get("m", 0.0)]))
    assert torch.isfinite(f(k=2)).sum() == 2
    probs = logits.softmax(-1)[0]
    assert torch.isfinite(f(p=float(probs[0]) + 1e-3)).sum() == 2      # first token alone falls just short
    assert torch.isfinite(f(p=1e-6)).sum() == 1
    assert torch.isfinite(f(m=0.3)).sum() == 2                          # exp(-1)=.37 passes, exp(-2)=.14 not
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    big = torch.randn(1, 1000)
    t = torch.tensor([1.0])
    draw = lambda g: sample(big, t, torch.tensor([0]), torch.tensor([0.9]), torch.tensor([0.0]), [g])
    assert torch.equal(draw(g1), draw(g2))


def test_filter_logits_without_top_p_equals_the_sorted_twin():
    """top-k (per row, off in some rows) and min-p without a sort == the one-sort twin, on a 49k vocabulary."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 49152, generator=g) * 3
    temperature = torch.tensor([1.0, 0.7, 1.3, 1.0, 0.5, 2.0])
    top_k = torch.tensor([0, 1, 40, 0, 49152, 7])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.1, 0.2])
    ones = torch.ones(6)
    fast = filter_logits(logits, temperature, top_k, ones, min_p)
    ref = filter_logits_sorted(logits / temperature[:, None], top_k, ones, min_p)
    assert torch.equal(torch.isfinite(fast), torch.isfinite(ref))
    torch.testing.assert_close(fast[torch.isfinite(fast)], ref[torch.isfinite(ref)], rtol=0, atol=0)
    assert torch.isfinite(fast).sum(-1).tolist()[1:3] == [1, 40]
    assert bool(torch.isfinite(fast[0]).all())                      # nothing asked, nothing removed


def test_sample_draws_the_filtered_distribution():
    """The inverse-CDF draw: frequencies of 40,000 seeded draws match the filtered probabilities (within 4 sigma),
    filtered-out tokens are never drawn, greedy rows in the same batch take the argmax, and a seed repeats."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03], [0.1, 0.2, 0.3, 0.4, 0.0]]))
    n = 40_000
    g = torch.Generator().manual_seed(11)
    t, k, p, m = torch.tensor([1.0, 0.0]), torch.tensor([3, 0]), torch.ones(2), torch.zeros(2)
    draws = torch.stack([sample(logits, t, k, p, m, [g, None]) for _ in range(n)])     # (n, 2)
    assert bool((draws[:, 1] == 3).all())
    freq = torch.bincount(draws[:, 0], minlength=5).float() / n
    want = torch.tensor([0.5, 0.25, 0.15, 0.0, 0.0]) / 0.9
    assert freq[3:].sum() == 0
    assert bool(((freq - want).abs() <= 4 * (want * (1 - want) / n).sqrt() + 1e-9).all()), freq
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [int(sample(logits, t, k, p, m, [a, None])[0]) for _ in range(20)] == \
           [int(sample(logits, t, k, p, m, [b, None])[0]) for _ in range(20)]


def test_seeded_sampling_reproducible_and_penalties():
    model = tiny("llama4")
    prompt = [5, 6, 7]
    p = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a = generate(model, [prompt], p)[0].output
    b = generate(model, [prompt, [9, 9]], p)[0].output     # same seed, different batch-mates
    assert a == b
    rep = generate(model, [prompt], SamplingParams(max_tokens=30, frequency_penalty=2.0, ignore_eos=True))[0]
    plain = generate(model, [prompt], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    assert len(set(rep.output)) >= len(set(plain.output))


def test_penalized_and_plain_requests_batched_get_their_own_tokens():
    """Penalty counts are kept only for requests with a penalty: batched with a plain greedy request, each gets the
    tokens it gets alone (the plain row's logits pass the penalties unchanged)."""
    model = tiny("llama4")
    rep = SamplingParams(max_tokens=25, frequency_penalty=2.0, presence_penalty=0.5, repetition_penalty=1.3,
                         ignore_eos=True)
    plain = SamplingParams(max_tokens=25, ignore_eos=True)

    def run(pairs):
        engine = Engine(model, max_batch=len(pairs))
        reqs = [engine.add(prompt, params) for prompt, params in pairs]
        while engine.has_work():
            engine.step()
        return [r.output for r in reqs]

    both = run([([5, 6, 7], rep), ([9, 8], plain)])
    assert both == run([([5, 6, 7], rep)]) + run([([9, 8], plain)])
    assert both[0] != run([([5, 6, 7], plain)])[0], "the penalty changed nothing: the test would prove little"


def test_stop_tokens_max_tokens_logprobs():
    model = tiny("llama4")
    prompt = [5, 6, 7]
    first = generate(model, [prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0].output
    r = generate(model, [prompt], SamplingParams(max_tokens=10, stop_token_ids=(first[3],), logprobs=2))[0]
    assert r.output == first[:first.index(first[3]) + 1] and r.finish_reason == "stop"
    assert len(r.logprobs) == len(r.output) and len(r.logprobs[0]["top"]) == 2
    assert r.logprobs[0]["top"][0][0] == r.output[0]           # greedy: the chosen token is the top one
    r = generate(model, [prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(r.output) == 4 and r.finish_reason == "length"


def test_bad_input():
    model = tiny("llama4")
    engine = Engine(model, max_batch=1, max_seq_len=64)
    with pytest.raises(ContextLengthError, match="prompt is 80 tokens.*context here is 64"):
        engine.add(list(range(3, 83)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add([1, 99999])
    with pytest.raises(ValueError, match="top_p"):
        engine.add([1], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add([])
    # generation stops at the context limit instead of overrunning the cache
    r = generate(model, [list(range(3, 60))], SamplingParams(max_tokens=100, ignore_eos=True), max_seq_len=64)[0]
    assert r.finish_reason == "length" and len(r.prompt) + len(r.output) == 64


def test_bad_sizes_are_refused():
    """A batch of no rows would queue every request for ever (a server that answers nothing): refused, as are a
    negative context and the other sizes, with messages naming them."""
    model = tiny("llama4")
    for kw, name in (({"max_batch": 0}, "max_batch"), ({"max_seq_len": -1}, "max_seq_len"),
                     ({"step_tokens": 0}, "step_tokens"), ({"prefix_cache_mib": -1}, "prefix_cache_mib")):
        with pytest.raises(ValueError, match=name):
            Engine(model, **kw)


def test_logit_bias_bans_and_forces_tokens_per_request():
    """OpenAI's logit_bias: -100 takes the greedy token out of play, +100 makes one token every answer; a request
    without a bias batched beside them gets the tokens it gets alone, and the logprobs are the biased ones."""
    model = tiny("llama4")
    prompt = torch.randint(3, 512, (9,)).tolist()
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    plain = generate(model, [prompt], params)[0].output
    banned = SamplingParams(max_tokens=6, ignore_eos=True, logit_bias={plain[0]: -100.0, plain[1]: -100.0})
    forced = SamplingParams(max_tokens=6, ignore_eos=True, logit_bias={77: 100}, logprobs=0)
    engine = Engine(model, max_batch=3, max_seq_len=64)
    reqs = [engine.add(prompt, p) for p in (params, banned, forced)]
    while engine.has_work():
        engine.step()
    assert reqs[0].output == plain
    assert plain[0] not in reqs[1].output and plain[1] not in reqs[1].output and reqs[1].output != plain
    assert reqs[2].output == [77] * 6 and reqs[2].logprobs[0]["logprob"] > -1e-3    # biased: ~all the mass
    for bad in ({5: 101}, {5: float("nan")}, {"5": 1.0}):
        with pytest.raises(ValueError, match="logit_bias maps token ids"):
            engine.add(prompt, SamplingParams(logit_bias=bad))
    with pytest.raises(ValueError, match=r"logit_bias token ids \[99999\] outside the vocabulary"):
        engine.add(prompt, SamplingParams(logit_bias={99999: 1.0}))
