"""Train or distill a herd model: `herd train`, `herd distill`, or under torchrun:
    torchrun --nproc-per-node 2 -m herd.train --config debug --data a.txt --tokenizer bytes --steps 100 --out run

Reads top to bottom like nanoGPT's train.py: flags, distributed init, data, model, parallelism, optimizer, resume,
then the loop (data, forward, losses, backward, clip, step, log, eval, save).

OUT/log.jsonl has one line per logged step; OUT/loss.png and OUT/expert_load.png are redrawn at every save.
OUT/checkpoints/step_NNNNNN/ is an HF folder (model.safetensors + config.json, so herd.load and transformers read
it) plus optimizer.safetensors + optimizer.json, rng.safetensors and state.json (step, data position, run
identity) for an exact resume. state.json is written last and the folder renamed into place: a folder without it
is never used.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import build_meta, save_hf, to_hf_config
from ..config import PRESETS, ModelConfig, from_hf_config, preset
from ..model import MoE
from . import losses
from ..tokenizer import save_tokenizer
from .data import ByteTokenizer, TokenLoader, fingerprint, load_tokens
from .pairs import PairLoader, is_pairs, load_pairs
from .distill import TeacherCache, build_teacher_cache, check_same_tokenizer, kl_full, kl_topk
from .flags import add_train_flags
from .optim import build_optimizer, load_optimizer_state, lr_at, save_optimizer_state
from .parallel import Dist, all_reduce, apply_ddp, apply_fsdp, barrier, distributed


class TrainingError(RuntimeError):
    """A run that cannot start or continue, with the reason and what to do."""


# Settings that define a run: a resume must use the same ones (they fix the model, the data order and the batch).
IDENTITY = {"config": None, "data": None, "tokenizer": None, "seq_len": 256, "batch_size": 8, "grad_accum": 1,
            "seed": 0, "teacher": None, "kd_top_k": 0}


# ---- helpers --------------------------------------------------------------------------------------------------------
def model_config(spec: str) -> ModelConfig:
    """A preset name, a checkpoint folder, an HF config.json or a herd config JSON (ModelConfig fields)."""
    if spec in PRESETS:
        return preset(spec)
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise TrainingError(f"--config {spec}: not a preset ({', '.join(PRESETS)}) nor a config file")
    d = json.loads(p.read_text())
    return from_hf_config(d, str(p)) if ("architectures" in d or "model_type" in d) else ModelConfig.from_dict(d)


def is_checkpoint(path: str) -> bool:
    p = Path(path)
    return p.suffix == ".gguf" or (p.is_dir() and any(p.glob("*.safetensors")))


def load_tok(spec: str | None):
    from ..textgen import default_model_path
    from ..tokenizer import load_tokenizer
    if spec == "bytes":
        return ByteTokenizer()
    return load_tokenizer(spec or default_model_path())


def find_checkpoint(path: Path) -> Path | None:
    """A complete checkpoint folder: `path` itself, or the newest under path/checkpoints."""
    if (path / "state.json").exists():
        return path
    done = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / "state.json").exists())
    return done[-1] if done else None


def memory_available(d: Dist) -> int:
    """Bytes this rank may use: free accelerator memory, else MemAvailable (and the cgroup limit) shared by the
    ranks on this machine."""
    if d.device.type == "cuda":
        return torch.cuda.mem_get_info(d.device)[0]
    avail = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable"))
        avail = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail or 1 << 62, int(limit) - used)
    avail = avail or 1 << 62
    return avail // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def estimate_memory(cfg: ModelConfig, n_params: int, batch: int, seq: int, teacher_params: int, full_kd: bool):
    """(fixed bytes, activation bytes per sequence): a deliberately generous estimate made before allocating.
    Fixed: fp32 weights + gradients + two AdamW moments (16 B/param) and a teacher's fp32 weights. Per token, fp32
    values the backward keeps: per layer the norms, q/k/v and their rotated fp32 copies, attention probabilities
    (H x T, the non-fused path), and the FFN or MoE hidden states; then logits, log-softmax and their gradient
    (3 x V), and the teacher's logits when the KL uses the full vocabulary."""
    D, H, K, hd, T = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, seq
    per_token = 0
    for spec in cfg.layers:
        attn = 6 * D + 4 * (H + 2 * K) * hd + H * (min(T, cfg.attn_chunk_size) if spec.chunked else T)
        ffn = (6 * D + cfg.moe.n_experts + 8 * cfg.moe.expert_dim) if spec.is_moe else 4 * cfg.ffn_dim
        per_token += attn + ffn
    per_token += 3 * cfg.vocab_size + (3 * cfg.vocab_size if full_kd else 0)
    return 16 * n_params + 4 * teacher_params, 4 * per_token * T


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def write_plots(out: Path):
    """loss.png (train and eval loss) and expert_load.png (each MoE layer's per-expert token share) from the log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in recs if "loss" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (total)")
    if any("kd" in r for r in train):
        ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train cross-entropy", alpha=0.7)
    ev = [r for r in recs if "val_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="eval cross-entropy")
    ax.set(xlabel="step", ylabel="loss", title=out.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    loads = [r for r in train if r.get("expert_load")]
    if not loads:
        return
    n_layers, n_exp = len(loads[0]["expert_load"]), len(loads[0]["expert_load"][0])
    cols = min(n_layers, 3)
    rows = math.ceil(n_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    steps = [r["step"] for r in loads]
    for i, layer in enumerate(loads[0]["moe_layers"]):
        ax = axes[i // cols][i % cols]
        for e in range(n_exp):
            ax.plot(steps, [r["expert_load"][i][e] for r in loads], label=f"expert {e}")
        ax.axhline(1 / n_exp, color="k", ls="--", lw=0.8)
        ax.set(title=f"layer {layer}", xlabel="step", ylabel="token share", ylim=(0, 1))
    for j in range(n_layers, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "expert_load.png", dpi=100)
    plt.close(fig)


def save_checkpoint(out: Path, step: int, model, raw, opt, loader, run: dict, d: Dist, keep: int, tok):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = torch.get_rng_state()
    if d.world > 1:                                          # every rank's generator, as tensors (no pickling)
        states = [torch.empty_like(rng) for _ in range(d.world)]
        torch.distributed.all_gather(states, rng)
    else:
        states = [rng]
    if d.main:
        root = out / "checkpoints"
        folder, tmp = root / f"step_{step:06d}", root / f".step_{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf(raw, tmp, state={k: v for k, v in model_sd.items()})
        save_optimizer_state(optim_sd, tmp)
        from safetensors.torch import save_file
        save_file({f"cpu.rank{r}": s for r, s in enumerate(states)}, str(tmp / "rng.safetensors"))
        if not isinstance(tok, ByteTokenizer):
            save_tokenizer(tok, tmp)
        state = {"step": step, "data": loader.state_dict(), "world": d.world, "run": run,
                 "model_config": to_hf_config(raw.config)}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        for old in sorted(p for p in root.glob("step_*") if (p / "state.json").exists())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return out / "checkpoints" / f"step_{step:06d}"


@torch.no_grad()
def evaluate(model, loader: TokenLoader, n_batches: int, device, autocast) -> float:
    """Mean cross-entropy over the first n_batches global batches of the held-out stream (the same ones every time)."""
    model.eval()
    loader.load_state_dict({"epoch": 0, "index": 0})
    total = torch.zeros(2)
    for _ in range(min(n_batches, loader.n_windows // (loader.batch_size * loader.world))):
        x, y, _ = loader.next_batch()
        with autocast:
            logits = model(x.to(device))
        total += torch.tensor([losses.cross_entropy(logits, y.to(device)).item(), 1.0])
    model.train()
    all_reduce(total)
    return float(total[0] / total[1])


# ---- the run --------------------------------------------------------------------------------------------------------
def train(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    with distributed(args.device) as d:
        return _train(args, d)


def _train(args, d: Dist) -> dict:
    """The run: set-up (identity, config, memory, data, model, resume, teacher), then the loop."""
    run, resume, saved, out = run_identity(args, d)
    cfg, init_model = run_model_config(args, run, resume, saved)
    check_memory(cfg, run, args, d)
    tok, tokens, loader, val_loader = load_data(run, cfg, args, d, resume, saved)
    dev = d.device
    raw = build_model(cfg, init_model, run, args, dev)
    use_ddp = d.world > 1 and args.parallel in ("auto", "ddp")
    use_fsdp = d.world > 1 and args.parallel == "fsdp"
    model = apply_ddp(raw, d) if use_ddp else apply_fsdp(raw) if use_fsdp else raw
    opt = build_optimizer(model, args.lr, args.weight_decay)
    step = restore(resume, saved, model, opt, loader, d)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    if d.main:       # drop log lines past the resumed step (a run that went on after its last checkpoint)
        old = log_path.read_text().splitlines() if (resume and log_path.exists()) else []
        log_path.write_text("".join(l + "\n" for l in old if l.strip() and json.loads(l).get("step", 0) <= step))
    teacher, cache = setup_teacher(run, args, cfg, tok, tokens, out, d)

    # -- the loop: a straight read of one optimizer step after another (micro-batches, check, step, log, eval, save)
    from tqdm import tqdm
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16)
    moes = [m for m in raw.modules() if isinstance(m, MoE)]
    moe_layers = [i for i, s in enumerate(cfg.layers) if s.is_moe]
    warmup = args.warmup if args.warmup is not None else min(500, max(1, args.steps // 10))
    pbar = tqdm(total=args.steps, initial=step, disable=not d.main or args.no_progress, unit="step",
                dynamic_ncols=True, file=sys.stderr)
    tokens_per_step = run["batch_size"] * run["seq_len"] * run["grad_accum"] * d.world
    t_log, tokens_since, last_ckpt = time.perf_counter(), 0, resume
    summary = {"out": str(out), "log": str(log_path)}
    while step < args.steps:
        lr = lr_at(step, args.lr, warmup, args.steps, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        sums, counts = accumulate_gradients(model, loader, moes, teacher, cache, run, args, autocast, d,
                                            use_ddp, use_fsdp)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(float(sums[0])) and math.isfinite(grad_norm)):
            pbar.close()
            stop_on_non_finite(float(sums[0]), grad_norm, step, last_ckpt, log_path, d)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_since += tokens_per_step
        pbar.update(1)
        pbar.set_postfix(loss=f"{float(sums[0]):.3f}", lr=f"{lr:.2e}")

        val_loss = None
        if val_loader is not None and ((args.eval_every and step % args.eval_every == 0) or step == args.steps):
            val_loss = evaluate(model, val_loader, args.eval_batches, dev, autocast)
            summary["val_loss"] = val_loss
        if step % args.log_every == 0 or step == args.steps or val_loss is not None:
            now = time.perf_counter()
            rec = {"step": step, "loss": float(sums[0]), "ce": float(sums[1]), "lr": lr, "grad_norm": grad_norm,
                   "tokens": step * tokens_per_step, "tokens_per_s": tokens_since / max(now - t_log, 1e-9)}
            if run["teacher"]:
                rec["kd"] = float(sums[2])
            if moes:
                share = counts / counts.sum(-1, keepdim=True).clamp(min=1)
                rec.update(balance=float(sums[3]), z=float(sums[4]), moe_layers=moe_layers,
                           expert_load=[[round(v, 4) for v in row] for row in share.tolist()],
                           max_expert_share=float(share.max()))
            if val_loss is not None:
                rec["val_loss"] = val_loss
            t_log, tokens_since = now, 0
            if d.main:
                with log_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            summary.update(step=step, loss=rec["loss"], last=rec)
        if (args.save_every and step % args.save_every == 0) or step == args.steps:
            last_ckpt = save_checkpoint(out, step, model, raw, opt, loader, run, d, args.keep, tok)
            summary["checkpoint"] = str(last_ckpt)
            if d.main and not args.no_plots:
                write_plots(out)
    pbar.close()
    return summary


# ---- set-up ---------------------------------------------------------------------------------------------------------
def run_identity(args, d: Dist) -> tuple[dict, Path | None, dict | None, Path]:
    """(the run's identity settings, the checkpoint resumed or None, its state.json or None, the run folder): from
    the flags, or from the checkpoint being resumed (flags given must agree with it)."""
    distill = hasattr(args, "teacher")
    if distill and args.teacher == "default":
        from ..textgen import default_model_path
        args.teacher = str(default_model_path())
    if distill and args.student is not None:        # a student is either fresh (a config) or a checkpoint
        args.init, args.config = (args.student, None) if is_checkpoint(args.student) else (None, args.student)
    elif distill:
        args.init = None
    resume = None
    if args.resume:
        resume = find_checkpoint(Path(args.resume))
        if resume is None:
            raise TrainingError(f"--resume {args.resume}: no complete checkpoint (a folder with state.json) there")
    saved = json.loads((resume / "state.json").read_text()) if resume else None
    if distill and args.tokenizer is None:          # the student's own tokenizer if it has one, else the teacher's
        has_tok = args.init and Path(args.init).is_dir() and (Path(args.init) / "tokenizer.json").exists()
        args.tokenizer = args.init if has_tok else args.teacher
    run = {}
    for key, default in IDENTITY.items():
        given = getattr(args, key, None)
        if saved is not None:
            if given is not None and key not in ("config", "data") and given != saved["run"][key]:
                raise TrainingError(f"--resume {resume}: that run used {key} = {saved['run'][key]!r}, not "
                                    f"{given!r}; an exact resume needs the same value (or leave the flag out)")
            given = saved["run"][key] if given is None else given
        run[key] = default if given is None else given
    if saved is not None and saved["world"] != d.world:
        raise TrainingError(f"--resume {resume}: saved by {saved['world']} process(es), now {d.world}; the data "
                            "position is per global batch, so resume with the same number of processes")
    if run["config"] is None and args.init is None and saved is None:
        raise TrainingError("give --config PRESET_OR_PATH (or --init CHECKPOINT)")
    if not run["data"]:
        raise TrainingError("give --data FILES")
    out = Path(args.out) if args.out else (resume.parent.parent if resume and resume.parent.name == "checkpoints"
                                           else None)
    if out is None:
        raise TrainingError("give --out DIR")
    held = find_checkpoint(out)
    if held is not None and (resume is None or out.resolve() not in resume.resolve().parents):
        # a new run there would rewrite its log at once and, at its first save, delete its checkpoints past --keep
        raise TrainingError(f"--out {out} already holds a run (its checkpoint {held.name}): --resume {out} to go on "
                            "with it, or give a new --out")
    return run, resume, saved, out


def run_model_config(args, run: dict, resume: Path | None, saved: dict | None):
    """(the model config, the --init model or None); a resume must match the checkpoint's config exactly."""
    import herd
    init_model = herd.load(args.init) if args.init and not resume else None
    cfg = model_config(run["config"]) if run["config"] else None
    if cfg is None:
        cfg = init_model.config if init_model is not None else model_config(str(resume))
    elif init_model is not None and to_hf_config(cfg) != to_hf_config(init_model.config):
        raise TrainingError(f"--init {args.init} has another model config than --config {run['config']}; give one")
    if saved is not None:
        want, have = to_hf_config(cfg), saved["model_config"]
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            raise TrainingError(f"--resume {resume}: the checkpoint's model config differs from --config "
                                f"{run['config']} in {', '.join(diff[:6])} (e.g. {diff[0]}: {have.get(diff[0])!r} "
                                f"saved vs {want.get(diff[0])!r} requested); resume with the config it was trained "
                                "with, or start a new --out")
    return cfg, init_model


def check_memory(cfg: ModelConfig, run: dict, args, d: Dist):
    """Refuse a batch that cannot fit, before allocating anything large, naming the largest that does."""
    n_params = sum(p.numel() for p in build_meta(cfg).parameters())
    teacher_params = 0
    if run["teacher"]:
        from ..gguf import config_from_metadata, is_gguf, metadata, open_gguf
        if is_gguf(run["teacher"]):
            reader = open_gguf(run["teacher"])
            t_cfg = config_from_metadata(metadata(reader), {t.name for t in reader.tensors}, run["teacher"])
        else:
            t_cfg = model_config(run["teacher"])
        teacher_params = sum(p.numel() for p in build_meta(t_cfg).parameters())
    B, T = run["batch_size"], run["seq_len"]
    fixed, per_seq = estimate_memory(cfg, n_params, B, T, teacher_params, bool(run["teacher"]) and not run["kd_top_k"])
    limit = int(args.memory_limit * 2 ** 30) if args.memory_limit else memory_available(d)
    if fixed + B * per_seq > limit:
        fits = max(0, (limit - fixed) // per_seq)
        raise TrainingError(
            f"--batch-size {B} x --seq-len {T} needs about {gib(fixed + B * per_seq)} per process (weights, "
            f"gradients and AdamW state {gib(fixed)} + activations {gib(per_seq)} per sequence) but {gib(limit)} is "
            f"available: at most {fits} sequence(s) of {T} tokens fit per micro-batch. Lower --batch-size (and raise "
            "--grad-accum to keep the batch) or --seq-len")


def load_data(run: dict, cfg: ModelConfig, args, d: Dist, resume: Path | None, saved: dict | None):
    """(tokenizer, the training token stream, its loader, the held-out loader or None)."""
    B, T = run["batch_size"], run["seq_len"]
    tok = load_tok(run["tokenizer"])
    # prompt/completion JSONL: one row per pair, loss on the completion (pairs.py); anything else: a packed stream
    pairs = is_pairs(run["data"])
    load = (lambda files: load_pairs(files, tok, cfg.vocab_size, T)) if pairs else \
        (lambda files: load_tokens(files, tok, cfg.vocab_size))
    Loader = PairLoader if pairs else TokenLoader
    tokens = load(run["data"])
    if saved is not None and fingerprint(tokens) != saved["run"]["data_fingerprint"]:
        raise TrainingError(f"--resume {resume}: the data files tokenize to a different stream than the run's "
                            f"({run['data']}); resume with the same files and tokenizer")
    run["data_fingerprint"] = fingerprint(tokens)
    loader = Loader(tokens, T, B, d.rank, d.world, run["seed"])
    val_loader = None
    if args.val_data:
        val_tokens = load(args.val_data)
        n_val = len(val_tokens) if pairs else (len(val_tokens) - 1) // T
        val_b = max(1, min(B, n_val // d.world))                         # a small held-out set: smaller batches
        val_loader = Loader(val_tokens, T, val_b, d.rank, d.world, shuffle=False)
    return tok, tokens, loader, val_loader


def build_model(cfg: ModelConfig, init_model, run: dict, args, dev):
    """Fresh weights on meta -> device, or the --init checkpoint; fp32 master weights, in training mode."""
    torch.manual_seed(run["seed"])
    if init_model is not None:
        raw = init_model.float().to(dev)
    else:
        raw = build_meta(cfg)
        raw.to_empty(device=dev)
        raw.init_weights(std=args.init_std, seed=run["seed"])
        if cfg.tie_embeddings:
            raw.output.weight = raw.tok_embeddings.weight
    return raw.train()


def restore(resume: Path | None, saved: dict | None, model, opt, loader: TokenLoader, d: Dist) -> int:
    """The step to start from: 0, or a resumed checkpoint's, with weights, optimizer, RNG and data position exactly
    as saved."""
    if resume is None:
        return 0
    import herd
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    sd = herd.load(resume).state_dict()
    set_state_dict(model, opt, model_state_dict=sd, optim_state_dict=load_optimizer_state(resume),
                   options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(load_file(str(resume / "rng.safetensors"))[f"cpu.rank{d.rank}"])
    loader.load_state_dict(saved["data"])
    return saved["step"]


def setup_teacher(run: dict, args, cfg: ModelConfig, tok, tokens, out: Path, d: Dist):
    """(teacher model run every step or None, top-k cache or None): full-vocabulary KL runs the teacher each step;
    --kd-top-k computes its top-k once into a cache and frees it."""
    if not run["teacher"]:
        return None, None
    import herd
    from ..tokenizer import load_tokenizer
    from .distill import DistillError
    t_path = run["teacher"]
    t_tok = load_tokenizer(t_path)
    teacher = herd.load(t_path, device=d.device).eval().requires_grad_(False)
    if isinstance(tok, ByteTokenizer):
        raise DistillError("a byte-tokenizer student cannot be distilled from a BPE teacher")
    check_same_tokenizer(t_tok, tok, teacher.config.vocab_size, cfg.vocab_size)
    if not run["kd_top_k"]:
        return teacher, None
    cache_path = Path(args.teacher_cache or out / "teacher_topk.safetensors")
    if d.main and not cache_path.exists():
        build_teacher_cache(teacher, TokenLoader(tokens, run["seq_len"], 1, shuffle=False), run["kd_top_k"],
                            cache_path, str(t_path), run["data_fingerprint"], batch_size=run["batch_size"],
                            autocast_dtype=torch.bfloat16 if args.bf16 else None, progress=not args.no_progress)
    barrier()
    return None, TeacherCache(cache_path, run["data_fingerprint"], run["seq_len"], cfg.vocab_size)


# ---- one optimizer step's gradients ----------------------------------------------------------------------------------
def accumulate_gradients(model, loader: TokenLoader, moes: list, teacher, cache, run: dict, args, autocast, d: Dist,
                         use_ddp: bool, use_fsdp: bool):
    """Forward and backward over --grad-accum micro-batches. Returns (loss, ce, kd, balance, z averaged over
    micro-batches and ranks (5,), expert token counts per MoE layer (L, E))."""
    A, dev = run["grad_accum"], d.device
    sums = torch.zeros(5)                               # loss, ce, kd, balance, z
    counts = torch.zeros(len(moes), moes[0].router.out_features if moes else 1)
    for micro in range(A):
        x, y, win = loader.next_batch()
        x, y = x.to(dev), y.to(dev)
        last = micro == A - 1
        if use_fsdp:
            model.set_requires_gradient_sync(last)
        with (model.no_sync() if use_ddp and not last else contextlib.nullcontext()):
            with autocast:
                logits = model(x)
            ce = losses.cross_entropy(logits, y)
            kd = torch.zeros(())
            if teacher is not None:
                with torch.inference_mode(), autocast:
                    t_logits = teacher(x)
                kd = kl_full(logits, t_logits.clone(), args.temperature)
            elif cache is not None:
                t_lp, t_ids = cache.lookup(win)
                kd = kl_topk(logits, t_lp.to(dev), t_ids.to(dev), args.temperature)
            loss = (1 - args.kd_weight) * ce + args.kd_weight * kd if run["teacher"] else ce
            bal, z = torch.zeros(()), torch.zeros(())
            if moes:
                c = torch.stack([losses.expert_counts(m.router_logits, m.top_k) for m in moes])   # (L, E)
                all_reduce(c)                   # balance over the global batch, identical on every rank
                bal = sum(losses.load_balancing_loss(m.router_logits, c[i]) for i, m in enumerate(moes)) / len(moes)
                z = sum(losses.router_z_loss(m.router_logits) for m in moes) / len(moes)
                loss = loss + args.balance_coef * bal + args.z_coef * z
                counts += c.cpu()
            (loss / A).backward()
        sums += torch.stack([loss.detach(), ce.detach(), kd.detach(), bal.detach(), z.detach()]).float().cpu() / A
    all_reduce(sums)
    return sums / d.world, counts


def stop_on_non_finite(loss: float, grad_norm: float, step: int, last_ckpt, log_path: Path, d: Dist):
    """Stop before the optimizer step, so no non-finite value ever reaches the weights or a checkpoint."""
    where = last_ckpt or "none (no checkpoint was saved yet)"
    if d.main:
        with log_path.open("a") as f:
            f.write(json.dumps({"step": step + 1, "error": "non-finite loss", "loss": loss, "grad_norm": grad_norm,
                                "last_checkpoint": str(where)}) + "\n")
    raise TrainingError(f"loss is {loss} (gradient norm {grad_norm}) at step {step + 1}: stopped before updating "
                        f"the weights. Last good checkpoint: {where}. Resume from it with a lower --lr or a "
                        "--grad-clip")


def main(argv=None):
    p = add_train_flags(argparse.ArgumentParser(prog="herd.train", description=__doc__.split("\n")[0]))
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()
