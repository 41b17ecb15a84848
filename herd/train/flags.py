"""The flags of `herd train` / `herd distill` / `python -m herd.train` (argparse only: the CLI builds its parser
from this without importing the training code)."""
from __future__ import annotations

import argparse

from ..cli_common import count, number


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
    p.add_argument("--seq-len", type=count(1), default=None, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=count(1), default=None, help="sequences per micro-batch per rank (default 8)")
    p.add_argument("--grad-accum", type=count(1), default=None, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--seed", type=int, default=None, help="weight init and data order seed (default 0)")
    # Optim
    p.add_argument("--steps", type=count(1), required=True, help="optimizer steps in total (a resume continues to it)")
    p.add_argument("--lr", type=number(0), default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=number(0, 1), default=0.1, help="final lr as a fraction of the peak (cosine)")
    p.add_argument("--warmup", type=count(0), default=None, help="warmup steps (default 10%% of --steps, at most 500)")
    p.add_argument("--weight-decay", type=number(0), default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=number(0), default=1.0, help="clip the global gradient norm (0 = off)")
    p.add_argument("--init-std", type=number(0, above=True), default=0.02, help="std of fresh weights")
    # MoE
    p.add_argument("--balance-coef", type=number(0), default=0.01, help="Switch load-balancing loss weight (0 = off)")
    p.add_argument("--z-coef", type=number(0), default=0.001, help="router z-loss weight (0 = off)")
    # Distillation
    p.add_argument("--kd-weight", type=number(0, 1), default=0.5, help="loss = w * KL + (1 - w) * cross-entropy")
    p.add_argument("--temperature", type=number(0, above=True), default=2.0, help="softmax temperature of the KL term")
    p.add_argument("--kd-top-k", type=count(0), default=None,
                   help="0: full-vocabulary KL with the teacher run every step; k: the teacher's top-k, computed once "
                        "and cached on disk (default 0)")
    p.add_argument("--teacher-cache", default=None, help="top-k cache file (default OUT/teacher_topk.safetensors)")
    # Runtime
    p.add_argument("--out", default=None, help="run folder (default: the --resume run's folder)")
    p.add_argument("--resume", default=None, help="run folder or checkpoint folder to continue exactly")
    p.add_argument("--save-every", type=count(0), default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep", type=count(1), default=2, help="checkpoints to keep")
    p.add_argument("--log-every", type=count(1), default=1, help="log every N steps")
    p.add_argument("--eval-every", type=count(0), default=0, help="eval on --val-data every N steps (0: at the end)")
    p.add_argument("--eval-batches", type=count(1), default=8, help="micro-batches per eval")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights and optimizer)")
    p.add_argument("--parallel", choices=["auto", "ddp", "fsdp"], default="auto",
                   help="multi-process data parallelism under torchrun (auto = ddp)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=count(1), default=None, help="torch CPU threads per process")
    p.add_argument("--memory-limit", type=number(0, above=True), default=None,
                   help="GiB this process may use (default: available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p
