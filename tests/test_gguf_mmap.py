"""Routed experts mapped from the GGUF file (herd.load(..., mmap_experts=True)): the GGUF block kernel (gguf_mm) against
its float64 twin, HerdGGUFExperts against GGUFExperts, the mapped model against the in-memory packed one (logits and
greedy tokens), and that the mapped experts are the file's pages (their addresses lie in the file's mapping, and
anonymous memory does not grow by their size)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import herd
from herd.cpu import extension, kernels
from herd.engine import SamplingParams, generate
from herd.gguf import GGUFError, GGUFExperts, available_memory, routed_expert_bytes
from herd.textgen import default_model_path

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from bench.scout_gguf import scout_config, write_scout_gguf  # noqa: E402

needs_kernels = pytest.mark.skipif(not extension.available(), reason=f"herd kernels {extension.status()}")
QTYPES = ["Q4_0", "Q4_1", "Q8_0"]


def gguf_matrix(qtype, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g)
    w[:, :64] += 0.5                               # blocks far from zero-mean: Q4_1's minimum m matters
    return gguf_quants.quantize(w.numpy(), Q[qtype])                 # (N, K/32 * block bytes) uint8


def rows(M, K, seed=1):
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed))
    x[:, 5] *= 30                                  # an outlier channel
    return x


# int16 x int8 products summed exactly in int32 per block, then fp32 FMAs with d * xs rounded to fp32 (the twin
# multiplies in float64): measured max error 1.8e-6 of the largest output; stated 1e-5, as test_kernels.
@needs_kernels
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("M", [1, 3, 4, 9])                         # 4-row tiles, and a partial tile
@pytest.mark.parametrize("N,K", [(1, 32), (40, 256), (96, 576)])
def test_gguf_kernel_matches_twin(qtype, M, N, K):
    raw = gguf_matrix(qtype, N, K)
    x = rows(M, K)
    y = kernels.gguf_mm(x, torch.from_numpy(raw), qtype)
    ref = kernels.gguf_mm_reference(x, raw, qtype)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max(), ((y - ref).abs().max() / ref.abs().max()).item()


@needs_kernels
def test_gguf_kernel_bad_inputs():
    raw = torch.from_numpy(gguf_matrix("Q4_0", 16, 64))
    with pytest.raises(RuntimeError, match="GGML type 12"):
        extension.ext().gguf_mm(rows(1, 64), raw, 16, 12)
    with pytest.raises(RuntimeError, match="16 rows of 2 blocks of 18 bytes"):
        extension.ext().gguf_mm(rows(1, 64), raw[:, :20].contiguous(), 16, 2)


def random_gguf_experts(qtype, E=3, D=64, F=96):
    blocks = [np.stack([gguf_matrix(qtype, n, k, seed=10 * e + i) for e in range(E)])
              for i, (n, k) in enumerate(((F, D), (F, D), (D, F)))]
    return GGUFExperts(qtype, *(torch.from_numpy(b) for b in blocks))


# The twin: exact x, weights dequantized by herd.gguf (gguf's values); the kernel: int16 activations (~1.5e-5
# relative per product) through two products and SiLU: measured 3e-5 of the largest output; stated 2e-4.
@needs_kernels
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n_tokens", [1, 7])
def test_herd_gguf_experts_match_twin(qtype, n_tokens):
    twin = random_gguf_experts(qtype)
    fast = kernels.HerdGGUFExperts(twin)
    assert fast.w1.data_ptr() == twin.w1.data_ptr()                 # the same bytes, no copy
    x = rows(n_tokens, 64)
    idx = torch.randint(0, 3, (n_tokens, 1), generator=torch.Generator().manual_seed(2))
    gate = torch.rand(n_tokens, 1, generator=torch.Generator().manual_seed(3))
    y, ref = fast(x, idx, gate), twin(x, idx, gate)
    assert (y - ref).abs().max() <= 2e-4 * ref.abs().max(), ((y - ref).abs().max() / ref.abs().max()).item()


# ---- whole models from a small llama4 GGUF ---------------------------------------------------------------------------
SMALL = dict(layers=4, vocab=512, dim=256, n_heads=4, n_kv_heads=2, head_dim=64, experts=4, expert_dim=256,
             ffn_dim=512)
IDS = torch.randint(3, 512, (1, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    try:                                            # the generator's tokenizer comes from the default model's GGUF
        default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp("mmap")
    return {q: write_scout_gguf(d / f"{q}.gguf", scout_config(**SMALL), q, seed=0, log=lambda _: None)
            for q in QTYPES}


def mapping_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges at which this process maps `path` (/proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(path.resolve()):
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            out.append((lo, hi))
    return out


@pytest.mark.parametrize("qtype", QTYPES)
def test_mapped_experts_alias_the_file(files, qtype):
    """Every routed expert tensor of a mapped model lies inside a mapping of the GGUF file, and its bytes are the
    file's bytes at the tensor's offset."""
    from herd.gguf import open_gguf

    path = files[qtype]
    model = herd.load(path, quant="packed", mmap_experts=True)
    ranges = mapping_ranges(path)
    offsets = {t.name: t.data_offset for t in open_gguf(path).tensors}
    raw = path.read_bytes()
    for i, layer in enumerate(model.layers):
        experts = layer.feed_forward.experts
        assert type(experts) is GGUFExperts and experts.qtype == qtype
        for w, name in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            t = getattr(experts, w)
            start, end = t.data_ptr(), t.data_ptr() + t.numel()
            assert any(lo <= start and end <= hi for lo, hi in ranges), f"layer {i} {w} is not in the file's mapping"
            off = offsets[f"blk.{i}.ffn_{name}_exps.weight"]
            assert t.numpy().tobytes()[:4096] == raw[off:off + 4096]


@needs_kernels
@pytest.mark.parametrize("qtype", QTYPES)
def test_mapped_same_as_in_memory(files, qtype):
    """Prepared (herd's kernels), the mapped model picks the in-memory packed model's greedy tokens wherever that
    choice is not a near-tie, and gives logits within the packed path's own error. The two differ by what the
    in-memory repacking rounds: Q4 scales (and Q4_1 zeros) to bf16 (measured max 0.3% per position), Q8_0 blocks
    re-quantized to one int8 scale per row (~2%); with random weights a top-2 gap of 1e-4 happens (Q4_0 on Zen 4:
    3.0441 vs 3.0440), where either choice is right and the two greedy runs part ways."""
    path = files[qtype]
    mapped = herd.load(path, quant="packed", prepare=True, mmap_experts=True)
    in_memory = herd.load(path, quant="packed", prepare=True, mmap_experts=False)
    assert all(type(layer.feed_forward.experts) is kernels.HerdGGUFExperts for layer in mapped.layers)
    assert not any(type(layer.feed_forward.experts) is kernels.HerdGGUFExperts for layer in in_memory.layers)
    prompt = IDS[0, :8].tolist()
    out = generate(in_memory, [prompt], SamplingParams(max_tokens=12, temperature=0.0))[0].output
    with torch.inference_mode():                   # both models on the in-memory model's greedy sequence
        seq = torch.tensor([prompt + out])
        ref, got = in_memory(seq)[0, len(prompt) - 1:-1], mapped(seq)[0, len(prompt) - 1:-1]     # (12, V)
    assert ref.argmax(-1).tolist() == out
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05        # well past the 0.3% (~0.01 here) the two paths differ by
    assert clear.sum() >= 6
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    with torch.inference_mode():
        a, b = mapped(IDS)[0], in_memory(IDS)[0]
        for layer in mapped.layers:                # the experts' torch twin (the same views) in the same model
            fast = layer.feed_forward.experts
            layer.feed_forward.experts = GGUFExperts(fast.qtype, fast.w1, fast.w3, fast.w2)
        twin = mapped(IDS)[0]
    err = (a - b).norm(dim=-1) / b.norm(dim=-1)
    tol = 0.035 if qtype == "Q8_0" else 0.01
    assert err.median() <= tol and (err <= tol).float().mean() >= 0.75, err.tolist()
    # kernel vs twin on the same GGUF values: only the int16 activations differ (measured max 2e-5)
    assert ((a - twin).norm(dim=-1) / twin.norm(dim=-1)).max() <= 1e-3


@needs_kernels
@pytest.mark.parametrize("qtype", QTYPES)
def test_mapped_layers_take_the_one_call_decode(files, qtype, monkeypatch):
    """decode.HerdBlock runs a mapped layer (HerdGGUFExperts) in decode.cpp's one call per layer, with the same tokens
    and log-probabilities as Block.forward over the same modules (30 tokens past a 10-token prompt)."""
    from herd.cpu import decode
    from herd.engine import Engine

    model = herd.load(files[qtype], quant="packed", prepare=True, mmap_experts=True)
    prompt = IDS[0, :10].tolist()
    calls, one_call = [], extension.ext().decode_layer

    def run():
        engine = Engine(model, max_batch=1, max_seq_len=64)
        req = engine.add(prompt, SamplingParams(max_tokens=30, ignore_eos=True, logprobs=0))
        with torch.inference_mode():
            while not req.finished:
                engine.step()
        return req.output, torch.tensor([x["logprob"] for x in req.logprobs])

    steps, one_step = [], extension.ext().decode_step
    monkeypatch.setattr(extension.ext(), "decode_step", lambda *a: steps.append(1) or one_step(*a))
    monkeypatch.setattr(extension.ext(), "decode_layer", lambda *a: calls.append(1) or one_call(*a))
    tokens, lp = run()
    assert len(steps) == 29 and not calls, "every decode step in one call for all layers"
    monkeypatch.setattr(decode.HerdTransformer, "forward", decode.Transformer.forward)
    layer_tokens, layer_lp = run()
    assert len(calls) == 29 * model.config.n_layers, "every decode step of every layer in one call"
    assert layer_tokens == tokens and torch.equal(layer_lp, lp)
    monkeypatch.setattr(decode.HerdBlock, "forward", decode.Block.forward)
    ref_tokens, ref_lp = run()
    assert tokens == ref_tokens and len(set(tokens)) > 5
    # the 10-token prompt's prefill takes the C++ layer too (decode_layer_rows, its tokens as rows of one cache row):
    # keys that differ from the twin's in their last bits can move an int16 activation level in every later step's
    # kernels (measured 2e-4 to 7.5e-4 here); a wrong slot, row or expert is O(1)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=2e-3)


@needs_kernels
@pytest.mark.parametrize("qtype", QTYPES)
def test_mapped_layers_batched_decode_equals_alone(files, qtype):
    """Three ragged prompts decoded together (decode_layer_rows: the rows grouped by their chosen expert, each GGUF
    expert's blocks read once for its rows) give each prompt's tokens decoded alone."""
    model = herd.load(files[qtype], quant="packed", prepare=True, mmap_experts=True)
    prompts = [IDS[0, :n].tolist() for n in (3, 10, 6)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    together = [r.output for r in generate(model, prompts, params, max_seq_len=64, step_tokens=64)]
    assert together == [generate(model, [p], params, max_seq_len=64)[0].output for p in prompts]
    assert len({t for out in together for t in out}) > 5


def test_mmap_experts_bad_requests(files, tmp_path):
    with pytest.raises(GGUFError, match="needs quant='packed'"):
        herd.load(files["Q4_0"], mmap_experts=True)
    hf = tmp_path / "hf"
    hf.mkdir()
    with pytest.raises(ValueError, match="mmap_experts=True applies to GGUF files only"):
        herd.load(hf, mmap_experts=True)


def test_mmap_auto_only_when_experts_do_not_fit(files, monkeypatch):
    """mmap_experts=None maps the experts only when the in-memory load's peak (IN_MEMORY_PEAK_PER_EXPERT_BYTE times
    their bytes) exceeds the memory this process may still take; True / False decide alone."""
    import herd.gguf as hg

    path = files["Q4_0"]
    assert available_memory() is None or available_memory() > 0
    peak = hg.IN_MEMORY_PEAK_PER_EXPERT_BYTE * routed_expert_bytes(path)
    monkeypatch.setattr(hg, "available_memory", lambda: peak + 1)
    assert type(herd.load(path, quant="packed").layers[0].feed_forward.experts) is not GGUFExperts
    assert type(herd.load(path, quant="packed", mmap_experts=True).layers[0].feed_forward.experts) is GGUFExperts
    monkeypatch.setattr(hg, "available_memory", lambda: peak - 1)
    assert type(herd.load(path, quant="packed").layers[0].feed_forward.experts) is GGUFExperts
    assert type(herd.load(path, quant="packed", mmap_experts=False).layers[0].feed_forward.experts) \
        is not GGUFExperts


# A file whose routed experts dwarf everything else: 2 MoE layers of 16 experts of 4096 x 512 (Q4_0, 113 MB of
# experts; the shared experts, attention, router, norms and embeddings ~10 MB once loaded).
BIG_EXPERTS = dict(layers=2, vocab=512, dim=512, n_heads=4, n_kv_heads=2, head_dim=128, experts=16, expert_dim=4096,
                   ffn_dim=512)

RSS_SCRIPT = """
import gc, json, sys, torch, herd
from herd.engine import SamplingParams, generate
from herd.gguf import _release_freed_memory
def rss_anon():
    gc.collect()
    _release_freed_memory()             # glibc's freed heap back to the OS: it moves RssAnon by +-40 MB otherwise
    line = next(l for l in open("/proc/self/status") if l.startswith("RssAnon"))
    return int(line.split()[1]) * 1024
torch.set_num_threads(1)
# a first mapped load and decode: the modules it imports and the reader's parsed metadata (~100 MB) stay resident
generate(herd.load(sys.argv[1], quant="packed", prepare=True, mmap_experts=True), [[5, 6]],
         SamplingParams(max_tokens=2), max_seq_len=64)
before = rss_anon()
model = herd.load(sys.argv[1], quant="packed", prepare=True, mmap_experts=sys.argv[2] == "mapped")
generate(model, [[5, 6, 7, 8]], SamplingParams(max_tokens=4), max_seq_len=64)
print(json.dumps({"grew": rss_anon() - before}))
"""


@needs_kernels
def test_mapped_experts_hold_no_second_copy(tmp_path):
    """Load + 4 decoded tokens in a fresh process (after one warm-up load): anonymous memory (RssAnon) grows by well
    under the experts' bytes when they are mapped (their pages are the file's, counted in RssFile; measured 10.3 MB,
    the other weights), by more than their bytes when they are copied into memory (136 MB for 113 MB of experts)."""
    try:
        default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    path = write_scout_gguf(tmp_path / "big.gguf", scout_config(**BIG_EXPERTS), "Q4_0", seed=0, log=lambda _: None)
    experts = routed_expert_bytes(path)
    assert experts > 100e6
    env_root = str(Path(herd.__file__).resolve().parents[1])
    grew = {}
    for mode in ("mapped", "in_memory"):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), mode], capture_output=True, text=True,
                             check=True, cwd=env_root).stdout
        grew[mode] = json.loads(out.strip().splitlines()[-1])["grew"]
    assert grew["mapped"] < 0.25 * experts, (grew, experts)
    assert grew["in_memory"] > experts, (grew, experts)


def test_cli_mmap_experts_flag(files):
    """`herd generate FILE --mmap-experts` maps the experts (and says so with --verbose); with --dequantize it is
    refused by name."""
    cmd = [sys.executable, "-m", "herd.cli", "generate", str(files["Q4_0"]), "Hello", "--max-tokens", "3"]
    run = subprocess.run(cmd + ["--mmap-experts", "--verbose"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "routed experts mapped from the file" in run.stderr
    bad = subprocess.run(cmd + ["--mmap-experts", "--dequantize"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--mmap-experts and --dequantize do not go together" in bad.stderr
