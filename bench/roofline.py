"""The decode roofline: how many bytes per second this machine reads from memory, and how many bytes each engine must
read to decode one token. Must not know how any engine computes; it counts bytes of weights and cache only.

    python -m bench.roofline [--threads 1,2] [--gib 1] [--repeats 7] [MODEL.gguf [--context 5,2048]]

Bandwidth: torch's sum over a --gib buffer (far past the last-level cache), best and median of --repeats passes, per
thread count, in this process with torch's default OpenMP environment. A sum reads every byte once and writes
nothing; at batch 1 a decode step is the same kind of work (each weight byte read once per token), so its best rate
is the ceiling a decode step can reach on this machine, and bytes per token x tokens/s over it is the fraction of
the ceiling an engine reaches.

Bytes per decoded token (batch 1, `context` tokens already in the cache):
- weights: every tensor once, except the token embedding (one row, unless it is also the output head) and the
  routed experts: an engine that runs only the routed experts reads top_k / n_experts of them (llama.cpp, herd);
  one that runs every expert on every token reads them all (transformers' Llama4TextExperts, a bmm over all E);
- KV cache: keys and values of the positions each layer attends to (chunked iRoPE layers: only the current chunk)
  in the cache's dtype; activations are small and not counted.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from herd.cpu.hugepages import huge_buffer


def read_bandwidth(threads: int, nbytes: int = 2**30, repeats: int = 7) -> dict:
    """{"best": GB/s, "median": GB/s} of torch.sum over an nbytes fp32 buffer with `threads` torch threads. The
    buffer sits in 2 MB pages where the kernel offers them (herd.cpu.hugepages), as herd's prepared weights do: in
    4 KB pages the same sum measured 29.4 GB/s here, in 2 MB pages 36.3 (Zen 2 VM, 2 threads)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = huge_buffer(nbytes // 4 * 4).view(torch.float32).fill_(1.0)   # every page touched before timing
        x.sum()
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            rates.append(x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        return {"best": max(rates), "median": statistics.median(rates)}
    finally:
        torch.set_num_threads(saved)


def kv_read_bytes(cfg, context: int, bytes_per_value: float) -> float:
    """Keys and values one decode step at position `context` reads, summed over layers."""
    total = 0
    for spec in cfg.layers:
        visible = (context % cfg.attn_chunk_size if spec.chunked else context) + 1
        total += 2 * cfg.n_kv_heads * cfg.head_dim * bytes_per_value * visible
    return total


def gguf_weight_bytes_per_token(path) -> float:
    """Weight bytes one batch-1 decode step reads from a GGUF file run by an engine that runs only routed experts
    (llama.cpp): each tensor's stored bytes; *_exps tensors at top_k / n_experts; token_embd one row unless it is
    also the output head (no output.weight)."""
    from herd.gguf import config_from_metadata, metadata, open_gguf

    reader = open_gguf(path)
    names = {t.name for t in reader.tensors}
    cfg = config_from_metadata(metadata(reader), names, str(path))
    total = 0.0
    for t in reader.tensors:
        n = int(t.n_bytes)
        if t.name.endswith("_exps.weight"):
            n *= cfg.moe.top_k / cfg.moe.n_experts
        elif t.name == "token_embd.weight" and "output.weight" in names:
            n /= cfg.vocab_size
        total += n
    return total


def module_weight_bytes_per_token(model, n_experts: int = 0, top_k: int = 0, all_experts: bool = False) -> float:
    """Weight bytes one batch-1 decode step reads from a loaded torch model (herd's or transformers'): every
    parameter and buffer's memory once (tied tensors view the same bytes), routed-expert tensors (names with
    '.experts.') at top_k / n_experts unless all_experts, an embedding that is not also the output head at one row.
    Keyed by each tensor's own bytes, not its storage: herd.cpu.prepare puts every tensor in one arena."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    by_memory: dict[tuple, list[str]] = {}        # (address, bytes) -> the names viewing those bytes
    for name, t in tensors.items():
        if t.is_meta:
            continue
        by_memory.setdefault((t.data_ptr(), t.numel() * t.element_size()), []).append(name)
    total = 0.0
    for (_, n), names in by_memory.items():
        embedding = any("embed" in name for name in names)
        head = any(name.split(".")[-2] in ("output", "lm_head") for name in names)
        if embedding and not head:
            n /= tensors[names[0]].shape[0]
        elif any(".experts." in name for name in names) and not all_experts and n_experts:
            n *= top_k / n_experts
        total += n
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="a GGUF file: also print its bytes per decoded token")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--gib", type=float, default=1.0, help="buffer size in GiB")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--context", default="5,2048", help="comma-separated context lengths for the KV-cache bytes")
    args = ap.parse_args()
    for n in (int(x) for x in args.threads.split(",")):
        bw = read_bandwidth(n, int(args.gib * 2**30), args.repeats)
        print(f"read bandwidth, {n} thread(s): best {bw['best']:.1f} GB/s, median {bw['median']:.1f} GB/s")
    if args.model:
        from herd.gguf import config_from_metadata, metadata, open_gguf

        reader = open_gguf(args.model)
        cfg = config_from_metadata(metadata(reader), {t.name for t in reader.tensors}, args.model)
        w = gguf_weight_bytes_per_token(args.model)
        for ctx in (int(x) for x in args.context.split(",")):
            kv = kv_read_bytes(cfg, ctx, 2)
            print(f"{args.model}, routed experts only, f16 KV cache, after {ctx} tokens: weights {w / 1e6:.1f} MB "
                  f"+ KV {kv / 1e6:.2f} MB = {(w + kv) / 1e6:.1f} MB per token")


if __name__ == "__main__":
    main()
