"""HF-format checkpoints: safetensors (single or sharded) + config.json <-> herd's Transformer.

All HF tensor names live in this file, in HF_TO_NATIVE. Loading builds the model on the meta device, reads each
tensor through safetensors' mmap, checks its shape against the model, and assigns it. Pickle-based files
(.bin/.pt/.pth) are refused: unpickling runs arbitrary code.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig, load_config
from .model import Transformer


class CheckpointError(ValueError):
    """A checkpoint herd cannot load, naming the file, the key and what was expected."""


# HF key (after the model prefix is stripped) -> herd key. "{L}" is the layer index.
HF_TO_NATIVE = {
    "embed_tokens.weight": "tok_embeddings.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "layers.{L}.input_layernorm.weight": "layers.{L}.attention_norm.weight",
    "layers.{L}.post_attention_layernorm.weight": "layers.{L}.ffn_norm.weight",
    "layers.{L}.self_attn.q_proj.weight": "layers.{L}.attention.wq.weight",
    "layers.{L}.self_attn.k_proj.weight": "layers.{L}.attention.wk.weight",
    "layers.{L}.self_attn.v_proj.weight": "layers.{L}.attention.wv.weight",
    "layers.{L}.self_attn.o_proj.weight": "layers.{L}.attention.wo.weight",
    # Llama 4 dense layers and Llama 2/3 MLPs
    "layers.{L}.feed_forward.gate_proj.weight": "layers.{L}.feed_forward.w1.weight",
    "layers.{L}.feed_forward.up_proj.weight": "layers.{L}.feed_forward.w3.weight",
    "layers.{L}.feed_forward.down_proj.weight": "layers.{L}.feed_forward.w2.weight",
    "layers.{L}.mlp.gate_proj.weight": "layers.{L}.feed_forward.w1.weight",
    "layers.{L}.mlp.up_proj.weight": "layers.{L}.feed_forward.w3.weight",
    "layers.{L}.mlp.down_proj.weight": "layers.{L}.feed_forward.w2.weight",
    # Llama 4 MoE
    "layers.{L}.feed_forward.router.weight": "layers.{L}.feed_forward.router.weight",
    "layers.{L}.feed_forward.shared_expert.gate_proj.weight": "layers.{L}.feed_forward.shared_expert.w1.weight",
    "layers.{L}.feed_forward.shared_expert.up_proj.weight": "layers.{L}.feed_forward.shared_expert.w3.weight",
    "layers.{L}.feed_forward.shared_expert.down_proj.weight": "layers.{L}.feed_forward.shared_expert.w2.weight",
    # fused experts (official BF16 repos): gate_up (E, D, 2F) used as x @ W -> w1, w3 (E, F, D); down (E, F, D) -> w2
    "layers.{L}.feed_forward.experts.gate_up_proj": "layers.{L}.feed_forward.experts.w1+w3",
    "layers.{L}.feed_forward.experts.down_proj": "layers.{L}.feed_forward.experts.w2",
    # per-expert layout (the FP8 Maverick repo, llm-compressor): stacked into (E, out, in)
    "layers.{L}.feed_forward.experts.{E}.gate_proj.weight": "layers.{L}.feed_forward.experts.w1[{E}]",
    "layers.{L}.feed_forward.experts.{E}.up_proj.weight": "layers.{L}.feed_forward.experts.w3[{E}]",
    "layers.{L}.feed_forward.experts.{E}.down_proj.weight": "layers.{L}.feed_forward.experts.w2[{E}]",
    # Llama4ForConditionalGeneration vision tower (no prefix to strip) and projector into the text width
    "vision_model.patch_embedding.linear.weight": "vision.patch_embed.weight",
    "vision_model.class_embedding": "vision.class_embedding",
    "vision_model.positional_embedding_vlm": "vision.pos_embedding",
    "vision_model.layernorm_pre.weight": "vision.pre_norm.weight",
    "vision_model.layernorm_pre.bias": "vision.pre_norm.bias",
    "vision_model.layernorm_post.weight": "vision.post_norm.weight",
    "vision_model.layernorm_post.bias": "vision.post_norm.bias",
    "vision_model.model.layers.{L}.self_attn.q_proj.weight": "vision.layers.{L}.attention.wq.weight",
    "vision_model.model.layers.{L}.self_attn.q_proj.bias": "vision.layers.{L}.attention.wq.bias",
    "vision_model.model.layers.{L}.self_attn.k_proj.weight": "vision.layers.{L}.attention.wk.weight",
    "vision_model.model.layers.{L}.self_attn.k_proj.bias": "vision.layers.{L}.attention.wk.bias",
    "vision_model.model.layers.{L}.self_attn.v_proj.weight": "vision.layers.{L}.attention.wv.weight",
    "vision_model.model.layers.{L}.self_attn.v_proj.bias": "vision.layers.{L}.attention.wv.bias",
    "vision_model.model.layers.{L}.self_attn.o_proj.weight": "vision.layers.{L}.attention.wo.weight",
    "vision_model.model.layers.{L}.self_attn.o_proj.bias": "vision.layers.{L}.attention.wo.bias",
    "vision_model.model.layers.{L}.mlp.fc1.weight": "vision.layers.{L}.feed_forward.w1.weight",
    "vision_model.model.layers.{L}.mlp.fc1.bias": "vision.layers.{L}.feed_forward.w1.bias",
    "vision_model.model.layers.{L}.mlp.fc2.weight": "vision.layers.{L}.feed_forward.w2.weight",
    "vision_model.model.layers.{L}.mlp.fc2.bias": "vision.layers.{L}.feed_forward.w2.bias",
    "vision_model.model.layers.{L}.input_layernorm.weight": "vision.layers.{L}.attention_norm.weight",
    "vision_model.model.layers.{L}.input_layernorm.bias": "vision.layers.{L}.attention_norm.bias",
    "vision_model.model.layers.{L}.post_attention_layernorm.weight": "vision.layers.{L}.ffn_norm.weight",
    "vision_model.model.layers.{L}.post_attention_layernorm.bias": "vision.layers.{L}.ffn_norm.bias",
    "vision_model.vision_adapter.mlp.fc1.weight": "vision.adapter.w1.weight",
    "vision_model.vision_adapter.mlp.fc2.weight": "vision.adapter.w2.weight",
    "multi_modal_projector.linear_1.weight": "vision_proj.weight",
}
# Model prefixes: Llama4ForConditionalGeneration, then Llama4ForCausalLM / LlamaForCausalLM.
_PREFIXES = ("language_model.model.", "language_model.", "model.")
_TEMPLATES = [
    (re.compile("^" + re.escape(k).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)") + "$"), v)
    for k, v in HF_TO_NATIVE.items()
]
# What sits beside a quantized `X.weight`, in HF and herd names alike: its scales and (asymmetric int4) zero points.
_QUANT_SUFFIXES = ("_scale", "_zero")
# For saving: the first HF name listed for each herd name (Llama 4 spelling; save swaps in "mlp." for Llama).
_NATIVE_TO_HF: dict[str, str] = {}
for _hf, _native in HF_TO_NATIVE.items():
    if "[" not in _native and "+" not in _native:
        _NATIVE_TO_HF.setdefault(_native, _hf)


def strip_prefix(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def hf_key_to_native(key: str) -> tuple[str, int | None] | None:
    """'language_model.model.layers.3.self_attn.q_proj.weight' -> ('layers.3.attention.wq.weight', None).
    Returns the expert index for per-expert keys, None when the key is not a text-trunk tensor.
    A quantized weight's row/group scales `X.weight_scale` and zero points `X.weight_zero` map to the native name
    of `X.weight` + "_scale" / "_zero" (`...wq.weight_scale`, `...experts.w1_zero`); see quantize.py for the layout."""
    k = strip_prefix(key)
    for suffix in _QUANT_SUFFIXES:
        if k.endswith(".weight" + suffix):
            mapped = hf_key_to_native(k[: -len(suffix)])
            return None if mapped is None else (mapped[0] + suffix, mapped[1])
    for pattern, native in _TEMPLATES:
        m = pattern.match(k)
        if m:
            g = m.groupdict()
            name = native.replace("{L}", g.get("L", ""))
            if "E" in g:
                return name.split("[")[0], int(g["E"])
            return name, None
    return None


def rotate_half_to_interleaved(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder q/k rows of an HF Llama 2/3 checkpoint (rotate-half pairs i, i + D/2) to the interleaved pairs
    (2i, 2i + 1) model.py rotates: per head, rows viewed as (2, D/2) become (D/2, 2)."""
    out_dim, in_dim = w.shape
    return w.view(out_dim // head_dim, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def interleaved_to_rotate_half(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(out_dim // head_dim, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# ---- reading -----------------------------------------------------------------------------------------------------
def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder, or a clear refusal."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (expected a JSON 'weight_map'): {e}") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise CheckpointError(
            f"{folder}: only pickle weights found ({', '.join(pickled)}). herd never unpickles files, since that can "
            "run arbitrary code; convert them to safetensors first (e.g. transformers' save_pretrained with "
            "safe_serialization=True).")
    raise CheckpointError(f"{folder}: no weights found (expected model.safetensors or model.safetensors.index.json)")


# Float dtypes load casts to `dtype`; quantized weights (int8, uint8 nibbles, fp8), their scales and zeros keep theirs.
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)
# Tensors whose rows are q/k output rows (reordered between RoPE conventions), with their quantization scales and
# zero points (one per row and group, so they move with their rows).
_QK_ROWS = tuple(f"attention.{w}.weight{s}" for w in ("wq", "wk") for s in ("",) + _QUANT_SUFFIXES)


def build_meta(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def read_hf_state_dict(folder: Path, cfg: ModelConfig, expected: dict[str, torch.Size], dtype=None,
                       progress=False) -> dict:
    """HF safetensors -> herd state dict, every tensor checked against the expected shapes."""
    sd: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, torch.Tensor]] = {}
    needs_permute = cfg.source == "llama"       # HF Llama 2/3 store q/k rows in rotate-half order
    from tqdm import tqdm

    files = weight_files(folder)
    for f in tqdm(files, desc=f"loading {folder.name}", unit="file", disable=not progress or len(files) < 2):
        try:
            handle = safe_open(str(f), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        with handle:
            for key in handle.keys():
                mapped = hf_key_to_native(key)
                if mapped is None:
                    raise CheckpointError(f"{f}: unexpected tensor {key!r} (not part of a {cfg.source} model)")
                name, expert = mapped
                if cfg.vision is None and name.startswith("vision"):
                    continue   # a multimodal checkpoint whose config.json has no vision_config: run the text trunk
                t = handle.get_tensor(key)
                if dtype is not None and t.dtype in _CASTABLE and not name.endswith(_QUANT_SUFFIXES):
                    t = t.to(dtype)
                if expert is not None:
                    per_expert.setdefault(name, {})[expert] = t
                    continue
                if name.endswith("experts.w1+w3"):
                    base = name[: -len("w1+w3")]
                    want = expected.get(base + "w1")
                    if want is None or t.shape != (want[0], want[2], 2 * want[1]):
                        _shape_error(f, key, None if want is None else (want[0], want[2], 2 * want[1]), t.shape)
                    gate, up = t.transpose(1, 2).chunk(2, dim=1)       # (E, 2F, D) -> two (E, F, D)
                    sd[base + "w1"], sd[base + "w3"] = gate.contiguous(), up.contiguous()
                    continue
                if name.endswith("experts.w2"):
                    t = t.transpose(1, 2).contiguous()                 # (E, F, D) used as z @ W -> (E, D, F)
                if needs_permute and name.endswith(_QK_ROWS):
                    t = rotate_half_to_interleaved(t, cfg.head_dim)
                if name not in expected or t.shape != expected[name]:
                    _shape_error(f, key, expected.get(name), t.shape)
                sd[name] = t
    for name, parts in per_expert.items():
        want = expected.get(name)
        if want is None:                  # e.g. zero points of a checkpoint whose config.json says symmetric
            _shape_error(folder, name, None, None)
        if sorted(parts) != list(range(want[0])):
            raise CheckpointError(f"{folder}: {name} has experts {sorted(parts)}, expected 0..{want[0] - 1}")
        t = torch.stack([parts[e] for e in range(want[0])])
        if t.shape != want:
            _shape_error(folder, name, want, t.shape)
        sd[name] = t
    return sd


def _shape_error(file, key, want, got):
    if want is None:
        raise CheckpointError(f"{file}: tensor {key!r} has no place in this model's config")
    raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(got)}, expected {tuple(want)} from config.json")


def load_hf(folder: str | Path, dtype=None, device="cpu", progress=False) -> Transformer:
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such file or folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: neither a GGUF file nor an HF checkpoint folder")
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json (an HF checkpoint folder needs config.json + safetensors)")
    cfg = load_config(folder / "config.json")
    if cfg.vision is not None and (folder / "preprocessor_config.json").exists():
        cfg.vision.max_tiles = read_max_tiles(folder / "preprocessor_config.json", cfg.vision.max_tiles)
    model = build_meta(cfg)
    qspec = _read_quant_spec(folder, device)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if qspec is not None:       # the on-disk layout of the recorded scheme: quantize.py, computed on meta
        from .quantize import quantized_shapes
        expected = _quant_call(folder, quantized_shapes, model, qspec)
    if cfg.tie_embeddings:
        expected.pop("output.weight", None)
    sd = read_hf_state_dict(folder, cfg, expected, dtype, progress)
    missing = sorted(set(expected) - set(sd))
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{folder}: missing tensors for {', '.join(missing[:5])}{more}")
    if cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    if qspec is not None:       # swap in the quantized modules (still on meta), pack the tensors for them
        from .quantize import quantize_model, runtime_state_dict
        _quant_call(folder, quantize_model, model, qspec)
        sd = _quant_call(folder, runtime_state_dict, model, sd)
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device).eval()


def _read_quant_spec(folder: Path, device):
    """The QuantSpec recorded in config.json's quantization_config (None: a float checkpoint)."""
    from .quantize import spec_from_hf_config
    hf = json.loads((folder / "config.json").read_text())
    spec = _quant_call(folder, spec_from_hf_config, hf, str(folder / "config.json"))
    if spec is not None and spec.scheme in ("int8", "int4") and torch.device(device).type != "cpu":
        raise CheckpointError(f"{folder}: {spec.scheme} weights run on torch's packed CPU kernels; load on cpu")
    return spec


def _quant_call(folder: Path, fn, *args):
    from .quantize import QuantizationError
    try:
        return fn(*args)
    except QuantizationError as e:
        raise CheckpointError(f"{folder}: {e}") from None


# ---- writing -----------------------------------------------------------------------------------------------------
def to_hf_state_dict(model: Transformer, state: dict | None = None) -> dict[str, torch.Tensor]:
    """herd state dict -> HF names and layouts: Llama4ForConditionalGeneration (text under 'language_model.',
    vision unprefixed) when the model has vision, else Llama4ForCausalLM / LlamaForCausalLM (prefix 'model.')."""
    cfg = model.config
    lm = "language_model." if cfg.vision is not None else ""
    state = model.state_dict() if state is None else state    # `state`: e.g. quantize.quantized_state_dict
    out = {}
    for name, t in state.items():
        if name == "output.weight":
            if not cfg.tie_embeddings:
                out[lm + "lm_head.weight"] = t
            continue
        generic = re.sub(r"^(vision\.)?layers\.\d+\.", r"\1layers.{L}.", name)
        layer = re.match(r"^(?:vision\.)?layers\.(\d+)\.", name)
        layer = layer.group(1) if layer else ""
        expert_w = re.search(r"experts\.(w[123])(_scale|_zero)?$", generic)
        if expert_w and name[: name.rindex(".")] + ".w1_scale" in state:
            # quantized routed experts, per expert: [out, in] + weight_scale (+ weight_zero), the HF FP8 Maverick layout
            proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[expert_w.group(1)]
            suffix = "weight" + (expert_w.group(2) or "")
            for e in range(t.shape[0]):
                out[f"{lm}model.layers.{layer}.feed_forward.experts.{e}.{proj}.{suffix}"] = t[e].contiguous()
            continue
        if generic.endswith("experts.w1"):
            w3 = state[name[:-2] + "w3"]
            hf = "layers.{L}.feed_forward.experts.gate_up_proj"
            t = torch.cat([t, w3], dim=1).transpose(1, 2)              # (E, 2F, D) -> (E, D, 2F)
        elif generic.endswith("experts.w3"):
            continue
        elif generic.endswith("experts.w2"):
            hf, t = "layers.{L}.feed_forward.experts.down_proj", t.transpose(1, 2)
        else:
            # a quantized weight's scales and zeros sit beside it
            aux = next((s for s in _QUANT_SUFFIXES if generic.endswith(".weight" + s)), "")
            hf = _NATIVE_TO_HF[generic[: len(generic) - len(aux)]] + aux
            if cfg.source == "llama":
                hf = hf.replace(".feed_forward.", ".mlp.")
                if generic.endswith(_QK_ROWS):
                    t = interleaved_to_rotate_half(t, cfg.head_dim)
        prefix = "" if generic.startswith("vision") else lm + "model."
        out[prefix + hf.replace("{L}", layer)] = t.contiguous()
    return out


def to_hf_config(cfg: ModelConfig) -> dict:
    """config.json for transformers: Llama4ForConditionalGeneration for Llama-4 configs with vision,
    Llama4ForCausalLM for text-only ones, LlamaForCausalLM for dense ones."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_seq_len}
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else cfg.eos_token_ids,
        "pad_token_id": cfg.pad_token_id, "attention_bias": False,
        # both spellings: rope_theta/rope_scaling for transformers 4.x and other engines, rope_parameters for 5.x
        "rope_theta": cfg.rope_theta, "rope_scaling": rope if cfg.rope_scaling else None, "rope_parameters": rope,
    }
    if cfg.source == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "intermediate_size": cfg.ffn_dim, "mlp_bias": False}
    moe_ids = [i for i, s in enumerate(cfg.layers) if s.is_moe]
    text = {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", **common,
        "intermediate_size": cfg.moe.expert_dim if cfg.moe else cfg.ffn_dim,
        "intermediate_size_mlp": cfg.ffn_dim,
        "num_local_experts": cfg.moe.n_experts if cfg.moe else 1,
        "num_experts_per_tok": cfg.moe.top_k if cfg.moe else 1,
        "moe_layers": moe_ids, "interleave_moe_layer_step": cfg.moe_every,
        "no_rope_layers": [int(s.uses_rope) for s in cfg.layers],
        "layer_types": ["chunked_attention" if s.chunked else "full_attention" for s in cfg.layers],
        # transformers builds a chunked mask even when no layer is chunked, so it needs a size: the whole context
        "attention_chunk_size": cfg.attn_chunk_size or cfg.max_seq_len, "use_qk_norm": cfg.use_qk_norm,
        "attn_temperature_tuning": cfg.attn_temperature_tuning,
        "floor_scale": int(cfg.floor_scale) if float(cfg.floor_scale).is_integer() else cfg.floor_scale,  # HF: int
        "attn_scale": cfg.attn_scale,
    }
    v = cfg.vision
    if v is None:
        return text
    if v.ffn_dim != round(v.dim / v.pixel_shuffle_ratio ** 2):
        # transformers sizes both the encoder MLP and the adapter's input from one key, intermediate_size
        raise CheckpointError(f"vision ffn_dim {v.ffn_dim} must equal dim / pixel_shuffle_ratio^2 = "
                              f"{round(v.dim / v.pixel_shuffle_ratio ** 2)} for transformers to load the checkpoint")
    vision = {
        "model_type": "llama4_vision_model", "hidden_size": v.dim, "num_hidden_layers": v.n_layers,
        "num_attention_heads": v.n_heads, "intermediate_size": v.ffn_dim, "image_size": v.image_size,
        "patch_size": v.patch_size, "num_channels": 3, "norm_eps": v.norm_eps, "hidden_act": "gelu",
        "pixel_shuffle_ratio": v.pixel_shuffle_ratio, "projector_input_dim": v.projector_dim,
        "projector_output_dim": v.projector_dim, "vision_output_dim": v.projector_dim,
        "multi_modal_projector_bias": False, "rope_theta": v.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta},
    }
    del text["architectures"]
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text,
            "vision_config": vision, "image_token_index": cfg.image_token_id,
            "tie_word_embeddings": cfg.tie_embeddings}


def save_hf(model: Transformer, folder: str | Path, extra_config: dict | None = None,
            state: dict | None = None) -> None:
    """Write model.safetensors + config.json atomically enough that a crash never leaves a half-written pair:
    files are written under temporary names and renamed into place. `state` replaces model.state_dict() (herd
    names), e.g. a quantized state dict, whose scheme then goes in extra_config["quantization_config"]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = to_hf_state_dict(model, state)
    cfg = to_hf_config(model.config)
    if extra_config:
        cfg.update(extra_config)
    tmp_w, tmp_c = folder / ".model.safetensors.tmp", folder / ".config.json.tmp"
    save_file(sd, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(cfg, indent=2))
    if model.config.vision is not None:   # the image tiling transformers' processor needs; herd reads max_tiles
        tmp_p = folder / ".preprocessor_config.json.tmp"
        tmp_p.write_text(json.dumps(to_hf_preprocessor_config(model.config), indent=2))
        os.replace(tmp_p, folder / "preprocessor_config.json")
    os.replace(tmp_w, folder / "model.safetensors")
    os.replace(tmp_c, folder / "config.json")


def to_hf_preprocessor_config(cfg: ModelConfig) -> dict:
    """preprocessor_config.json for transformers' Llama 4 image processor: the tiling images.py does (spec 4.5)."""
    S = cfg.vision.image_size
    return {"image_processor_type": "Llama4ImageProcessor", "size": {"height": S, "width": S},
            "max_patches": cfg.vision.max_tiles, "resize_to_max_canvas": False, "do_resize": True, "resample": 2,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}


def read_max_tiles(path: Path, default: int) -> int:
    """The tile limit (`max_patches`) from an HF preprocessor_config.json."""
    try:
        return int(json.loads(path.read_text()).get("max_patches", default))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a usable preprocessor config ({e})") from None


__all__ = ["CheckpointError", "ConfigError", "HF_TO_NATIVE", "load_hf", "save_hf", "to_hf_config",
           "to_hf_state_dict", "hf_key_to_native", "build_meta"]
