"""The Llama 4 text trunk (and, with its features switched off, Llama 2/3). Math only.

Architecture, each a per-layer boolean from `config.LayerSpec`:
- Pre-norm decoder blocks with RMSNorm (fp32 compute, cast back, then the weight).
- Grouped-query attention; RoPE on the interleaved (2i, 2i+1) pairs, with optional llama3 frequency scaling.
- iRoPE (https://ai.meta.com/blog/llama-4-multimodal-intelligence/): 3 of 4 layers use RoPE and attend only inside
  block-aligned chunks of `attn_chunk_size` tokens; every 4th layer is NoPE and attends globally, with attention
  temperature tuning (q scaled by 1 + attn_scale * ln(floor((p + 1) / floor_scale) + 1)).
- QK-norm: a weightless RMS norm of each q and k head, after RoPE, on RoPE layers.
- Mixture of experts: top-1 on the raw router logits, the sigmoid of the winner scales the expert's INPUT, plus an
  always-on shared expert (Switch/DeepSeekMoE style, https://arxiv.org/abs/2401.06066). Dense SwiGLU elsewhere.
- Early fusion: image tiles go through vision.py's encoder and `vision_proj`, and their embeddings replace the
  token embeddings at the `<|patch|>` positions before the first block (images and text share the whole trunk).

Tensor letters: B batch, T new tokens, S attended keys, H query heads, K kv heads, D head dim, N = B*T tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import LayerSpec, ModelConfig
from .vision import VisionEncoder, image_token_mask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32:    # no cast back to do: the fused kernel applies the weight
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return rms_normalize(x, self.eps) * self.weight


def rms_normalize(x, eps: float):
    # fp32 statistics, then back to the activation dtype BEFORE any weight multiply (Llama reference order).
    # torch's fused kernel, weightless: x * rsqrt(mean(x^2) + eps), one op instead of five.
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


# ---- rotary position embedding ----------------------------------------------------------------------------------
def rope_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """inv_freq (D/2,) in fp32, llama3-scaled when the config says so."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    if cfg.rope_freq_factors is not None:
        return inv_freq / torch.tensor(cfg.rope_freq_factors, device=device, dtype=torch.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # llama3 scaling: keep high frequencies, divide low ones by `factor`, blend the band between.
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    if s.high_freq_factor != s.low_freq_factor:
        smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        scaled = torch.where(is_mid, blended, scaled)
    return scaled


def rope_angles(pos: torch.Tensor, inv_freq: torch.Tensor):
    """The rotations e^(i * pos * inv_freq), complex64 (B, T, 1, D/2), for absolute positions pos (B, T)."""
    angles = pos.float()[..., None] * inv_freq           # (B, T, D/2)
    return torch.polar(torch.ones_like(angles), angles)[:, :, None, :]


def apply_rope(x, rotation):
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, D) by `rotation` (rope_angles): each pair read
    as the complex number x[2i] + i x[2i+1] and multiplied, i.e. (x0 cos - x1 sin, x0 sin + x1 cos), the Meta/GPT-J
    convention. Complex arithmetic does it in one multiply instead of a dozen real ops (decode runs this per layer)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))      # (B, T, H, D/2) complex
    return torch.view_as_real(xc * rotation).flatten(-2).type_as(x)


def attention_temperature(pos, floor_scale: float, attn_scale: float):
    """NoPE-layer q scale (B, T, 1, 1): exactly 1 for p + 1 < floor_scale, grows like log(p) beyond."""
    scale = 1.0 + attn_scale * torch.log1p(torch.floor((pos.float() + 1.0) / floor_scale))
    return scale[:, :, None, None]


def attention_mask(q_pos, k_pos, chunk_size: int | None):
    """Boolean (B, 1, T, S): key visible iff it exists (pos >= 0), is not in the future, and, on chunked layers,
    lies in the same block-aligned chunk as the query (floor(k / C) == floor(q / C); not a sliding window).
    Padding queries (pos < 0) see every key so softmax stays finite; their outputs are unused.
    Written as lo(q) <= k <= hi(q), two comparisons over (T, S) (this runs once per key block of a long prefill)."""
    big = torch.iinfo(k_pos.dtype).max
    kp = torch.where(k_pos >= 0, k_pos, big)[:, None, :]                        # (B, 1, S), empty slots: never seen
    valid = (q_pos >= 0)[:, :, None]                                            # (B, T, 1)
    mask = kp <= torch.where(valid, q_pos[:, :, None], big)
    if chunk_size is not None:
        chunk_start = q_pos[:, :, None] - q_pos[:, :, None] % chunk_size
        mask &= kp >= torch.where(valid, chunk_start, -1)
    return mask[:, None]


def key_block_mask(q_pos, k_pos, chunk_size: int | None):
    """`attention_mask` for one block of keys, or None when every query sees every key of the block: no mask to
    build for most of a long prefill's global attention, where the whole past is visible."""
    lo = 0 if chunk_size is None else int(q_pos.max()) // chunk_size * chunk_size   # start of the last query's chunk
    if int(k_pos.min()) >= lo and int(k_pos.max()) <= int(q_pos.min()):
        return None
    return attention_mask(q_pos, k_pos, chunk_size)


def is_plain_causal(q_pos, k_pos, chunk_size: int | None) -> bool:
    """True when `attention_mask(q_pos, k_pos, chunk_size)` is the lower triangle: the keys are exactly the queries
    (a prompt's first prefill piece), positions run consecutively with no padding, and each row stays in one chunk."""
    T = q_pos.shape[1]
    if T < 2 or k_pos.shape != q_pos.shape or not torch.equal(q_pos, k_pos) or int(q_pos.min()) < 0:
        return False
    if not bool((q_pos[:, 1:] == q_pos[:, :-1] + 1).all()):
        return False
    return chunk_size is None or bool((q_pos[:, 0] // chunk_size == q_pos[:, -1] // chunk_size).all())


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.spec: LayerSpec = cfg.layers[layer_id]
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.chunk_size = cfg.attn_chunk_size if self.spec.chunked else None
        self.norm_eps, self.floor_scale, self.attn_scale = cfg.norm_eps, cfg.floor_scale, cfg.attn_scale
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def project_qkv(self, x):
        """q (B, T, H, D), k and v (B, T, K, D). cpu/fuse.py swaps in a fused projection (FusedAttention)."""
        B, T, _ = x.shape
        return (self.wq(x).view(B, T, self.n_heads, self.head_dim),
                self.wk(x).view(B, T, self.n_kv_heads, self.head_dim),
                self.wv(x).view(B, T, self.n_kv_heads, self.head_dim))

    def forward(self, x, pos, rope, kv_cache=None):
        q, k, v = self.project_qkv(x)
        if self.spec.uses_rope:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if self.spec.qk_norm:
            q, k = rms_normalize(q, self.norm_eps), rms_normalize(k, self.norm_eps)
        if self.spec.temperature_tuning:
            q = (q * attention_temperature(pos, self.floor_scale, self.attn_scale)).type_as(q)
        if kv_cache is not None:
            # The cache returns every key this step may attend to (earlier ones + these) and their positions
            # (int8 ops.QuantizedKV keys and values on global layers when the engine asks for them).
            k, v, k_pos = kv_cache.update(self.layer_id, k, v, pos)
        else:
            k_pos = pos
        return self.wo(self.attend(q, k, v, pos, k_pos))

    def attend(self, q, k, v, pos, k_pos):
        """Each query (position pos) over the keys it may see (positions k_pos): q (B, T, H, D), k and v (B, S, K, D)
        -> (B, T, H*D)."""
        B, T = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # (B, H, T, D), (B, K, S, D)
        if is_plain_causal(pos, k_pos, self.chunk_size):
            out = ops.attention_causal(q, k, v)
        else:
            # The mask of keys start..end-1: a long key range (NoPE layers at long context) is attended block by
            # block, never as one (T, S) mask.
            mask = lambda start, end: key_block_mask(pos, k_pos[:, start:end], self.chunk_size)
            out = ops.attention_blockwise(q, k, v, mask)                            # (B, H, T, D)
        return out.transpose(1, 2).reshape(B, T, -1)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)   # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)   # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)   # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Experts(nn.Module):
    """E SwiGLU experts stacked: w1, w3 (E, F, D) and w2 (E, D, F), each [out, in] like nn.Linear."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    def forward(self, x, expert_idx, gate):
        # x (N, D), expert_idx and gate (N, top_k): only the chosen expert runs for each token
        if expert_idx.numel() > 1 and ops.grouped_mm_runs(x):
            return ops.run_experts_grouped(x, expert_idx, gate, self.w1, self.w2, self.w3)
        return ops.run_experts(x, expert_idx, gate, self.w1, self.w2, self.w3)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.top_k = m.top_k
        self.router = nn.Linear(cfg.dim, m.n_experts, bias=False)
        self.experts = Experts(m.n_experts, cfg.dim, m.expert_dim)
        self.shared_expert = FeedForward(cfg.dim, m.expert_dim)
        self.router_logits = None   # (N, E) of the last training forward, for the load-balancing loss

    def forward(self, x):                                   # x: (B, T, D)
        B, T, D = x.shape
        x = x.reshape(-1, D)                                # (N, D)
        logits = self.router(x)                             # (N, E), raw: top-k is taken before any sigmoid
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)  # (N, K)
        gate = torch.sigmoid(top_logits.float()).to(x.dtype)   # scales the expert's input, not its output
        if self.training:
            self.router_logits = logits
        out = self.shared_expert(x) + self.experts(x, top_idx, gate)
        return out.view(B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention = Attention(cfg, layer_id)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoE(cfg) if cfg.layers[layer_id].is_moe else FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, pos, rope, kv_cache=None):
        h = x + self.attention(self.attention_norm(x), pos, rope, kv_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        # NOTE: this runs on the meta device: it only defines shapes. Weights come from init_weights() or a
        # checkpoint loaded with assign=True.
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if cfg.vision is not None:
            self.vision = VisionEncoder(cfg.vision)
            self.vision_proj = nn.Linear(cfg.vision.projector_dim, cfg.dim, bias=False)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Fresh weights for training from scratch: normal(0, std) matrices, unit norms."""
        g = torch.Generator(device="cpu")
        if seed is not None:
            g.manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
        return self

    def embed(self, tokens, images=None):
        """Input rows (B, T, dim): token embeddings, with the `<|patch|>` rows replaced by the images' projected
        vision embeddings (early fusion). images: see forward."""
        h = self.tok_embeddings(tokens)
        if images is not None:
            image_mask = image_token_mask(tokens, images, self.config)       # (B, T); checks the counts first
            h = h.masked_scatter(image_mask[..., None], self.vision_proj(self.vision(images)).to(h.dtype))
        return h

    def forward(self, tokens, *, input_pos=None, kv_cache=None, embeddings=None, logit_index=None, images=None):
        """tokens (B, T) -> logits (B, T, V) in fp32.

        input_pos: (B, T) absolute positions, -1 for padding; default 0..T-1 in every row.
        kv_cache: the engine's cache (see kv_cache.KVCache.update); None recomputes everything.
        embeddings: (B, T, dim) input rows to use instead of the token embeddings (early fusion, see vision.py).
        logit_index: (B,) one position per row whose logits are wanted -> (B, 1, V); saves the full-vocab matmul.
        images: (n_tiles, 3, S, S) normalized tiles of every image in these rows (images.prepare_images), in the
            order their `<|patch|>` tokens appear (row 0 first); each tile fills tokens_per_tile patch positions.
        """
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        h = self.embed(tokens, images) if embeddings is None else embeddings
        rope = rope_angles(input_pos, rope_frequencies(self.config, tokens.device))
        for layer in self.layers:
            h = layer(h, input_pos, rope, kv_cache)
        if logit_index is not None:
            h = h[torch.arange(B, device=h.device), logit_index][:, None]   # (B, 1, dim)
        return self.output(self.norm(h)).float()
