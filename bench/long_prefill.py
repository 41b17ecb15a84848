"""Long-context prefill on a tiny Llama 4 config: time, peak memory and KV-cache bytes per token of context.

    python -m bench.long_prefill --tokens 1048576

The model is the `debug` preset's trunk (dim 64, 4 layers: 3 chunked-RoPE + 1 NoPE global, MoE every 2nd layer)
with Llama 4's real chunk and temperature-tuning floor (8192), random weights, bf16. The prompt goes through
engine.Engine exactly as any request does: prefill in pieces of --prefill-chunk tokens, then one decode step. The
global layer attends over up to the whole context per piece with ops.attention_blockwise, so activation memory
stays bounded; the hybrid KV cache keeps one chunk for chunked layers and everything for the global one.
Peak memory is the process's max RSS (resource.getrusage), which includes torch itself and the weights.

NOTE: torch's oneDNN bf16 matmuls JIT-compile and cache one kernel per matrix shape. MoE expert groups have a new row
count almost every forward, so with oneDNN on, RSS climbs by a few hundred MB over the first few hundred forwards
(independent of context length, and it saturates). The bench turns oneDNN off (--onednn keeps it) so that peak RSS
measures herd's memory; the fused attention kernel runs at the same speed either way.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from herd.config import preset
from herd.engine import Engine, SamplingParams
from herd.model import Transformer
from herd.plan import kv_cache_bytes


def tiny_llama4(context: int, n_heads: int, n_kv_heads: int, head_dim: int):
    cfg = preset("debug")
    cfg.attn_chunk_size, cfg.floor_scale, cfg.max_seq_len = 8192, 8192.0, context
    cfg.n_heads, cfg.n_kv_heads, cfg.head_dim = n_heads, n_kv_heads, head_dim
    cfg.__post_init__()
    return cfg


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux reports KiB


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Workload
    p.add_argument("--tokens", type=int, default=1 << 20, help="prompt length")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill forward")
    p.add_argument("--kv-int8", action="store_true", help="int8 keys and values on the global layer")
    # Model
    p.add_argument("--n-heads", type=int, default=4, help="query heads (the debug preset has 4)")
    p.add_argument("--n-kv-heads", type=int, default=2, help="key/value heads (the debug preset has 2)")
    p.add_argument("--head-dim", type=int, default=16, help="(the debug preset has 16)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights, activations, cache")
    # Runtime
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--onednn", action="store_true", help="keep torch's oneDNN matmuls on (see the NOTE above)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.mkldnn.enabled = args.onednn
    dtype = getattr(torch, args.dtype)

    context = args.tokens + 2                                   # the prompt and two generated tokens
    cfg = tiny_llama4(context, args.n_heads, args.n_kv_heads, args.head_dim)
    model = Transformer(cfg).init_weights(seed=0).to(dtype).eval()
    prompt = torch.randint(3, cfg.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = Engine(model, max_batch=1, max_seq_len=context, prefill_chunk=args.prefill_chunk, kv_int8=args.kv_int8)
    rss_before = max_rss_bytes()

    t0, cpu0 = time.perf_counter(), time.process_time()
    req = engine.add(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    while not req.output:                                       # prefill, a piece per step, + the first token
        engine.step()
    t_prefill, cpu_prefill = time.perf_counter() - t0, time.process_time() - cpu0
    engine.step()                                               # one decode step over the whole context
    t_decode = time.perf_counter() - t0 - t_prefill
    rss_peak = max_rss_bytes()

    elt = torch.tensor([], dtype=dtype).element_size()
    measured = engine.cache.nbytes()
    formula = kv_cache_bytes(cfg, context, dtype_bytes=elt, pos_bytes=8, kv_int8=args.kv_int8)
    full_cfg = tiny_llama4(context, args.n_heads, args.n_kv_heads, args.head_dim)
    full_cfg.nope_every, full_cfg.attn_chunk_size = 0, None    # same model shapes, every layer keeps everything
    full_cfg.__post_init__()
    full = kv_cache_bytes(full_cfg, context, dtype_bytes=elt, pos_bytes=8)
    n_global = sum(not s.chunked for s in cfg.layers)
    print(f"model        debug trunk, {cfg.n_layers} layers ({cfg.n_layers - n_global} chunked RoPE, chunk "
          f"{cfg.attn_chunk_size}; {n_global} NoPE global), heads {cfg.n_heads} q / {cfg.n_kv_heads} kv x "
          f"{cfg.head_dim}, {args.dtype}{', int8 global KV' if args.kv_int8 else ''}, {args.threads} thread(s), "
          f"oneDNN {'on' if args.onednn else 'off'}")
    print(f"prefill      {args.tokens:,} tokens in {t_prefill:.1f} s wall, {cpu_prefill:.1f} s CPU "
          f"({args.tokens / t_prefill:,.0f} tok/s), pieces of {args.prefill_chunk}; decode step "
          f"{t_decode * 1000:.0f} ms; tokens {req.output}")
    print(f"peak RSS     {rss_peak / 2**20:,.0f} MiB (after building the model and cache: {rss_before / 2**20:,.0f} "
          f"MiB)")
    print(f"KV cache     {measured / 2**20:,.1f} MiB measured (plan.kv_cache_bytes: {formula / 2**20:,.1f} MiB), "
          f"{measured / context:,.1f} B per token of context; a full cache of the same model "
          f"{full / 2**20:,.1f} MiB ({full / context:,.1f} B/token): {100 * measured / full:.1f}%")


if __name__ == "__main__":
    main()
