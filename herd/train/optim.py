"""AdamW with two parameter groups, the warmup + cosine learning-rate schedule, and the optimizer state as
safetensors + JSON (never pickle)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def build_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8):
    """AdamW; matrices (and embeddings) decay, vectors (norm weights) do not (the GPT-2/nanoGPT grouping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def lr_at(step: int, max_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from max_lr to min_ratio * max_lr at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_optimizer_state(state: dict, folder: Path):
    """A full (unsharded) optimizer state dict keyed by parameter name, as torch.distributed.checkpoint's
    get_optimizer_state_dict returns it -> optimizer.safetensors (every tensor) + optimizer.json (the rest)."""
    tensors, scalars = {}, {}
    for name, s in state["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{name}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{name}/{k}"] = v
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def load_optimizer_state(folder: Path) -> dict:
    tensors = load_file(str(folder / "optimizer.safetensors"))
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict[str, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    for g in meta["param_groups"]:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": meta["param_groups"]}
