"""`herd plan` against figures computed by hand from the spec's shapes (section 1, 3, 4.1) and Meta's recipes (7.1)."""
import pytest

from herd.cli import main as cli_main
from herd.config import preset
from herd.kv_cache import KVCache
from herd.plan import (
    ALLOCATOR_SLACK_PCT, DEVICES, GiB, PREFILL_CHUNK, RUNTIME_FIXED, activation_bytes, kv_cache_bytes,
    kv_cache_bytes_per_token, longest_context, make_plan,
)

D, V, L, H, KV, HD, F, F_DENSE = 5120, 202048, 48, 40, 8, 128, 8192, 16384
ATTN = D * H * HD + 2 * D * KV * HD + H * HD * D          # wq, wk, wv, wo per layer
EXPERT = 3 * D * F                                         # w1, w3, w2 of one expert (also the shared expert)
DENSE = 3 * D * F_DENSE
NORMS = 2 * L * D + D
EMBED = OUTPUT = V * D
# vision (spec 3 / 4.1): patch linear, class token, 577 positions, pre/post LayerNorm, 34 blocks with biased
# q/k/v/o, fc1/fc2 and two LayerNorms, adapter fc1 5632->4096 and fc2 4096->4096, projector 4096->5120
DV, FV = 1408, 5632
VISION = (588 * DV + DV + 577 * DV + 4 * DV
          + 34 * (4 * (DV * DV + DV) + (FV * DV + FV) + (DV * FV + DV) + 4 * DV)
          + FV * 4096 + 4096 * 4096 + 4096 * D)


def int4_bytes(n):                 # Meta int4: half a byte per weight + one fp32 scale per 128 weights
    return n // 2 + 4 * (n // 128)


def scout_counts():
    routed, shared = L * 16 * EXPERT, L * EXPERT
    rest = EMBED + OUTPUT + L * ATTN + L * 16 * D + NORMS + VISION
    return routed, shared, rest


def maverick_counts():
    moe_layers = L // 2                                    # layers 1, 3, ..., 47
    routed, shared = moe_layers * 128 * EXPERT, moe_layers * EXPERT
    rest = EMBED + OUTPUT + L * ATTN + moe_layers * 128 * D + (L - moe_layers) * DENSE + NORMS + VISION
    return routed, shared, rest


def test_scout_weights():
    routed, shared, rest = scout_counts()
    assert routed + shared + rest == 108_641_793_536       # ~109B total (MODEL_CARD)
    assert make_plan(preset("scout"), "h100", "bf16", 8192).weights == 2 * (routed + shared + rest)
    # int4_mixed: routed AND shared experts of every MoE layer
    assert make_plan(preset("scout"), "h100", "int4", 8192).weights == int4_bytes(routed) + int4_bytes(shared) + 2 * rest
    # fp8_mixed: routed experts of layers 1..46 (first and last layer skipped), one fp32 scale per output row
    per_layer = 16 * EXPERT
    rows = 16 * (F + F + D)
    fp8 = 46 * (per_layer + 4 * rows) + 2 * (2 * per_layer) + 2 * (shared + rest)
    assert make_plan(preset("scout"), "h100", "fp8", 8192).weights == fp8


def test_maverick_weights():
    routed, shared, rest = maverick_counts()
    assert 395e9 < routed + shared + rest < 405e9          # ~400B total (MODEL_CARD)
    cfg = preset("maverick")
    assert make_plan(cfg, "h200", "bf16", 8192).weights == 2 * (routed + shared + rest)
    assert make_plan(cfg, "h200", "int4", 8192).weights == int4_bytes(routed) + int4_bytes(shared) + 2 * rest
    # fp8_mixed: MoE layers 1, 3, ..., 45 in fp8; layer 47 is the last layer and stays bf16
    per_layer = 128 * EXPERT
    rows = 128 * (F + F + D)
    fp8 = 23 * (per_layer + 4 * rows) + 2 * per_layer + 2 * (shared + rest)
    assert make_plan(cfg, "h200", "fp8", 8192).weights == fp8


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_hybrid_kv_cache(name):
    cfg = preset(name)
    per_tok_layer = 2 * KV * HD * 2                        # K and V, bf16: 4096 B
    # 36 chunked RoPE layers keep one chunk of 8192 tokens, 12 NoPE layers keep everything
    for ctx in (1000, 8192, 131072, 1_000_000):
        want = 36 * min(ctx, 8192) * per_tok_layer + 12 * ctx * per_tok_layer
        assert kv_cache_bytes(cfg, ctx) == want
        assert kv_cache_bytes(cfg, ctx, batch=3) == 3 * want
    assert kv_cache_bytes_per_token(cfg, 100) == 48 * per_tok_layer
    assert kv_cache_bytes_per_token(cfg, 200_000) == 12 * per_tok_layer
    plan = make_plan(cfg, "h200", "int4", 131072, batch=2)
    assert plan.kv_cache == 2 * (36 * 8192 + 12 * 131072) * per_tok_layer


def test_kv_formula_matches_the_engine_cache():
    cfg = preset("debug")
    cache = KVCache(cfg, batch_size=2, max_seq_len=100)
    assert cache.nbytes() == kv_cache_bytes(cfg, 100, batch=2, dtype_bytes=4, pos_bytes=8)


def test_activations():
    cfg = preset("scout")
    per_token = 6 * D + (H + 2 * KV) * HD + 3 * F          # Scout has no dense layer: widest FFN is 8192
    assert activation_bytes(cfg, 100_000, batch=2) == 2 * PREFILL_CHUNK * per_token * 2 + 2 * V * 4
    assert activation_bytes(cfg, 100) == 100 * per_token * 2 + V * 4
    per_token = 6 * D + (H + 2 * KV) * HD + 3 * F_DENSE    # Maverick's dense layers are 16384 wide
    assert activation_bytes(preset("maverick"), 4096) == PREFILL_CHUNK * per_token * 2 + V * 4


def hand_need(weights, ctx, batch, device):
    per_tok_layer = 2 * KV * HD * 2
    kv = batch * (36 * min(ctx, 8192) + 12 * ctx) * per_tok_layer
    act = batch * min(ctx, PREFILL_CHUNK) * (6 * D + (H + 2 * KV) * HD + 3 * F) * 2 + batch * V * 4
    dev = DEVICES[device]
    return weights + kv + act + dev.n * RUNTIME_FIXED[dev.kind] + (kv + act) * ALLOCATOR_SLACK_PCT // 100


def test_scout_int4_on_one_h100():
    """The seeds' claim: Scout at int4 fits one 80 GB H100. It does, with about 300K tokens of context at batch 1,
    3% of the 10M the model is sold with."""
    routed, shared, rest = scout_counts()
    weights = int4_bytes(routed) + int4_bytes(shared) + 2 * rest
    assert 61 * GiB < weights < 63 * GiB
    cap = 81559 * 2 ** 20
    plan = make_plan(preset("scout"), "h100", "int4", 131072)
    assert plan.total == hand_need(weights, 131072, 1, "h100") and plan.fits
    n = plan.longest_context
    assert hand_need(weights, n, 1, "h100") <= cap < hand_need(weights, n + 1, 1, "h100")
    assert 300_000 < n < 330_000
    assert make_plan(preset("scout"), "h100", "int4", 1_000_000).fits is False
    # bf16 Scout (~202 GiB) fits no single GPU listed
    assert make_plan(preset("scout"), "h200", "bf16", 8192).longest_context == 0


def test_maverick_fits_no_single_device_and_an_8_gpu_node():
    """Maverick (~215 GiB even at int4) fits none of the single devices (nor two 3090s); an 8x H100 node, tensor
    parallel, holds it at fp8 with long context, its 8 kv heads one per GPU (no KV replication)."""
    cfg = preset("maverick")
    routed, shared, rest = maverick_counts()
    smallest = int4_bytes(routed) + int4_bytes(shared) + 2 * rest          # ~215 GiB even at int4
    for device, dev in DEVICES.items():
        if dev.split == "tensor":
            continue
        assert dev.total < smallest
        assert longest_context(cfg, dev, smallest, 1) == 0
    plan = make_plan(cfg, "8xh100", "fp8", 65536)
    assert plan.fits and plan.longest_context == cfg.max_seq_len
    assert plan.kv_cache == kv_cache_bytes(cfg, 65536)                     # split, not replicated
    assert plan.total // 8 <= DEVICES["8xh100"].mem_each


def test_cli_plan(capsys):
    cli_main(["plan", "scout", "--device", "h100", "--quant", "int4", "--context", "131072"])
    out = capsys.readouterr().out
    assert "int4_mixed: routed + shared experts" in out
    assert "fits" in out and "does NOT fit" not in out
    plan = make_plan(preset("scout"), "h100", "int4", 131072)
    assert f"longest context that fits: {plan.longest_context:,} tokens" in out
    assert "36 chunked RoPE layers hold min(context, 8,192) tokens, 12 global layers" in out
    cli_main(["plan", "maverick", "--device", "2x3090", "--quant", "fp8", "--context", "4096", "--batch", "2"])
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "longest context that fits: none" in out


def test_cli_plan_bad_input(capsys):
    with pytest.raises(SystemExit):
        cli_main(["plan", "scout", "--device", "tpu", "--quant", "int4"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["plan", "scout", "--device", "h100", "--context", "0"])
    assert e.value.code == 2 and "argument --context: 0 is out of range: expected at least 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="context and batch must be at least 1"):
        make_plan(preset("scout"), "h100", "int4", 0)           # the library's own check, for callers in Python
    with pytest.raises(SystemExit) as e:
        cli_main(["plan", "llama-9000", "--device", "h100"])
    assert e.value.code == 2
