"""GGUF files (llama.cpp's format) -> herd config, state dict and tokenizer metadata, through the `gguf` package.

Architectures: `llama` (Llama 2/3, SmolLM2, ...) and `llama4`. GGUF keeps q/k rows in the interleaved RoPE order
(the HF->GGUF converter permutes them), which is the order model.py rotates, so no permutation happens here.
Tensor data is read through the gguf reader's memory map and dequantized with gguf's own block decoders.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch

from .config import MoEConfig, ModelConfig

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """A GGUF file herd cannot read, naming the file and what was wrong."""


# GGUF tensor name (blk.{L}.*) -> herd name. Experts (*_exps) are stored (E, out, in) in torch order already.
GGUF_TO_NATIVE = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{L}.attn_norm.weight": "layers.{L}.attention_norm.weight",
    "blk.{L}.ffn_norm.weight": "layers.{L}.ffn_norm.weight",
    "blk.{L}.attn_q.weight": "layers.{L}.attention.wq.weight",
    "blk.{L}.attn_k.weight": "layers.{L}.attention.wk.weight",
    "blk.{L}.attn_v.weight": "layers.{L}.attention.wv.weight",
    "blk.{L}.attn_output.weight": "layers.{L}.attention.wo.weight",
    "blk.{L}.ffn_gate.weight": "layers.{L}.feed_forward.w1.weight",
    "blk.{L}.ffn_up.weight": "layers.{L}.feed_forward.w3.weight",
    "blk.{L}.ffn_down.weight": "layers.{L}.feed_forward.w2.weight",
    "blk.{L}.ffn_gate_inp.weight": "layers.{L}.feed_forward.router.weight",
    "blk.{L}.ffn_gate_exps.weight": "layers.{L}.feed_forward.experts.w1",
    "blk.{L}.ffn_up_exps.weight": "layers.{L}.feed_forward.experts.w3",
    "blk.{L}.ffn_down_exps.weight": "layers.{L}.feed_forward.experts.w2",
    "blk.{L}.ffn_gate_shexp.weight": "layers.{L}.feed_forward.shared_expert.w1.weight",
    "blk.{L}.ffn_up_shexp.weight": "layers.{L}.feed_forward.shared_expert.w3.weight",
    "blk.{L}.ffn_down_shexp.weight": "layers.{L}.feed_forward.shared_expert.w2.weight",
}
_PATTERNS = [(re.compile("^" + re.escape(k).replace(r"\{L\}", r"(\d+)") + "$"), v) for k, v in GGUF_TO_NATIVE.items()]


def gguf_name_to_native(name: str) -> str | None:
    for pattern, native in _PATTERNS:
        m = pattern.match(name)
        if m:
            return native.replace("{L}", m.group(1)) if m.groups() else native
    return None


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_gguf(path: str | Path):
    """A gguf.GGUFReader over the file (memory-mapped), or a GGUFError that names the file. Parsing the header of
    a 49k-token vocabulary takes seconds, so the reader is kept for the model loader and the tokenizer to share."""
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    st = path.stat()
    return _open_gguf(path.resolve(), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: Path, mtime_ns: int, size: int):
    from gguf import GGUFReader

    if not is_gguf(path):
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        return GGUFReader(str(path))
    except ValueError as e:
        m = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
        if m:
            raise GGUFError(f"{path}: unknown tensor type {m.group(1)} (not a GGML type herd's gguf package "
                            "knows; a newer llama.cpp format?)") from None
        raise GGUFError(f"{path}: unreadable or truncated GGUF file ({e})") from None
    except Exception as e:  # the reader raises IndexError/struct errors on truncated files
        raise GGUFError(f"{path}: unreadable or truncated GGUF file ({type(e).__name__}: {e})") from None


def metadata(reader) -> dict:
    """Scalar, string and array metadata as Python values (large arrays, the tokenizer's, included)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception:   # a value type the reader cannot decode: leave it out, nothing herd needs
            continue
    return out


def config_from_metadata(meta: dict, tensor_names: set[str], path: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "llama4"):
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported (herd reads llama and llama4)")

    def get(key, default=None, required=False):
        k = f"{arch}.{key}"
        if k not in meta:
            if required:
                raise GGUFError(f"{path}: metadata key {k!r} is missing")
            return default
        return meta[k]

    n_heads = get("attention.head_count", required=True)
    dim = get("embedding_length", required=True)
    n_layers = get("block_count", required=True)
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or None
    if vocab is None:
        raise GGUFError(f"{path}: cannot tell the vocabulary size ({arch}.vocab_size and tokenizer.ggml.tokens absent)")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [eos] if eos is not None else []
    if "tokenizer.ggml.eot_token_id" in meta and meta["tokenizer.ggml.eot_token_id"] not in eos_ids:
        eos_ids.append(meta["tokenizer.ggml.eot_token_id"])
    common = dict(
        vocab_size=int(vocab), dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads), head_dim=get("attention.key_length", dim // n_heads),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)), max_seq_len=int(get("context_length", 4096)),
        tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=eos_ids,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    if arch == "llama":
        if get("expert_count"):
            raise GGUFError(f"{path}: llama-architecture MoE (Mixtral-style) GGUF files are not supported")
        # source "llama": in memory the q/k rows are interleaved like every herd model; saving to HF permutes them
        return ModelConfig(**common, ffn_dim=get("feed_forward_length", required=True), moe=None, nope_every=0,
                           attn_chunk_size=None, use_qk_norm=False, attn_temperature_tuning=False, source="llama")
    n_experts = get("expert_count", required=True)
    # llama.cpp's llama4 conventions: NoPE every 4th layer, 8192-token chunks, QK-norm except on the 128-expert
    # model (Maverick), temperature tuning with floor 8192 / scale 0.1 unless the file says otherwise.
    return ModelConfig(
        **common, ffn_dim=get("feed_forward_length", required=True),
        moe=MoEConfig(n_experts=n_experts, top_k=get("expert_used_count", 1),
                      expert_dim=get("expert_feed_forward_length", required=True)),
        moe_every=get("interleave_moe_layer_step", 1), nope_every=4,
        attn_chunk_size=8192, use_qk_norm=n_experts != 128,
        floor_scale=float(get("attention.temperature_length", 8192)),
        attn_scale=float(get("attention.temperature_scale", 0.1)), source="llama4_text",
    )


def tensor_to_torch(t, path) -> torch.Tensor:
    """One GGUF tensor dequantized to a float32 torch tensor in PyTorch's (out, in) order."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    shape = tuple(int(x) for x in reversed(t.shape))   # GGUF lists dims innermost first
    if t.tensor_type in (Q.F32, Q.F16):
        arr = np.array(t.data, dtype=np.float32)    # a copy: the reader's memory map is read-only
    elif t.tensor_type == Q.BF16:
        arr = torch.from_numpy(np.asarray(t.data).view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    else:
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, KeyError, quants.QuantError) as e:
            raise GGUFError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which herd cannot "
                            f"dequantize ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(shape)


def read_gguf(path: str | Path, dtype=torch.float32, progress=False):
    """(config, state dict, metadata) of a GGUF file; every tensor checked against the config's shapes."""
    from .checkpoint import build_meta

    path = Path(path)
    reader = open_gguf(path)
    meta = metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = config_from_metadata(meta, names, str(path))
    if "rope_freqs.weight" in names:
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        cfg.rope_freq_factors = tensor_to_torch(t, path).tolist()
    expected = {k: v.shape for k, v in build_meta(cfg).state_dict().items()}
    from tqdm import tqdm

    sd = {}
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", disable=not progress, leave=False):
        if t.name == "rope_freqs.weight" or t.name.endswith("attn_rot_embd"):
            continue
        native = gguf_name_to_native(t.name)
        if native is None:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} for architecture {meta['general.architecture']}")
        w = tensor_to_torch(t, path)
        if native not in expected or w.shape != expected[native]:
            want = tuple(expected[native]) if native in expected else "no such tensor in this config"
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {tuple(w.shape)}, expected {want}")
        sd[native] = w.to(dtype)
    if cfg.tie_embeddings:
        sd["output.weight"] = sd.get("tok_embeddings.weight")
    missing = sorted(set(expected) - set(k for k, v in sd.items() if v is not None))
    if missing:
        raise GGUFError(f"{path}: missing tensors {', '.join(missing[:5])}")
    return cfg, sd, meta


def load_gguf(path: str | Path, dtype=None, device="cpu", progress=False, quant=None):
    """quant=None: every tensor dequantized to `dtype` (fp32 by default). quant="packed": Q4_0 / Q4_1 / Q8_0 kept
    packed for the CPU kernels (gguf_packed.py; CPU, packed modules' own dtypes)."""
    from .checkpoint import build_meta

    if quant == "packed":
        if dtype is not None or str(device) != "cpu":
            raise GGUFError(f"{path}: quant='packed' runs on the CPU with the packed modules' own dtypes")
        from .gguf_packed import load_gguf_packed
        return load_gguf_packed(path, progress=progress)
    if quant is not None:
        raise GGUFError(f"{path}: unknown quant {quant!r}; expected None or 'packed'")

    cfg, sd, _ = read_gguf(path, dtype or torch.float32, progress)
    model = build_meta(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device).eval()
