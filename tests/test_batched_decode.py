"""Batched decode on herd's one-call layer (decode.cpp's decode_layer_rows): against its twin Block.forward layer by
layer, and through the engine against each prompt decoded alone, token for token."""
import copy

import pytest
import torch

from herd.cpu import decode, extension
from herd.engine import ContextLengthError, Engine, SamplingParams
from herd.model import rope_angles, rope_frequencies

from test_decode import needs_kernels, packed_tiny

LENGTHS = [3, 40, 17, 1, 29, 16, 9, 33, 22, 5, 12, 31, 2, 19, 26, 8, 36]      # ragged, rings wrapped or not

# int4/int8 kernels vs the torch twin, as a fraction of the layer's largest output: one int16 activation level
# moved by a last-bit difference (see below); a real error (a wrong row, slot or expert) is O(1) of it
QUANT_ATOL = 5e-4


def prompts(n: int, lengths=LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 512, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def prefilled(model, n_rows: int, lengths=LENGTHS) -> Engine:
    """An engine whose n_rows cache rows hold prompts of ragged lengths, every one prefilled."""
    engine = Engine(model, max_batch=n_rows, max_seq_len=4096, step_tokens=4096)
    reqs = [engine.add(p, SamplingParams(max_tokens=64, ignore_eos=True)) for p in prompts(n_rows, lengths)]
    with torch.inference_mode():
        while any(not r.output for r in reqs):
            engine.step()
    return engine


def decode_step(model, engine: Engine, rows: list[int]):
    """x (B, 1, dim), pos (B, 1), rope of a decode step of these cache rows, each at its next position."""
    g = torch.Generator().manual_seed(len(rows))
    pos = torch.tensor([[len(engine.rows[r].prompt) + len(engine.rows[r].output) - 1] for r in rows])
    x = torch.randn(len(rows), 1, model.config.dim, generator=g)
    return x, pos, rope_angles(pos, rope_frequencies(model.config))


@needs_kernels
@pytest.mark.parametrize("kind", ["llama4", "llama3"])
@pytest.mark.parametrize("scheme", ["int4", "int8", "fp32"])
@pytest.mark.parametrize("B", [1, 2, 5, 16])
def test_decode_layer_rows_matches_block_forward(kind, scheme, B):
    """Every layer (llama4: chunked ring layers, a NoPE layer with temperature, MoE layers) on B rows picked out of
    order from a 17-row cache of ragged lengths: the one C++ call against Block.forward on a copy of the cache, the
    layer's output and every cache buffer it wrote."""
    model = packed_tiny(kind, scheme)
    assert decode.use_decode_kernels(model) > 0
    engine = prefilled(model, 17)
    rows = [16, 3, 9, 0, 5, 11, 1, 14, 7, 2, 12, 4, 15, 8, 10, 6][:B]
    x, pos, rope = decode_step(model, engine, rows)
    cache = engine.cache
    cache.rows = torch.tensor(rows)
    with torch.inference_mode():
        for layer in model.layers:
            twin_cache = copy.deepcopy(cache)
            args = layer._rows_call_args(x, pos, rope, cache)
            assert args is not None, "the layer must take the one call"
            got = extension.ext().decode_layer_rows(*args).view_as(x)
            ref = decode.Block.forward(layer, x, pos, rope, twin_cache)
            # the kernels quantize activations to int16 per 32 inputs: a last-bit difference before a matmul (C++
            # vs torch attention) can move one input by a level, ~1e-5 of the layer's largest output, more where
            # SiLU gating multiplies it; AVX-512 sums in another order than AVX2 (seen: 2.2e-4 on Zen 4)
            scale = float(ref.abs().max())
            torch.testing.assert_close(got, ref, rtol=0, atol=(2e-6 if scheme == "fp32" else QUANT_ATOL) * scale)
            i = layer.attention.layer_id
            torch.testing.assert_close(cache.k[i], twin_cache.k[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache.v[i], twin_cache.v[i], rtol=1e-5, atol=1e-5)
            assert torch.equal(cache.pos[i], twin_cache.pos[i])
            x = ref


@needs_kernels
@pytest.mark.parametrize("kind", ["llama4", "llama3"])
@pytest.mark.parametrize("scheme", ["int4", "fp32"])
@pytest.mark.parametrize("row, T", [(0, 12), (2, 7), (1, 31)])
def test_prefill_piece_as_rows_matches_block_forward(kind, scheme, row, T):
    """A prefill piece, T new tokens of one sequence after its prompt (row 0: positions 3-14, row 2: 17-23, row 1:
    40-70), as T rows of its one cache row through decode_layer_rows (KVCache.piece_slots) against Block.forward,
    layer by layer: output and the cache buffers written. llama4's rings hold 16-token chunks: row 1's piece leaves
    its chunk, which those layers refuse (None: the twin runs them); its NoPE layer still takes the rows."""
    model = packed_tiny(kind, scheme)
    assert decode.use_decode_kernels(model) > 0
    engine = prefilled(model, 3)
    cache = engine.cache
    cache.rows = slice(row, row + 1)
    start = len(engine.rows[row].prompt)
    pos = torch.arange(start, start + T)[None]
    x = torch.randn(1, T, model.config.dim, generator=torch.Generator().manual_seed(T))
    assert piece_through_layers(model, cache, x, pos, 2e-6 if scheme == "fp32" else QUANT_ATOL) >= 1


def piece_through_layers(model, cache, x, pos, atol: float) -> int:
    """The piece x (1, T, dim) at positions pos (1, T) through every layer as T rows of its one cache row
    (decode_layer_rows) against Block.forward on a copy of the cache, layer by layer: the output (within atol of its
    largest value) and the keys, values and positions written. A ring layer must refuse a piece that leaves its
    16-token chunk (the twin runs it there). Returns how many layers took the rows."""
    rope = rope_angles(pos, rope_frequencies(model.config))
    leaves_chunk = int(pos[0, 0]) // 16 != int(pos[0, -1]) // 16
    taken = 0
    with torch.inference_mode():
        for layer in model.layers:
            i = layer.attention.layer_id
            twin_cache = copy.deepcopy(cache)
            ref = decode.Block.forward(layer, x, pos, rope, twin_cache)
            args = layer._piece_call_args(x, pos, rope, cache)
            if cache.ring[i] and leaves_chunk:
                assert args is None
                decode.Block.forward(layer, x, pos, rope, cache)
            else:
                assert args is not None, "the piece must take the rows"
                taken += 1
                got = extension.ext().decode_layer_rows(*args).view_as(x)
                torch.testing.assert_close(got, ref, rtol=0, atol=atol * float(ref.abs().max()))
                torch.testing.assert_close(cache.k[i], twin_cache.k[i], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(cache.v[i], twin_cache.v[i], rtol=1e-5, atol=1e-5)
                assert torch.equal(cache.pos[i], twin_cache.pos[i])
            x = ref
    return taken


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def long_prompt_engine(request):
    """(model, engine) on 1 or 2 torch threads: the tiny llama4 int4 model with the decode kernels, its three cache
    rows prefilled with 2100, 7 and 300 tokens (long enough that attention splits its keys over the threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        model = packed_tiny("llama4", "int4")
        decode.use_decode_kernels(model)
        yield model, prefilled(model, 3, lengths=[2100, 7, 300])
    finally:
        torch.set_num_threads(before)


@needs_kernels
def test_prefill_piece_after_a_long_prompt_matches_block_forward(long_prompt_engine):
    """A 12-token piece after a 2100-token prompt: its rows attend together over their shared cache row, each key read
    once for all of them, in key ranges split over the threads (or on one): layer by layer against Block.forward."""
    model, engine = long_prompt_engine
    cache = engine.cache
    cache.rows = slice(0, 1)
    pos = torch.arange(2100, 2112)[None]                           # inside one 16-token chunk of the ring layers
    x = torch.randn(1, 12, model.config.dim, generator=torch.Generator().manual_seed(5))
    assert piece_through_layers(model, cache, x, pos, QUANT_ATOL) == len(model.layers)


@needs_kernels
def test_decode_layer_rows_long_context_equals_each_row_alone(long_prompt_engine):
    """A NoPE layer's 2100-slot cache row is attended in key ranges split over the threads at batch 1 and on one
    thread inside a batch (the rows are on the threads): the same bits either way, and the twin's numbers."""
    model, engine = long_prompt_engine
    rows = [0, 1, 2]
    x, pos, rope = decode_step(model, engine, rows)
    layer = model.layers[3]
    assert layer.attention.spec.temperature_tuning and not layer.attention.spec.chunked
    with torch.inference_mode():
        alone = []
        for b, r in enumerate(rows):
            one = copy.deepcopy(engine.cache)
            one.rows = slice(r, r + 1)
            alone.append(extension.ext().decode_layer(*layer._one_call_args(x[b:b + 1], pos[b:b + 1],
                                                                              rope[b:b + 1], one)))
        twin = copy.deepcopy(engine.cache)
        engine.cache.rows = twin.rows = slice(0, 3)
        got = extension.ext().decode_layer_rows(*layer._rows_call_args(x, pos, rope, engine.cache))
        ref = decode.Block.forward(layer, x, pos, rope, twin)
    assert torch.equal(got, torch.cat(alone))
    torch.testing.assert_close(got.view_as(ref), ref, rtol=0, atol=QUANT_ATOL * float(ref.abs().max()))


def staggered(model, prompt_list, params, max_batch=None) -> tuple[list[list[int]], list]:
    """Every prompt through one engine, admitted one per step (so each is prefilled alone and in one piece, exactly
    as a solo run prefills it: a step's prefill budget is fixed, not measured) while the earlier ones decode as a
    batch of ragged lengths; their outputs and logprobs."""
    engine = Engine(model, max_batch=max_batch or len(prompt_list), step_tokens=4096)
    reqs = []
    with torch.inference_mode():
        for p, prm in zip(prompt_list, params):
            reqs.append(engine.add(p, prm))
            engine.step()
        while engine.has_work():
            engine.step()
    return [r.output for r in reqs], [[x["logprob"] for x in r.logprobs] for r in reqs]


def alone(model, prompt_list, params):
    out = [staggered(model, [p], [prm]) for p, prm in zip(prompt_list, params)]
    return [o[0][0] for o in out], [o[1][0] for o in out]


@needs_kernels
@pytest.mark.parametrize("kind", ["llama4", "llama3"])
@pytest.mark.parametrize("scheme", ["int4", "int8", "fp32"])
def test_engine_batched_greedy_equals_alone(kind, scheme, monkeypatch):
    """Five ragged prompts decoded together (rows leave at different times, so the running rows stop being
    consecutive: the cache rows go as an index tensor) give each prompt's solo tokens and logprobs exactly: every
    kernel computes a row the same way whatever rows run beside it."""
    model = packed_tiny(kind, scheme)
    assert decode.use_decode_kernels(model) > 0
    prompt_list = prompts(5, [5, 33, 18, 1, 24])
    params = [SamplingParams(max_tokens=n, ignore_eos=True, logprobs=0) for n in (30, 12, 40, 25, 35)]
    calls = []
    rows_call = extension.ext().decode_layer_rows
    # rows of distinct cache rows: decode steps (a prefill piece's rows share one cache row: KVCache.piece_slots)
    record = lambda *a: calls.append(int(a[-5].unique().numel())) or rows_call(*a)        # noqa: E731
    monkeypatch.setattr(extension.ext(), "decode_layer_rows", record)
    tokens, logprobs = staggered(model, prompt_list, params)
    assert max(calls) == 5 and 2 in calls, "batched steps of 5 down to 2 rows took the one call"
    ref_tokens, ref_logprobs = alone(model, prompt_list, params)
    assert tokens == ref_tokens
    assert logprobs == ref_logprobs
    assert all(len(set(t)) > 3 for t in ref_tokens), "degenerate model: the comparison would prove little"


@needs_kernels
def test_engine_batched_with_twin_layers_equals_alone():
    """The torch twin path (Block.forward) with the running rows as an index tensor: batched == alone."""
    model = packed_tiny("llama4", "int4")
    decode.use_decode_kernels(model)
    for layer in model.layers:
        layer.forward = lambda *a, layer=layer: decode.Block.forward(layer, *a)
    prompt_list = prompts(3, [5, 20, 9])
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (20, 6, 20)]
    tokens, _ = staggered(model, prompt_list, params)
    ref_tokens, _ = alone(model, prompt_list, params)
    assert tokens == ref_tokens


@needs_kernels
def test_decode_slots_raises_past_the_context():
    model = packed_tiny("llama3", "int4")
    decode.use_decode_kernels(model)
    cache = Engine(model, max_batch=2, max_seq_len=64).cache
    cache.rows = torch.tensor([1, 0])
    with pytest.raises(ContextLengthError, match="position 64 is past the cache's 64 slots"):
        cache.decode_slots(0, torch.tensor([[3], [64]]))
    assert cache.decode_slots(0, torch.tensor([[3], [-1]])) is None, "a padding row: the twin's job"
    k, v, pos, rows, slots, n_slots = cache.decode_slots(0, torch.tensor([[3], [63]]))
    assert rows.tolist() == [1, 0] and slots.tolist() == [3, 63] and n_slots.tolist() == [4, 64]


def test_decode_slot_all_is_decode_slot_for_every_layer():
    """The one-call step's cache rows: decode_slot layer by layer (the same views, slots and counts; ring layers
    wrap, global ones count p + 1), the same refusals (past the context, several rows, int8 keys)."""
    from herd.config import preset
    from herd.model import Transformer
    cfg = preset("debug")                                  # chunked ring layers of 16 and a global NoPE layer
    model = Transformer(cfg)
    cache = Engine(model, max_batch=2, max_seq_len=64).cache
    cache.rows = slice(1, 2)
    for p in (0, 21, 63):
        k, v, pos, slots, n_slots = cache.decode_slot_all(p)
        for i in range(cfg.n_layers):
            one = cache.decode_slot(i, p)
            assert all(a.data_ptr() == b.data_ptr() and a.shape == b.shape for a, b in zip((k[i], v[i], pos[i]), one))
            assert (slots[i], n_slots[i]) == one[3:]
    assert any(r for r in cache.ring) and not all(cache.ring)
    with pytest.raises(ContextLengthError, match="position 64 is past the cache's 64 slots"):
        cache.decode_slot_all(64)
    cache.rows = slice(0, 2)
    assert cache.decode_slot_all(3) is None
    int8 = Engine(model, max_batch=1, max_seq_len=64, kv_int8=True).cache
    int8.rows = slice(0, 1)
    assert int8.decode_slot_all(3) is None


@needs_kernels
def test_decode_layer_rows_refuses_bad_rows():
    model = packed_tiny("llama3", "int4")
    decode.use_decode_kernels(model)
    engine = prefilled(model, 3)
    rows = [2, 0]
    x, pos, rope = decode_step(model, engine, rows)
    engine.cache.rows = torch.tensor(rows)
    args = list(model.layers[0]._rows_call_args(x, pos, rope, engine.cache))
    ext = extension.ext()
    for i, value, message in [(-5, torch.tensor([2, 2]), "its slot .* is taken by an earlier row"),
                              (-5, torch.tensor([2, 3]), "outside the cache's 3 rows"),
                              (-4, torch.tensor([4000, 4096]), "slot 4096 / 4097 slots"),
                              (-2, torch.tensor([5]), r"pos must be a contiguous Long \(2,\)"),
                              (-9, torch.tensor([1.0]), r"q_scale must be a contiguous Float \(2,\)")]:
        bad = list(args)
        bad[i] = value
        if i == -4:
            bad[-3] = value + 1                         # n_slots
        if message.startswith("its slot"):              # rows may share a cache row (a prefill piece), not a slot
            bad[-4] = args[-4][:1].repeat(2)
            bad[-3] = torch.maximum(bad[-4] + 1, args[-3])
        with pytest.raises(RuntimeError, match=message):
            ext.decode_layer_rows(*bad)
    ext.decode_layer_rows(*args)


@needs_kernels
def test_default_model_batched_equals_alone(monkeypatch):
    """SmolLM2-135M (packed Q4_1, as `herd run` loads it): four chat-sized prompts decoded as a batch give each
    prompt's solo greedy tokens and logprobs, every layer in one decode_layer_rows call."""
    import herd
    from herd.textgen import default_model_path
    from herd.tokenizer import load_tokenizer
    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = herd.load(path, quant="packed", prepare=True)
    tok = load_tokenizer(path)
    texts = ["The capital of France is", "def fibonacci(n):", "Llamas are", "1, 2, 3, 4,"]
    prompt_list = [tok.encode(t) for t in texts]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, logprobs=0) for n in (12, 8, 12, 10)]
    calls = []
    rows_call = extension.ext().decode_layer_rows
    record = lambda *a: calls.append(int(a[-5].unique().numel())) or rows_call(*a)        # noqa: E731
    monkeypatch.setattr(extension.ext(), "decode_layer_rows", record)                   # distinct cache rows
    tokens, logprobs = staggered(model, prompt_list, params)
    assert max(calls) == 4 and len(calls) % model.config.n_layers == 0
    ref_tokens, ref_logprobs = alone(model, prompt_list, params)
    assert tokens == ref_tokens
    assert logprobs == ref_logprobs


@needs_kernels
def test_many_rows_take_the_dequantized_twin(monkeypatch):
    """From kernels.DEQUANT_ROWS rows on the packed modules' dense matmuls are faster than the kernels: the layer
    leaves such steps to Block.forward."""
    from herd.cpu import kernels
    model = packed_tiny("llama3", "int4")
    decode.use_decode_kernels(model)
    engine = prefilled(model, 5)
    x, pos, rope = decode_step(model, engine, [0, 1, 2, 3, 4])
    engine.cache.rows = slice(0, 5)
    assert model.layers[0]._rows_call_args(x, pos, rope, engine.cache) is not None
    monkeypatch.setattr(kernels, "DEQUANT_ROWS", 5)
    assert model.layers[0]._rows_call_args(x, pos, rope, engine.cache) is None


def test_decode_slots_follow_new_positions_and_rows():
    """decode_slots computes its per-row tensors once per step and kind of layer: new positions, positions changed
    in place, or new rows must not get the last step's."""
    from test_decode import tiny
    cache = Engine(tiny("llama4"), max_batch=3, max_seq_len=64).cache
    cache.rows = torch.tensor([2, 0])
    pos = torch.tensor([[3], [20]])
    ring, nope = cache.decode_slots(0, pos), cache.decode_slots(3, pos)
    assert ring[4].tolist() == [3, 4] and ring[5].tolist() == [16, 16]            # slots in a 16-slot ring
    assert nope[4].tolist() == [3, 20] and nope[5].tolist() == [4, 21]
    assert cache.decode_slots(1, pos)[4] is ring[4]                                  # the same step: reused
    pos[1, 0] = 21
    assert cache.decode_slots(3, pos)[4].tolist() == [3, 21]
    cache.rows = torch.tensor([1, 0])
    assert cache.decode_slots(3, pos)[3].tolist() == [1, 0]
    assert cache.decode_slots(3, torch.tensor([[5], [6]]))[4].tolist() == [5, 6]
