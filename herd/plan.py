"""Memory plan: does a model fit on a device at a quantization recipe, context and batch, and the longest context
that does. Pure arithmetic on a config (parameter shapes come from a meta-device model; nothing is allocated).

need = weights + KV cache + activations + runtime overhead, each stated with its assumption:
- weights: what each recipe really quantizes, Meta's recipes (spec 7.1), never "every matrix":
  bf16   everything in bf16.
  fp8    `fp8_mixed`: routed experts of the MoE layers except the first and last transformer layer, e4m3 with one
         fp32 scale per output row; attention, shared expert, dense FFN, router, embeddings, output, vision in bf16.
  int4   `int4_mixed` (the on-the-fly mode behind "Scout on one H100"): routed AND shared experts of every MoE
         layer, groups of 128 inputs with one fp32 scale per group (zero points are all 0 and not counted); the
         rest in bf16.
- KV cache (`kv_cache_bytes`): iRoPE makes it hybrid. Chunked RoPE layers only ever attend inside the current
  block of attn_chunk_size tokens, so they keep at most one chunk; NoPE (global) layers keep every token.
- activations (`activation_bytes`): the largest forward, a prefill chunk of PREFILL_CHUNK tokens per sequence, with
  flash-style attention (no T x S score matrix) and logits for the last position only.
- runtime overhead: RUNTIME_FIXED per device (CUDA context, cuBLAS/attention workspaces, NCCL buffers; on a CPU
  the OS, Python and torch) plus ALLOCATOR_SLACK of the dynamic memory (KV cache + activations) for fragmentation.
Several devices split the model evenly, by layers (a pipeline: each holds its layers' weights and KV cache) or
tensor-parallel (vLLM / SGLang --tensor-parallel-size: every matrix split across devices, the KV cache split by kv
head; with more devices than kv heads each head is held by devices/n_kv_heads of them, so the cache is replicated
that many times; activations: the residual stream on every device, attention and FFN widths and logits split).
A plan fits when each device's even share fits its memory.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

MiB, GiB = 1 << 20, 1 << 30
PREFILL_CHUNK = 2048           # tokens per sequence per prefill forward (the engine's / vLLM's usual chunk)
INT4_GROUP = 128               # Meta's int4 recipe
ALLOCATOR_SLACK_PCT = 5        # % of KV cache + activations lost to fragmentation / caching allocator rounding
RUNTIME_FIXED = {"gpu": 1 * GiB, "cpu": 2 * GiB}   # per device
QUANTS = ("bf16", "fp8", "int4")


@dataclass(frozen=True)
class Device:
    label: str
    n: int                     # devices the weights are split over (even split assumed)
    mem_each: int              # bytes usable by the process on each, as nvidia-smi reports the total
    kind: str                  # gpu | cpu
    split: str = "layers"      # layers | tensor (see the module docstring)

    @property
    def total(self) -> int:
        return self.n * self.mem_each


DEVICES = {
    "h100": Device("1x H100 80GB", 1, 81559 * MiB, "gpu"),
    "h200": Device("1x H200 141GB", 1, 143771 * MiB, "gpu"),
    "a100-80g": Device("1x A100 80GB", 1, 81920 * MiB, "gpu"),
    "rtx4090": Device("1x RTX 4090 24GB", 1, 24564 * MiB, "gpu"),
    "2x3090": Device("2x RTX 3090 24GB (layers split evenly)", 2, 24576 * MiB, "gpu"),
    "8xh100": Device("8x H100 80GB node (tensor parallel)", 8, 81559 * MiB, "gpu", "tensor"),
    "8xh200": Device("8x H200 141GB node (tensor parallel)", 8, 143771 * MiB, "gpu", "tensor"),
    "cpu-64g": Device("CPU with 64 GiB RAM", 1, 64 * GiB, "cpu"),
}

RECIPES = {
    "bf16": "every tensor in bf16",
    "fp8": "Meta fp8_mixed: routed experts of MoE layers except the first and last layer in fp8 e4m3 + one fp32 "
           "scale per output row; everything else bf16",
    "int4": "Meta int4_mixed: routed + shared experts of every MoE layer in int4, groups of 128 with one fp32 "
            "scale each; everything else bf16",
}


@dataclass
class WeightPart:
    name: str
    params: int
    bytes: int
    quantized: bool


def weight_parts(cfg: ModelConfig, quant: str) -> list[WeightPart]:
    """Parameters and bytes per part of the model under a recipe (see module docstring)."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; expected one of {', '.join(QUANTS)}")
    from .checkpoint import build_meta

    last = cfg.n_layers - 1
    parts: dict[str, WeightPart] = {}
    for name, p in build_meta(cfg).named_parameters():      # shared (tied) parameters are listed once
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        if name.startswith("vision"):          # encoder, adapter and projector (vision_proj)
            part = "vision"
        elif ".experts." in name:
            part = "routed experts"
        elif ".shared_expert." in name:
            part = "shared experts"
        elif ".router." in name:
            part = "routers"
        elif ".attention." in name:
            part = "attention"
        elif ".feed_forward." in name:
            part = "dense FFN"
        elif name.startswith("tok_embeddings"):
            part = "embeddings"
        elif name.startswith("output"):
            part = "output head"
        else:
            part = "norms"
        n = p.numel()
        rows = n // p.shape[-1]
        if quant == "fp8" and part == "routed experts" and layer not in (0, last):
            nbytes, q = n + 4 * rows, True
        elif quant == "int4" and part in ("routed experts", "shared experts"):
            nbytes, q = n // 2 + 4 * (n // INT4_GROUP), True
        else:
            nbytes, q = 2 * n, False
        key = f"{part} ({quant})" if q else part
        wp = parts.setdefault(key, WeightPart(key, 0, 0, q))
        wp.params += n
        wp.bytes += nbytes
    order = ["embeddings", "attention", "routers", "routed experts", "shared experts", "dense FFN", "norms",
             "output head", "vision"]
    return sorted(parts.values(), key=lambda p: (order.index(p.name.split(" (")[0]), p.name))


# ---- KV cache ------------------------------------------------------------------------------------------------
def kv_bytes_per_token_per_layer(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """K and V of one token in one layer: 2 * n_kv_heads * head_dim * dtype_bytes."""
    return 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


def kv_cache_tokens(cfg: ModelConfig, context: int) -> list[int]:
    """Tokens each layer's cache holds for a sequence of `context` tokens: chunked RoPE layers at most one chunk
    (attn_chunk_size), global (NoPE) layers all of them."""
    return [min(context, cfg.attn_chunk_size) if s.chunked else context for s in cfg.layers]


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, dtype_bytes: int = 2, pos_bytes: int = 0,
                   kv_int8: bool = False) -> int:
    """Bytes of the hybrid KV cache for `batch` sequences of `context` tokens. pos_bytes: per-slot position
    bookkeeping (kv_cache.KVCache keeps an int64 position per slot and layer: pass 8 to match its nbytes()).
    kv_int8: global layers hold int8 K and V plus one fp32 scale per token and head (kv_cache.KVCache kv_int8)."""
    per_slot = kv_bytes_per_token_per_layer(cfg, dtype_bytes) + pos_bytes
    int8_slot = 2 * cfg.n_kv_heads * (cfg.head_dim + 4) + pos_bytes
    return batch * sum(n * (int8_slot if kv_int8 and not s.chunked else per_slot)
                       for s, n in zip(cfg.layers, kv_cache_tokens(cfg, context)))


def kv_cache_bytes_per_token(cfg: ModelConfig, context: int, dtype_bytes: int = 2) -> int:
    """What one more token costs once a sequence holds `context` tokens: every global layer grows, chunked layers
    only until their first chunk is full. Past attn_chunk_size this is the long-context growth rate."""
    return kv_cache_bytes(cfg, context + 1, 1, dtype_bytes) - kv_cache_bytes(cfg, context, 1, dtype_bytes)


# ---- activations -----------------------------------------------------------------------------------------------
def activation_bytes(cfg: ModelConfig, context: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    """Peak transient memory of one forward over min(context, PREFILL_CHUNK) tokens per sequence (decode steps
    are smaller): per token the residual stream, its norm, the attention output and the MoE dispatch copies (6 D),
    q, k, v ((H + 2 K) * head_dim) and the widest FFN's gate, up and product (3 F), in the activation dtype; plus
    fp32 logits of the last position of each sequence."""
    widths = [cfg.moe.expert_dim if s.is_moe else cfg.ffn_dim for s in cfg.layers]
    per_token = 6 * cfg.dim + (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + 3 * max(widths)
    tokens = batch * min(context, PREFILL_CHUNK)
    return tokens * per_token * dtype_bytes + batch * cfg.vocab_size * 4


# ---- plan ------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    device: Device
    quant: str
    context: int
    batch: int
    parts: list[WeightPart]
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    longest_context: int       # 0 when not even the weights fit

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.device.total


def kv_replicas(cfg: ModelConfig, device: Device) -> int:
    """Copies of each K/V the devices hold together: 1, except tensor-parallel over more devices than kv heads."""
    return max(1, device.n // cfg.n_kv_heads) if device.split == "tensor" else 1


def _need(cfg, device: Device, weights: int, context: int, batch: int) -> tuple[int, int, int]:
    """(KV cache, activations, overhead) summed over the devices."""
    kv = kv_cache_bytes(cfg, context, batch) * kv_replicas(cfg, device)
    act = activation_bytes(cfg, context, batch)
    if device.split == "tensor":           # the residual stream (and its norm) on every device, the rest split
        tokens = batch * min(context, PREFILL_CHUNK)
        act += (device.n - 1) * tokens * 6 * cfg.dim * 2
    overhead = device.n * RUNTIME_FIXED[device.kind] + (kv + act) * ALLOCATOR_SLACK_PCT // 100
    return kv, act, overhead


def make_plan(cfg: ModelConfig, device: str, quant: str, context: int, batch: int = 1) -> Plan:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be at least 1 (got context {context}, batch {batch})")
    dev = DEVICES[device]
    parts = weight_parts(cfg, quant)
    weights = sum(p.bytes for p in parts)
    kv, act, overhead = _need(cfg, dev, weights, context, batch)
    return Plan(dev, quant, context, batch, parts, weights, kv, act, overhead,
                longest_context(cfg, dev, weights, batch))


def longest_context(cfg: ModelConfig, dev: Device, weights: int, batch: int) -> int:
    """The largest context (<= max_seq_len) whose need fits the device; 0 if one token does not fit."""
    def fits(n):
        return weights + sum(_need(cfg, dev, weights, n, batch)) <= dev.total
    if not fits(1):
        return 0
    lo, hi = 1, cfg.max_seq_len            # need grows with context: bisect for the last n that fits
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def format_plan(name: str, cfg: ModelConfig, plan: Plan) -> str:
    d = plan.device
    n_chunked = sum(s.chunked for s in cfg.layers)
    n_global = cfg.n_layers - n_chunked
    per_tok = kv_bytes_per_token_per_layer(cfg)
    lines = [
        f"plan         {name} on {d.label} ({gib(d.total)}), {plan.quant}, context {plan.context:,}, "
        f"batch {plan.batch}",
        f"weights      {gib(plan.weights):>10}  {RECIPES[plan.quant]}",
    ]
    if plan.context > cfg.max_seq_len:
        lines.insert(1, f"NOTE         context {plan.context:,} is past the model's limit of {cfg.max_seq_len:,} tokens "
                        "(max_position_embeddings): it was not trained for it and may fail to answer")
    if d.n > 1:
        how = ("every matrix split across the devices, the KV cache by kv head"
               + (f" ({cfg.n_kv_heads} kv heads: each held {kv_replicas(cfg, d)}x)" if kv_replicas(cfg, d) > 1
                  else "") if d.split == "tensor" else "each device holds its share of the layers")
        lines.insert(1, f"split        {d.n} devices of {gib(d.mem_each)}, {how}; each needs "
                        f"{gib(plan.total // d.n)}")
    for p in plan.parts:
        lines.append(f"  {p.name:22s}{p.params / 1e9:8.2f}B params {gib(p.bytes):>10}")
    kv_desc = f"bf16 K+V, {per_tok:,} B per token per layer; "
    if n_chunked:
        kv_desc += (f"{n_chunked} chunked RoPE layers hold min(context, {cfg.attn_chunk_size:,}) tokens, ")
    kv_desc += f"{n_global} global layers hold every token"
    lines += [
        f"kv cache     {gib(plan.kv_cache):>10}  {kv_desc}",
        f"activations  {gib(plan.activations):>10}  one prefill chunk of {min(plan.context, PREFILL_CHUNK):,} tokens x "
        f"batch {plan.batch}, flash-style attention, last-position logits",
        f"overhead     {gib(plan.overhead):>10}  {gib(RUNTIME_FIXED[d.kind])} per device "
        f"({'CUDA context, workspaces' if d.kind == 'gpu' else 'OS, Python, torch'}) + {ALLOCATOR_SLACK_PCT}% "
        "allocator slack on KV cache and activations",
        f"total        {gib(plan.total):>10}  of {gib(d.total)}: "
        + (f"fits, {gib(d.total - plan.total)} to spare" if plan.fits else f"does NOT fit, {gib(plan.total - d.total)} short"),
    ]
    if plan.longest_context == 0:
        lines.append(f"longest context that fits: none; the weights and runtime alone need "
                     f"{gib(plan.weights + d.n * RUNTIME_FIXED[d.kind])}")
    else:
        growth = kv_cache_bytes_per_token(cfg, max(plan.longest_context, cfg.attn_chunk_size or 0))
        lines.append(f"longest context that fits: {plan.longest_context:,} tokens at batch {plan.batch}, "
                     f"{100 * plan.longest_context / cfg.max_seq_len:.1f}% of the model's {cfg.max_seq_len:,} "
                     f"(past {cfg.attn_chunk_size or 0:,} tokens each token adds {growth * plan.batch:,} B of KV cache)")
        if plan.longest_context < cfg.max_seq_len:
            full = kv_cache_bytes(cfg, cfg.max_seq_len, plan.batch)
            lines.append(f"the model's full {cfg.max_seq_len:,}-token context would need {gib(full)} of KV cache alone")
    return "\n".join(lines)
