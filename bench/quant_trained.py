"""Perplexity cost of each weight scheme on a model trained here from scratch, so never quantized. Not a test.

    python bench/quant_trained.py [--steps 1200] [--threads 2] [--out runs/quant_trained] [--bytes 65536]

Why: the only real model on this machine, SmolLM2 (bench/perplexity.py), ships as Q4_1: its "fp32" weights are
already on an asymmetric 4-bit grid, so any symmetric int4 grid (Meta's recipe) re-rounds them and the comparison
is unfair (+32-37% there). No model with real bf16 weights can be had here (the package registries were searched).
This script trains one instead: a small Llama-4-shaped byte-level model (dim 256, 4 layers, iRoPE with 128-token
chunks and QK-norm, 4 routed experts + a shared expert on every other layer, fp32 weights) with `herd.train` on
English prose shipped with Python (pydoc_data's topics and the standard library's docstrings), then scores
held-out text under each scheme as bench/perplexity.py does. A model this small and this briefly trained is not
SmolLM2 or Llama 4: read the table as what each scheme's rounding costs on weights no quantizer has touched.

Held out: the six pydoc reference sections bench/perplexity.py scores (excluded from training), the first --bytes
bytes, in windows of 512. Schemes (quantize_model, as `herd quantize` writes them): routed experts only (the
default selection) and every trunk linear ("all"), int8, int4 symmetric (Meta's recipe, scale = max|w| / 8) at
group sizes 128 (Meta's default), 64 and 32, int4 asymmetric g128, fp8 e4m3. The training run is kept in --out and
reused when its final checkpoint exists.
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see bench/speed.py

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perplexity import SECTIONS, machine, score  # noqa: E402


def corpus() -> tuple[str, str]:
    """(training text, held-out text): pydoc topics other than SECTIONS, then every docstring of the standard
    library's modules in file order; the held-out text is SECTIONS, as bench/perplexity.py reads them."""
    import pydoc_data.topics as topics
    parts = [topics.topics[k] for k in sorted(topics.topics) if k not in SECTIONS]
    lib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(lib.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts or "idlelib" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:          # prose, not one-line summaries
                    parts.append(doc)
    return "\n\n".join(parts), "\n\n".join(topics.topics[k] for k in SECTIONS)


def config() -> dict:
    from herd.config import ModelConfig, MoEConfig
    cfg = ModelConfig(      # Scout's defaults (iRoPE: every 4th layer NoPE, QK-norm, temperature tuning), sized down
        vocab_size=384, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=768,
        moe=MoEConfig(n_experts=4, top_k=1, expert_dim=512), moe_every=2, attn_chunk_size=128, max_seq_len=4096,
        rope_theta=10000.0, rope_scaling=None, bos_token_id=256, eos_token_ids=[257], pad_token_id=258,
        image_token_id=None, vision=None, source="preset")
    return cfg.to_dict()


def train(out: Path, steps: int, threads: int) -> Path:
    final = out / "checkpoints" / f"step_{steps:06d}"
    if (final / "state.json").exists():
        print(f"reusing {final}", flush=True)
        return final
    out.mkdir(parents=True, exist_ok=True)
    text, _ = corpus()
    (out / "train.txt").write_text(text)
    (out / "config.json").write_text(json.dumps(config()))
    print(f"training on {len(text.encode()) / 1e6:.1f} MB of text, {steps} steps", flush=True)
    cmd = [sys.executable, "-m", "herd.train", "--config", str(out / "config.json"), "--data", str(out / "train.txt"),
           "--tokenizer", "bytes", "--seq-len", "256", "--batch-size", "16", "--steps", str(steps), "--lr", "2e-3",
           "--warmup", "100", "--threads", str(threads), "--out", str(out / "run"), "--no-plots", "--log-every", "50"]
    subprocess.run(cmd, check=True)
    return out / "run" / "checkpoints" / f"step_{steps:06d}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/quant_trained")
    ap.add_argument("--bytes", type=int, default=65536, help="held-out bytes scored")
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import herd
    from herd.train.data import ByteTokenizer
    from herd.quantize import quantize_model

    out = Path(args.out)
    ckpt = train(out, args.steps, args.threads)
    if not ckpt.exists():                  # train() reuses a run at out/checkpoints or writes out/run/checkpoints
        ckpt = out / "run" / "checkpoints" / f"step_{args.steps:06d}"
    _, held_out = corpus()
    ids = torch.tensor(ByteTokenizer().encode(held_out)[:args.bytes])
    fp32 = herd.load(ckpt).eval()

    def q(scheme, group=None, only="experts", symmetric=True):
        return lambda: quantize_model(copy.deepcopy(fp32), scheme, group, only=only, symmetric=symmetric)

    schemes = {"fp32 (trained here)": lambda: fp32}
    for only in ("experts", "all"):
        schemes[f"int8, {only}"] = q("int8", only=only)
        for g in (128, 64, 32):
            schemes[f"int4 g{g} symmetric, {only}"] = q("int4", g, only)
        schemes[f"int4 g128 asymmetric, {only}"] = q("int4", 128, only, symmetric=False)
        schemes[f"fp8 e4m3, {only}"] = q("fp8", only=only)
    rows = score(schemes, ids, args.window, {"int8": 1.0, "int4": 5.0, "fp8": 5.0}, digits=4)
    log = [json.loads(line) for line in (ckpt.parent.parent / "log.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in log if "loss" in r][-1]
    n_params = sum(p.numel() for p in fp32.parameters())
    print(f"\nbyte-level Llama 4 MoE trained here ({n_params / 1e6:.1f}M parameters, {last['step']} steps, "
          f"{last['tokens'] / 1e6:.1f}M tokens, final train loss {last['loss']:.3f}), {len(ids)} held-out bytes of "
          f"Python's pydoc reference prose, windows of {args.window}; {machine()}, {args.threads} threads, "
          f"torch {torch.__version__}\n")
    print("| scheme, quantized modules | weight MB | perplexity (per byte) | vs fp32 | target |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
