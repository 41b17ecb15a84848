"""The flags of `herd train` / `herd distill` / `python -m herd.train` (argparse only: the CLI builds its parser
from this without importing the training code)."""
from __future__ import annotations

import argparse


def add_train_flags(p: argparse.ArgumentParser, distill: bool = False):
    # Model
    if distill:
        p.add_argument("--teacher", required=True, help="teacher: HF folder, GGUF file or 'default'")
        p.add_argument("--student", default=None,
                       help="student: a preset name or config.json (fresh weights) or a checkpoint to start from")
    else:
        p.add_argument("--config", default=None, help="preset name (debug, ...) or config.json (HF or herd)")
        p.add_argument("--init", default=None, help="start from these weights (HF folder or GGUF) instead of random")
    p.add_argument("--tokenizer", default=None,
                   help="model path whose tokenizer to use, or 'bytes' (default: the teacher's / default model's)")
    # Data
    p.add_argument("--data", nargs="+", default=None, help="training files: text (one document) or JSONL ('text')")
    p.add_argument("--val-data", nargs="+", default=None, help="held-out files for the eval loss")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch per rank (default 8)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--seed", type=int, default=None, help="weight init and data order seed (default 0)")
    # Optim
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in total (a resume continues to it)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak (cosine)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10%% of --steps, at most 500)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    p.add_argument("--init-std", type=float, default=0.02, help="std of fresh weights")
    # MoE
    p.add_argument("--balance-coef", type=float, default=0.01, help="Switch load-balancing loss weight (0 = off)")
    p.add_argument("--z-coef", type=float, default=0.001, help="router z-loss weight (0 = off)")
    # Distillation
    p.add_argument("--kd-weight", type=float, default=0.5, help="loss = w * KL + (1 - w) * cross-entropy")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the KL term")
    p.add_argument("--kd-top-k", type=int, default=None,
                   help="0: full-vocabulary KL with the teacher run every step; k: the teacher's top-k, computed once "
                        "and cached on disk (default 0)")
    p.add_argument("--teacher-cache", default=None, help="top-k cache file (default OUT/teacher_topk.safetensors)")
    # Runtime
    p.add_argument("--out", default=None, help="run folder (default: the --resume run's folder)")
    p.add_argument("--resume", default=None, help="run folder or checkpoint folder to continue exactly")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--log-every", type=int, default=1, help="log every N steps")
    p.add_argument("--eval-every", type=int, default=0, help="eval on --val-data every N steps (0: at the end)")
    p.add_argument("--eval-batches", type=int, default=8, help="micro-batches per eval")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights and optimizer)")
    p.add_argument("--parallel", choices=["auto", "ddp", "fsdp"], default="auto",
                   help="multi-process data parallelism under torchrun (auto = ddp)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--memory-limit", type=float, default=None, help="GiB this process may use (default: available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p
