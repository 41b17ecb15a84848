"""Quantized CPU matmuls against dense fp32 and bf16 matmuls, at SmolLM2-135M's shapes (dim 576, 3 kv heads x 64,
FFN 1536, vocab 49152), for 1 row (decode) and 512 rows (prefill). Not a test. Prints milliseconds per call and
each one's speed relative to the dense fp32 matmul (bf16 activations unless marked fp32-act).

Columns: "int8", "int4 gN" are herd.quantize's modules (the packed kernel for few rows, dequantize to bf16 + dense
matmul from INT8_DEQUANT_ROWS / INT4_DEQUANT_ROWS rows on); "kernel" columns call torch's packed kernel directly;
"herd int8", "herd int4 g32" are herd.cpu.kernels' modules (herd's own kernels for few rows, fp32 in and out), which
`herd.load(gguf, quant="packed", prepare=True)` uses where the CPU has AVX512-VNNI. Every call here re-reads one matrix that
stays in cache; in a decode step the weights come from memory (see herd/cpu/kernels.cpp for those figures).

    python bench/quant_matmul.py [--threads 2] [--rows 1 512] [--fp32-packed]

--fp32-packed also times the packed kernels fed fp32 activations (what herd avoids; at 512 rows the vocab matrix
takes minutes, so it is skipped there).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from herd.cpu import extension, kernels
from herd.quantize import Int4Linear, Int8Linear, quantize_tensor

SHAPES = {                     # name: (out N, in K)
    "wq/wo 576x576": (576, 576),
    "wk/wv 192x576": (192, 576),
    "w1/w3 1536x576": (1536, 576),
    "w2 576x1536": (576, 1536),
    "output 49152x576": (49152, 576),
}


def timeit(fn, min_time=0.3, max_iters=200):
    fn()                                                   # warm-up (first-call allocation, packing caches)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time or n >= max_iters:
            return dt / n * 1e3


def module(cls, w, *extra):
    N, K = w.shape
    q, s, _ = quantize_tensor(w, "int8" if cls is Int8Linear else "int4", *extra)
    m = cls(K, N, *extra, device="meta")
    m.load_state_dict(cls.pack(q, s), assign=True)
    return m


def kernel(m, dtype=torch.bfloat16):
    """torch's packed kernel alone, with activations and scales in `dtype` (herd's modules always feed bf16)."""
    if isinstance(m, Int8Linear):
        scale = m.scale.to(dtype)
        return lambda x: torch._weight_int8pack_mm(x, m.weight, scale)
    sz = m.scales_and_zeros.to(dtype)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, m.weight, m.group_size, sz)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 512], help="activation rows (tokens)")
    ap.add_argument("--fp32-packed", action="store_true", help="also time packed kernels with fp32 activations")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("ms per call; x = speed relative to dense fp32 (higher is faster)")
    herd_cols = ["herd int8", "herd int4 g32"] if extension.available() else []
    if not herd_cols:
        print(f"herd kernels {extension.status()}")
    cols = ["fp32", "bf16", "int8", "int4 g32", "int4 g64", "int8 kernel", "int4 g32 kernel", *herd_cols] + (
        ["int8 kernel fp32-act", "int4 kernel fp32-act"] if args.fp32_packed else [])
    print(f"{'shape':18s} {'rows':>4s} " + " ".join(f"{c:>20s}" for c in cols))
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K) * 0.05
        mods = {"int8": module(Int8Linear, w), "int4 g32": module(Int4Linear, w, 32),
                "int4 g64": module(Int4Linear, w, 64)}
        w16 = w.bfloat16()
        for M in args.rows:
            x = torch.randn(M, K)
            x16 = x.bfloat16()
            ms = {"fp32": timeit(lambda: x @ w.t()), "bf16": timeit(lambda: x16 @ w16.t())}
            for k, m in mods.items():
                ms[k] = timeit(lambda: m(x16))            # bf16 in, bf16 out: the model's cast is not timed
            for k, src in (("int8 kernel", "int8"), ("int4 g32 kernel", "int4 g32")):
                f = kernel(mods[src])
                ms[k] = timeit(lambda: f(x16))
            if herd_cols:
                for k, m in (("herd int8", kernels.HerdInt8Linear.from_int8(mods["int8"])),
                             ("herd int4 g32", kernels.HerdInt4Linear.from_int4(mods["int4 g32"]))):
                    ms[k] = timeit(lambda: m(x))
            if args.fp32_packed:
                for k, src in (("int8 kernel fp32-act", "int8"), ("int4 kernel fp32-act", "int4 g32")):
                    if M > 64 and N > 10000:
                        ms[k] = float("nan")
                        continue
                    f = kernel(mods[src], torch.float32)
                    ms[k] = timeit(lambda: f(x), min_time=0.1, max_iters=5)
            cells = [f"{ms[c]:11.3f} ({ms['fp32'] / ms[c]:5.2f}x)" for c in cols]
            print(f"{name:18s} {M:4d} " + " ".join(cells))


if __name__ == "__main__":
    main()
