"""bench/scout_gguf.py: the Scout-shaped llama4 GGUF and its HF twin, at a small width (CI), read by herd (packed and
dequantized), transformers and llama.cpp; bench/roofline.py's byte counts on the same file."""
import numpy as np
import pytest
import torch

import herd
from bench.roofline import gguf_weight_bytes_per_token, kv_read_bytes, module_weight_bytes_per_token
from bench.scout_gguf import scout_config, tensor_specs, write_scout_gguf
from herd.cpu.hugepages import move_to_huge_pages
from herd.model import rope_frequencies
from herd.textgen import default_model_path

try:                                   # the generator's tokenizer comes from the default model's GGUF
    default_model_path()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

# Scout's layer pattern at a small width: 4 layers (NoPE on the 4th), 4 routed experts + a shared one, 2 KV heads
SMALL = dict(layers=4, vocab=512, dim=256, n_heads=4, n_kv_heads=2, head_dim=64, experts=4, expert_dim=256,
             ffn_dim=512)
IDS = torch.randint(3, 512, (1, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """qtype -> (GGUF path, HF twin folder), written once per module."""
    d = tmp_path_factory.mktemp("scout")
    cfg = scout_config(**SMALL)
    return {q: (write_scout_gguf(d / f"{q}.gguf", cfg, q, seed=0, hf_dir=d / f"{q}_hf", log=lambda _: None),
                d / f"{q}_hf") for q in ("Q4_0", "Q4_1", "Q8_0")}


def test_scout_layout_read_back(files):
    """herd reads back Scout's per-layer facts: chunked RoPE + QK-norm on 3 layers of 4, NoPE with temperature tuning
    on the 4th, every layer MoE, llama3-scaled RoPE (factor 16) from rope_freqs."""
    gguf, _ = files["Q4_0"]
    cfg = herd.load(gguf).config
    want = scout_config(**SMALL)
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == (256, 4, 2, 64, 512)
    assert (cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.expert_dim) == (4, 1, 256)
    assert [(s.uses_rope, s.chunked, s.qk_norm, s.temperature_tuning, s.is_moe) for s in cfg.layers] == \
        [(True, True, True, False, True)] * 3 + [(False, False, False, True, True)]
    assert cfg.attn_chunk_size == 8192 and cfg.floor_scale == 8192 and cfg.attn_scale == 0.1
    torch.testing.assert_close(rope_frequencies(cfg), rope_frequencies(want), rtol=1e-6, atol=0)
    assert max(cfg.rope_freq_factors) == 16.0 and min(cfg.rope_freq_factors) == 1.0


def test_width_flags_keep_scout_shapes():
    """At the default flags every layer tensor has Scout's exact shape (spec section 3), only depth and vocab shrink."""
    shapes = {s.gguf_name: s.shape for s in tensor_specs(scout_config(layers=1, vocab=1024), "Q4_0")}
    assert shapes["blk.0.attn_q.weight"] == (5120, 5120) and shapes["blk.0.attn_k.weight"] == (1024, 5120)
    assert shapes["blk.0.ffn_gate_exps.weight"] == (16, 8192, 5120)
    assert shapes["blk.0.ffn_down_exps.weight"] == (16, 5120, 8192)
    assert shapes["blk.0.ffn_up_shexp.weight"] == (8192, 5120) and shapes["blk.0.ffn_gate_inp.weight"] == (16, 5120)
    assert shapes["token_embd.weight"] == (1024, 5120) and shapes["output.weight"] == (1024, 5120)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_twin_is_the_gguf_dequantized(files, qtype):
    """The HF twin holds exactly the GGUF's dequantized values: herd gives identical logits from both, and
    transformers on the twin matches herd on the GGUF within 1e-3 (fp32)."""
    transformers = pytest.importorskip("transformers")
    gguf, hf = files[qtype]
    with torch.inference_mode():
        from_gguf = herd.load(gguf)(IDS)
        torch.testing.assert_close(herd.load(hf)(IDS), from_gguf, rtol=0, atol=0)
        ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(IDS).logits
    assert (ref - from_gguf).abs().max() <= 1e-3


def position_errors(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative L2 error of each position's logits, (T, V) -> (T,)."""
    return (got - ref).norm(dim=-1) / ref.norm(dim=-1)


def assert_close_but_for_router_flips(err: torch.Tensor, tol: float, what: str):
    """Top-1 routing is discontinuous: where a token's two best router logits nearly tie, quantization noise picks
    the other expert and that position's logits move by ~25% (seen at up to 3 of 20 positions). So: the median
    position within tol, and at least 3 positions in 4."""
    assert err.median() <= tol and (err <= tol).float().mean() >= 0.75, \
        f"{what}: per-position relative errors {[round(e, 4) for e in err.tolist()]}, tolerance {tol}"


def llamacpp_logits(llama_cpp, gguf, ids: list[int], f32_cache=False) -> torch.Tensor:
    """Every position's logits (T, V) from llama.cpp, 1 thread."""
    kw = dict(type_k=0, type_v=0) if f32_cache else {}                 # GGML_TYPE_F32 keys and values
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(ids) + 16, n_batch=len(ids), logits_all=True,
                          n_threads=1, n_threads_batch=1, verbose=False, **kw)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


# herd's packed modules vs the dequantized GGUF. Q4_0/Q4_1: scales (and zeros) rounded to bf16, bf16 activations in
# torch's int4 matmul (measured median 0.8%); Q8_0: blocks re-quantized to one int8 scale per row (2.3%).
PACKED_TOL = {"Q4_0": 0.015, "Q4_1": 0.015, "Q8_0": 0.035}


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_packed_close_to_dequantized(files, qtype):
    """The routed experts stay packed (Int4Experts / Int8Experts, as herd quantize leaves them; a Scout layer's
    experts would be 8 GB in fp32) and the model computes what the dequantized one does."""
    from herd.sizes import resident_bytes as weight_bytes
    from herd.quantize import Int4Experts, Int8Experts

    gguf, _ = files[qtype]
    packed = herd.load(gguf, quant="packed")
    kind = Int8Experts if qtype == "Q8_0" else Int4Experts
    assert all(type(layer.feed_forward.experts) is kind for layer in packed.layers)
    # resident weights vs the file: bf16 scale (+ zero) per 32 weights instead of f16, an fp32 Q4 embedding
    assert weight_bytes(packed) <= 1.3 * gguf.stat().st_size
    with torch.inference_mode():
        ref = herd.load(gguf)(IDS)[0]
        got = packed(IDS)[0]
    assert_close_but_for_router_flips(position_errors(got, ref), PACKED_TOL[qtype], f"{qtype} packed vs dequantized")


def test_q4_0_streams_hold_the_files_bytes(files):
    """A Q4_0 file's matrices become symmetric int4 streams (its zero points are all 0, so none are stored): the
    decode kernels read exactly the bytes the file holds for them (18 per 32 weights), where a stream with zero
    points would read 20. The token embedding is the one Q4_0 tensor herd keeps in fp32 (rows are gathered)."""
    from gguf import GGUFReader
    from herd.cpu import extension
    from herd.cpu.kernels import HerdInt4Experts, HerdInt4Linear, use_herd_kernels

    if not extension.available():
        pytest.skip(f"herd kernels {extension.status()}")
    gguf, _ = files["Q4_0"]
    model = herd.load(gguf, quant="packed")
    assert use_herd_kernels(model) > 0
    streams = [m.stream for m in model.modules() if isinstance(m, HerdInt4Linear)]
    streams += [w for m in model.modules() if isinstance(m, HerdInt4Experts) for w in (m.w13, m.w2)]
    file_bytes = sum(int(t.n_bytes) for t in GGUFReader(gguf).tensors
                     if t.tensor_type.name == "Q4_0" and t.name != "token_embd.weight")
    assert sum(s.numel() for s in streams) == file_bytes


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_llamacpp_same_logits(files, qtype):
    """llama.cpp on the quantized file vs herd on its dequantized weights: llama.cpp rounds each quantized matmul's
    input to 8 bits (Q8_0 / Q8_1 blocks) and keeps K/V in f16 (measured median 1.7% for all three types)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    gguf, _ = files[qtype]
    theirs = llamacpp_logits(llama_cpp, gguf, IDS[0].tolist())
    with torch.inference_mode():
        ours = herd.load(gguf)(IDS)[0]
    assert_close_but_for_router_flips(position_errors(theirs, ours), 0.03, f"{qtype} llama.cpp vs herd")


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    return write_scout_gguf(tmp_path_factory.mktemp("scout_f32") / "f32.gguf", scout_config(**SMALL), "F32",
                            log=lambda _: None)


def test_llamacpp_exact_on_f32(f32_gguf):
    """Unquantized weights and an f32 cache: llama.cpp and herd compute the same function (every Scout feature
    wired the same way: QK-norm after RoPE, rope_freqs, sigmoid gate on the expert input, shared expert)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    theirs = llamacpp_logits(llama_cpp, f32_gguf, IDS[0].tolist(), f32_cache=True)
    with torch.inference_mode():
        ours = herd.load(f32_gguf)(IDS)[0]
    assert (theirs - ours).abs().max() <= 1e-4


@pytest.mark.slow
def test_llamacpp_exact_across_chunk_boundary(f32_gguf):
    """8200 tokens: past position 8191 the RoPE layers start a new 8192-token chunk and the NoPE layer's temperature
    tuning scales q by 1 + 0.1 ln 2. Measured max abs difference 2.4e-4 on logits of magnitude ~5 (fp32 sums over
    8192 keys in two orders)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = torch.randint(3, 512, (1, 8200), generator=torch.Generator().manual_seed(2))
    theirs = llamacpp_logits(llama_cpp, f32_gguf, ids[0].tolist(), f32_cache=True)
    with torch.inference_mode():
        ours = herd.load(f32_gguf)(ids)[0]
    assert (theirs - ours).abs().max() <= 1e-3


def test_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="qtype 'Q5_K'"):
        write_scout_gguf(tmp_path / "x.gguf", scout_config(**SMALL), "Q5_K")
    with pytest.raises(ValueError, match="not a multiple of 32"):
        write_scout_gguf(tmp_path / "x.gguf", scout_config(**{**SMALL, "dim": 240, "n_heads": 4, "head_dim": 60}))


def test_bytes_per_token(files):
    """llama.cpp reads one routed expert of E, the whole of every other matrix and one embedding row; herd's count on
    the dequantized model is the same tensors at 4 bytes a weight; transformers' runs every expert."""
    gguf, _ = files["Q8_0"]
    cfg = scout_config(**SMALL)
    D, F, E, V = cfg.dim, cfg.moe.expert_dim, cfg.moe.n_experts, cfg.vocab_size
    attn = D * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * D
    per_layer_matrices = attn + 3 * D * F * 2                      # attention + shared expert + one routed expert
    vectors = cfg.n_layers * (2 * D + E * D) + D + cfg.head_dim // 2    # F32: norms, router, final norm, rope_freqs
    q8 = 34 / 32                                                           # bytes per weight in Q8_0
    want = (cfg.n_layers * per_layer_matrices + V * D + D) * q8 + vectors * 4  # + output head, one embedding row
    assert gguf_weight_bytes_per_token(gguf) == pytest.approx(want, rel=1e-3)
    model = herd.load(gguf)
    dense = cfg.n_layers * (per_layer_matrices + 2 * D + E * D) + V * D + D + D
    assert module_weight_bytes_per_token(model, E, 1) == pytest.approx(dense * 4, rel=1e-6)
    every = dense + cfg.n_layers * 3 * D * F * (E - 1)
    assert module_weight_bytes_per_token(model, E, 1, all_experts=True) == pytest.approx(every * 4, rel=1e-6)
    move_to_huge_pages(model)                   # every tensor now views one arena: still counted one by one
    assert module_weight_bytes_per_token(model, E, 1) == pytest.approx(dense * 4, rel=1e-6)
    # keys + values: chunked layers see the positions of the current 8192-token chunk, the NoPE layer all of them
    per_pos = 2 * cfg.n_kv_heads * cfg.head_dim * 2
    assert kv_read_bytes(cfg, 9000, 2) == 3 * per_pos * (9000 - 8192 + 1) + per_pos * 9001


def test_mixed_type_experts_fall_back_to_fp32(tmp_path, monkeypatch):
    """A layer whose three expert tensors do not share one packable type (here down_exps F32, as K-quant mixes
    leave some) keeps its experts dequantized, and still computes the same function."""
    import bench.scout_gguf as sg
    from herd.model import Experts

    monkeypatch.setattr(sg, "F32_GGUF_NAMES", sg.F32_GGUF_NAMES + ("ffn_down_exps.weight",))
    gguf = write_scout_gguf(tmp_path / "mixed.gguf", scout_config(**SMALL), "Q8_0", log=lambda _: None)
    packed = herd.load(gguf, quant="packed")
    assert all(type(layer.feed_forward.experts) is Experts for layer in packed.layers)
    with torch.inference_mode():
        err = position_errors(packed(IDS)[0], herd.load(gguf)(IDS)[0])
    assert_close_but_for_router_flips(err, PACKED_TOL["Q8_0"], "mixed-type experts")
