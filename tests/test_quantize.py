"""Quantization: primitives within stated error bounds, every packed module against its dequantize-then-matmul
twin, quantize -> save -> load round trips through the CLI and herd.load, the HF FP8 per-expert layout, bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import herd
from herd import ops
from herd.checkpoint import CheckpointError, build_meta, save_hf, to_hf_state_dict
from herd.cli import main as cli_main
from herd.config import preset
from herd.model import Experts, Transformer
from herd.quantize import (
    INT4_DEQUANT_ROWS, INT8_DEQUANT_ROWS, cpu_int4_block, int4_unpack_cpu,
    EXPERT_MODULES, Fp8Experts, Fp8Linear, Int4Experts, Int4Linear, Int8Experts, Int8Linear, QuantizationError,
    QuantSpec, dequantize, linear_reference, make_spec, pack_int4, quantize_int4, quantize_model, quantize_tensor,
    quantized_shapes, quantized_state_dict, spec_from_hf_config, unpack_int4,
)

# Packed kernels vs their fp32 reference on the same bf16 inputs: the kernels round their bf16 output (relative
# 2^-9 per element) and accumulate in their own order. Stated tolerance: relative Frobenius error <= 2^-8 and
# max abs error <= 2^-7 of the largest |output|. (Measured: about 1.7e-3 and 3e-3.)
REL_FRO, REL_MAX = 2 ** -8, 2 ** -7


def assert_close_packed(y, ref):
    y, ref = y.float(), ref.float()
    assert (y - ref).norm() <= REL_FRO * ref.norm(), ((y - ref).norm() / ref.norm()).item()
    assert (y - ref).abs().max() <= REL_MAX * ref.abs().max(), ((y - ref).abs().max() / ref.abs().max()).item()


def bf16_input(*shape):
    return torch.randn(*shape).bfloat16().float()       # bf16-representable, so only the kernel's rounding counts


def debug_model(seed=0):
    return Transformer(preset("debug")).init_weights(std=0.2, seed=seed)


def build(cls, *args, **buffers):
    m = cls(*args, device="meta")
    m.load_state_dict(cls.pack(**buffers), assign=True)
    return m


# ---- primitives ------------------------------------------------------------------------------------------------
def test_int8_error_bound():
    w = torch.randn(48, 80) * torch.rand(48, 1)          # rows of different ranges
    q, s, zero = quantize_tensor(w, "int8")
    assert q.dtype == torch.int8 and s.shape == (48, 1) and q.abs().max() <= 127 and zero is None
    # scale = max|row| / 127 rounded to bf16 (at most 2^-8 low), so |w / s| <= 127.5 and every element rounds
    # to within half a step: |w - q s| <= s / 2.
    assert ((dequantize(q, s) - w).abs() <= s / 2 + 1e-7).all()
    assert torch.equal(s, s.bfloat16().float())          # exactly the bf16 scale the kernel multiplies by


def test_int4_meta_recipe_and_error_bound():
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    q, s, zero = quantize_int4(w, 128)
    assert q.shape == (64, 256) and s.shape == (64, 2) and q.min() >= -8 and q.max() <= 7 and zero is None
    amax = w.view(64, 2, 128).abs().amax(-1)
    torch.testing.assert_close(s, (amax / 8).bfloat16().float())     # Meta: scale = max|w_group| / 8
    err = (dequantize(q, s) - w).view(64, 2, 128).abs()
    ratio = w.view(64, 2, 128) / s[..., None]
    # Stated bound: half a step everywhere, except the top of the range, which saturates at +7 (Meta's
    # clamp(round(w / s), -8, 7)): at most one step there (plus the bf16 rounding of the scale, 2^-8 * 8 steps).
    assert (err[ratio <= 7.5] <= s[..., None].expand_as(err)[ratio <= 7.5] / 2 + 1e-7).all()
    assert (err <= 1.04 * s[..., None]).all()
    qg = q.view(64, 2, 128)
    assert ((qg == 7) | (qg == -8)).any(-1).all()       # each group's largest |w| lands on an end of the range
    # Gaussian weights, groups of 128: relative RMS error ~0.10 (uniform rounding over steps of ~0.33 sigma)
    assert (dequantize(q, s) - w).norm() / w.norm() < 0.12


def test_int4_asymmetric_error_bound():
    """Asymmetric int4: the 16 levels span each group's min..max, so every weight, the min and max included, is
    within half a step (nothing saturates), on groups around 0 and groups far from it; and the step is no coarser
    than (max - min) / 15 needs, up to the bf16 rounding of scale and zero."""
    torch.manual_seed(2)
    N, K, G = 48, 256, 32
    offsets = (torch.randn(N, K // G) * 2).repeat_interleave(G, -1)          # some groups far from 0
    w = torch.randn(N, K) * torch.rand(N, 1) + offsets
    q, s, zero = quantize_int4(w, G, symmetric=False)
    assert q.shape == (N, K) and s.shape == zero.shape == (N, K // G) and q.min() >= -8 and q.max() <= 7
    assert torch.equal(s, s.bfloat16().float()) and torch.equal(zero, zero.bfloat16().float())   # what the kernel holds
    wg, deq = w.view(N, -1, G), dequantize(q, s, zero).view(N, -1, G)
    lo, hi = wg.amin(-1), wg.amax(-1)
    assert ((lo < 0) & (hi > 0)).any() and ((lo > 0) | (hi < 0)).any()       # both kinds of group are tested
    half = s[..., None] / 2 + 2 ** -22 * (wg.abs() + zero.abs()[..., None])  # + fp32 rounding of q * s + zero
    assert ((deq - wg).abs() <= half).all()
    for end in (wg.argmin(-1, keepdim=True), wg.argmax(-1, keepdim=True)):
        assert ((deq.gather(-1, end) - wg.gather(-1, end)).abs() <= half.gather(-1, end)).all()
    # scale = (max - min) / 15, widened by at most the bf16 rounding of zero (2^-8 |zero|, spread over 7 steps),
    # then rounded up to bf16 (< 2^-7 relative)
    assert (s <= (1 + 2 ** -7) * ((hi - lo) / 15 + 2 ** -8 * zero.abs() / 7)).all()
    # what the zero point buys on off-centre weights: symmetric int4 spends levels on values the group never has
    q_sym, s_sym, _ = quantize_int4(w, G)
    assert (dequantize(q, s, zero) - w).norm() < 0.5 * (dequantize(q_sym, s_sym) - w).norm()


def test_int4_asymmetric_constant_groups():
    """A group of equal weights (hi == lo) gets a finite step and no NaN; it dequantizes exactly when the value is a
    bf16 number (all-zero groups stay zero), else within half a step and within 2^-8 of it (bf16 rounding)."""
    vals = torch.tensor([0.0, 1.0, -5.0, 1.003, -0.3337, 1e-9])
    w = vals.repeat_interleave(32)[None].repeat(16, 1)                          # (16, 192): 6 constant groups
    q, s, zero = quantize_int4(w, 32, symmetric=False)
    deq = dequantize(q, s, zero)
    assert torch.isfinite(deq).all() and (s > 0).all()
    assert torch.equal(deq[:, :96], w[:, :96])                                  # 0, 1 and -5 are bf16 numbers
    err = (deq - w).abs().view(16, 6, 32)
    assert (err <= s[..., None] / 2).all() and (err <= 2 ** -8 * vals.abs()[:, None]).all()


def test_int4_pack_round_trip_and_layout():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)          # (3, 32), every value
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (3, 16)
    assert p[0, 0] == ((-8 + 8) | ((-7 + 8) << 4))                  # even index low nibble, odd high, offset 8
    assert torch.equal(unpack_int4(p), q)


def test_fp8_error_bound():
    w = torch.randn(32, 64) * torch.rand(32, 1)
    q, s, _ = quantize_tensor(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn and s.shape == (32, 1)
    assert (q.float().abs().amax(-1) == 448).all()                    # each row's max maps to e4m3's largest value
    err = (dequantize(q, s) - w).abs()
    # e4m3 keeps 3 mantissa bits: relative rounding <= 2^-4 for normal values; subnormals (below 2^-6 * s)
    # round to multiples of 2^-9 * s.
    assert (err <= 2 ** -4 * w.abs() + 2 ** -10 * s).all()


@pytest.mark.parametrize("scheme,group,symmetric", [("int8", None, True), ("int4", 32, True), ("int4", 32, False),
                                                    ("fp8", None, True)])
def test_quantized_shapes_match_the_state_dict(scheme, group, symmetric):
    """The loader checks files against quantized_shapes (arithmetic on a meta model): it must agree with what
    quantized_state_dict really writes."""
    spec = make_spec(scheme, group, "all", symmetric)
    real = {k: v.shape for k, v in quantized_state_dict(debug_model(), spec).items()}
    assert quantized_shapes(build_meta(preset("debug")), spec) == real
    if scheme == "int4":
        assert real["layers.1.feed_forward.experts.w2"] == (4, 64, 32)
        assert real["layers.1.feed_forward.experts.w2_scale"] == (4, 64, 2)
    zeros = {k for k in real if k.endswith("_zero")}
    if symmetric:
        assert not zeros
    else:                                               # a zero point beside every scale, of the same shape
        assert zeros == {k[: -len("_scale")] + "_zero" for k in real if k.endswith("_scale")}
        assert all(real[k] == real[k[: -len("_zero")] + "_scale"] for k in zeros)
        assert real["layers.1.feed_forward.experts.w2_zero"] == (4, 64, 2)


# ---- packed modules vs the reference twin ---------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 7, INT8_DEQUANT_ROWS + 1])          # packed kernel, and the dequantize path
def test_int8_linear_matches_reference(M):
    w = torch.randn(96, 128) * 0.05
    q, s, _ = quantize_tensor(w, "int8")
    m = build(Int8Linear, 128, 96, weight=q, weight_scale=s)
    x = bf16_input(2, M, 128)
    y = m(x)
    assert y.shape == (2, M, 96) and y.dtype == torch.float32
    assert_close_packed(y, linear_reference(x, q, s))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 33, INT4_DEQUANT_ROWS + 5])         # packed kernel, and the dequantize path
def test_int4_linear_matches_reference(group_size, M, symmetric):
    w = torch.randn(112, 256) * 0.05                # 112 rows: one full 64-row block of the CPU layout + a tail
    q, s, zero = quantize_tensor(w, "int4", group_size, symmetric)
    m = build(Int4Linear, 256, 112, group_size, weight=q, weight_scale=s, weight_zero=zero)
    # the kernel holds exactly the stored scale and zero (both bf16 numbers)
    assert torch.equal(m.scales_and_zeros.float(), torch.stack((s, torch.zeros_like(s) if zero is None else zero), -1)
                       .transpose(0, 1))
    x = bf16_input(M, 256)
    assert_close_packed(m(x), linear_reference(x, unpack_int4(q), s, zero))


@pytest.mark.parametrize("N", [16, 48, 64, 112, 256])
def test_cpu_int4_layout_unpacks_exactly(N):
    """The dequantize path reads torch's packed layout; the block size is detected against torch's own packer."""
    block = cpu_int4_block()
    assert block in (64, 32, None)
    if block is None:
        pytest.skip("this CPU's int4 layout is unknown; the packed kernel runs for every row count")
    u = torch.randint(0, 16, (N, 96), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    assert torch.equal(int4_unpack_cpu(packed, block).to(torch.int32), u)


def test_int4_linear_with_zero_points():
    """Asymmetric groups, what GGUF Q4_1 needs: w = d * u + m with u in 0..15, i.e. q = u - 8, zero = m + 8 d.
    The kernel holds scales and zeros in bf16: the zero point is rounded to 2^-9 of |m + 8 d|, the middle of the
    block's range (same order as storing the weights themselves in bf16)."""
    u = torch.randint(0, 16, (32, 64))
    d = (torch.rand(32, 2) * 0.01).bfloat16().float()
    m = -8 * d + torch.randn(32, 2) * 0.01
    q, zero = (u - 8).to(torch.int8), (m + 8 * d).bfloat16().float()
    mod = build(Int4Linear, 64, 32, 32, weight=pack_int4(q), weight_scale=d, weight_zero=zero)
    for rows in (5, INT4_DEQUANT_ROWS):
        x = bf16_input(rows, 64)
        assert_close_packed(mod(x), linear_reference(x, q, d, zero))
    w_q41 = (u.float().view(32, 2, 32) * d[..., None] + m[..., None]).view(32, 64)   # the Q4_1 formula itself
    err = (dequantize(q, d, zero) - w_q41).abs().view(32, 2, 32)
    assert (err <= 2 ** -8 * (m + 8 * d).abs()[..., None] + 1e-9).all()


def test_fp8_linear_matches_reference():
    w = torch.randn(40, 24)
    q, s, _ = quantize_tensor(w, "fp8")
    m = build(Fp8Linear, 24, 40, weight=q, weight_scale=s)
    x = torch.randn(3, 24)
    torch.testing.assert_close(m(x), linear_reference(x, q, s), rtol=1e-5, atol=1e-5)


def test_packed_kernels_survive_unaligned_inputs():
    """torch's int8 kernel reads its operands with aligned loads: a view at an odd offset must be copied first."""
    w = torch.randn(32, 64)
    q, s, _ = quantize_tensor(w, "int8")
    m = build(Int8Linear, 64, 32, weight=q[:, :].clone(), weight_scale=s)
    buf = torch.randn(5 * 64 + 3).bfloat16()
    x = buf[3:].view(5, 64)                                # data_ptr not 64-byte aligned
    assert_close_packed(m(x), linear_reference(x.float(), q, s))


@pytest.mark.parametrize("N", [37, 4 * INT4_DEQUANT_ROWS + 80])     # few tokens per expert, and many (dequantize)
@pytest.mark.parametrize("scheme,symmetric", [("int8", True), ("int4", True), ("int4", False), ("fp8", True)])
def test_quantized_experts_match_dequantized_reference(scheme, symmetric, N):
    """Each quantized Experts module equals the dense every-expert reference (ops.run_experts_reference) on its own
    dequantized weights."""
    E, D, Fh = 4, 64, 96
    ex = Experts(E, D, Fh)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
    spec = make_spec(scheme, 32 if scheme == "int4" else None, symmetric=symmetric)
    disk, zeros = {}, {}
    for name in ("w1", "w3", "w2"):
        disk[name], disk[name + "_scale"], zeros[name] = quantize_tensor(getattr(ex, name).detach(), scheme,
                                                                         spec.group_size, symmetric)
        if not symmetric:
            disk[name + "_zero"] = zeros[name]
    args = (E, D, Fh, 32) if scheme == "int4" else (E, D, Fh)
    qex = build(EXPERT_MODULES[scheme], *args, **disk)
    deq = {n: dequantize(unpack_int4(disk[n]) if scheme == "int4" else disk[n], disk[n + "_scale"], zeros[n])
           for n in ("w1", "w3", "w2")}
    x = bf16_input(N, D)
    idx = torch.randint(0, E, (N, 1))
    idx[:3] = 0                                             # expert 3 may get nothing; make sure 0 gets some
    gate = torch.rand(N, 1)
    ref = ops.run_experts_reference(x, idx, gate, deq["w1"], deq["w2"], deq["w3"])
    out = qex(x, idx, gate)
    if scheme == "fp8":
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    else:
        # two packed matmuls with bf16 rounding of the hidden state in between: twice the single-matmul bound
        assert (out - ref).norm() <= 2 * REL_FRO * ref.norm()


@pytest.mark.parametrize("cls", [Int8Experts, Fp8Experts])
def test_only_routed_experts_run(cls):
    """Sparse dispatch: poison the weights of an expert no token is routed to; the output stays finite."""
    E, D, Fh = 3, 32, 32
    w = {n: torch.randn(E, *shape) * 0.1 for n, shape in (("w1", (Fh, D)), ("w3", (Fh, D)), ("w2", (D, Fh)))}
    scheme = "int8" if cls is Int8Experts else "fp8"
    disk = {}
    for n, t in w.items():
        disk[n], disk[n + "_scale"], _ = quantize_tensor(t, scheme)
        disk[n + "_scale"][2] = float("nan")
    qex = build(cls, E, D, Fh, **disk)
    x = torch.randn(10, D)
    idx = torch.randint(0, 2, (10, 1))
    assert torch.isfinite(qex(x, idx, torch.rand(10, 1))).all()
    idx[0] = 2
    assert not torch.isfinite(qex(x, idx, torch.rand(10, 1))).all()   # and the poison does show when routed


# ---- quantize_model ------------------------------------------------------------------------------------------
def test_quantize_model_swaps_modules_only():
    model = debug_model()
    ids = torch.randint(0, 512, (2, 24))
    ref = model(ids)
    quantize_model(model, "int8")
    ff = model.layers[1].feed_forward
    assert isinstance(ff.experts, Int8Experts)
    assert type(ff.router) is torch.nn.Linear and type(ff.shared_expert.w1) is torch.nn.Linear
    assert type(model.layers[0].attention.wq) is torch.nn.Linear and type(model.output) is torch.nn.Linear
    assert "forward" not in vars(ff.experts)                # swapped module, no rebound method
    out = model(ids)
    assert (out - ref).norm() / ref.norm() < 0.02

    model = debug_model()
    quantize_model(model, "int4", 32, only="all")
    assert isinstance(model.layers[0].attention.wq, Int4Linear)
    assert isinstance(model.layers[0].feed_forward.w2, Int4Linear)
    assert isinstance(model.layers[1].feed_forward.shared_expert.w1, Int4Linear)
    assert isinstance(model.layers[1].feed_forward.experts, Int4Experts)
    assert isinstance(model.output, Int4Linear)
    assert type(model.layers[1].feed_forward.router) is torch.nn.Linear   # routing stays exact
    assert type(model.tok_embeddings) is torch.nn.Embedding
    assert torch.isfinite(model(ids)).all()


def test_quantize_model_keeps_tied_output_and_float_parts():
    cfg = preset("debug")
    cfg.tie_embeddings = True
    cfg.__post_init__()
    model = Transformer(cfg).init_weights(std=0.2, seed=0)
    quantize_model(model, "int8", only="all")
    assert type(model.output) is torch.nn.Linear and model.output.weight is model.tok_embeddings.weight


# ---- save -> load round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,group,only,asymmetric", [
    ("int8", None, "experts", False), ("int4", "32", "all", False), ("fp8", None, "all", False),
    ("int4", "64", "experts", False), ("int4", "32", "all", True)])
def test_cli_quantize_then_herd_load(tmp_path, capsys, scheme, group, only, asymmetric):
    model = debug_model()
    save_hf(model, tmp_path / "src")
    argv = ["quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--scheme", scheme, "--only", only]
    cli_main(argv + (["--group-size", group] if group else []) + (["--asymmetric"] if asymmetric else []))
    assert ("asymmetric" in capsys.readouterr().out) == asymmetric
    hf = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert hf["quantization_config"] == {"quant_method": "herd", "scheme": scheme, "symmetric": not asymmetric,
                                         "group_size": int(group) if group else None, "modules": only}
    keys = load_file(str(tmp_path / "dst" / "model.safetensors"))
    gate = keys["model.layers.1.feed_forward.experts.2.gate_proj.weight"]       # per-expert layout on disk
    assert gate.dtype == {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}[scheme]
    assert "model.layers.1.feed_forward.experts.2.gate_proj.weight_scale" in keys
    assert keys["model.layers.1.feed_forward.router.weight"].dtype == torch.float32
    assert ("model.layers.0.self_attn.q_proj.weight_scale" in keys) == (only == "all")
    assert ("model.layers.1.feed_forward.experts.2.gate_proj.weight_zero" in keys) == asymmetric
    assert ("model.layers.0.self_attn.q_proj.weight_zero" in keys) == (asymmetric and only == "all")

    back = herd.load(tmp_path / "dst")
    expected = quantize_model(debug_model(), scheme, int(group) if group else None, only, symmetric=not asymmetric)
    ids = torch.randint(0, 512, (2, 24))
    torch.testing.assert_close(back(ids), expected(ids), rtol=0, atol=0)   # same bits after the round trip
    assert isinstance(back.layers[1].feed_forward.experts, EXPERT_MODULES[scheme])


def test_asymmetric_int4_round_trip_with_rope_row_permutation(tmp_path):
    """HF Llama checkpoints store q/k rows in rotate-half order, which load and save permute: the zero points of
    wq/wk are per row like their scales and must move with them. On disk they must be the HF weights' own zeros
    (the quantization is per row, so it commutes with the row order), and the loaded model must equal the
    in-memory quantized one bit for bit."""
    cfg = preset("debug")
    cfg.moe, cfg.nope_every, cfg.attn_chunk_size, cfg.use_qk_norm = None, 0, None, False
    cfg.attn_temperature_tuning, cfg.source = False, "llama"
    cfg.__post_init__()
    model = Transformer(cfg).init_weights(std=0.2, seed=1)
    save_hf(model, tmp_path / "src")
    cli_main(["quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--scheme", "int4", "--group-size", "32",
              "--only", "all", "--asymmetric"])
    hf_float, disk = to_hf_state_dict(model), load_file(str(tmp_path / "dst" / "model.safetensors"))
    for proj in ("q_proj", "k_proj"):
        key = f"model.layers.2.self_attn.{proj}.weight"
        q, scale, zero = quantize_tensor(hf_float[key], "int4", 32, symmetric=False)
        assert not torch.equal(hf_float[key], model.state_dict()[f"layers.2.attention.w{proj[0]}.weight"])  # permuted
        assert torch.equal(disk[key], q) and torch.equal(disk[key + "_scale"], scale)
        assert torch.equal(disk[key + "_zero"], zero)
    back = herd.load(tmp_path / "dst")
    assert isinstance(back.layers[0].attention.wq, Int4Linear)
    expected = quantize_model(model, make_spec("int4", 32, "all", symmetric=False))
    ids = torch.randint(0, 512, (2, 24))
    torch.testing.assert_close(back(ids), expected(ids), rtol=0, atol=0)


def test_quantized_load_with_bf16_dtype(tmp_path):
    model = debug_model()
    spec = make_spec("int8", only="all")
    save_hf(model, tmp_path, extra_config={"quantization_config": spec.to_config()},
            state=quantized_state_dict(model, spec))
    back = herd.load(tmp_path, dtype=torch.bfloat16)
    assert back.tok_embeddings.weight.dtype == torch.bfloat16
    assert back.layers[0].attention.wq.weight.dtype == torch.int8
    ids = torch.randint(0, 512, (1, 16))
    ref = model(ids)
    assert (back(ids) - ref).norm() / ref.norm() < 0.1


def _per_expert_fp8_checkpoint(model, folder, scale_dtype=torch.bfloat16):
    """An HF FP8-Maverick-style checkpoint of `model`: routed experts per expert in e4m3 [out, in] with row
    scales `weight_scale` [out, 1], everything else unchanged, and a compressed-tensors quantization_config."""
    save_hf(model, folder)
    sd = to_hf_state_dict(model)
    deq = {}
    for key in [k for k in sd if k.endswith("experts.gate_up_proj")]:
        gu, down = sd.pop(key), sd.pop(key.replace("gate_up_proj", "down_proj"))
        Fh = gu.shape[2] // 2
        layer = int(key.split(".")[2])
        for e in range(gu.shape[0]):
            for proj, w in (("gate_proj", gu[e, :, :Fh].t()), ("up_proj", gu[e, :, Fh:].t()),
                            ("down_proj", down[e].t())):
                q, s, _ = quantize_tensor(w.contiguous(), "fp8")
                s = s.to(scale_dtype)
                sd[key.replace("gate_up_proj", f"{e}.{proj}.weight")] = q
                sd[key.replace("gate_up_proj", f"{e}.{proj}.weight_scale")] = s
                deq[(layer, e, proj)] = dequantize(q, s)
    save_file(sd, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False}}},
        "ignore": ["re:.*self_attn.*", "re:.*router", "re:.*shared_expert.*", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return deq


def test_hf_fp8_per_expert_layout_loads_and_matches_dequantized(tmp_path):
    model = debug_model()
    deq = _per_expert_fp8_checkpoint(model, tmp_path)
    back = herd.load(tmp_path)
    assert isinstance(back.layers[1].feed_forward.experts, Fp8Experts)
    # the float model whose experts hold the dequantized fp8 weights
    with torch.no_grad():
        for (layer, e, proj), w in deq.items():
            name = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
            getattr(model.layers[layer].feed_forward.experts, name)[e] = w
    ids = torch.randint(0, 512, (2, 30))
    torch.testing.assert_close(back(ids), model(ids), rtol=1e-5, atol=1e-5)


# ---- bad input -------------------------------------------------------------------------------------------------
def test_bad_specs():
    with pytest.raises(QuantizationError, match="unknown quantization scheme 'int3'"):
        make_spec("int3")
    with pytest.raises(QuantizationError, match="group size 100 is not supported"):
        make_spec("int4", 100)
    with pytest.raises(QuantizationError, match="--group-size applies to int4 only"):
        make_spec("int8", 64)
    with pytest.raises(QuantizationError, match="unknown module selection 'attention'"):
        QuantSpec("int8", None, "attention")
    assert make_spec("int4").group_size == 128
    for scheme in ("int8", "fp8"):
        with pytest.raises(QuantizationError, match=f"{scheme} is symmetric only.*--asymmetric applies to int4 only"):
            make_spec(scheme, symmetric=False)
        with pytest.raises(QuantizationError, match=f"{scheme} is symmetric only"):
            quantize_tensor(torch.randn(16, 32), scheme, symmetric=False)
    with pytest.raises(QuantizationError, match="'symmetric' must be true or false, not 'false'"):
        QuantSpec("int4", 32, "all", "false")


def test_spec_config_round_trip_and_old_configs(tmp_path):
    model = debug_model()
    spec = make_spec("int4", 32)
    save_hf(model, tmp_path, extra_config={"quantization_config": spec.to_config()},
            state=quantized_state_dict(model, spec))
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["quantization_config"]["symmetric"]             # as written before asymmetric int4 existed
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, 512, (1, 16))
    torch.testing.assert_close(herd.load(tmp_path)(ids), quantize_model(model, spec)(ids), rtol=0, atol=0)

    asym = make_spec("int4", 64, "all", symmetric=False)
    assert asym.to_config()["symmetric"] is False
    assert spec_from_hf_config({"quantization_config": json.loads(json.dumps(asym.to_config()))}) == asym
    old = {"quant_method": "herd", "scheme": "int4", "group_size": 32, "modules": "experts"}   # before "symmetric"
    assert spec_from_hf_config({"quantization_config": old}) == QuantSpec("int4", 32, "experts", symmetric=True)
    for bad in ("false", 0, None):
        with pytest.raises(QuantizationError, match="'symmetric' must be true or false"):
            spec_from_hf_config({"quantization_config": {**old, "symmetric": bad}}, "x/config.json")
    with pytest.raises(QuantizationError, match="int8 is symmetric only"):
        spec_from_hf_config({"quantization_config": {**old, "scheme": "int8", "group_size": None, "symmetric": False}})


def test_group_size_must_divide_input_dim():
    model = debug_model()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=r"layers\.1\.feed_forward\.experts.*group size 128 does not divide "
                                                r"the input dim 64"):
        quantize_model(model, "int4")                     # debug: dim 64, experts 64 wide
    assert isinstance(model.layers[1].feed_forward.experts, Experts)          # nothing swapped
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_cli_bad_input(tmp_path, capsys):
    save_hf(debug_model(), tmp_path / "src")
    with pytest.raises(SystemExit) as e:
        cli_main(["quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--scheme", "int4"])
    assert e.value.code == 2 and "does not divide the input dim 64" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
    with pytest.raises(SystemExit) as e:
        cli_main(["quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--scheme", "nf4"])
    assert e.value.code == 2 and "invalid choice: 'nf4'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["quantize", str(tmp_path / "nowhere"), str(tmp_path / "dst"), "--scheme", "int8"])
    assert e.value.code == 2 and "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:      # refused before loading: a missing source is not what gets reported
        cli_main(["quantize", str(tmp_path / "nowhere"), str(tmp_path / "dst"), "--scheme", "int8", "--asymmetric"])
    assert e.value.code == 2 and "--asymmetric applies to int4 only" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_already_quantized_model_is_refused(tmp_path):
    model = quantize_model(debug_model(), "int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantized_state_dict(model, make_spec("int8"))
    save_hf(debug_model(), tmp_path / "src")
    cli_main(["quantize", str(tmp_path / "src"), str(tmp_path / "q"), "--scheme", "int8"])
    with pytest.raises(SystemExit):
        cli_main(["quantize", str(tmp_path / "q"), str(tmp_path / "q2"), "--scheme", "int8"])


def test_bad_quantized_checkpoints(tmp_path):
    model = debug_model()
    spec = make_spec("int8")
    save_hf(model, tmp_path, extra_config={"quantization_config": spec.to_config()},
            state=quantized_state_dict(model, spec))
    cfg = json.loads((tmp_path / "config.json").read_text())

    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method 'gptq' is not supported"):
        herd.load(tmp_path)

    cfg["quantization_config"] = {"quant_method": "herd", "group_size": None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization_config has no 'scheme'"):
        herd.load(tmp_path)

    # config says int8 but the file holds int8 experts without their scales
    cfg["quantization_config"] = spec.to_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.3.feed_forward.experts.1.down_proj.weight_scale"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="experts.w2_scale has experts"):
        herd.load(tmp_path)

    # the config is the only source of truth: zero points on disk that it does not announce have no place
    spec = make_spec("int4", 32, symmetric=False)
    save_hf(model, tmp_path / "a", extra_config={"quantization_config": spec.to_config()},
            state=quantized_state_dict(model, spec))
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    del cfg["quantization_config"]["symmetric"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"experts\.w[123]_zero' has no place in this model's config"):
        herd.load(tmp_path / "a")
    cfg["quantization_config"]["symmetric"] = "no"
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'symmetric' must be true or false, not 'no'"):
        herd.load(tmp_path / "a")

    # a float checkpoint whose config claims int4: shapes disagree, named
    save_hf(model, tmp_path / "f", extra_config={"quantization_config": make_spec("int4", 32).to_config()})
    with pytest.raises(CheckpointError, match="expected"):
        herd.load(tmp_path / "f")
