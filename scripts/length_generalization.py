"""Does iRoPE buy length generalisation? Train two tiny models on key-value retrieval at short length, test far past it.

Task (synthetic, vocabulary of 128): each sequence has N_PAIRS keys with a value each. A haystack of random filler
tokens holds the pairs as "k v" at random places; a tail then gives every key once more, in random order, and the
model must say its value. Training haystacks repeat keys too (so retrieval is supervised at every distance inside
the training length); test haystacks hold each pair once and only the tail is scored. Accuracy = share of tail values
predicted exactly (argmax over the whole vocabulary; chance 1/32). Retrieval needs two steps: a value must know the
key before it (local, relative position) and the tail key must find that value anywhere in the context (global).

Models (same size, the `debug` preset's shapes: dim 64, 4 layers, 4 heads / 2 kv heads, MoE every 2nd layer):
- iRoPE (Llama 4): layers 0-2 RoPE + QK-norm with block-aligned chunked attention (chunks of CHUNK tokens), layer 3
  NoPE, global, with attention temperature tuning (floor_scale = the training length, attn_scale 0.1).
  Evaluated twice: as trained, and with temperature tuning switched off at test time (same weights).
- RoPE everywhere: the same model with RoPE + QK-norm and full causal attention in every layer.

Both train at TRAIN_LEN tokens with the same data, steps and optimizer, then are tested at 1x, 4x, 16x and 64x
TRAIN_LEN (same number of pairs, longer haystack). Long sequences go through the engine's KV cache in prefill pieces
(blockwise attention for the global layers), exactly as the engine serves them.

    python -m scripts.length_generalization              # ~20-30 min on one CPU thread; prints + writes the table
    python -m scripts.length_generalization --quick      # a minute: smoke test of the whole pipeline
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.config import ModelConfig, MoEConfig
from herd.engine import KVCache
from herd.model import Transformer

# Vocabulary: 0 unused, 1 BOS, then keys, values and filler in disjoint ranges.
BOS = 1
KEYS = range(2, 66)            # 64 keys
VALUES = range(66, 98)         # 32 values
FILLER = range(98, 128)        # 30 filler tokens
VOCAB = 128
N_PAIRS = 8                    # keys per sequence, each with its own value
CHUNKS_PER_TRAIN_SEQ = 4       # the iRoPE model's RoPE layers attend in chunks of train_len / 4 tokens


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Task
    p.add_argument("--train-len", type=int, default=256, help="training sequence length (tokens)")
    p.add_argument("--factors", default="1,4,16,64", help="test lengths as multiples of --train-len")
    p.add_argument("--eval-seqs", type=int, default=32, help="test sequences per length (N_PAIRS queries each)")
    # Optim
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps per model")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (warmup, then cosine to 10%%)")
    # Run
    p.add_argument("--seed", type=int, default=0, help="weights and training data (the test data is fixed)")
    p.add_argument("--out", default="results/length_generalization.md", help="where to write the table")
    p.add_argument("--quick", action="store_true", help="smoke run: 40 steps, 2 test sequences, factors 1,4")
    return p.parse_args(argv)


# ---- data ---------------------------------------------------------------------------------------------------------
def make_batch(batch: int, length: int, g: torch.Generator, test: bool = False):
    """tokens (B, L) and targets (B, L): a haystack of filler holding "k v" pairs, then a tail that gives every key
    once more, in random order, as "k v". Each sequence has its own N_PAIRS keys and values. The target at a key
    whose key already appeared is its value (-100 elsewhere). Training haystacks repeat keys, so retrieval is
    learned at every distance inside the training length; test haystacks hold each pair once: only the tail counts.
    """
    n_tail = 2 * N_PAIRS
    hay = length - n_tail                                                     # BOS + filler + pairs
    n_slots = (hay - 1) // 2                                                  # non-overlapping 2-token pair slots
    n_hay = N_PAIRS if test else max(N_PAIRS, min(n_slots, hay // 4))
    assert n_slots >= n_hay, f"length {length} is too short for {N_PAIRS} pairs"
    rows = torch.arange(batch)[:, None]
    tokens = torch.randint(FILLER.start, FILLER.stop, (batch, length), generator=g)
    tokens[:, 0] = BOS
    keys = torch.rand(batch, len(KEYS), generator=g).argsort(-1)[:, :N_PAIRS] + KEYS.start          # (B, P) distinct
    values = torch.randint(VALUES.start, VALUES.stop, (batch, N_PAIRS), generator=g)
    # haystack pairs: every key once, then (training) more occurrences of random keys, in random slots
    which = torch.cat([torch.rand(batch, N_PAIRS, generator=g).argsort(-1),
                       torch.randint(0, N_PAIRS, (batch, n_hay - N_PAIRS), generator=g)], dim=1)    # (B, n_hay)
    slot = torch.rand(batch, n_slots, generator=g).argsort(-1)[:, :n_hay]                         # (B, n_hay)
    at = 1 + 2 * slot
    tokens[rows, at], tokens[rows, at + 1] = keys.gather(1, which), values.gather(1, which)
    first = torch.full((batch, N_PAIRS), n_slots).scatter_reduce(1, which, slot, "amin")         # first slot per key
    targets = torch.full_like(tokens, -100)
    targets[rows, at] = torch.where(slot > first.gather(1, which), values.gather(1, which), -100)
    # the tail: every key once more
    order = torch.rand(batch, N_PAIRS, generator=g).argsort(-1)
    t_at = hay + 2 * torch.arange(N_PAIRS)
    tokens[:, t_at], tokens[:, t_at + 1] = keys.gather(1, order), values.gather(1, order)
    targets[:, t_at] = values.gather(1, order)
    return tokens, targets


# ---- models -------------------------------------------------------------------------------------------------------
def make_config(kind: str, train_len: int, temperature_tuning: bool = True) -> ModelConfig:
    shapes = dict(vocab_size=VOCAB, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128,
                  moe=MoEConfig(n_experts=4, top_k=1, expert_dim=64), moe_every=2, rope_theta=10000.0,
                  max_seq_len=1 << 20, bos_token_id=BOS, eos_token_ids=[], pad_token_id=0, image_token_id=0,
                  use_qk_norm=False)
    if kind == "irope":
        return ModelConfig(**shapes, nope_every=4, attn_chunk_size=train_len // CHUNKS_PER_TRAIN_SEQ,
                           attn_temperature_tuning=temperature_tuning,
                           floor_scale=float(train_len), attn_scale=0.1)
    return ModelConfig(**shapes, nope_every=0, attn_chunk_size=None, attn_temperature_tuning=False)


def train(model: Transformer, args, log) -> float:
    g = torch.Generator().manual_seed(args.seed + 1)          # the same batches for every model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        tokens, targets = make_batch(args.batch_size, args.train_len, g)
        logits = model(tokens)
        loss = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.3f}  lr {lr:.2e}  {time.perf_counter() - t0:.0f}s")
    model.eval()
    return time.perf_counter() - t0


@torch.inference_mode()
def query_logits(model: Transformer, tokens, piece: int = 1024):
    """Logits (B, 2 * N_PAIRS, V) of the query tail, after prefilling the haystack through the engine's KV cache in
    pieces (blockwise attention over long key ranges; equal to one forward, see tests/test_long_context.py)."""
    B, L = tokens.shape
    tail = 2 * N_PAIRS
    cache = KVCache(model.config, B, L, dtype=torch.float32)
    pos = torch.arange(L).expand(B, L)
    for s in range(0, L - tail, piece):
        e = min(s + piece, L - tail)
        model(tokens[:, s:e], input_pos=pos[:, s:e], kv_cache=cache, logit_index=torch.zeros(B, dtype=torch.long))
    return model(tokens[:, L - tail:], input_pos=pos[:, L - tail:], kv_cache=cache)


def accuracy(model: Transformer, length: int, n_seqs: int, batch: int = 4) -> float:
    g = torch.Generator().manual_seed(1234 + length)          # fixed test data per length, shared by all models
    correct = total = 0
    for start in range(0, n_seqs, batch):
        tokens, targets = make_batch(min(batch, n_seqs - start), length, g, test=True)
        tail = targets[:, -2 * N_PAIRS:]
        pred = query_logits(model, tokens).argmax(-1)
        asked = tail != -100
        correct += int((pred[asked] == tail[asked]).sum())
        total += int(asked.sum())
    return correct / total


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.eval_seqs, args.factors = 40, 2, "1,4"
    factors = [int(f) for f in args.factors.split(",")]

    def log(msg):
        print(msg, flush=True)

    t_start = time.perf_counter()
    rows = []
    for kind in ("irope", "rope"):
        cfg = make_config(kind, args.train_len)
        torch.manual_seed(args.seed)
        model = Transformer(cfg).init_weights(seed=args.seed)
        log(f"training {kind}: {sum(p.numel() for p in model.parameters()):,} parameters, {args.steps} steps of "
            f"{args.batch_size} x {args.train_len} tokens")
        t_train = train(model, args, log)
        variants = [(kind, model)]
        if kind == "irope":
            off = Transformer(make_config(kind, args.train_len, temperature_tuning=False))
            off.load_state_dict(model.state_dict())
            variants.append(("irope, temperature tuning off at test", off.eval()))
        for name, m in variants:
            t0 = time.perf_counter()
            accs = [accuracy(m, f * args.train_len, args.eval_seqs) for f in factors]
            log(f"  {name}: " + "  ".join(f"{f}x {a:.3f}" for f, a in zip(factors, accs))
                + f"  (test {time.perf_counter() - t0:.0f}s)")
            rows.append((name, accs, t_train))

    chunk = args.train_len // CHUNKS_PER_TRAIN_SEQ
    names = {"irope": f"iRoPE: 3 chunked RoPE (chunks of {chunk}) + 1 NoPE global, temperature tuning",
             "irope, temperature tuning off at test": "iRoPE, same weights, temperature tuning off at test",
             "rope": "RoPE + full attention in every layer"}
    n_q = args.eval_seqs * N_PAIRS
    header = "| model | " + " | ".join(f"{f}x ({f * args.train_len:,} tok)" for f in factors) + " |"
    lines = [f"Key-value retrieval accuracy ({N_PAIRS} pairs in filler, {n_q} queries per length, chance "
              f"{1 / len(VALUES):.3f}); trained at {args.train_len} tokens, {args.steps} steps x {args.batch_size} "
              f"sequences, seed {args.seed}.", "", header, "|" + "---|" * (len(factors) + 1)]
    for name, accs, _ in rows:
        lines.append(f"| {names[name]} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    total = time.perf_counter() - t_start
    lines += ["", f"Total {total / 60:.1f} min on {torch.get_num_threads()} CPU thread "
              f"(`python -m scripts.length_generalization{' --quick' if args.quick else ''}`)."]
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
