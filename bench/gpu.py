"""The GPU check of issue 21, prepared to run in one call on a lent device (15 minutes of device time in all): Llama 4
shapes in bf16 on CUDA against the CPU's fp32, decode speed against transformers and against the HBM ceiling, and
`herd plan`'s memory figures against what torch allocates. Not a test; `--small --device cpu` is its dry run here.

    python -m bench.gpu [--device cuda] [--layers 4] [--vocab 8192] [--batches 1,64] [--prompt 64] [--decode 32]
                        [--skip-transformers] [--small] [--out gpu.json]

Models, random weights drawn on the device (seeded), bf16:
- the tiny Llama 4 MoE (preset "debug": every trunk feature at a few MB);
- Scout's layers (preset "scout": dim 5120, 40 / 8 heads of 128, 16 routed experts of 8192 + a shared expert,
  iRoPE with 8192-token chunks and NoPE every 4th layer, QK-norm, temperature tuning), --layers deep, --vocab
  tokens, no vision. 4 layers are ~8.8B parameters: 17.6 GB in bf16 (and 35 GB in fp32 on the host for the check).
  --small keeps the layout at 1/10 the width, for a dry run on a CPU.

Measured, printed as a table and written to --out:
1. logits: the device's bf16 forward of 2 x 48 tokens against the same weights in fp32 on the CPU (max |diff| and
   its ratio to the logits' standard deviation; bf16 keeps ~3 significant digits, so a few 1e-2 is its tolerance).
2. decode tok/s at each --batches size after a --prompt-token prompt, herd's Engine (MoE through grouped GEMMs,
   ops.run_experts_grouped) and transformers' generate (sdpa attention, its DynamicCache) on the same weights; at
   batch 1 the bytes each reads per token and the fraction of the measured read bandwidth (torch.sum over 4 GiB).
3. plan: herd.plan.make_plan's weight and KV cache bytes against the built model's parameters and the engine's
   cache buffers, and its total against torch.cuda.max_memory_allocated over a batch prefill.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from bench.roofline import kv_read_bytes, module_weight_bytes_per_token
from herd.config import preset
from herd.engine import Engine, SamplingParams
from herd.model import Transformer


def configs(args) -> dict:
    scout = preset("scout")
    scout.n_layers, scout.vocab_size, scout.vision, scout.max_seq_len = args.layers, args.vocab, None, 16384
    scout.bos_token_id, scout.eos_token_ids, scout.pad_token_id, scout.image_token_id = 1, [2], 0, 3   # < vocab
    if args.small:                      # Scout's layout at a tenth of its width: a CPU dry run
        scout.dim, scout.n_heads, scout.n_kv_heads, scout.head_dim = 512, 8, 2, 64
        scout.moe.expert_dim, scout.ffn_dim, scout.attn_chunk_size = 512, 1024, 64
    scout.__post_init__()
    return {"tiny Llama 4 MoE": preset("debug"), f"Scout layers x{args.layers}": scout}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def build(cfg, device, seed: int = 0) -> Transformer:
    """The model in bf16 on `device`, weights N(0, 1/fan_in) drawn there (N(0, 1) embeddings, unit norms)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Transformer(cfg).eval()
    finally:
        torch.set_default_dtype(saved)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 1.0 if "embeddings" in name else p.shape[-1] ** -0.5, generator=g)
    return model


def read_bandwidth(device, gib: float) -> float:
    """Best GB/s of torch.sum over a gib-GiB bf16 buffer on the device: the ceiling of a memory-bound decode."""
    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    rates = []
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        rates.append(x.numel() * 2 / (time.perf_counter() - t0) / 1e9)
    return max(rates[1:])


def routed(model) -> tuple[list, list]:
    """Forward hooks that record each MoE layer's chosen expert per token: (hooks, choices)."""
    choices = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, out: choices.append(out.argmax(-1).cpu()))
             for m in model.modules() if hasattr(m, "router")]
    return hooks, choices


@torch.no_grad()
def logits_check(model, cfg, device) -> dict:
    """bf16 on the device vs fp32 on the CPU, same weights (bf16 values are exact in fp32). Top-1 routing is a
    discontinuity: where the two runs pick different experts for a token (near-tied router logits, ~0.4% apart in
    bf16) that token's logits, and through attention every later token's, differ by O(1) whatever the precision;
    so the tolerance applies to positions before the first token routed differently in any layer (counted)."""
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.device("meta"):                      # fp32 on the CPU, holding only the copies made here
        host = Transformer(cfg).eval()
    host.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()}, assign=True)
    runs = []
    for m, ids in ((model, tokens.to(device)), (host, tokens)):
        hooks, choices = routed(m)
        runs.append((m(ids).float().cpu(), choices))
        for h in hooks:
            h.remove()
    (got, got_routes), (want, want_routes) = runs
    same = torch.ones(tokens.shape, dtype=torch.bool)
    for a, b in zip(got_routes, want_routes):
        same &= (a == b).reshape(tokens.shape)
    same = same.int().cummin(dim=1).values.bool()   # attention carries a rerouted token's keys to later ones
    diff = (got - want).abs().amax(-1)              # (2, 48) per position
    std = want.std().item()
    agree = diff[same].max().item() if same.any() else float("nan")
    return {"max_abs_diff_same_routes": agree, "logit_std": std, "diff_over_std": agree / std,
            "positions_rerouted": int((~same).sum()),      # and those after them "max_abs_diff_all": diff.max().item(),
            "argmax_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}


def prompts(cfg, batch: int, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return torch.randint(3, cfg.vocab_size, (batch, n), generator=g).tolist()


@torch.no_grad()
def herd_decode(model, cfg, batch: int, args) -> float:
    """Decode tok/s of herd's Engine, all rows decoding, after every prompt's prefill (first tokens excluded)."""
    engine = Engine(model, max_batch=batch, max_seq_len=args.prompt + args.decode + 2, prefix_cache_mib=0)
    reqs = [engine.add(p, SamplingParams(max_tokens=args.decode + 1, temperature=0, ignore_eos=True))
            for p in prompts(cfg, batch, args.prompt)]
    while any(not r.output for r in reqs):
        engine.step()
    sync(args.device)
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    sync(args.device)
    return batch * args.decode / (time.perf_counter() - t0)


@torch.no_grad()
def hf_decode(hf, cfg, batch: int, args) -> float:
    """Decode tok/s of transformers' greedy generate: (prompt + decode + 1 tokens) - (prompt + 1 token) time."""
    ids = torch.tensor(prompts(cfg, batch, args.prompt), device=args.device)

    def timed(n_new):
        sync(args.device)
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                    do_sample=False, pad_token_id=0)
        sync(args.device)
        return time.perf_counter() - t0

    first = statistics.median(timed(1) for _ in range(3))
    return batch * args.decode / (timed(args.decode + 1) - first)


def hf_twin(model, device):
    """transformers' Llama4ForCausalLM on the very same weights (herd writes the HF layout, transformers reads it)."""
    import transformers
    from herd.checkpoint import save_hf

    with tempfile.TemporaryDirectory() as folder:
        save_hf(model, folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                               attn_implementation="sdpa")
    return hf.to(device).eval(), transformers.__version__


@torch.no_grad()
def plan_check(model, cfg, args) -> dict:
    """make_plan's figures for these shapes against the built model, the engine's buffers and the peak allocation
    of a prefill of the largest batch (CUDA only: the CPU has no allocator statistics)."""
    from herd.plan import make_plan

    batch, context = max(args.batches), args.prompt + args.decode + 2
    plan = make_plan(cfg, "h100", "bf16", context, batch)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    engine = Engine(model, max_batch=batch, max_seq_len=context, cache_dtype=torch.bfloat16, prefix_cache_mib=0)
    out = {"plan_weights": plan.weights, "model_weights": params, "plan_kv_cache": plan.kv_cache,
           "engine_kv_cache": engine.cache.nbytes(), "plan_activations": plan.activations}
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        for p in prompts(cfg, batch, args.prompt):
            engine.add(p, SamplingParams(max_tokens=1, ignore_eos=True))
        while engine.has_work():
            engine.step()
        out["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        out["plan_total_less_runtime"] = plan.weights + plan.kv_cache + plan.activations
    return out


def run(args) -> dict:
    results = {"device": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu",
               "torch": torch.__version__, "read_gb_s": read_bandwidth(args.device, 0.25 if args.small else 4)}
    for name, cfg in configs(args).items():
        t0 = time.perf_counter()
        model = build(cfg, args.device)
        r = {"build_s": round(time.perf_counter() - t0, 1), "logits": logits_check(model, cfg, args.device)}
        w = module_weight_bytes_per_token(model, cfg.moe.n_experts, cfg.moe.top_k)
        r["bytes_per_token_b1"] = w + kv_read_bytes(cfg, args.prompt, 2)
        r["herd"] = {b: herd_decode(model, cfg, b, args) for b in args.batches}
        if not args.skip_transformers:
            hf, version = hf_twin(model, args.device)
            r["transformers_version"] = version
            r["bytes_per_token_b1_transformers"] = (module_weight_bytes_per_token(hf, all_experts=True)
                                                    + kv_read_bytes(cfg, args.prompt, 2))
            r["transformers"] = {b: hf_decode(hf, cfg, b, args) for b in args.batches}
            del hf
        r["plan"] = plan_check(model, cfg, args)
        results[name] = r
        del model
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
        print(f"[{name} done in {time.perf_counter() - t0:.0f} s]", flush=True)
    return results


def report(res: dict, args) -> str:
    lines = [f"device {res['device']}, torch {res['torch']}, read bandwidth {res['read_gb_s']:.0f} GB/s, bf16, "
             f"prompt {args.prompt}, decode {args.decode}", "",
             "| model | logits max diff, same routes (/ std; rerouted) | engine | "
             + " | ".join(f"batch {b} tok/s" for b in args.batches) + " | batch 1 GB/token | % of bandwidth |",
             "|---|---|---|" + "---|" * (len(args.batches) + 2)]
    for name, r in res.items():
        if not isinstance(r, dict):
            continue
        lg = r["logits"]
        for engine in ("herd", "transformers"):
            if engine not in r:
                continue
            nbytes = r["bytes_per_token_b1" + ("_transformers" if engine == "transformers" else "")]
            speed = r[engine]
            pct = 100 * nbytes * speed[args.batches[0]] / 1e9 / res["read_gb_s"] if args.batches[0] == 1 else None
            lines.append(f"| {name} | {lg['max_abs_diff_same_routes']:.3g} ({lg['diff_over_std']:.2g}; "
                         f"{lg['positions_rerouted']} of 96 at/after a reroute) | {engine} | "
                         + " | ".join(f"{speed[b]:.1f}" for b in args.batches)
                         + f" | {nbytes / 1e9:.2f} | {'' if pct is None else f'{pct:.0f}%'} |")
    lines.append("")
    for name, r in res.items():
        if isinstance(r, dict):
            lines.append(f"plan, {name}: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in r["plan"].items()))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--small", action="store_true", help="Scout's layout at 1/10 the width (a CPU dry run)")
    ap.add_argument("--out", default="gpu.json")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    res = run(args)
    print(report(res, args))
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), **res}, f, indent=2, default=str)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
