"""Model configuration: one dataclass for every checkpoint family herd runs, HF config.json reading, presets.

Does not import torch. Per-layer facts (RoPE or NoPE, chunked attention, QK-norm, MoE or dense) are derived
once in `__post_init__`; nothing else in herd re-derives them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A config.json herd cannot run, with the file and the reason in the message."""


@dataclass
class RopeScaling:
    """llama3-style RoPE frequency scaling (Llama 3.1 / Llama 4 Scout). Read from the file, never assumed."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_seq_len: int


@dataclass
class MoEConfig:
    n_experts: int = 16
    top_k: int = 1                 # Llama 4: top-1 routed expert ...
    expert_dim: int = 8192         # hidden width of each routed expert and of the shared expert
    n_shared_experts: int = 1      # ... plus one always-on shared expert


@dataclass
class VisionConfig:
    """Llama 4 vision encoder shapes (spec section 4.1)."""
    image_size: int = 336          # tile side in pixels
    patch_size: int = 14
    dim: int = 1408
    n_layers: int = 34
    n_heads: int = 16
    ffn_dim: int = 5632
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    pixel_shuffle_ratio: float = 0.5
    projector_dim: int = 4096      # adapter MLP width (projector_input_dim == projector_output_dim)
    max_tiles: int = 16

    def __post_init__(self):
        k = 1 / self.pixel_shuffle_ratio
        if self.image_size % self.patch_size or self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            raise ConfigError(f"vision: image_size {self.image_size} must be a multiple of patch_size "
                              f"{self.patch_size}, and dim {self.dim} / n_heads {self.n_heads} a multiple of 4 "
                              "(2D RoPE gives a quarter of each head to rows, a quarter to columns)")
        if k != round(k) or self.patches_per_side % round(k):
            raise ConfigError(f"vision: pixel_shuffle_ratio {self.pixel_shuffle_ratio} must be 1/k with k dividing "
                              f"the {self.patches_per_side} patches per side")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        # 24x24 patches shrink by ratio^2 through the pixel shuffle: 576 * 0.25 = 144
        return int(self.patches_per_side ** 2 * self.pixel_shuffle_ratio ** 2)


@dataclass
class ModelConfig:
    # Trunk
    vocab_size: int = 202048
    dim: int = 5120
    n_layers: int = 48
    n_heads: int = 40
    n_kv_heads: int = 8
    head_dim: int = 0              # 0 -> dim // n_heads
    ffn_dim: int = 16384           # dense SwiGLU layers
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 10485760
    # RoPE. Weights are always held in the interleaved (2i, 2i+1) pairing; checkpoint.py converts rotate-half
    # checkpoints (HF Llama 2/3) at load so model.py has one rotation.
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: list[float] | None = None   # per-frequency divisors stored in some GGUF files (rope_freqs)
    # iRoPE: every `nope_every`-th layer has no RoPE and attends globally; 0 = every layer uses RoPE.
    # `rope_layers` (explicit per-layer list, 1 = uses RoPE, HF's inverted `no_rope_layers`) wins when given.
    nope_every: int = 4
    rope_layers: list[int] | None = None
    attn_chunk_size: int | None = 8192     # chunked (block-diagonal causal) attention on RoPE layers
    use_qk_norm: bool = True               # weightless RMS norm of q and k, on RoPE layers only
    attn_temperature_tuning: bool = True   # NoPE layers scale q by 1 + attn_scale * ln(floor((p+1)/floor_scale)+1)
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    # Feed-forward: MoE on every `moe_every`-th layer (layers step-1, 2*step-1, ...) unless `moe_layer_ids` given.
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    moe_every: int = 1
    moe_layer_ids: list[int] | None = None
    vision: VisionConfig | None = None
    # Tokens
    bos_token_id: int | None = 200000
    eos_token_ids: list[int] = field(default_factory=lambda: [200001, 200007, 200008])
    pad_token_id: int | None = 200018
    image_token_id: int = 200092           # <|patch|>: positions that take vision embeddings
    # Where the config came from ("llama4", "llama4_text", "llama", "gguf", "preset"), for messages and saving.
    source: str = "preset"

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        L = self.n_layers
        if self.rope_layers is not None:
            if len(self.rope_layers) != L:
                raise ConfigError(f"rope_layers has {len(self.rope_layers)} entries, expected n_layers={L}")
            uses_rope = [bool(x) for x in self.rope_layers]
        elif self.nope_every:
            uses_rope = [(i + 1) % self.nope_every != 0 for i in range(L)]
        else:
            uses_rope = [True] * L
        if self.moe is None:
            is_moe = [False] * L
        elif self.moe_layer_ids is not None:
            bad = [i for i in self.moe_layer_ids if not 0 <= i < L]
            if bad:
                raise ConfigError(f"moe_layer_ids {bad} outside 0..{L - 1}")
            is_moe = [i in set(self.moe_layer_ids) for i in range(L)]
        else:
            is_moe = [(i + 1) % self.moe_every == 0 for i in range(L)]
        # Derived once, read everywhere: one LayerSpec per layer.
        self.layers = [
            LayerSpec(
                uses_rope=uses_rope[i],
                chunked=uses_rope[i] and self.attn_chunk_size is not None,
                qk_norm=uses_rope[i] and self.use_qk_norm,
                temperature_tuning=(not uses_rope[i]) and self.attn_temperature_tuning,
                is_moe=is_moe[i],
            )
            for i in range(L)
        ]

    # ---- JSON ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("moe", "vision", "rope_scaling"):
            if d[k] is not None:
                d[k] = asdict(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown herd config keys {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class LayerSpec:
    uses_rope: bool            # False on NoPE (global) layers
    chunked: bool              # block-aligned chunked causal attention (RoPE layers of an iRoPE model)
    qk_norm: bool
    temperature_tuning: bool
    is_moe: bool


# ---- HF config.json -------------------------------------------------------------------------------------------
SUPPORTED_ARCHITECTURES = ("Llama4ForConditionalGeneration", "Llama4ForCausalLM", "LlamaForCausalLM")


def _rope_from_hf(tc: dict, path: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either the classic keys (rope_theta, rope_scaling) or transformers 5 rope_parameters."""
    params = tc.get("rope_parameters") or {}
    scaling = tc.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = params.get("rope_theta", tc.get("rope_theta", 10000.0))
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ConfigError(f"{path}: rope scaling type {kind!r} is not supported (herd supports llama3 scaling)")
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_seq_len=int(scaling["original_max_position_embeddings"]),
    )


def _eos_list(x) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in x] if isinstance(x, list) else [int(x)]


def from_hf_config(hf: dict, path: str = "config.json") -> ModelConfig:
    """ModelConfig from the dict of an HF config.json (Llama 4 nested or flat, or Llama 2/3 dense)."""
    arch = (hf.get("architectures") or [None])[0]
    model_type = hf.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES and model_type not in ("llama4", "llama4_text", "llama"):
        raise ConfigError(
            f"{path}: architecture {arch!r} (model_type {model_type!r}) is not supported; "
            f"herd runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    nested = arch == "Llama4ForConditionalGeneration" or model_type == "llama4"
    tc = hf["text_config"] if nested else hf
    try:
        theta, scaling = _rope_from_hf(tc, path)
        common = dict(
            vocab_size=tc["vocab_size"], dim=tc["hidden_size"], n_layers=tc["num_hidden_layers"],
            n_heads=tc["num_attention_heads"],
            n_kv_heads=tc.get("num_key_value_heads") or tc["num_attention_heads"],
            head_dim=tc.get("head_dim") or 0, norm_eps=tc.get("rms_norm_eps", 1e-5),
            max_seq_len=tc.get("max_position_embeddings", 4096), rope_theta=theta, rope_scaling=scaling,
            tie_embeddings=bool(hf.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))),
            bos_token_id=tc.get("bos_token_id"), eos_token_ids=_eos_list(tc.get("eos_token_id")),
            pad_token_id=tc.get("pad_token_id"),
        )
        if tc.get("attention_bias") or tc.get("mlp_bias"):
            raise ConfigError(f"{path}: attention_bias / mlp_bias checkpoints are not supported")
        if tc.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{path}: hidden_act {tc.get('hidden_act')!r} is not supported (expected silu)")
        if model_type == "llama" or arch == "LlamaForCausalLM":
            return ModelConfig(**common, ffn_dim=tc["intermediate_size"], moe=None, nope_every=0,
                               attn_chunk_size=None, use_qk_norm=False, attn_temperature_tuning=False,
                               source="llama")
        n_layers = tc["num_hidden_layers"]
        step = tc.get("interleave_moe_layer_step", 1)
        moe_ids = tc.get("moe_layers")
        if moe_ids is None:
            moe_ids = list(range(step - 1, n_layers, step)) if step else []    # step 0: dense (Llama Guard 4)
        rope_layers = tc.get("no_rope_layers") or None   # HF: 1 means the layer USES RoPE
        vision = None
        if nested and hf.get("vision_config"):
            vc = hf["vision_config"]
            vision = VisionConfig(
                image_size=vc.get("image_size", 336), patch_size=vc.get("patch_size", 14),
                dim=vc.get("hidden_size", 1408), n_layers=vc.get("num_hidden_layers", 34),
                n_heads=vc.get("num_attention_heads", 16), ffn_dim=vc.get("intermediate_size", 5632),
                norm_eps=vc.get("norm_eps", 1e-5),
                rope_theta=vc.get("rope_theta", (vc.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                pixel_shuffle_ratio=vc.get("pixel_shuffle_ratio", 0.5),
                projector_dim=vc.get("projector_output_dim", vc.get("projector_input_dim", 4096)),
            )
        return ModelConfig(
            **common,
            ffn_dim=tc.get("intermediate_size_mlp", 16384),
            moe=MoEConfig(n_experts=tc.get("num_local_experts", 16), top_k=tc.get("num_experts_per_tok", 1),
                          expert_dim=tc.get("intermediate_size", 8192)) if moe_ids else None,
            moe_layer_ids=list(moe_ids),
            nope_every=tc.get("no_rope_layer_interval", 4), rope_layers=rope_layers,
            # null (Llama Guard 4's config) = no chunked attention: Meta's reference builds the chunked mask only
            # when a chunk size is set and otherwise gives RoPE layers the global causal mask; so does herd.
            attn_chunk_size=tc.get("attention_chunk_size"),
            use_qk_norm=bool(tc.get("use_qk_norm", True)),
            attn_temperature_tuning=bool(tc.get("attn_temperature_tuning", True)),
            floor_scale=float(tc.get("floor_scale", 8192)), attn_scale=float(tc.get("attn_scale", 0.1)),
            vision=vision, image_token_id=hf.get("image_token_index", 200092),
            source="llama4" if nested else "llama4_text",
        )
    except KeyError as e:
        raise ConfigError(f"{path}: missing key {e.args[0]!r}") from None


def load_config(path: str | Path) -> ModelConfig:
    """Read a config.json: herd's own (key "herd") or an HF one."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        # a file that is no GGUF is read as a config.json: say what else it could have been
        raise ConfigError(f"{path}: not valid JSON ({e}); a model is a GGUF file, an HF checkpoint folder or its "
                          "config.json") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return from_hf_config(d, str(path))


# ---- presets ----------------------------------------------------------------------------------------------------
PRESETS = {
    # Llama-4-Scout-17B-16E-Instruct: 16 routed experts + shared in every layer, llama3 RoPE scaling, QK-norm.
    "scout": lambda: ModelConfig(
        moe=MoEConfig(n_experts=16, top_k=1, expert_dim=8192), moe_every=1, use_qk_norm=True,
        rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                 original_max_seq_len=8192),
        max_seq_len=10485760, vision=VisionConfig(), source="preset"),
    # Llama-4-Maverick-17B-128E-Instruct: 128 experts on odd layers, dense FFN on even layers, no QK-norm.
    "maverick": lambda: ModelConfig(
        moe=MoEConfig(n_experts=128, top_k=1, expert_dim=8192), moe_every=2, use_qk_norm=False,
        rope_scaling=None, max_seq_len=1048576, vision=VisionConfig(), source="preset"),
    # A few-MB Llama-4-shaped model for tests and CPU experiments: every feature of the trunk, small chunks.
    "debug": lambda: ModelConfig(
        vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128,
        moe=MoEConfig(n_experts=4, top_k=1, expert_dim=64), moe_every=2, attn_chunk_size=16,
        floor_scale=8.0, max_seq_len=4096, rope_theta=10000.0, bos_token_id=1, eos_token_ids=[2],
        pad_token_id=0, image_token_id=3, source="preset"),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


