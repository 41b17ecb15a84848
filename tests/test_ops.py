"""Every fast path against its reference twin."""
import pytest
import torch

from herd import ops
from herd.model import attention_mask, is_plain_causal


SPARSE = [ops.run_experts, ops.run_experts_grouped]      # the per-expert loop and the grouped GEMMs


@pytest.mark.parametrize("run", SPARSE)
@pytest.mark.parametrize("N", [37, 1])                  # 1: the single-token path of a batch-1 decode step
def test_run_experts_matches_reference(N, run):
    D, F, E, K = 16, 24, 6, 1
    x = torch.randn(N, D)
    w1, w3, w2 = torch.randn(E, F, D), torch.randn(E, F, D), torch.randn(E, D, F)
    logits = torch.randn(N, E)
    top, idx = logits.topk(K, dim=-1)
    gate = torch.sigmoid(top)
    fast = run(x, idx, gate, w1, w2, w3)
    ref = ops.run_experts_reference(x, idx, gate, w1, w2, w3)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("run", SPARSE)
def test_run_experts_top2_and_empty_experts(run):
    N, D, F, E = 9, 8, 12, 8
    x = torch.randn(N, D)
    w1, w3, w2 = torch.randn(E, F, D), torch.randn(E, F, D), torch.randn(E, D, F)
    idx = torch.randint(0, 3, (N, 2))          # experts 3..7 receive nothing
    idx[:, 1] = (idx[:, 0] + 1) % 3
    gate = torch.rand(N, 2)
    torch.testing.assert_close(run(x, idx, gate, w1, w2, w3),
                               ops.run_experts_reference(x, idx, gate, w1, w2, w3), rtol=1e-5, atol=1e-4)


def test_run_experts_gradients_match():
    N, D, F, E = 20, 8, 12, 4
    x = torch.randn(N, D, requires_grad=True)
    ws = [torch.randn(E, F, D, requires_grad=True), torch.randn(E, D, F, requires_grad=True),
          torch.randn(E, F, D, requires_grad=True)]
    idx = torch.randint(0, E, (N, 1))
    gate = torch.rand(N, 1, requires_grad=True)
    grads = []
    for fn in (ops.run_experts_reference, *SPARSE):
        out = fn(x, idx, gate, ws[0], ws[1], ws[2])
        grads.append(torch.autograd.grad(out.square().sum(), [x, gate, *ws]))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_grouped_experts_bf16_and_meta_shapes():
    """The GPU's case without a GPU: bf16 grouped GEMMs within bf16 rounding of the fp32 reference, on whatever
    device runs the tests (CUDA where there is one), and Scout's expert shapes (16 experts, 5120 -> 8192) through
    the meta device, which checks what CUDA's kernel accepts (dtype, strides) without any memory."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    N, D, F, E = 64, 64, 96, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    w1, w3 = torch.randn(E, F, D, generator=g) / D ** 0.5, torch.randn(E, F, D, generator=g) / D ** 0.5
    w2 = torch.randn(E, D, F, generator=g) / F ** 0.5
    idx = torch.randint(0, E, (N, 1), generator=g)
    gate = torch.rand(N, 1, generator=g)
    ref = ops.run_experts_reference(x, idx, gate, w1, w2, w3)
    args = [t.to(device, torch.bfloat16) for t in (x, w1, w2, w3)]
    assert ops.grouped_mm_runs(args[0])
    out = ops.run_experts_grouped(args[0], idx.to(device), gate.to(device, torch.bfloat16), args[1], args[2],
                                  args[3])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu(), ref, rtol=3e-2, atol=3e-2)
    meta = dict(device="meta", dtype=torch.bfloat16)
    N, D, F, E = 256, 5120, 8192, 16
    out = ops.run_experts_grouped(torch.empty(N, D, **meta), torch.zeros(N, 1, dtype=torch.long, device="meta"),
                                  torch.empty(N, 1, **meta), torch.empty(E, F, D, **meta), torch.empty(E, D, F, **meta),
                                  torch.empty(E, F, D, **meta))
    assert out.shape == (N, D) and out.dtype == torch.bfloat16
    assert not ops.grouped_mm_runs(torch.empty(1, device="meta"))     # fp32 off the CPU: the per-expert loop


def test_attention_matches_reference():
    B, H, K, T, S, D = 2, 8, 2, 5, 12, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, K, S, D), torch.randn(B, K, S, D)
    q_pos = torch.arange(7, 12).expand(B, T)
    k_pos = torch.arange(S).expand(B, S).clone()
    k_pos[1, :3] = -1                               # empty cache slots in row 1
    mask = attention_mask(q_pos, k_pos, chunk_size=4)
    torch.testing.assert_close(ops.attention(q, k, v, mask), ops.attention_reference(q, k, v, mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H,K", [(9, 3), (8, 8), (8, 1)])
def test_one_query_attention_matches_reference(H, K):
    """The decode-step attention (query heads grouped per kv head) against the plain twin: masked rows (a padding
    row, empty cache slots, a chunked layer) and the mask-free case."""
    B, S, D = 3, 20, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, K, S, D, generator=g), torch.randn(B, K, S, D, generator=g)
    q_pos = torch.tensor([[19], [11], [-1]])                         # row 2: padding
    k_pos = torch.arange(S).expand(B, S).clone()
    k_pos[1, 12:] = -1                                               # row 1: empty slots
    for mask in (attention_mask(q_pos, k_pos, None), attention_mask(q_pos, k_pos, chunk_size=8)):
        torch.testing.assert_close(ops.attention_one_query(q, k, v, mask), ops.attention_reference(q, k, v, mask),
                                   rtol=1e-5, atol=1e-5)
    everything = torch.ones(B, 1, 1, S, dtype=torch.bool)
    torch.testing.assert_close(ops.attention_one_query(q, k, v, None), ops.attention_reference(q, k, v, everything),
                               rtol=1e-5, atol=1e-5)


def test_causal_attention_matches_reference_and_is_used_only_when_plain():
    B, H, K, T, D = 2, 8, 2, 9, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, K, T, D), torch.randn(B, K, T, D)
    pos = torch.arange(T).expand(B, T)
    mask = attention_mask(pos, pos, chunk_size=None)
    torch.testing.assert_close(ops.attention_causal(q, k, v), ops.attention_reference(q, k, v, mask),
                               rtol=1e-5, atol=1e-5)
    assert is_plain_causal(pos, pos, None) and is_plain_causal(pos, pos, 16)
    padded = pos.clone()
    padded[1, -2:] = -1                              # right padding: padding queries must see every key
    later = torch.arange(T + 3)[None, 3:].expand(B, T)
    assert not is_plain_causal(pos, pos, 4)          # crosses a chunk boundary: block-diagonal, not a triangle
    assert not is_plain_causal(padded, padded, None)
    assert not is_plain_causal(later, torch.arange(T + 3).expand(B, T + 3), None)   # earlier keys in the cache
    assert not is_plain_causal(pos[:, :1], pos[:, :1], None)
    # whenever it says so, the triangle is exactly the mask the general path builds
    for q_pos, chunk in ((pos, None), (pos, 16), (later, 16)):
        if is_plain_causal(q_pos, q_pos, chunk):
            assert torch.equal(attention_mask(q_pos, q_pos, chunk)[0, 0], torch.ones(T, T, dtype=torch.bool).tril())


def test_chunk_mask_is_block_aligned():
    """Spec 9(c): chunk size 4, positions across a boundary. Position 4 starts a chunk and sees only itself."""
    pos = torch.arange(10)[None]
    m = attention_mask(pos, pos, chunk_size=4)[0, 0]
    assert m[4].nonzero().flatten().tolist() == [4]
    assert m[7].nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert m[8].nonzero().flatten().tolist() == [8]
    assert m[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    full = attention_mask(pos, pos, chunk_size=None)[0, 0]
    assert torch.equal(full, torch.ones(10, 10, dtype=torch.bool).tril())
