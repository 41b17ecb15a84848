"""Batch-1 CPU speed, in one run on one machine and one thread count: herd vs llama.cpp (llama-cpp-python on the same
GGUF file) vs transformers (the same GGUF loaded in fp32), and a tiny Llama 4 MoE, herd vs transformers (which runs
every expert for every token); herd runs the MoE in fp32 and with its routed experts quantized to int8 and to int4
(`herd quantize`'s default selection). Not a test. Prints a markdown table of medians over --repeats runs and the
ratios.

    python bench/speed.py [--threads 2] [--repeats 3] [--decode 32] [--skip-llamacpp] [--skip-transformers]
                          [--skip-moe | --moe-only]

Measured (SmolLM2-135M-Instruct Q4_1, the default model):
- decode tok/s after a 5-token and after a 512-token prompt (greedy, --decode tokens, first token excluded);
- prefill tok/s of the 512-token prompt (time to the first token's logits).
herd runs the GGUF repacked (herd.load(path, quant="packed", prepare=True): herd's own int4 / int8 kernels where the CPU has
AVX512-VNNI, else torch's; fused q/k/v and gate/up) through its Engine, as `herd run` loads a GGUF file, once with its
default fp32 KV cache and once with an f16 one (`--kv-dtype f16`; llama.cpp's default cache is f16); llama.cpp
through Llama.eval; transformers through forward calls with its KV cache. The prompt is English prose (Python's
pydoc topics), identical token ids for all three.

llama.cpp: llama-cpp-python (a benchmark-only peer, not installed by install.sh). On this machine its native build
(AVX512 + AMX) crashed with a general protection fault in libggml-cpu on the first eval; built without AMX it runs:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
      -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF \
      -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install --no-deps --no-cache-dir llama-cpp-python==0.3.36
(about 25 minutes on 2 cores). It runs in a child process, so a crash there cannot take the other results with it.

NOTE: OMP_WAIT_POLICY=PASSIVE is set before torch loads. On a shared, loaded machine OpenMP worker threads that
spin-wait get descheduled and a 2-thread fp32 matmul of SmolLM2's FFN took 23 ms instead of 0.8 ms (1 thread).
The same environment applies to every engine in this process (llama.cpp's OpenMP build included).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPT_LONG = 512
PROMPT_SHORT = 5


def prompt_ids(tok, n: int) -> list[int]:
    import pydoc_data.topics as topics
    text = "\n\n".join(topics.topics[k] for k in ("execmodel", "naming", "objects", "import"))
    ids = tok.encode(text)
    assert len(ids) >= n
    return ids[:n]


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")
    return f"{name}, {os.cpu_count()} cores"


def load_avg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


# ---- herd ----------------------------------------------------------------------------------------------------------
def herd_run(model, prompt: list[int], n_decode: int, cache_dtype=None) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one request through the Engine (KV cache in cache_dtype, default the
    activations' dtype)."""
    from herd.engine import Engine, SamplingParams
    engine = Engine(model, max_batch=1, max_seq_len=len(prompt) + n_decode + 8, cache_dtype=cache_dtype)
    req = engine.add(prompt, SamplingParams(max_tokens=n_decode + 1, ignore_eos=True))
    t0 = time.perf_counter()
    engine.step()                                        # prefill + the first token
    t1 = time.perf_counter()
    while not req.finished:
        engine.step()
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


# ---- llama.cpp -----------------------------------------------------------------------------------------------------
def llamacpp_next(llm) -> int:
    """Greedy next token from the last evaluated position. Llama.eval no longer copies logits into `scores` unless
    logits_all (which would make llama.cpp compute the head for every prompt token), so read the context's own
    buffer: without logits_all it holds the last token's row only."""
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))


def llamacpp_run(llm, prompt: list[int], n_decode: int) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = llamacpp_next(llm)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([tok])
        tok = llamacpp_next(llm)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


# ---- transformers --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def hf_run(model, prompt: list[int], n_decode: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        out = model(tok, past_key_values=out.past_key_values, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


def median_runs(fn, repeats: int, *args):
    runs = [fn(*args) for _ in range(repeats)]
    return tuple(statistics.median(r[i] for r in runs) for i in range(2))


def smollm2(args, results: dict):
    import herd
    from herd.textgen import default_model_path
    from herd.tokenizer import load_tokenizer

    path = default_model_path()
    tok = load_tokenizer(path)
    short, long = prompt_ids(tok, PROMPT_SHORT), prompt_ids(tok, PROMPT_LONG)

    def measure(name, fn, model):
        fn(model, short, 4)                                           # warm-up
        _, d5 = median_runs(fn, args.repeats, model, short, args.decode)
        p512, d512 = median_runs(fn, args.repeats, model, long, args.decode)
        results[name] = {"decode after 5": d5, "decode after 512": d512, "prefill 512": p512}
        print(f"  {name}: {results[name]}  (load {load_avg()})", flush=True)

    with torch.inference_mode():
        packed = herd.load(path, quant="packed", prepare=True)
        measure("herd (packed Q4_1)", herd_run, packed)
        measure("herd (packed Q4_1, f16 KV)", functools.partial(herd_run, cache_dtype=torch.float16), packed)
        del packed
    if not args.skip_llamacpp:
        # in a child process: a crash of the native library (seen: a general protection fault in libggml-cpu.so on
        # the first eval with llama-cpp-python 0.3.36 built natively here) must not take the other results with it
        child = subprocess.run([sys.executable, __file__, "--llamacpp-child", "--threads", str(args.threads),
                                "--repeats", str(args.repeats), "--decode", str(args.decode)],
                               capture_output=True, text=True)
        if child.returncode == 0:
            results["llama.cpp (Q4_1)"] = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"  llama.cpp (Q4_1): {results['llama.cpp (Q4_1)']}  (load {load_avg()})", flush=True)
        else:
            print(f"  llama.cpp (Q4_1): FAILED, exit code {child.returncode} "
                  f"{child.stderr.strip().splitlines()[-1:] if child.stderr.strip() else ''}", flush=True)
    if not args.skip_transformers:
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
        measure("transformers (fp32)", hf_run, hf)
        del hf


def llamacpp_child(args):
    """Measure llama.cpp alone and print its results as one JSON line (see smollm2)."""
    from llama_cpp import Llama

    from herd.textgen import default_model_path
    from herd.tokenizer import load_tokenizer

    path = default_model_path()
    tok = load_tokenizer(path)
    short, long = prompt_ids(tok, PROMPT_SHORT), prompt_ids(tok, PROMPT_LONG)
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    llamacpp_run(llm, short, 4)
    _, d5 = median_runs(llamacpp_run, args.repeats, llm, short, args.decode)
    p512, d512 = median_runs(llamacpp_run, args.repeats, llm, long, args.decode)
    print(json.dumps({"decode after 5": d5, "decode after 512": d512, "prefill 512": p512}))


def tiny_moe(args, results: dict):
    """A tiny Llama 4 MoE (16 routed experts, top-1, a shared expert, every layer MoE), random weights saved by
    transformers and loaded by herd: the same checkpoint, fp32 in both."""
    import herd
    import transformers
    from herd.cpu import prepare
    from herd.quantize import quantize_model

    cfg = transformers.Llama4TextConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=16, num_experts_per_tok=1,
        interleave_moe_layer_step=1, attention_chunk_size=8192, use_qk_norm=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.Llama4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    prompt = torch.randint(3, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = []
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        for scheme in (None, "int8", "int4"):   # routed experts as `herd quantize SRC DST --scheme S` leaves them
            model = herd.load(d)
            if scheme:
                quantize_model(model, scheme)
            prepare(model)                      # as `herd run` loads a checkpoint (cli._load)
            runs.append((f"herd tiny MoE ({scheme + ' experts' if scheme else 'fp32'})", herd_run, model))
    for name, fn, m in (*runs, ("transformers tiny MoE (fp32)", hf_run, hf)):
        with torch.inference_mode():
            fn(m, prompt, 4)
            _, dec = median_runs(fn, args.repeats, m, prompt, args.decode)
        results[name] = {"decode after 16": dec}
        print(f"  {name}: {results[name]}  (load {load_avg()})", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", type=int, default=32, help="decode tokens per run")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--moe-only", action="store_true", help="only the tiny Llama 4 MoE, herd vs transformers")
    ap.add_argument("--llamacpp-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.llamacpp_child:
        return llamacpp_child(args)
    print(f"machine: {machine()}; threads {args.threads}; torch {torch.__version__}; "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; load average at start {load_avg()}", flush=True)
    results: dict = {}
    if not args.moe_only:
        smollm2(args, results)
    if not args.skip_moe and not args.skip_transformers:
        tiny_moe(args, results)
    print(f"\nload average at end {load_avg()}; medians of {args.repeats} runs, {args.decode} decode tokens each\n")
    print("| engine | decode tok/s after 5 | decode tok/s after 512 | prefill tok/s (512) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        if "prefill 512" in r:
            print(f"| {name} | {r['decode after 5']:.1f} | {r['decode after 512']:.1f} | {r['prefill 512']:.1f} |")
    print()
    for herd_name, herd_label in (("herd (packed Q4_1)", "herd"), ("herd (packed Q4_1, f16 KV)", "herd f16 KV")):
        herd_r = results.get(herd_name)
        for other, label in (("llama.cpp (Q4_1)", "llama.cpp"), ("transformers (fp32)", "transformers")):
            if herd_r and other in results:
                o = results[other]
                print(f"{herd_label} / {label}: "
                      f"decode after 5 {herd_r['decode after 5'] / o['decode after 5']:.2f}x, "
                      f"decode after 512 {herd_r['decode after 512'] / o['decode after 512']:.2f}x, "
                      f"prefill 512 {herd_r['prefill 512'] / o['prefill 512']:.2f}x")
    if "herd tiny MoE (fp32)" in results:
        t = results["transformers tiny MoE (fp32)"]["decode after 16"]
        for label in ("fp32", "int8 experts", "int4 experts"):
            h = results[f"herd tiny MoE ({label})"]["decode after 16"]
            print(f"tiny Llama 4 MoE decode: herd ({label}) {h:.1f} tok/s, transformers (fp32) {t:.1f} tok/s, "
                  f"herd / transformers {h / t:.2f}x")


if __name__ == "__main__":
    main()
