"""Train a tiny early-fusion Llama-4-style MoE from scratch to read handwritten digits, on the CPU, in minutes.

Data: scikit-learn's 1,797 8x8 digit scans, drawn as dark ink on white paper and upscaled to 32x32 images. Each
example is a Llama 4 chat: the user turn holds the image and "Which digit is this?", the assistant answers with the
digit as a word ("seven") and <|eot|>. Images go through herd.images (the same tiling and tokens as real Llama 4
inputs) and herd.chat builds the prompt, so `herd.load` + the saved tokenizer run the model like any other.

Model: a 64-wide vision encoder (4x4 patches of 8x8 pixels, 2D RoPE, 2 blocks, pixel shuffle to 4 tokens per image)
feeding a 4-layer MoE trunk (4 routed experts top-1 + a shared expert in every layer, iRoPE: 3 RoPE layers with
QK-norm and chunked attention, 1 NoPE layer). Held-out accuracy on a 25% split is printed next to two classic
baselines on the raw pixels: logistic regression and an RBF SVM.

    python -m scripts.train_digits                     # full run: minutes on a 2-core CPU, writes runs/digits
    python -m scripts.train_digits --quick --out /tmp/d # seconds: a smoke test of the whole pipeline

The output folder is an HF checkpoint (Llama4ForConditionalGeneration): config.json, model.safetensors,
preprocessor_config.json, generation_config.json, tokenizer.json + tokenizer_config.json (word level), metrics.json,
and a few held-out digits as PNG files under examples/.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from herd.chat import format_llama4
from herd.checkpoint import save_hf
from herd.config import ModelConfig, MoEConfig, VisionConfig
from herd.images import ImageTokenIds, prepare_images
from herd.model import Transformer
from herd.tokenizer import tokenizer_from_folder

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
QUESTION = "Which digit is this?"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>",
            "<|finetune_right_pad|>", "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>",
            "<|tile_y_separator|>", "<|image|>", "<|patch|>"]
WORDS = ["[UNK]", "system", "user", "assistant", "ipython", "which", "digit", "is", "this", "?"] + DIGIT_WORDS
IMAGE_SIDE = 32          # 8x8 scans upscaled 4x; one 32-pixel tile of 8-pixel patches (2x2 scan pixels each)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Output
    p.add_argument("--out", default="runs/digits", help="checkpoint folder to write")
    # Optim
    p.add_argument("--steps", type=int, default=900, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="examples per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (warmup, then cosine to 10%%)")
    p.add_argument("--aux-loss", type=float, default=0.01, help="weight of the MoE load-balancing loss")
    # Run
    p.add_argument("--seed", type=int, default=0, help="weights, augmentation and batch order")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (matrices this small gain little "
                   "from a second thread, and lose a lot when another process keeps the other core busy)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run: 30 steps, no baselines")
    return p.parse_args(argv)


# ---- tokenizer, prompts, model shape -------------------------------------------------------------------------------
def write_tokenizer(folder: Path):
    """A word-level tokenizer.json with Llama 4's special tokens, so herd.chat lays out Llama 4 chats with it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>",
        "pad_token": "<|finetune_right_pad|>", "unk_token": "[UNK]", "add_bos_token": True,
        "model_max_length": 64}, indent=2))
    return tokenizer_from_folder(folder)


def image_token_ids(tok) -> ImageTokenIds:
    t = tok.token_id
    return ImageTokenIds(image_start=t("<|image_start|>"), image_end=t("<|image_end|>"), image=t("<|image|>"),
                         tile_x=t("<|tile_x_separator|>"), tile_y=t("<|tile_y_separator|>"), patch=t("<|patch|>"))


def model_config(tok) -> ModelConfig:
    t = tok.token_id
    vocab = 64                                             # 36 tokens used; rounded up for round matrix shapes
    assert tok.vocab_size <= vocab
    return ModelConfig(
        vocab_size=vocab, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, norm_eps=1e-5,
        max_seq_len=64, rope_theta=10000.0,
        # iRoPE as in Llama 4: layers 0-2 RoPE + QK-norm + chunked attention, layer 3 NoPE (global). The chunk
        # covers the whole 22-token example, as Llama 4's 8192 does for everyday prompts.
        nope_every=4, attn_chunk_size=64, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=8192.0,
        moe=MoEConfig(n_experts=4, top_k=1, expert_dim=64), moe_every=1,   # Scout-style: every layer MoE
        vision=VisionConfig(image_size=IMAGE_SIDE, patch_size=8, dim=64, n_layers=2, n_heads=4, ffn_dim=256,
                            pixel_shuffle_ratio=0.5, projector_dim=64, max_tiles=1),
        bos_token_id=t("<|begin_of_text|>"), eos_token_ids=[t("<|eot|>"), t("<|end_of_text|>"), t("<|eom|>")],
        pad_token_id=t("<|finetune_right_pad|>"), image_token_id=t("<|patch|>"), source="llama4")


def prompt_ids(tok, block: list[int]) -> list[int]:
    """The chat prompt for one image, ending with the assistant header: what `herd run --image` will send."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return format_llama4(tok, messages, image_blocks=[block])


def digit_image(scan: np.ndarray) -> Image.Image:
    """An 8x8 scan (ink 0..16) -> a 32x32 RGB picture, dark ink on white, each scan pixel a 4x4 block."""
    gray = (255 - scan * 255 / 16).round().astype(np.uint8)
    return Image.fromarray(gray, "L").resize((IMAGE_SIDE, IMAGE_SIDE), Image.NEAREST).convert("RGB")


# ---- training pieces -----------------------------------------------------------------------------------------------
def shift_images(x: torch.Tensor, g: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """Translate half of the tiles (B, 3, S, S) by up to max_shift pixels (one scan pixel) in x and y, filling
    with paper white (+1). Shifting every image slows learning more than it helps; none overfits (~90%)."""
    B, _, S, _ = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=1.0)                       # (B, 3, S + 2m, S + 2m)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, B), generator=g).tolist()
    shifted = torch.stack([padded[i, :, dy[i]:dy[i] + S, dx[i]:dx[i] + S] for i in range(B)])
    keep = torch.rand(B, generator=g) < 0.5
    return torch.where(keep[:, None, None, None], x, shifted)


def load_balance_loss(model: Transformer) -> torch.Tensor:
    """Switch-Transformer auxiliary loss (https://arxiv.org/abs/2101.03961), summed over MoE layers:
    E * sum_e (fraction of tokens routed to e) * (mean router probability of e); 1 when perfectly balanced."""
    total = 0.0
    for layer in model.layers:
        logits = getattr(layer.feed_forward, "router_logits", None)     # (N, E), set by MoE.forward in training
        if logits is None:
            continue
        E = logits.shape[-1]
        routed = F.one_hot(logits.argmax(-1), E).float().mean(0)         # (E,)
        total = total + E * (routed * logits.float().softmax(-1).mean(0)).sum()
    return total


@torch.no_grad()
def accuracy(model, prompt, answer_pos, pixels, labels, word_ids, eot_id, batch=150):
    """Fraction answered exactly right: the argmax over the whole vocabulary at the answer position is the right
    word, and after it the model ends its turn with <|eot|>."""
    model.eval()
    right = ended = 0
    for s in range(0, len(labels), batch):
        y = labels[s:s + batch]
        ids = torch.cat([prompt.expand(len(y), -1), word_ids[y][:, None]], dim=1)   # (b, T + 1)
        logits = model(ids, images=pixels[s:s + batch])
        ok = logits[:, answer_pos].argmax(-1) == word_ids[y]
        right += ok.sum().item()
        ended += (ok & (logits[:, answer_pos + 1].argmax(-1) == eot_id)).sum().item()
    model.train()
    return right / len(labels), ended / len(labels)


def baselines(X_train, y_train, X_test, y_test) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    return {"logistic_regression": LogisticRegression(max_iter=5000).fit(X_train, y_train).score(X_test, y_test),
            "rbf_svm": SVC(kernel="rbf").fit(X_train, y_train).score(X_test, y_test)}


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.steps, args.batch_size = 30, 32
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)

    # Data: the fixed 25% held-out split the baselines use too
    try:
        import sklearn  # noqa: F401  (the digits and the baselines come from scikit-learn)
    except ImportError:
        raise SystemExit("scripts.train_digits needs scikit-learn (the digits dataset and the baselines): "
                         "./install.sh installs it, or pip install scikit-learn") from None
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, test_idx = train_test_split(np.arange(len(digits.target)), test_size=0.25, random_state=0)
    if args.quick:               # a slice of each split: exercises the pipeline, says nothing about accuracy
        train_idx, test_idx = train_idx[:256], test_idx[:100]
    tok = write_tokenizer(out)
    cfg = model_config(tok)
    ids = image_token_ids(tok)
    # every digit through the real image pipeline once (32x32 into one 32-pixel tile: no resize, just normalize)
    pixels, blocks = prepare_images([digit_image(s) for s in digits.images], cfg.vision, ids,
                                    max_images=len(digits.images))                       # (1797, 3, 32, 32)
    assert all(b == blocks[0] for b in blocks)
    prompt = torch.tensor([prompt_ids(tok, blocks[0])])                                 # (1, T)
    answer_pos = prompt.shape[1] - 1            # logits here predict the word; one later, <|eot|>
    word_ids = torch.tensor([tok.encode(w)[0] for w in DIGIT_WORDS])
    eot = tok.token_id("<|eot|>")
    labels = torch.from_numpy(digits.target)
    train_x, train_y = pixels[train_idx], labels[train_idx]
    test_x, test_y = pixels[test_idx], labels[test_idx]
    print(f"data: {len(train_idx)} train / {len(test_idx)} held-out digits, prompt {prompt.shape[1]} tokens "
          f"({blocks[0].count(ids.patch)} image patches)")

    # Model and optimizer: decay matrices only, not norms, biases, embeddings of single vectors
    model = Transformer(cfg).init_weights(std=0.02, seed=args.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vision"))
    print(f"model: {n_params / 1e3:.0f}K parameters ({n_vision / 1e3:.0f}K vision)")

    losses = []
    for step in range(args.steps):
        lr = args.lr * (step + 1) / warmup if step < warmup else \
            args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))))
        for group in opt.param_groups:
            group["lr"] = lr
        b = torch.randint(0, len(train_y), (args.batch_size,), generator=g)
        y = train_y[b]
        tokens = torch.cat([prompt.expand(len(b), -1), word_ids[y][:, None], torch.full((len(b), 1), eot)], 1)
        logits = model(tokens[:, :-1], images=shift_images(train_x[b], g))              # (B, T + 1, V)
        # the loss covers the answer only: the word, then <|eot|>
        targets = tokens[:, answer_pos + 1:]                                             # (B, 2)
        loss = F.cross_entropy(logits[:, answer_pos:].reshape(-1, cfg.vocab_size), targets.reshape(-1))
        total = loss + args.aux_loss * load_balance_loss(model)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {np.mean(losses[-100:]):.4f}  lr {lr:.2e}  {time.time() - t0:.0f}s")

    acc, acc_eot = accuracy(model, prompt, answer_pos, test_x, test_y, word_ids, eot)
    wall = time.time() - t0
    metrics = {"held_out_accuracy": acc, "answered_and_ended_turn": acc_eot, "n_test": len(test_idx),
               "steps": args.steps, "batch_size": args.batch_size, "wall_seconds": round(wall, 1),
               "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])), "params": n_params}
    print(f"held-out accuracy {acc:.2%} ({round(acc * len(test_idx))}/{len(test_idx)}), "
          f"ending the turn with <|eot|> {acc_eot:.2%}; trained in {wall:.0f}s")
    if not args.quick:
        flat = digits.data
        base = baselines(flat[train_idx], digits.target[train_idx], flat[test_idx], digits.target[test_idx])
        metrics.update(base)
        lr_acc, svm_acc = base["logistic_regression"], base["rbf_svm"]
        where = "above both baselines" if acc > svm_acc else "level with the RBF SVM" if acc == svm_acc else \
            "between the baselines" if acc > lr_acc else "below logistic regression"
        print(f"baselines on the raw pixels: logistic regression {lr_acc:.2%}, RBF SVM {svm_acc:.2%}; "
              f"the model is {where}")

    model.eval()
    save_hf(model, out, extra_config={"boi_token_index": ids.image_start, "eoi_token_index": ids.image_end})
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids, "pad_token_id": cfg.pad_token_id,
         "do_sample": False}, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    examples = out / "examples"
    examples.mkdir(exist_ok=True)
    for i in test_idx[:10]:
        digit_image(digits.images[i]).save(examples / f"test{i}_{DIGIT_WORDS[digits.target[i]]}.png")
    print(f"saved {out}/ (HF Llama4ForConditionalGeneration + tokenizer, examples/)")
    return metrics


if __name__ == "__main__":
    main()
