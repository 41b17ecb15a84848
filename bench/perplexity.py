"""Perplexity of SmolLM2-135M-Instruct (the default model's GGUF) under each weight scheme vs fp32. Not a test.
Prints a markdown table (with the machine) for the README.

    python bench/perplexity.py [--tokens 4096] [--window 512] [--threads 2]

Text: English prose shipped with Python itself (pydoc_data.topics: the "execmodel", "naming", "objects", "import",
"calls", "compound" reference sections), the first --tokens tokens, scored in non-overlapping windows of --window
tokens (every window starts fresh; the first token of a window is context only). No download. Caveat: public
documentation may well be in the model's training data; it is the same text for every scheme.

Schemes:
- fp32: the GGUF dequantized to fp32 (herd.load(path)), the baseline.
- fp32, fused + decode steps: the same model as `herd run` loads it (herd.cpu's fuse_model, use_decode_kernels:
  C++ RMSNorm and SiLU gating, transposed fp32 matrices); it should equal the baseline to float rounding.
- int8 / int4 gN: herd.quantize.quantize_model(fp32, scheme, only="all"): every trunk linear (the tied output head
  and the embedding stay fp32), bf16 activations in the quantized matmuls. int4 uses groups of 64 and 32: Meta's
  128 does not divide SmolLM2's dim 576. Plain int4 is Meta's symmetric recipe (scale = max|w| / 8).
- int4 gN asymmetric: the same with symmetric=False (`herd quantize --asymmetric`): a zero point per group, the 16
  levels spanning each group's min..max. SmolLM2's weights are Q4_1 (asymmetric, 32-weight blocks), so g32 can land
  on their own grid; g64 straddles two blocks.
- packed GGUF: herd.load(path, quant="packed", prepare=True): Q4_1 blocks mapped exactly to int4 (group 32, scale + zero),
  Q8_0 token embedding / tied head re-quantized per row to int8; fused q/k/v and gate/up.
- packed GGUF, fp32 embedding: the same with the Q8_0 embedding / head kept in fp32 (what int8 costs there).
- packed GGUF, decode kernels: the packed model with every row forced through herd's own int4/int8 kernels
  (herd/cpu/kernels.py, int16 activations), which otherwise run only for fewer than kernels.DEQUANT_ROWS rows: the
  numerics of a decode step, measured on whole windows. Only where the kernels run (AVX512-VNNI).
- packed GGUF, f16 / bf16 KV cache: the packed model with each window run through an engine KV cache of that dtype,
  so every query attends over keys and values rounded as the cache stores them (`herd run --kv-dtype`; llama.cpp's
  default cache is f16).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import subprocess
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see bench/speed.py

import torch  # noqa: E402

SECTIONS = ("execmodel", "naming", "objects", "import", "calls", "compound")


class ThroughKernels(torch.nn.Module):
    """Calls `model` with kernels.DEQUANT_ROWS lifted, so every row takes herd's decode kernels."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        from herd.cpu import kernels
        saved, kernels.DEQUANT_ROWS = kernels.DEQUANT_ROWS, 10**9
        try:
            return self.model(tokens)
        finally:
            kernels.DEQUANT_ROWS = saved


class ThroughCache(torch.nn.Module):
    """Calls `model` with a fresh engine KV cache of `dtype` per window: every query attends over the keys and
    values as that cache stores them (rounded when written), as in decode."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, tokens):
        from herd.engine import KVCache
        cache = KVCache(self.model.config, 1, tokens.shape[1], self.dtype)
        cache.rows = slice(0, 1)
        return self.model(tokens, kv_cache=cache)


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    nll, n = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window][None]
        if chunk.shape[1] < 2:
            break
        logp = model(chunk).log_softmax(-1)[0, :-1]                     # (T-1, V)
        nll -= float(logp.gather(-1, chunk[0, 1:, None]).sum())
        n += chunk.shape[1] - 1
    return math.exp(nll / n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import pydoc_data.topics as topics

    import herd
    from herd.cpu import prepare
    from herd.cpu.decode import use_decode_kernels
    from herd.cpu.fuse import fuse_model
    from herd.gguf import load_gguf
    from herd.quantize import quantize_model
    from herd.textgen import default_model_path
    from herd.tokenizer import load_tokenizer

    path = default_model_path()
    text = "\n\n".join(topics.topics[k] for k in SECTIONS)
    ids = torch.tensor(load_tokenizer(path).encode(text)[:args.tokens])
    fp32 = herd.load(path)
    def as_herd_run_loads(model):
        fuse_model(model)
        use_decode_kernels(model)
        return model

    schemes = {
        "fp32 (GGUF dequantized)": lambda: fp32,
        "fp32, fused + decode steps (as herd run loads it)": lambda: as_herd_run_loads(copy.deepcopy(fp32)),
        "int8 (quantize_model, all linears)": lambda: quantize_model(copy.deepcopy(fp32), "int8", only="all"),
        "int4 g64 (quantize_model, all linears)": lambda: quantize_model(copy.deepcopy(fp32), "int4", 64, only="all"),
        "int4 g32 (quantize_model, all linears)": lambda: quantize_model(copy.deepcopy(fp32), "int4", 32, only="all"),
        "int4 g64 asymmetric (quantize_model, all linears)":
            lambda: quantize_model(copy.deepcopy(fp32), "int4", 64, only="all", symmetric=False),
        "int4 g32 asymmetric (quantize_model, all linears)":
            lambda: quantize_model(copy.deepcopy(fp32), "int4", 32, only="all", symmetric=False),
        "packed GGUF Q4_1 (herd.load quant='packed')": lambda: herd.load(path, quant="packed", prepare=True),
        "packed GGUF Q4_1, fp32 embedding/head": lambda: prepare(load_gguf(path, packed=True, int8_embeddings=False)),
    }
    from herd.cpu import extension
    if extension.available():
        schemes["packed GGUF Q4_1, decode kernels (every row)"] = (
            lambda: ThroughKernels(herd.load(path, quant="packed", prepare=True)))
    else:
        print(f"herd kernels {extension.status()}: no decode-kernel row")
    for cache_name, cache_dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        schemes[f"packed GGUF Q4_1, {cache_name} KV cache"] = (
            lambda d=cache_dtype: ThroughCache(herd.load(path, quant="packed", prepare=True), d))
    rows = score(schemes, ids, args.window, {"fp32,": 0.1, "int8": 1.0, "int4": 5.0, "packed": 5.0})
    print(f"\nSmolLM2-135M-Instruct ({path.name}), {len(ids)} tokens of Python's pydoc reference prose, windows of "
          f"{args.window}; {machine()}, {args.threads} threads, torch {torch.__version__}\n")
    print("| scheme | weight MB | perplexity | vs fp32 | target |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


def score(schemes: dict, ids: torch.Tensor, window: int, targets: dict, digits: int = 3) -> list[str]:
    """The table's rows: each scheme's model built (`schemes`: name -> a function returning it), its perplexity on
    ids and the change vs the first scheme's, judged against the target (percent) of the first prefix of `targets`
    its name starts with."""
    from herd.sizes import resident_bytes as weight_bytes
    rows, base = [], None
    for name, make in schemes.items():
        t0 = time.perf_counter()
        model = make()
        ppl = perplexity(model, ids, window)
        base = ppl if base is None else base
        delta = 100 * (ppl / base - 1)
        target = next((v for k, v in targets.items() if name.startswith(k)), None)
        verdict = "baseline" if target is None else f"{'met' if abs(delta) <= target else 'MISSED'} (<= {target:g}%)"
        rows.append(f"| {name} | {weight_bytes(model) / 1e6:.2f} | {ppl:.{digits}f} | {delta:+.2f}% | {verdict} |")
        print(f"  {name}: ppl {ppl:.{digits}f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        del model
    return rows


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
