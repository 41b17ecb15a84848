"""Batch-1 CPU speed, a fair race: herd vs llama.cpp (llama-cpp-python on the same GGUF file) vs transformers (the
same weights in fp32), each engine in its own process with its own environment and its own best documented settings,
printed beside its figures; and a tiny Llama 4 MoE, herd (fp32, int8 and int4 routed experts) vs transformers. Not a
test. Prints a markdown table of medians over --repeats runs, bytes read per token, the fraction of the machine's
read-bandwidth ceiling each engine reaches (bench/roofline.py), and the ratios.

    python bench/speed.py [--threads 2] [--repeats 3] [--decode 32] [--short 5] [--long 512]
                          [--model FILE.gguf] [--hf DIR] [--skip-llamacpp] [--skip-transformers]
                          [--skip-moe | --moe-only] [--load N] [--torch-kernels]

--load N runs N busy-loop processes (one pure-Python spin each) beside every engine for the whole race: a shared,
busy machine, where a thread the OS deschedules holds up every step that waits for it. --torch-kernels adds herd
with HERD_KERNELS=0 (torch's int4/int8 kernels), the path herd falls back to where its own kernels cannot run.

Model: --model, a GGUF file (default: the default model, SmolLM2-135M-Instruct Q4_1); transformers loads the same
GGUF through its own GGUF reader (llama files), or --hf DIR, an HF folder of the same weights (bench/scout_gguf.py
--hf writes one for its llama4 files, which transformers' GGUF reader does not read). Measured: decode tok/s after a
--short and after a --long prompt (greedy, --decode tokens, first token excluded); prefill tok/s of the --long
prompt (time to the first token's logits). The prompt is English prose (Python's pydoc topics), the same token ids
for every engine (the GGUF's own tokenizer).

Each engine runs in a child process started with the parent's environment minus every OpenMP / threading knob
(THREAD_KNOBS), plus that engine's own (ENGINE_ENV), and its own settings:
- herd: as `herd generate` runs: herd.cli_common.load_model (GGUF kept packed, fused q/k/v and gate/up, herd's
  kernels where the CPU has them), its Engine, KV cache fp32 (default) and f16 (`--kv-dtype f16`);
  OMP_WAIT_POLICY=PASSIVE, which herd's CLI sets for itself (herd/cli.py); torch threads = --threads.
- llama.cpp: the library's defaults except what a user sets: n_threads = n_threads_batch = --threads (llama.cpp's
  own default is the number of physical cores; llama-cpp-python's is half the logical CPUs); n_batch 2048 and
  n_ubatch 512 (llama.cpp's CLI defaults: one logical batch covers a 2048-token prefill); flash attention on, which
  is what llama.cpp's default "auto" resolves to on the CPU backend (llama-cpp-python's flash_attn=False default
  would turn it off); f16 KV cache; mmap; OpenMP in its default environment.
- transformers: fp32, attn_implementation="sdpa" (its fastest CPU attention; flash-attention kernels are GPU-only),
  torch threads = --threads, its own DynamicCache, OpenMP in its default environment.

llama.cpp: llama-cpp-python (a benchmark-only peer, not installed by install.sh). A portable build without AMX or
AVX-512 (the native build crashed on an AMX machine; this recipe runs on any AVX2 + FMA x86-64 CPU):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
      pip wheel --no-deps llama-cpp-python==0.3.36 -w WHEEL_DIR && pip install WHEEL_DIR/llama_cpp_python-*.whl
A crash of the native library in its child cannot take the other results with it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Threading knobs removed from every child's environment, so that none inherits a setting meant for another.
THREAD_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "OMP_DYNAMIC", "OMP_PROC_BIND", "OMP_PLACES",
                "KMP_BLOCKTIME", "KMP_AFFINITY", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Each engine's own environment. herd: what its CLI sets for itself (passive OpenMP waits; on a shared, loaded CPU a
# spinning worker gets descheduled: 23 ms instead of 0.8 ms for one SmolLM2 FFN matmul with 2 threads).
# llama.cpp and transformers: their defaults.
ENGINE_ENV = {"herd": {"OMP_WAIT_POLICY": "PASSIVE"}, "herd-torch": {"OMP_WAIT_POLICY": "PASSIVE", "HERD_KERNELS": "0"},
              "llama.cpp": {}, "transformers": {}, "probe": {}}
FAMILY = {"herd": "herd", "herd-f16kv": "herd", "herd-torch": "herd-torch", "herd-moe": "herd", "llama.cpp": "llama.cpp",
          "transformers": "transformers", "transformers-moe": "transformers", "bandwidth": "probe"}


def prompt_ids(tok, n: int) -> list[int]:
    """The first n token ids of Python's pydoc reference topics (English prose), in a fixed order."""
    import pydoc_data.topics as topics
    ids: list[int] = []
    for key in ("execmodel", "naming", "objects", "import", *sorted(topics.topics)):
        ids += tok.encode(topics.topics[key] + "\n\n")
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"the pydoc topics hold only {len(ids)} tokens, fewer than the {n} asked for")


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")
    return f"{name}, {os.cpu_count()} cores"


def load_avg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def child_env(engine_family: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_KNOBS}
    env.update(ENGINE_ENV[engine_family])
    return env


def env_line(engine_family: str) -> str:
    own = ENGINE_ENV[engine_family]
    return " ".join(f"{k}={v}" for k, v in own.items()) or "OpenMP/threading variables unset (defaults)"


def run_child(task: str, args, **extra) -> dict | None:
    """Run one measurement in a fresh process (`--child task`) with its engine's environment; its last stdout line
    is a JSON object. None (and a message) when it fails."""
    family = FAMILY[task]
    cmd = [sys.executable, __file__, "--child", task, "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--decode", str(args.decode), "--short", str(args.short), "--long", str(args.long),
           "--model", str(args.model), "--prompts", str(args.prompts)] + (["--hf", str(args.hf)] if args.hf else [])
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    child = subprocess.run(cmd, capture_output=True, text=True, env=child_env(family))
    if child.returncode != 0:
        tail = child.stderr.strip().splitlines()[-3:]
        print(f"  {task}: FAILED, exit code {child.returncode}: {' | '.join(tail)}", flush=True)
        return None
    out = json.loads(child.stdout.strip().splitlines()[-1])
    out["env"] = env_line(family)
    print(f"  {task}: {json.dumps({k: v for k, v in out.items() if k not in ('settings', 'env')})}  "
          f"(load {load_avg()})", flush=True)
    return out


def median_runs(fn, repeats: int, *args):
    runs = [fn(*args) for _ in range(repeats)]
    return tuple(statistics.median(r[i] for r in runs) for i in range(2))


def measure(fn, model, args) -> dict:
    """Decode after the short prompt, decode and prefill of the long one (the prompts the parent tokenized)."""
    prompts = json.loads(Path(args.prompts).read_text())
    short, long = prompts["short"], prompts["long"]
    fn(model, short, 4)                                           # warm-up
    _, d_short = median_runs(fn, args.repeats, model, short, args.decode)
    p_long, d_long = median_runs(fn, args.repeats, model, long, args.decode)
    return {"decode_short": d_short, "decode_long": d_long, "prefill_long": p_long}


# ---- herd ----------------------------------------------------------------------------------------------------------
def herd_run(model, prompt: list[int], n_decode: int, cache_dtype=None) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one request through the Engine (KV cache in cache_dtype, default the
    activations' dtype)."""
    from herd.engine import Engine, SamplingParams
    engine = Engine(model, max_batch=1, max_seq_len=len(prompt) + n_decode + 8, cache_dtype=cache_dtype)
    req = engine.add(prompt, SamplingParams(max_tokens=n_decode + 1, ignore_eos=True))
    t0 = time.perf_counter()
    while not req.output:                                # prefill, a piece per step, + the first token
        engine.step()
    t1 = time.perf_counter()
    while not req.finished:
        engine.step()
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


def child_herd(args, kv: str) -> dict:
    import functools

    import torch

    from herd.cli_common import load_model
    from herd.cpu import status

    from bench.roofline import kv_read_bytes, module_weight_bytes_per_token

    _, model, _ = load_model(str(args.model), threads=args.threads)
    cache_dtype = {"fp32": None, "f16": torch.float16}[kv]
    cfg = model.config
    with torch.inference_mode():
        r = measure(functools.partial(herd_run, cache_dtype=cache_dtype), model, args)
    w = module_weight_bytes_per_token(model, *((cfg.moe.n_experts, cfg.moe.top_k) if cfg.moe else (0, 0)))
    kv_bytes = 2 if kv == "f16" else 4
    r["bytes_short"] = w + kv_read_bytes(cfg, args.short, kv_bytes)
    r["bytes_long"] = w + kv_read_bytes(cfg, args.long, kv_bytes)
    r["settings"] = (f"as `herd generate` loads a GGUF (packed, fused; {status()}), Engine, "
                     f"KV cache {kv}, torch {torch.__version__}, {args.threads} torch threads")
    return r


# ---- llama.cpp -----------------------------------------------------------------------------------------------------
def llamacpp_next(llm) -> int:
    """Greedy next token from the last evaluated position. Llama.eval no longer copies logits into `scores` unless
    logits_all (which would make llama.cpp compute the head for every prompt token), so read the context's own
    buffer: without logits_all it holds the last token's row only."""
    import numpy as np
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


def llamacpp_settings(args) -> dict:
    """llama.cpp's own defaults, except the thread counts under comparison (see the module docstring)."""
    return dict(n_ctx=args.long + args.decode + 16, n_batch=max(2048, args.long), n_ubatch=512,
                n_threads=args.threads, n_threads_batch=args.threads, flash_attn=True)


def child_llamacpp(args) -> dict:
    """llama.cpp alone: this process imports neither torch nor herd (torch's own OpenMP runtime would sit beside
    llama.cpp's); the parent adds the bytes per token, which it reads from the file."""
    import llama_cpp

    settings = llamacpp_settings(args)
    llm = llama_cpp.Llama(model_path=str(args.model), verbose=False, **settings)
    r = measure(llamacpp_run, llm, args)
    info = llama_cpp.llama_print_system_info().decode().replace("CPU : ", "")
    features = " ".join(f.removesuffix(" = 1") for f in info.split(" | ") if f.strip().endswith("= 1"))
    r["settings"] = (f"llama-cpp-python {llama_cpp.__version__}, Llama.eval, "
                     + ", ".join(f"{k}={v}" for k, v in settings.items()) + f", f16 KV cache, mmap; CPU: {features}")
    return r


# ---- transformers --------------------------------------------------------------------------------------------------
def hf_run(model, prompt: list[int], n_decode: int) -> tuple[float, float]:
    import torch
    with torch.inference_mode():
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


def child_transformers(args) -> dict:
    import torch
    import transformers

    from herd.gguf import config_from_metadata, metadata, open_gguf

    from bench.roofline import kv_read_bytes, module_weight_bytes_per_token

    torch.set_num_threads(args.threads)
    path = Path(args.model)
    where = dict(pretrained_model_name_or_path=str(args.hf)) if args.hf else \
        dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    r = measure(hf_run, model, args)
    reader = open_gguf(args.model)
    cfg = config_from_metadata(metadata(reader), {t.name for t in reader.tensors}, str(args.model))
    w = module_weight_bytes_per_token(model, all_experts=True)     # Llama4TextExperts runs every expert
    r["bytes_short"] = w + kv_read_bytes(cfg, args.short, 4)
    r["bytes_long"] = w + kv_read_bytes(cfg, args.long, 4)
    r["settings"] = (f"transformers {transformers.__version__}, fp32, sdpa attention, "
                     f"{'HF folder ' + str(args.hf) if args.hf else 'its GGUF reader'}, torch {torch.__version__}, "
                     f"{args.threads} torch threads")
    return r


# ---- the tiny Llama 4 MoE ------------------------------------------------------------------------------------------
def tiny_moe_checkpoint(folder: str):
    """A tiny Llama 4 MoE (16 routed experts, top-1, a shared expert, every layer MoE), random weights saved by
    transformers: the same checkpoint for herd and transformers, fp32 in both."""
    import torch
    import transformers

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
    hf.save_pretrained(folder)


def tiny_moe_prompt() -> list[int]:
    import torch
    return torch.randint(3, 8192, (16,), generator=torch.Generator().manual_seed(0)).tolist()


def child_tiny_moe(args) -> dict:
    import torch

    from bench.roofline import module_weight_bytes_per_token

    torch.set_num_threads(args.threads)
    if args.scheme == "transformers":
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32,
                                                                  attn_implementation="sdpa").eval()
        fn, settings = hf_run, f"transformers {transformers.__version__}, fp32, sdpa attention, every expert"
        w = module_weight_bytes_per_token(model, all_experts=True)
    else:
        import herd
        from herd.cpu import prepare, status
        from herd.quantize import quantize_model
        model = herd.load(args.checkpoint)
        if args.scheme != "fp32":               # routed experts as `herd quantize SRC DST --scheme S` leaves them
            quantize_model(model, args.scheme)
        prepare(model)                          # as `herd run` loads a checkpoint (cli_common.load_model)
        fn, settings = herd_run, f"herd, {args.scheme} routed experts, fused, {status()}"
        w = module_weight_bytes_per_token(model, model.config.moe.n_experts, model.config.moe.top_k)
    prompt = tiny_moe_prompt()
    with torch.inference_mode():
        fn(model, prompt, 4)
        _, dec = median_runs(fn, args.repeats, model, prompt, args.decode)
    return {"decode_short": dec, "bytes_short": w, "settings": settings + f", {args.threads} torch threads"}


def child_bandwidth(args) -> dict:
    from bench.roofline import read_bandwidth
    return read_bandwidth(args.threads)


# ---- the race ------------------------------------------------------------------------------------------------------
def main_model(args, results: dict):
    name = Path(args.model).name
    tasks = [("herd", f"herd ({name})"), ("herd-f16kv", f"herd ({name}, f16 KV)")]
    if args.torch_kernels:
        tasks.append(("herd-torch", f"herd ({name}, torch's kernels: HERD_KERNELS=0)"))
    for task, label in tasks:
        r = run_child(task, args)
        if r:
            results[label] = r
    if not args.skip_llamacpp:
        r = run_child("llama.cpp", args)
        if r:
            from herd.gguf import config_from_metadata, metadata, open_gguf

            from bench.roofline import gguf_weight_bytes_per_token, kv_read_bytes
            reader = open_gguf(args.model)
            cfg = config_from_metadata(metadata(reader), {t.name for t in reader.tensors}, str(args.model))
            w = gguf_weight_bytes_per_token(args.model)
            r["bytes_short"] = w + kv_read_bytes(cfg, args.short, 2)        # llama.cpp's default f16 KV cache
            r["bytes_long"] = w + kv_read_bytes(cfg, args.long, 2)
            results[f"llama.cpp ({name})"] = r
    from herd.gguf import metadata, open_gguf
    arch = metadata(open_gguf(args.model))["general.architecture"]
    if not args.skip_transformers and not args.hf and arch != "llama":
        print("  transformers: skipped (its GGUF reader reads llama files; give the same weights as --hf DIR)")
    elif not args.skip_transformers:
        r = run_child("transformers", args)
        if r:
            results[f"transformers ({'HF twin' if args.hf else name}, fp32)"] = r


def tiny_moe(args, results: dict):
    with tempfile.TemporaryDirectory() as d:
        tiny_moe_checkpoint(d)
        for scheme in ("fp32", "int8", "int4", "transformers"):
            r = run_child("transformers-moe" if scheme == "transformers" else "herd-moe", args, scheme=scheme,
                          checkpoint=d)
            if r:
                results["transformers tiny MoE (fp32)" if scheme == "transformers" else f"herd tiny MoE ({scheme})"] = r


def print_report(args, results: dict, bandwidth: dict | None):
    S, L = args.short, args.long
    ceiling = bandwidth["best"] * 1e9 if bandwidth else None
    print(f"\n{args.load} busy-loop processes beside the engines; load average at end {load_avg()}; medians of {args.repeats} runs, {args.decode} decode tokens each; "
          + (f"read-bandwidth ceiling {bandwidth['best']:.1f} GB/s (median {bandwidth['median']:.1f}) at "
             f"{args.threads} threads (bench/roofline.py)" if bandwidth else "bandwidth not measured") + "\n")
    print(f"| engine | decode tok/s after {S} | decode tok/s after {L} | prefill tok/s ({L}) | "
          f"MB read per token after {S} / {L} | % of read ceiling after {S} / {L} |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        if "decode_long" not in r:
            continue
        frac = (f"{100 * r['bytes_short'] * r['decode_short'] / ceiling:.0f}% / "
                f"{100 * r['bytes_long'] * r['decode_long'] / ceiling:.0f}%") if ceiling else "-"
        print(f"| {name} | {r['decode_short']:.1f} | {r['decode_long']:.1f} | {r['prefill_long']:.1f} | "
              f"{r['bytes_short'] / 1e6:.1f} / {r['bytes_long'] / 1e6:.1f} | {frac} |")
    moe = {k: r for k, r in results.items() if "tiny MoE" in k}
    if moe:
        print("\n| tiny Llama 4 MoE | decode tok/s after 16 | MB read per token | % of read ceiling |")
        print("|---|---|---|---|")
        for name, r in moe.items():
            frac = f"{100 * r['bytes_short'] * r['decode_short'] / ceiling:.0f}%" if ceiling else "-"
            print(f"| {name} | {r['decode_short']:.1f} | {r['bytes_short'] / 1e6:.2f} | {frac} |")
    print()
    herds = [k for k in results if k.startswith("herd (")]
    others = [k for k in results if k.startswith(("llama.cpp", "transformers (")) and "tiny" not in k]
    for h in herds:
        for o in others:
            a, b = results[h], results[o]
            print(f"{h} / {o}: decode after {S} {a['decode_short'] / b['decode_short']:.2f}x, "
                  f"after {L} {a['decode_long'] / b['decode_long']:.2f}x, "
                  f"prefill {L} {a['prefill_long'] / b['prefill_long']:.2f}x")
    t = results.get("transformers tiny MoE (fp32)")
    for scheme in ("fp32", "int8", "int4"):
        h = results.get(f"herd tiny MoE ({scheme})")
        if h and t:
            print(f"tiny Llama 4 MoE decode: herd ({scheme} experts) / transformers (fp32) "
                  f"{h['decode_short'] / t['decode_short']:.2f}x")
    print("\nEach engine's environment and settings:")
    for name, r in results.items():
        print(f"- {name}: env {r['env']}; {r['settings']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", type=int, default=32, help="decode tokens per run")
    ap.add_argument("--short", type=int, default=5, help="tokens of the short prompt")
    ap.add_argument("--long", type=int, default=512, help="tokens of the long prompt (prefill measured on it)")
    ap.add_argument("--model", type=Path, default=None, help="a GGUF file (default: the default model)")
    ap.add_argument("--hf", type=Path, default=None, help="an HF folder of the same weights, for transformers")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--moe-only", action="store_true", help="only the tiny Llama 4 MoE, herd vs transformers")
    ap.add_argument("--load", type=int, default=0, help="busy-loop processes running beside the engines")
    ap.add_argument("--torch-kernels", action="store_true", help="also herd on torch's kernels (HERD_KERNELS=0)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scheme", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompts", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))          # `from bench.roofline import ...`
    if args.model is None:
        from herd.textgen import default_model_path
        args.model = default_model_path()
    if args.child:
        run = {"herd": lambda: child_herd(args, "fp32"), "herd-f16kv": lambda: child_herd(args, "f16"),
               "herd-torch": lambda: child_herd(args, "fp32"),
               "llama.cpp": lambda: child_llamacpp(args), "transformers": lambda: child_transformers(args),
               "herd-moe": lambda: child_tiny_moe(args), "transformers-moe": lambda: child_tiny_moe(args),
               "bandwidth": lambda: child_bandwidth(args)}[args.child]
        print(json.dumps(run()))
        return
    print(f"machine: {machine()}; threads {args.threads}; model {args.model}; load average at start {load_avg()}; "
          f"{args.load} busy-loop processes beside the engines", flush=True)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        race(args)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def race(args):
    from herd.tokenizer import load_tokenizer
    tok = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as d:
        args.prompts = Path(d) / "prompts.json"       # the same token ids for every engine
        args.prompts.write_text(json.dumps({"short": prompt_ids(tok, args.short), "long": prompt_ids(tok, args.long)}))
        bandwidth = run_child("bandwidth", args)
        results: dict = {}
        if not args.moe_only:
            main_model(args, results)
        if not args.skip_moe and not args.skip_transformers:
            tiny_moe(args, results)
    print_report(args, results, bandwidth)


if __name__ == "__main__":
    main()
