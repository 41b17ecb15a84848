"""Does iRoPE buy length generalisation? Train tiny models on key-value retrieval at short length, test far past it.

Task (synthetic, vocabulary of 320): each sequence states N_PAIRS facts "key k is value v", one fact token each
(N_KEYS x N_VALUES fact tokens), at random places in a haystack of random filler tokens; a tail then asks every key
once, in random order, as "k v": the model must say v after k. Accuracy = share of tail values predicted exactly
(argmax over the whole vocabulary; chance 1/16). Test sequences hold the same facts in a longer haystack.

Models, same size (the `debug` preset's shapes: dim 64, 4 layers, 4 heads / 2 kv heads, MoE every 2nd layer):
- iRoPE (Llama 4's recipe at 4 layers): one NoPE layer with global attention and attention temperature tuning
  (floor_scale = the training length, attn_scale 0.1), three RoPE layers with block-aligned chunked attention
  (chunks of train_len / 4). The NoPE layer is layer 0. Evaluated twice: as trained, and with temperature tuning
  switched off at test time (same weights).
- The same with Llama 4's layer order, NoPE = layer 3 (every 4th layer, i.e. the last one of 4).
- RoPE everywhere: RoPE and full causal attention in every layer.
- Optional (`--models irope_8`, not in the default run): 8 layers in Llama 4's exact pattern, NoPE = layers 3 and 7.
All train on the same batches with the same optimizer and steps, then are tested at 1x, 4x, 16x and 64x the
training length. Long sequences go through the engine's KV cache in prefill pieces (blockwise attention for global
layers, the chunked layers' ring), exactly as the engine serves them.

    python -m scripts.length_generalization --out results/length_generalization.md   # ~18 min on one CPU thread
    python -m scripts.length_generalization --quick      # about a minute: smoke test, prints the table only
    python -m scripts.length_generalization --models irope_8 --out results/length_generalization_8layers.md
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.config import ModelConfig, MoEConfig
from herd.engine import KVCache
from herd.model import Transformer

# Vocabulary: 0 unused, 1 BOS, then key (question) tokens, value (answer) tokens, fact tokens (one per key-value
# combination: "k is v"), filler, in disjoint ranges.
BOS = 1
N_KEYS, N_VALUES = 16, 16
KEYS = range(2, 2 + N_KEYS)
VALUES = range(KEYS.stop, KEYS.stop + N_VALUES)
FACTS = range(VALUES.stop, VALUES.stop + N_KEYS * N_VALUES)        # fact(k, v) = FACTS.start + k * N_VALUES + v
VOCAB = 320
FILLER = range(FACTS.stop, VOCAB)
N_PAIRS = 8                    # facts per sequence, distinct keys
CHUNKS_PER_TRAIN_SEQ = 4       # the iRoPE model's RoPE layers attend in chunks of train_len / 4 tokens


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Task
    p.add_argument("--train-len", type=int, default=128, help="training sequence length (tokens)")
    p.add_argument("--factors", default="1,4,16,64", help="test lengths as multiples of --train-len")
    p.add_argument("--eval-seqs", type=int, default=64, help="test sequences per length (N_PAIRS queries each)")
    # Optim
    p.add_argument("--steps", type=int, default=800, help="optimizer steps per model")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (warmup, then cosine to 10%%)")
    # Run
    p.add_argument("--seed", type=int, default=0, help="weights and training data (the test data is fixed)")
    p.add_argument("--out", default=None, help="where to write the table (default: print it only)")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"which of {', '.join(MODELS)} to train, in order")
    p.add_argument("--quick", action="store_true", help="smoke run: 40 steps, 2 test sequences, factors 1,4")
    return p.parse_args(argv)


# ---- data ---------------------------------------------------------------------------------------------------------
def make_batch(batch: int, length: int, g: torch.Generator):
    """tokens (B, L) and targets (B, L): a haystack of filler holding N_PAIRS fact tokens at random places, then a
    tail asking every key once, in random order, as "k v". The target at each tail key is its value (-100 elsewhere).
    """
    n_tail = 2 * N_PAIRS
    hay = length - n_tail                                                     # BOS + filler + facts
    assert hay > N_PAIRS, f"length {length} is too short for {N_PAIRS} facts"
    rows = torch.arange(batch)[:, None]
    tokens = torch.randint(FILLER.start, FILLER.stop, (batch, length), generator=g)
    tokens[:, 0] = BOS
    keys = torch.rand(batch, N_KEYS, generator=g).argsort(-1)[:, :N_PAIRS]                    # (B, P) distinct
    values = torch.randint(0, N_VALUES, (batch, N_PAIRS), generator=g)
    at = 1 + torch.rand(batch, hay - 1, generator=g).argsort(-1)[:, :N_PAIRS]                # (B, P) distinct places
    tokens[rows, at] = FACTS.start + keys * N_VALUES + values
    order = torch.rand(batch, N_PAIRS, generator=g).argsort(-1)
    t_at = hay + 2 * torch.arange(N_PAIRS)
    tokens[:, t_at] = KEYS.start + keys.gather(1, order)
    tokens[:, t_at + 1] = VALUES.start + values.gather(1, order)
    targets = torch.full_like(tokens, -100)
    targets[:, t_at] = VALUES.start + values.gather(1, order)
    return tokens, targets


# ---- models -------------------------------------------------------------------------------------------------------
MODELS = {
    # kind: (table label, RoPE per layer (1 = RoPE, 0 = NoPE))
    "irope": ("iRoPE: NoPE global layer 0 + 3 chunked RoPE layers, temperature tuning", [0, 1, 1, 1]),
    "irope_last": ("iRoPE with Llama 4's layer order (NoPE = layer 3 of 4)", [1, 1, 1, 0]),
    "rope": ("RoPE + full attention in every layer", [1, 1, 1, 1]),
    # not in the default run (it doubles the depth, and the time): Llama 4's exact pattern at 8 layers
    "irope_8": ("iRoPE, 8 layers in Llama 4's pattern (NoPE = layers 3 and 7)", [1, 1, 1, 0, 1, 1, 1, 0]),
}
DEFAULT_MODELS = "irope,irope_last,rope"


def make_config(kind: str, train_len: int, temperature_tuning: bool = True) -> ModelConfig:
    """The `debug` preset's shapes with this task's vocabulary. No QK-norm in any model (Maverick's choice): with
    head_dim 16, Scout's weightless QK-norm caps RoPE-layer attention logits at +-sqrt(16) = 4."""
    rope_layers = MODELS[kind][1]
    irope = 0 in rope_layers
    return ModelConfig(
        vocab_size=VOCAB, dim=64, n_layers=len(rope_layers), n_heads=4, n_kv_heads=2, ffn_dim=128,
        moe=MoEConfig(n_experts=4, top_k=1, expert_dim=64), moe_every=2, rope_theta=10000.0, use_qk_norm=False,
        rope_layers=rope_layers, attn_chunk_size=train_len // CHUNKS_PER_TRAIN_SEQ if irope else None,
        attn_temperature_tuning=irope and temperature_tuning, floor_scale=float(train_len), attn_scale=0.1,
        max_seq_len=1 << 20, bos_token_id=BOS, eos_token_ids=[], pad_token_id=0, image_token_id=0)


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
        tokens, targets = make_batch(min(batch, n_seqs - start), length, g)
        tail = targets[:, -2 * N_PAIRS:]
        pred = query_logits(model, tokens).argmax(-1)
        asked = tail != -100
        correct += int((pred[asked] == tail[asked]).sum())
        total += int(asked.sum())
    return correct / total


def main(argv=None):
    args = parse_args(argv)
    command = " ".join(["python -m scripts.length_generalization", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.eval_seqs, args.factors = 40, 2, "1,4"
    factors = [int(f) for f in args.factors.split(",")]

    def log(msg):
        print(msg, flush=True)

    t_start, cpu_start = time.perf_counter(), time.process_time()
    rows = []                                                  # (label, accuracies)
    kinds = args.models.split(",")
    unknown = [k for k in kinds if k not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(MODELS)}")
    for kind in kinds:
        label = MODELS[kind][0]
        model = Transformer(make_config(kind, args.train_len)).init_weights(seed=args.seed)
        log(f"training {kind}: {sum(p.numel() for p in model.parameters()):,} parameters, {args.steps} steps of "
            f"{args.batch_size} x {args.train_len} tokens")
        train(model, args, log)
        variants = [(label, model)]
        if kind == "irope":
            off = Transformer(make_config(kind, args.train_len, temperature_tuning=False))
            off.load_state_dict(model.state_dict())
            variants.append(("the same iRoPE weights, temperature tuning off at test", off.eval()))
        for name, m in variants:
            t0 = time.perf_counter()
            accs = [accuracy(m, f * args.train_len, args.eval_seqs) for f in factors]
            log(f"  {name}: " + "  ".join(f"{f}x {a:.3f}" for f, a in zip(factors, accs))
                + f"  (test {time.perf_counter() - t0:.0f}s)")
            rows.append((name, accs))

    chunk = args.train_len // CHUNKS_PER_TRAIN_SEQ
    header = "| model | " + " | ".join(f"{f}x ({f * args.train_len:,} tok)" for f in factors) + " |"
    lines = [f"Key-value retrieval accuracy: {N_PAIRS} facts in filler, {args.eval_seqs * N_PAIRS} queries per "
             f"length, chance {1 / N_VALUES:.3f}. Trained at {args.train_len} tokens ({args.steps} steps x "
             f"{args.batch_size} sequences, seed {args.seed}); iRoPE chunks of {chunk} tokens, temperature-tuning "
             f"floor {args.train_len}.", "", header, "|" + "---|" * (len(factors) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + " |" for name, accs in rows]
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    lines += ["", f"{wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU on {torch.get_num_threads()} thread "
              f"(`{command}`)."]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out is None:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
