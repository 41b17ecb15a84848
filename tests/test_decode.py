"""decode.cpp's steps against their torch twins, and whole decode runs with them against the model without them."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from herd.cpu import decode, kernels, extension
from herd.config import preset
from herd.engine import Engine, SamplingParams
from herd.cpu.fuse import fuse_model
from herd.model import RMSNorm, rope_angles, rope_frequencies
from herd.model import Transformer

needs_kernels = pytest.mark.skipif(not extension.available(), reason=f"herd kernels {extension.status()}")
ext = extension.ext


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 64), (2, 7), (4, 33)])
def test_rms_norm_matches_torch(shape):
    x = torch.randn(shape) * 3
    w = torch.randn(shape[-1])
    for weight in (w, None):
        ref = F.rms_norm(x, (shape[-1],), weight, 1e-5)
        got = ext().rms_norm(x, weight if weight is not None else torch.empty(0), 1e-5)
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)


@needs_kernels
@pytest.mark.parametrize("H,K,D", [(9, 3, 64), (4, 2, 16), (8, 8, 8), (6, 1, 24)])
@pytest.mark.parametrize("rope,qk_norm,q_scale", [(True, False, 1.0), (True, True, 1.0), (False, True, 1.37),
                                                  (False, False, 1.0)])
def test_decode_qkv_matches_model_steps(H, K, D, rope, qk_norm, q_scale):
    qkv = torch.randn((H + 2 * K) * D) * 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    rotation = rope_angles(torch.tensor([[1234]]), inv_freq) if rope else None                # (1, 1, 1, D/2)
    cos_sin = torch.view_as_real(rotation).reshape(D // 2, 2) if rope else torch.empty(0)
    got = ext().decode_qkv(qkv, cos_sin, H, K, qk_norm, 1e-5, q_scale)
    ref = decode.decode_qkv_reference(qkv, rotation, H, K, qk_norm, 1e-5, q_scale)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("H,K,D", [(9, 3, 64), (8, 8, 16), (8, 1, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [0, 16])
def test_attend_one_matches_masked_softmax(H, K, D, dtype, chunk):
    """Empty slots (-1), keys past the query (a ring's stale slots), other chunks, S not a multiple of 16."""
    S, q_pos = 53, 40
    k, v = torch.randn(S, K, D).to(dtype), torch.randn(S, K, D).to(dtype)
    k_pos = torch.arange(S)
    k_pos[[0, 7, 22]] = -1
    k_pos[50:] = 100 + torch.arange(3)            # future positions: never visible
    q = torch.randn(H * D) * 2
    got = ext().attend_one(q, k, v, k_pos, q_pos, chunk)
    ref = decode.attend_one_reference(q, k, v, k_pos, q_pos, chunk)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_attend_one_long_context_in_parallel():
    """Enough keys that kv heads run on several threads."""
    S, H, K, D = 1500, 4, 2, 64
    k, v, q = torch.randn(S, K, D), torch.randn(S, K, D), torch.randn(H * D)
    got = ext().attend_one(q, k, v, torch.arange(S), S - 1, 0)
    torch.testing.assert_close(got, decode.attend_one_reference(q, k, v, torch.arange(S), S - 1, 0),
                               rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 3072), (5, 2 * 24), (3, 2 * 7)])
def test_silu_mul_matches_torch(shape):
    gate_up = torch.randn(shape) * 6
    gate_up.view(-1)[:4] = torch.tensor([-100.0, 100.0, -87.5, 89.0])       # e^-g under- and overflowing
    F_ = shape[-1] // 2
    ref = F.silu(gate_up[..., :F_]) * gate_up[..., F_:]
    torch.testing.assert_close(ext().silu_mul(gate_up), ref, rtol=2e-6, atol=1e-6)
    nan = gate_up.clone()
    nan.view(-1)[0] = float("nan")
    assert ext().silu_mul(nan).view(-1)[0].isnan(), "a NaN activation must stay NaN, not be hidden"


@needs_kernels
def test_decode_steps_refuse_bad_input():
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        ext().rms_norm(torch.randn(2, 8).double(), torch.empty(0), 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous fp32 \(8,\)"):
        ext().rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="head_dim"):
        ext().decode_qkv(torch.randn(100), torch.empty(0), 4, 2, False, 1e-5, 1.0)
    with pytest.raises(RuntimeError, match="cos_sin"):
        ext().decode_qkv(torch.randn(128), torch.randn(5, 2), 4, 2, False, 1e-5, 1.0)
    with pytest.raises(RuntimeError, match="k and v"):
        ext().attend_one(torch.randn(64), torch.randn(5, 2, 16), torch.randn(5, 2, 8), torch.arange(5), 4, 0)
    with pytest.raises(RuntimeError, match="k_pos"):
        ext().attend_one(torch.randn(64), torch.randn(5, 2, 16), torch.randn(5, 2, 16), torch.arange(4), 4, 0)
    with pytest.raises(RuntimeError, match="even last dim"):
        ext().silu_mul(torch.randn(3, 5))


def tiny(kind: str) -> Transformer:
    cfg = preset("debug")                 # chunks of 16, temperature floor 8, QK-norm, MoE every other layer
    if kind == "llama3":
        cfg.moe, cfg.nope_every, cfg.attn_chunk_size, cfg.use_qk_norm = None, 0, None, False
        cfg.attn_temperature_tuning, cfg.source = False, "llama"
    cfg.__post_init__()
    return Transformer(cfg).init_weights(std=0.3, seed=3).eval()


@needs_kernels
@pytest.mark.parametrize("kind", ["llama4", "llama3"])
@pytest.mark.parametrize("kv", ["fp32", "int8", "f16", "bf16"])
def test_decode_with_herd_steps_equals_without(kind, kv):
    """Greedy decode through the engine, 70 tokens past a 20-token prompt: chunk rings wrap four times, the NoPE
    layer's temperature grows; same tokens, logprobs within float error (int8 KV: the C++ q/k/v preparation, then
    Attention.attend; f16 / bf16 caches: both sides round the keys and values alike when they are written)."""
    kv_int8 = kv == "int8"
    cache_dtype = {"f16": torch.float16, "bf16": torch.bfloat16}.get(kv)
    plain = fuse_model(tiny(kind))
    herd_model = copy.deepcopy(plain)
    assert decode.use_decode_kernels(herd_model) > 0
    assert type(herd_model.layers[0].attention) is decode.HerdAttention
    assert type(herd_model.norm) is decode.HerdRMSNorm and type(herd_model.output) is decode.HerdLinear
    if kind == "llama4":
        assert type(herd_model.layers[1].feed_forward.experts) is decode.HerdExperts
    prompt = torch.randint(3, 512, (20,), generator=torch.Generator().manual_seed(1)).tolist()

    def run(model):
        engine = Engine(model, max_batch=1, kv_int8=kv_int8, cache_dtype=cache_dtype)
        req = engine.add(prompt, SamplingParams(max_tokens=70, ignore_eos=True, logprobs=0))
        with torch.inference_mode():
            while not req.finished:
                engine.step()
        return req.output, torch.tensor([x["logprob"] for x in req.logprobs])

    (ref_tokens, ref_lp), (tokens, lp) = run(plain), run(herd_model)
    assert tokens == ref_tokens
    assert len(set(ref_tokens)) > 5, "degenerate model: the comparison would prove little"
    # a last-bit difference in k (C++ vs torch rotary / QK-norm) can move its rounding in the cache by one level:
    # int8 1/127 of the head's largest value, bf16 / f16 one unit of their last place
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol={"fp32": 1e-4, "f16": 2e-3}.get(kv, 5e-3))


def packed_tiny(kind: str, scheme: str) -> Transformer:
    """The tiny model with every trunk linear quantized (int4 groups of 32, or int8), fused, on herd's kernels; or
    (scheme "fp32") only fused."""
    from herd.quantize import quantize_model
    if scheme == "fp32":
        return fuse_model(tiny(kind))
    model = quantize_model(tiny(kind), scheme, 32 if scheme == "int4" else None, only="all")
    fuse_model(model)
    assert kernels.use_herd_kernels(model) > 0
    return model


@needs_kernels
@pytest.mark.parametrize("kind", ["llama3", "llama4"])
@pytest.mark.parametrize("scheme", ["int4", "int8", "fp32"])
def test_whole_layer_decode_equals_block_forward(kind, scheme, monkeypatch):
    """HerdTransformer's one C++ call per decode step (decode_step over a LayerStack), against HerdBlock's one call
    per layer (the same bits) and Block.forward (the same Herd* modules, layer by layer), through the engine: 70
    tokens past a 20-token prompt (chunk rings wrapping, QK-norm, the NoPE layer's temperature).
    Every layer takes the C++ layer, llama4's MoE ones included: fp32 (HerdLinear, HerdExperts), int4 / int8 (every
    trunk matrix and the routed experts quantized: HerdInt4Experts / HerdInt8Experts). The prompt's prefill takes it
    too (decode_layer_rows, its 20 tokens as rows of one cache row) where its piece stays in one chunk: llama3's
    layers and llama4's NoPE layer."""
    model = packed_tiny(kind, scheme)
    assert decode.use_decode_kernels(model) > 0
    assert type(model.layers[0]) is decode.HerdBlock
    prompt = torch.randint(3, 512, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    calls = []
    one_call = extension.ext().decode_layer

    def run():
        engine = Engine(model, max_batch=1)
        req = engine.add(prompt, SamplingParams(max_tokens=70, ignore_eos=True, logprobs=0))
        with torch.inference_mode():
            while not req.finished:
                engine.step()
        return req.output, torch.tensor([x["logprob"] for x in req.logprobs])

    steps, one_step = [], extension.ext().decode_step
    monkeypatch.setattr(extension.ext(), "decode_step", lambda *a: steps.append(1) or one_step(*a))
    monkeypatch.setattr(extension.ext(), "decode_layer", lambda *a: calls.append(1) or one_call(*a))
    tokens, lp = run()
    assert type(model) is decode.HerdTransformer
    if kind == "llama4":
        experts = {"int4": kernels.HerdInt4Experts, "int8": kernels.HerdInt8Experts, "fp32": decode.HerdExperts}
        assert type(model.layers[1].feed_forward.experts) is experts[scheme]
    assert len(steps) == 69 and not calls, "every decode step in one call for all layers"
    # layer by layer (HerdBlock's decode_layer): the same C++ layers, so the same bits
    monkeypatch.setattr(decode.HerdTransformer, "forward", decode.Transformer.forward)
    layer_tokens, layer_lp = run()
    assert len(calls) == 69 * model.config.n_layers, "every decode step of every layer in one call"
    assert layer_tokens == tokens and torch.equal(layer_lp, lp)
    monkeypatch.setattr(decode.HerdBlock, "forward", decode.Block.forward)
    ref_tokens, ref_lp = run()
    assert tokens == ref_tokens
    assert len(set(ref_tokens)) > 5, "degenerate model: the comparison would prove little"
    # fp32: float error. int4 / int8: the prefill's keys differ from the twin's in their last bits (C++ vs torch
    # attention and norms), which can move an int16 activation level in every later step's kernels: measured up
    # to 2.2e-3 (int4) and 4e-4 (int8) over the 70 steps; a wrong slot, row or expert is O(1)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-4 if scheme == "fp32" else 5e-3)


def one_call_step(model, layer: int):
    """(the layer's HerdBlock, a batch-1 decode step's arguments for it at position 3: x, pos, rope, a cache whose
    rows are set as Engine._decode sets them) for a model swapped by use_decode_kernels here."""
    decode.use_decode_kernels(model)
    cache = Engine(model, max_batch=1, max_seq_len=64).cache
    cache.rows = slice(0, 1)
    rope = rope_angles(torch.tensor([[3]]), torch.ones(8))
    return model.layers[layer], (torch.randn(1, 1, 64), torch.tensor([[3]]), rope, cache)


@needs_kernels
def test_whole_layer_decode_refuses_a_slot_outside_the_cache():
    block, step = one_call_step(packed_tiny("llama3", "int4"), 0)
    args = list(block._one_call_args(*step))
    args[-4] = 64                                       # slot
    with pytest.raises(RuntimeError, match="do not fit a cache"):
        extension.ext().decode_layer(*args)


@needs_kernels
def test_whole_layer_arguments_follow_replaced_modules():
    """HerdBlock keeps decode_layer's per-layer arguments between steps: replacing a matrix, or moving the model to
    another dtype, must not leave the old tensors in them."""
    block, step = one_call_step(packed_tiny("llama3", "int4"), 0)
    assert block._one_call_args(*step)[8] is block.attention.wo.stream
    block.attention.wo = copy.deepcopy(block.attention.wo)
    assert block._one_call_args(*step)[8] is block.attention.wo.stream
    block.attention.wo = torch.nn.Linear(64, 64, bias=False)          # not a matrix decode_layer takes
    assert block._one_call_args(*step) is None
    fp32 = packed_tiny("llama3", "fp32")
    decode.use_decode_kernels(fp32)
    assert fp32.layers[0]._one_call_args(*step) is not None
    fp32.to(torch.bfloat16)                                             # HerdLinear's weights become bf16
    assert fp32.layers[0]._one_call_args(*step) is None


def stack_step(model, p: int = 3):
    """decode_step's arguments for a model swapped by use_decode_kernels, one token at position p in a fresh cache
    row: (stack, x, cos_sin, q_scales, k, v, pos, slots, n_slots, p)."""
    cache = Engine(model, max_batch=1, max_seq_len=64).cache
    cache.rows = slice(0, 1)
    k, v, pos, slot, n_slots = zip(*[cache.decode_slot(i, p) for i in range(len(model.layers))])
    rope = rope_angles(torch.tensor([[p]]), rope_frequencies(model.config, "cpu"))
    attns = [layer.attention for layer in model.layers]
    return [model._layer_stack(), torch.randn(1, model.config.dim), attns[0].cos_sin(rope),
            [a.q_scale(p) for a in attns], list(k), list(v), list(pos), list(slot), list(n_slots), p]


@needs_kernels
def test_layer_stack_follows_replaced_modules():
    """HerdTransformer keeps its LayerStack between steps: replacing a matrix rebuilds it; a matrix the C++ layer
    cannot take, or another dtype, drops it and decoding runs the layers' own forward; the matrix put back gives the
    first tokens again."""
    model = packed_tiny("llama4", "int4")
    decode.use_decode_kernels(model)
    stack = model._layer_stack()
    assert stack is not None and len(stack) == model.config.n_layers and model._layer_stack() is stack
    model.layers[2].attention.wo = copy.deepcopy(model.layers[2].attention.wo)
    assert model._layer_stack() is not stack and model._layer_stack() is not None
    prompt = list(range(3, 23))

    def tokens():
        engine = Engine(model, max_batch=1)
        req = engine.add(prompt, SamplingParams(max_tokens=20, ignore_eos=True))
        with torch.inference_mode():
            while not req.finished:
                engine.step()
        return req.output

    before = tokens()
    twin = copy.deepcopy(model)                         # after a step: the copy builds its own stack
    assert type(twin) is decode.HerdTransformer and twin._stack is None
    model, original = twin, model
    assert tokens() == before and model._layer_stack() is not original._layer_stack()
    model = original
    wo = model.layers[2].attention.wo
    model.layers[2].attention.wo = torch.nn.Linear(64, 64, bias=False)      # not a matrix decode_layer takes
    assert model._layer_stack() is None
    assert len(tokens()) == 20                                          # through Transformer.forward
    model.layers[2].attention.wo = wo
    assert model._layer_stack() is not None and tokens() == before
    fp32 = packed_tiny("llama3", "fp32")
    decode.use_decode_kernels(fp32)
    assert fp32._layer_stack() is not None
    fp32.to(torch.bfloat16)                                             # HerdLinear's weights become bf16
    assert fp32._stack is None and fp32._layer_stack() is None


@needs_kernels
def test_decode_step_refuses_bad_input():
    model = packed_tiny("llama4", "int4")
    decode.use_decode_kernels(model)
    args = stack_step(model)
    out = extension.ext().decode_step(*args)
    assert out.shape == (1, model.config.dim) and torch.isfinite(out).all()
    bad = list(args)
    bad[4] = bad[4][:-1]                                                # a cache row short
    with pytest.raises(RuntimeError, match="layers"):
        extension.ext().decode_step(*bad)
    bad = list(args)
    bad[7] = [64] * len(args[7])                                        # slot outside the cache
    with pytest.raises(RuntimeError, match="do not fit a cache"):
        extension.ext().decode_step(*bad)
    bad = list(args)
    bad[4] = [torch.zeros(64, 1, 16)] * len(args[4])                    # the cache holds other heads
    bad[5] = [torch.zeros(64, 1, 16)] * len(args[5])
    with pytest.raises(RuntimeError, match="kv heads"):
        extension.ext().decode_step(*bad)
    bad = list(args)
    bad[1] = torch.randn(1, model.config.dim + 1)
    with pytest.raises(RuntimeError, match="row"):
        extension.ext().decode_step(*bad)
    with pytest.raises(RuntimeError, match="33 items"):
        extension.ext().layer_stack([(1, 2, 3)])


@needs_kernels
def test_whole_layer_decode_refuses_mismatched_shapes():
    block, step = one_call_step(packed_tiny("llama4", "fp32"), 1)
    assert type(block.feed_forward.experts) is decode.HerdExperts
    args = list(block._one_call_args(*step))
    bad = list(args)
    bad[21] = args[21][:2]                              # experts_w13 with 2 of the router's 4 experts
    with pytest.raises(RuntimeError, match="router's 4 outputs"):
        extension.ext().decode_layer(*bad)
    bad = list(args)
    bad[25] = args[25] * 2                              # an expert hidden dim the matrices do not have
    with pytest.raises(RuntimeError, match="experts_w13 has 128 outputs, expected 256"):
        extension.ext().decode_layer(*bad)
    bad = list(args)
    bad[30] = args[30] + args[31]                       # more query heads than wqkv has outputs for
    with pytest.raises(RuntimeError, match="do not match wqkv's"):
        extension.ext().decode_layer(*bad)
    bad = list(args)
    bad[1] = args[1][:-1]                               # a norm weight one short
    with pytest.raises(RuntimeError, match=r"attn_norm must be a contiguous fp32 \(64,\)"):
        extension.ext().decode_layer(*bad)
    extension.ext().decode_layer(*args)                    # the untouched arguments run


@needs_kernels
def test_whole_layer_decode_refuses_mismatched_quantized_experts():
    block, step = one_call_step(packed_tiny("llama4", "int8"), 1)
    args = list(block._one_call_args(*step))
    assert args[21] is block.feed_forward.experts.w13
    bad = list(args)
    bad[24] = args[24][:3]                              # row scales of 3 of the 4 experts
    with pytest.raises(RuntimeError, match=r"experts_w2 must stack one expert per router output \(the router's 4"):
        extension.ext().decode_layer(*bad)
    bad = list(args)
    bad[22] = args[22][:, :-16].contiguous()            # each expert's gate/up row scales 16 short
    with pytest.raises(RuntimeError, match="experts_w13 has 112 row scales, expected 128"):
        extension.ext().decode_layer(*bad)
    extension.ext().decode_layer(*args)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M, K, N", [(1, 64, 48), (1, 37, 20), (3, 130, 77), (4, 512, 768), (1, 512, 16)])
def test_fp32_mm_matches_torch(M, K, N, threads):
    """fp32_mm (HerdLinear / HerdExperts at decode sizes) against x @ w_t: shapes with tails in both dims (rows of
    w_t are taken 4 at a time, outputs 16 at a time), 1-3 threads (each sums its own range of inputs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(M * K + N)
        x, w_t = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
        torch.testing.assert_close(ext().fp32_mm(x, w_t), x @ w_t, rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RuntimeError, match=r"w_t must be a contiguous fp32 \(64, N\)"):
        ext().fp32_mm(torch.randn(1, 64), torch.randn(48, 64))


@needs_kernels
def test_herd_modules_fall_back_to_their_twins_off_the_decode_path():
    """Prefill (many tokens), batches with padding and bf16 activations run the plain modules' code."""
    plain = fuse_model(tiny("llama4"))
    herd_model = copy.deepcopy(plain)
    decode.use_decode_kernels(herd_model)
    tokens = torch.randint(3, 512, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(herd_model(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
        bf = copy.deepcopy(herd_model).to(torch.bfloat16)
        assert bf(tokens).dtype == torch.float32
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    norm = herd_model.layers[0].attention_norm
    torch.testing.assert_close(norm(x), RMSNorm.forward(norm, x))


@needs_kernels
def test_herd_linear_and_experts_match_their_twins():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 80, bias=False)
    herd_lin = decode.HerdLinear(lin.weight.detach().t().contiguous())
    experts = Transformer(preset("debug")).layers[1].feed_forward.experts.to_empty(device="cpu")
    for w in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(w, std=0.3)
    herd_experts = decode.HerdExperts(experts)
    with torch.no_grad():
        for n in (1, 7):
            x = torch.randn(n, 48)
            torch.testing.assert_close(herd_lin(x), lin(x), rtol=1e-5, atol=1e-5)
            x = torch.randn(n, 64)
            idx, gate = torch.randint(0, 4, (n, 1)), torch.rand(n, 1)
            torch.testing.assert_close(herd_experts(x, idx, gate), experts(x, idx, gate), rtol=1e-5, atol=1e-5)


def test_use_decode_kernels_is_a_no_op_where_the_extension_cannot_run(monkeypatch):
    monkeypatch.setattr(extension, "_ext", None)           # as extension.ext() leaves it where the build fails
    monkeypatch.setattr(extension, "_status", "off: the test says so")
    model = fuse_model(tiny("llama4"))
    assert decode.use_decode_kernels(model) == 0
    assert not any(type(m).__module__ == "herd.cpu.decode" for m in model.modules())


def test_host_temperature_matches_model():
    """HerdAttention computes the NoPE q scale on the host; the model computes it in torch."""
    from herd.model import attention_temperature
    model = fuse_model(tiny("llama4"))
    nope = next(layer.attention for layer in model.layers if layer.attention.spec.temperature_tuning)
    attn = decode.retype(nope, decode.HerdAttention, ())
    for p in (0, 6, 7, 8, 100, 8191, 8192, 10 ** 6):
        _, host = attn.rotation_and_q_scale(None, p)
        ref = float(attention_temperature(torch.tensor([[p]]), attn.floor_scale, attn.attn_scale))
        assert abs(host - ref) < 1e-6 and (p < 7 or host > 1.0), p
