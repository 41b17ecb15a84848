"""The distillation report: SmolLM2-135M-Instruct (the default model) teaches a small Llama-4-style MoE student.

    python -m scripts.distill_report            # CPU, one thread; writes runs/distill/

1. synth: the teacher answers data/prompts.txt (320 prompts) through the engine -> runs/distill/synth.jsonl.
2. split by prompt: every 10th answer is held out (val.jsonl), the rest is training text (train.jsonl).
3. (b) baseline: the student trained with cross-entropy only on the training tokens.
   (a) distilled: the same student, same init, same tokens, same steps, with the teacher's top-k logits (cached
   once) in a temperature-softened KL term plus cross-entropy.
4. eval on the held-out windows: perplexity, and KL(teacher || student) over the full vocabulary at temperature 1.
Writes report.json and report.md, and prints the table and the wall time of every stage.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def student_config(vocab_size: int, bos: int, eos: int) -> dict:
    """A ~23M-parameter Llama-4-style MoE (19M of it the untied embedding and output matrices): 4 layers of dim
    192, GQA 6/2 heads, iRoPE (NoPE every 4th layer, 64-token chunks), QK-norm, 4 routed experts (top-1) + a
    shared expert in every layer."""
    return dict(vocab_size=vocab_size, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=768,
                moe={"n_experts": 4, "top_k": 1, "expert_dim": 384, "n_shared_experts": 1}, moe_every=1,
                nope_every=4, attn_chunk_size=64, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=8192.0,
                rope_theta=10000.0, max_seq_len=2048, tie_embeddings=False, bos_token_id=bos, eos_token_ids=[eos],
                pad_token_id=eos, source="preset")


def train_args(extra: list[str]):
    from herd.train.flags import add_train_flags
    return add_train_flags(argparse.ArgumentParser(), distill="--teacher" in extra).parse_args(extra)


@torch.no_grad()
def evaluate(student_dir: Path, teacher, val_windows: torch.Tensor, teacher_logp: list[torch.Tensor], bs: int):
    import herd
    student = herd.load(student_dir).eval()
    nll = kl = n = 0.0
    for i, start in enumerate(range(0, len(val_windows), bs)):
        w = val_windows[start:start + bs]
        x, y = w[:, :-1], w[:, 1:]
        logp = student(x).log_softmax(-1)                                   # (B, T, V)
        nll += -logp.gather(-1, y[..., None]).sum().item()
        t = teacher_logp[i]
        kl += (t.exp() * (t - logp)).sum().item()
        n += y.numel()
    return {"ppl": math.exp(nll / n), "ce": nll / n, "kl_to_teacher": kl / n, "tokens": int(n)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "distill"), help="output folder")
    ap.add_argument("--prompts", default=str(ROOT / "data" / "prompts.txt"), help="prompt file for herd synth")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per teacher answer")
    ap.add_argument("--steps", type=int, default=200, help="training steps for each student")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--kd-top-k", type=int, default=32, help="teacher entries cached per position")
    ap.add_argument("--kd-weight", type=float, default=0.9, help="KL weight (1 - w on cross-entropy)")
    ap.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the 2 cores are shared)")
    ap.add_argument("--reuse-synth", action="store_true", help="keep an existing synth.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import herd
    from herd.train.data import TokenLoader, load_tokens
    from herd.engine import SamplingParams
    from herd.train.synth import read_prompts, synthesize
    from herd.textgen import default_model_path
    from herd.tokenizer import load_tokenizer
    from herd.train.train import train

    times, t_all = {}, time.perf_counter()
    teacher_path = default_model_path()
    tok = load_tokenizer(teacher_path)

    # 1. the teacher writes the training text (bf16 on CPU: AMX kernels where the CPU has them)
    t0 = time.perf_counter()
    synth = out / "synth.jsonl"
    if not (args.reuse_synth and synth.exists()):
        teacher = herd.load(teacher_path, dtype=torch.bfloat16)
        synthesize(teacher, tok, read_prompts(args.prompts), synth,
                   SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=0), batch_size=32,
                   max_seq_len=512)
        del teacher
    times["synth_s"] = time.perf_counter() - t0

    # 2. split by prompt
    lines = [l for l in synth.read_text().splitlines() if l.strip()]
    (out / "train.jsonl").write_text("".join(l + "\n" for i, l in enumerate(lines) if i % 10 != 9))
    (out / "val.jsonl").write_text("".join(l + "\n" for i, l in enumerate(lines) if i % 10 == 9))
    cfg = student_config(49152, tok.bos_id, tok.eos_ids[0])
    (out / "student.json").write_text(json.dumps(cfg, indent=1))
    train_tokens = load_tokens([out / "train.jsonl"], tok, 49152)
    val_tokens = load_tokens([out / "val.jsonl"], tok, 49152)

    # 3. the two students: identical flags except the teacher
    common = ["--config", str(out / "student.json"), "--data", str(out / "train.jsonl"), "--val-data",
              str(out / "val.jsonl"), "--tokenizer", str(teacher_path), "--steps", str(args.steps), "--seq-len",
              str(args.seq_len), "--batch-size", str(args.batch_size), "--lr", "3e-3", "--warmup", "30",
              "--bf16", "--threads", str(args.threads), "--eval-every", str(max(1, args.steps // 4)),
              "--log-every", "5", "--seed", "0"]
    for old in (out / "baseline", out / "distilled"):       # this report's own runs: a rerun starts them again
        if old.exists():
            print(f"replacing the earlier run in {old}", flush=True)
            shutil.rmtree(old)
    t0 = time.perf_counter()
    base = train(train_args(common + ["--out", str(out / "baseline")]))
    times["baseline_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dist = train(train_args(common[2:] + ["--student", str(out / "student.json"), "--teacher", str(teacher_path),
                                          "--kd-top-k", str(args.kd_top_k), "--kd-weight", str(args.kd_weight),
                                          "--temperature", str(args.temperature), "--out", str(out / "distilled")]))
    times["distill_train_s"] = time.perf_counter() - t0      # includes the one teacher pass that fills the cache

    # 4. held-out eval: the same windows for both, teacher log-probs computed once (fp32)
    t0 = time.perf_counter()
    val = TokenLoader(val_tokens, args.seq_len, 1, shuffle=False)
    windows = torch.stack([val.tokens[i * args.seq_len: i * args.seq_len + args.seq_len + 1]
                           for i in range(val.n_windows)])
    teacher = herd.load(teacher_path).eval()
    bs = 8
    with torch.no_grad():
        t_logp = [teacher(windows[s:s + bs, :-1]).log_softmax(-1) for s in range(0, len(windows), bs)]
        t_nll = sum(-lp.gather(-1, windows[s:s + bs, 1:, None]).sum().item()
                    for lp, s in zip(t_logp, range(0, len(windows), bs)))
    res = {"teacher": {"ppl": math.exp(t_nll / (len(windows) * args.seq_len))},
           "distilled": evaluate(Path(dist["checkpoint"]), teacher, windows, t_logp, bs),
           "baseline": evaluate(Path(base["checkpoint"]), teacher, windows, t_logp, bs)}
    times["eval_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_all
    d, b = res["distilled"], res["baseline"]
    n_params = sum(p.numel() for p in herd.load(dist["checkpoint"]).parameters())
    report = {"results": res, "times": times, "student_params": n_params, "train_tokens": int(len(train_tokens)),
              "val_tokens": int(len(val_tokens)), "settings": vars(args),
              "improvement": {"ppl_ratio": b["ppl"] / d["ppl"], "ppl_reduction_pct": 100 * (1 - d["ppl"] / b["ppl"]),
                              "kl_reduction_pct": 100 * (1 - d["kl_to_teacher"] / b["kl_to_teacher"])}}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    md = [f"Student: {n_params / 1e6:.1f}M-parameter Llama-4-style MoE; {len(train_tokens)} training tokens "
          f"(teacher-written), {res['distilled']['tokens']} held-out tokens; {args.steps} steps of "
          f"{args.batch_size}x{args.seq_len} tokens each.", "",
          "| student | held-out perplexity | KL(teacher \u2016 student) nats/token |", "|---|---|---|",
          f"| (a) distilled (top-{args.kd_top_k} KL, w={args.kd_weight}, T={args.temperature}) | {d['ppl']:.2f} | "
          f"{d['kl_to_teacher']:.3f} |",
          f"| (b) cross-entropy only, same tokens | {b['ppl']:.2f} | {b['kl_to_teacher']:.3f} |",
          f"| teacher (SmolLM2-135M-Instruct) | {res['teacher']['ppl']:.2f} | 0 |", "",
          f"Distilled vs baseline: perplexity {report['improvement']['ppl_reduction_pct']:.1f}% lower, KL "
          f"{report['improvement']['kl_reduction_pct']:.1f}% lower. Wall time {times['total_s'] / 60:.1f} min "
          f"(synth {times['synth_s']:.0f} s, baseline {times['baseline_train_s']:.0f} s, distill "
          f"{times['distill_train_s']:.0f} s incl. the teacher cache, eval {times['eval_s']:.0f} s)."]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
