"""Long context: blockwise attention vs its reference, chunked prefill vs one-shot, hybrid KV-cache bytes at 1M tokens,
int8 KV error."""
import re

import pytest
import torch

from herd import ops
from herd.config import preset
from herd.engine import Engine, KVCache, SamplingParams, generate
from herd.model import Transformer, attention_mask, key_block_mask
from herd.plan import kv_cache_bytes


def tiny(**overrides) -> Transformer:
    cfg = preset("debug")                 # chunks of 16, temperature-tuning floor 8: long context in 100 tokens
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.__post_init__()
    # std 0.3 makes every position's logits depend on the whole context
    return Transformer(cfg).init_weights(std=0.3, seed=3).eval()


def positions():
    """Query positions 30..42 (row 1 ends in 3 padding queries), keys 0..49 with empty slots in both rows."""
    B, T, S = 2, 13, 50
    q_pos = torch.arange(30, 30 + T).expand(B, T).clone()
    q_pos[1, -3:] = -1
    k_pos = torch.arange(S).expand(B, S).clone()
    k_pos[0, :4] = -1
    k_pos[1, 45:] = -1
    return q_pos, k_pos


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("block", [3, 8, 16, 64])
def test_blockwise_attention_matches_reference(chunk, block):
    """Many key blocks, chunk boundaries inside blocks, queries that see nothing of a block, padding rows, GQA."""
    q_pos, k_pos = positions()
    B, H, K, D = 2, 4, 2, 8
    q, k, v = torch.randn(B, H, q_pos.shape[1], D), torch.randn(B, K, 50, D), torch.randn(B, K, 50, D)
    mask_fn = lambda s, e: key_block_mask(q_pos, k_pos[:, s:e], chunk)
    ref = ops.attention_reference(q, k, v, attention_mask(q_pos, k_pos, chunk))
    torch.testing.assert_close(ops.attention_blockwise(q, k, v, mask_fn, block), ref, rtol=1e-5, atol=1e-5)
    # the same over int8 keys and values equals the reference over their dequantized values
    kq, vq = ops.quantize_kv(k), ops.quantize_kv(v)
    mask = attention_mask(q_pos, k_pos, chunk)
    ref_q = ops.attention_reference(q, kq.dequantize(q.dtype), vq.dequantize(q.dtype), mask)
    torch.testing.assert_close(ops.attention_blockwise(q, kq, vq, mask_fn, block), ref_q, rtol=1e-5, atol=1e-5)


def test_attend_block_math_matches_fused_kernel():
    """The non-CPU block kernel (plain fp32 math) against the fused CPU one, with fully masked query rows."""
    q_pos, k_pos = positions()
    q, k, v = torch.randn(2, 4, 13, 8), torch.randn(2, 4, 14, 8), torch.randn(2, 4, 14, 8)
    mask = attention_mask(q_pos, k_pos[:, 36:], 7)
    assert not mask[0, 0, 0].any()                 # query 30 (chunk 28..34) sees none of keys 36..49
    out, lse = ops._attend_block(q, k, v, mask)
    bias = torch.where(mask, 0.0, float("-inf"))
    out_m, lse_m = ops._attend_block_math(q, k, v, bias)
    seen = mask.any(-1).expand_as(lse)
    torch.testing.assert_close(out[seen], out_m[seen], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[seen], lse_m[seen], rtol=1e-5, atol=1e-5)
    assert (lse[~seen] == -1e30).all() and torch.isfinite(out).all()


def test_key_block_mask_none_only_when_everything_is_visible():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        chunk = [None, 4, 16][int(torch.randint(3, (1,), generator=g))]
        q0 = int(torch.randint(0, 40, (1,), generator=g))
        q_pos = torch.arange(q0, q0 + int(torch.randint(1, 6, (1,), generator=g)))[None]
        k0 = int(torch.randint(-2, 40, (1,), generator=g))
        k_pos = torch.arange(k0, k0 + int(torch.randint(1, 9, (1,), generator=g)))[None].clamp(min=-1)
        full = attention_mask(q_pos, k_pos, chunk)
        m = key_block_mask(q_pos, k_pos, chunk)
        assert torch.equal(full, torch.ones_like(full)) if m is None else torch.equal(m, full)


def prefill_logits(model, tokens, piece, **cache_kw):
    """Logits of every position, prefilling `piece` tokens at a time through the engine's KV cache."""
    T = tokens.shape[1]
    cache = KVCache(model.config, 1, T, **cache_kw)
    return torch.cat([model(tokens[:, s:s + piece], input_pos=torch.arange(s, min(s + piece, T))[None],
                            kv_cache=cache) for s in range(0, T, piece)], dim=1)


def test_chunked_prefill_equals_one_shot(monkeypatch):
    """75 tokens cross four 16-token attention chunks and the temperature-tuning floor (8) many times."""
    model = tiny()
    tokens = torch.randint(3, 512, (1, 75))
    one_shot = model(tokens)
    for piece in (1, 5, 16, 23, 75):
        torch.testing.assert_close(prefill_logits(model, tokens, piece), one_shot, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"piece {piece}: {m}")
    monkeypatch.setattr(ops, "KV_BLOCK", 8)        # every layer now attends in several key blocks
    for piece in (7, 32):
        torch.testing.assert_close(prefill_logits(model, tokens, piece), one_shot, rtol=1e-4, atol=1e-4)
    assert one_shot[0, -1].std() > 1.0, "degenerate model: the comparison would prove little"


def test_engine_chunked_prefill_batch_with_padding():
    """Engine prefill of a right-padded batch in pieces: each row's next-token distribution equals one-shot."""
    model = tiny()
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (70, 9, 41)]
    expect = [model(torch.tensor([p]))[0, -1].log_softmax(-1) for p in prompts]
    for chunk in (6, 16, 100):
        reqs = generate(model, prompts, SamplingParams(max_tokens=1, logprobs=5), prefill_chunk=chunk)
        for r, e in zip(reqs, expect):
            ids, lps = zip(*r.logprobs[0]["top"])
            torch.testing.assert_close(torch.tensor(lps), e[list(ids)], rtol=1e-4, atol=1e-4)
            assert list(ids) == e.topk(5).indices.tolist()


def test_long_prefill_blockwise_equals_one_block(monkeypatch):
    """6000 tokens through the engine: the global layer's attention in 1024-key blocks (as at 1M tokens, with blocks
    of KV_BLOCK) gives what one SDPA call over every key gives."""
    model = tiny(attn_chunk_size=512, floor_scale=512.0, max_seq_len=8192)
    prompt = torch.randint(3, 512, (6000,)).tolist()
    params = SamplingParams(max_tokens=1, logprobs=5)
    monkeypatch.setattr(ops, "KV_BLOCK", 1024)
    blocks = generate(model, [prompt], params, prefill_chunk=1000)[0].logprobs[0]["top"]
    monkeypatch.setattr(ops, "KV_BLOCK", 1 << 30)
    whole = generate(model, [prompt], params, prefill_chunk=1000)[0].logprobs[0]["top"]
    assert [i for i, _ in blocks] == [i for i, _ in whole]
    torch.testing.assert_close(torch.tensor([lp for _, lp in blocks]), torch.tensor([lp for _, lp in whole]),
                               rtol=1e-4, atol=1e-4)


def allocated_bytes(cache: KVCache) -> int:
    """Bytes of the storages behind every buffer the cache holds, counted from the tensors themselves."""
    bufs = [t for x in (*cache.k, *cache.v)
            for t in ((x.values, x.scale) if isinstance(x, ops.QuantizedKV) else (x,))] + list(cache.pos)
    return sum(t.untyped_storage().nbytes() for t in bufs)


@pytest.mark.parametrize("kv_int8", [False, True])
def test_kv_cache_bytes_per_token_at_1m(kv_int8):
    """A tiny Llama 4 (3 chunked RoPE layers with Llama 4's 8192-token chunks, 1 global NoPE layer) at 1M tokens of
    context holds <= 30% of the KV bytes of the same model with full attention in every layer."""
    n = 1 << 20
    cfg = tiny(attn_chunk_size=8192, max_seq_len=n).config
    full_cfg = tiny(attn_chunk_size=None, nope_every=0, max_seq_len=n).config
    hybrid = KVCache(cfg, 1, n, dtype=torch.bfloat16, kv_int8=kv_int8)
    full = KVCache(full_cfg, 1, n, dtype=torch.bfloat16)
    got, base = allocated_bytes(hybrid), allocated_bytes(full)
    assert got == hybrid.nbytes() == kv_cache_bytes(cfg, n, dtype_bytes=2, pos_bytes=8, kv_int8=kv_int8)
    assert base == full.nbytes() == kv_cache_bytes(full_cfg, n, dtype_bytes=2, pos_bytes=8)
    # per token of context: bf16 K+V (2 kv heads x 16) + int64 slot position = 136 B per layer per token
    assert base / n == 4 * 136
    assert got / base <= (0.20 if kv_int8 else 0.30), f"{got / n:.1f} B/token vs {base / n:.1f} B/token"


def test_int8_kv_error():
    """int8 keys/values (one scale per token and head) on the global layer: element error <= scale / 2, and the
    logits of a 75-token chunked prefill stay within 2% of their range of the bf16-free fp32 cache's."""
    x = torch.randn(3, 40, 2, 16) * torch.rand(3, 40, 2, 1) * 10
    q = ops.quantize_kv(x)
    assert q.values.dtype == torch.int8 and q.scale.shape == (3, 40, 2, 1)
    assert ((q.dequantize(torch.float32) - x).abs() <= q.scale / 2 + 1e-6).all()
    model = tiny()
    tokens = torch.randint(3, 512, (1, 75))
    ref = prefill_logits(model, tokens, 16)
    got = prefill_logits(model, tokens, 16, kv_int8=True)
    err = (got - ref).abs().max() / (ref.max() - ref.min())
    assert 0 < err <= 0.02, f"relative logit error {err:.4f}"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("kv_int8", [False, True])
def test_verbose_kv_report_matches_the_real_cache(kv_int8, capsys):
    """`herd run/generate --verbose` prints plan.kv_cache_bytes; it must be what the engine really allocated."""
    from herd.cli import _print_kv_cache
    engine = Engine(tiny(), max_batch=1, max_seq_len=3000, kv_int8=kv_int8)
    _print_kv_cache(engine)
    per_token = int(re.search(r"= ([\d,]+) B per token", capsys.readouterr().err).group(1).replace(",", ""))
    assert per_token == round(allocated_bytes(engine.cache) / 3000)
