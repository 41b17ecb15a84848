"""GGUF Q4_0 / Q4_1 / Q8_0 weights repacked at load into herd's packed modules, one tensor at a time: no float
copy of the quantized matrices is kept (herd.load(path, quant="packed")).

GGUF blocks (ggml-common.h), 32 weights along the input dim, u = a 4-bit value in 0..15:
- Q4_0 (18 bytes): d f16, 16 bytes of nibbles; w = d * (u - 8).
- Q4_1 (20 bytes): d f16, m f16, 16 bytes of nibbles; w = d * u + m.
  In both, byte j holds weight j of the block in its low nibble and weight j + 16 in its high nibble.
- Q8_0 (34 bytes): d f16, 32 int8; w = d * q.
Mapping (quantize.Int4Linear computes w = q * scale + zero with q = u - 8, group 32, bf16 scale and zero):
- Q4_0 -> Int4Linear: q = u - 8, scale = d, zero = 0. Exact up to d rounded to bf16 (2^-9 relative).
- Q4_1 -> Int4Linear: q = u - 8, scale = d, zero = m + 8 d. Exact up to the bf16 rounding of scale and zero.
  (Re-quantizing to symmetric int4 instead costs ~14% logit error on SmolLM2: never done.)
- Q8_0 -> Int8Linear with one scale per row (torch's int8 kernel has no per-32 scales): the block values are
  re-quantized per output row, w ~= q' * max|w_row| / 127. The tied token embedding becomes one int8 matrix shared
  by Int8Embedding (the lookup) and Int8Linear (the output head). The extra error is measured in tests/test_fuse.py
  and bench/perplexity.py.
- A layer's routed experts (ffn_{gate,up,down}_exps, all three of one of these types) -> Int4Experts / Int8Experts
  by the same mappings, one expert at a time (packed_experts); a layer whose three differ is dequantized.
Other types (F32, F16, BF16, K-quants, ...) are dequantized to fp32 as gguf_loader does. Then fuse.fuse_model
fuses q/k/v and gate/up.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import gguf_loader as gl
from .decode import use_decode_kernels
from .fuse import fuse_model
from .kernels import use_herd_kernels
from .quantize import COMPUTE_DTYPE, Int4Experts, Int4Linear, Int8Experts, Int8Linear, _aligned, _bf16, pack_int4

BLOCK = 32
Q4_BYTES = {"Q4_0": 18, "Q4_1": 20}
PACKED_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def _f16(raw: np.ndarray, at: int) -> torch.Tensor:
    """The f16 at byte `at` of every block of raw (N, nb, bytes) -> fp32 (N, nb)."""
    return torch.from_numpy(np.ascontiguousarray(raw[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32))


def q4_values(raw: np.ndarray, qtype: str):
    """Q4_0 / Q4_1 blocks, raw uint8 (N, K/32 * bytes) -> (q int8 (N, K) in [-8, 7], scale fp32 (N, K/32),
    zero fp32 (N, K/32) or None) with w = q * scale + zero."""
    nbytes = Q4_BYTES[qtype]
    N = raw.shape[0]
    blocks = raw.reshape(N, -1, nbytes)                                     # (N, nb, bytes)
    d = _f16(blocks, 0)
    qs = torch.from_numpy(np.ascontiguousarray(blocks[..., nbytes - 16:]))  # (N, nb, 16)
    u = torch.cat((qs & 15, qs >> 4), dim=-1)                               # (N, nb, 32): weights 0-15, then 16-31
    q = (u.to(torch.int8) - 8).reshape(N, -1)                               # (N, K)
    zero = _f16(blocks, 2) + 8 * d if qtype == "Q4_1" else None
    return q, d, zero


def q8_0_values(raw: np.ndarray) -> torch.Tensor:
    """Q8_0 blocks, raw uint8 (N, K/32 * 34) -> fp32 weights (N, K) (one tensor's transient)."""
    N = raw.shape[0]
    blocks = raw.reshape(N, -1, 34)
    d = _f16(blocks, 0)                                                      # (N, nb)
    q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8))  # (N, nb, 32)
    return (q.float() * d[..., None]).reshape(N, -1)


def int8_rows(w: torch.Tensor):
    """fp32 (N, K) -> (q int8 (N, K), scale fp32 (N,)) with one bf16-representable scale per row (quantize.py's int8)."""
    scale = _bf16(w.abs().amax(-1) / 127).clamp(min=1e-6)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class Int8Embedding(nn.Module):
    """Token embedding stored int8 with one scale per row: weight (V, D) int8, scale (V,) bf16. The lookup returns
    weight[t] * scale[t] in `dtype`. Tied models share these buffers with an Int8Linear output head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(num_embeddings, dtype=COMPUTE_DTYPE, device=device))

    def forward(self, tokens):
        return (self.weight[tokens].to(self.dtype) * self.scale[tokens, None].to(self.dtype))


def packed_linear(qtype: str, raw: np.ndarray) -> nn.Module:
    """One GGUF matrix (N, K) of a PACKED_TYPES type -> an Int4Linear (group 32) or a row-scaled Int8Linear."""
    if qtype == "Q8_0":
        q, scale = int8_rows(q8_0_values(raw))
        N, K = q.shape
        mod = Int8Linear(K, N, device="meta")
        mod.load_state_dict(Int8Linear.pack(q, scale[:, None]), assign=True)
        return mod
    q, scale, zero = q4_values(raw, qtype)
    N, K = q.shape
    mod = Int4Linear(K, N, BLOCK, device="meta")
    mod.load_state_dict(Int4Linear.pack(pack_int4(q), scale, zero), assign=True)
    return mod


def packed_experts(qtype: str, gate, up, down) -> nn.Module:
    """One layer's GGUF routed experts (ffn_gate_exps, ffn_up_exps, ffn_down_exps: raw uint8 (E, N, K/32 * bytes),
    one PACKED_TYPES type) -> quantize.Int4Experts (group 32, as packed_linear maps Q4_0 / Q4_1) or a row-scaled
    Int8Experts (Q8_0). Each expert goes through the module's own pack() alone and into its slot of the buffers:
    the transient is one expert (~0.5 GB at Scout's width), never a float copy of the experts (8 GB per layer)."""
    E, F, D = gate.shape[0], gate.shape[1], down.shape[1]
    mod = Int8Experts(E, D, F) if qtype == "Q8_0" else Int4Experts(E, D, F, BLOCK)
    for e in range(E):
        if qtype == "Q8_0":
            (q1, s1), (q3, s3), (q2, s2) = (int8_rows(q8_0_values(raw[e])) for raw in (gate, up, down))
            one = Int8Experts.pack(q1[None], s1[None, :, None], q3[None], s3[None, :, None], q2[None],
                                   s2[None, :, None])
        else:
            (q1, s1, z1), (q3, s3, z3), (q2, s2, z2) = (q4_values(raw[e], qtype) for raw in (gate, up, down))
            zeros = (None, None, None) if z1 is None else (z1[None], z3[None], z2[None])
            one = Int4Experts.pack(pack_int4(q1)[None], s1[None], pack_int4(q3)[None], s3[None], pack_int4(q2)[None],
                                   s2[None], *zeros)
        for name, value in one.items():                  # (1, ...) -> slot e of (E, ...)
            getattr(mod, name)[e].copy_(value[0])
    return mod


def _set(model: nn.Module, name: str, mod: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, mod)


@torch.no_grad()
def load_gguf_packed(path: str | Path, fuse: bool = True, int8_embeddings: bool = True,
                     progress: bool = False, herd_kernels: bool = True) -> nn.Module:
    """A GGUF file -> a Transformer whose Q4_0 / Q4_1 / Q8_0 linears (and a Q8_0 token embedding) are packed
    modules, read one tensor at a time; every other tensor dequantized to fp32. fuse: fuse q/k/v and gate/up.
    int8_embeddings=False keeps a Q8_0 token embedding (and a tied head) in fp32 instead. herd_kernels: run the
    linears on herd's own decode kernels where this CPU has them (kernels.use_herd_kernels; after fusing), and the
    steps between them in C++ (decode.use_decode_kernels)."""
    from tqdm import tqdm

    from .checkpoint import build_meta

    path = Path(path)
    reader = gl.open_gguf(path)
    meta = gl.metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = gl.config_from_metadata(meta, names, str(path))
    if "rope_freqs.weight" in names:
        cfg.rope_freq_factors = gl.tensor_to_torch(next(t for t in reader.tensors if t.name == "rope_freqs.weight"),
                                                   path).tolist()
    model = build_meta(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    linears = {n + ".weight" for n, m in model.named_modules() if type(m) is nn.Linear}
    sd, experts = {}, {}       # experts: layer's "experts" module name -> {w1|w3|w2: reader tensor}, until all three
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", disable=not progress, leave=False):
        if t.name == "rope_freqs.weight" or t.name.endswith("attn_rot_embd"):
            continue
        native = gl.gguf_name_to_native(t.name)
        if native is None:
            raise gl.GGUFError(f"{path}: unexpected tensor {t.name!r} for architecture {meta['general.architecture']}")
        shape = tuple(int(x) for x in reversed(t.shape))
        if native not in expected or shape != tuple(expected[native]):
            want = tuple(expected[native]) if native in expected else "no such tensor in this config"
            raise gl.GGUFError(f"{path}: tensor {t.name!r} has shape {shape}, expected {want}")
        qtype = t.tensor_type.name
        raw = np.asarray(t.data)
        if qtype in PACKED_TYPES and native in linears and shape[1] % 16 == 0 and shape[0] % 16 == 0:
            _set(model, native.removesuffix(".weight"), packed_linear(qtype, raw))
        elif qtype in PACKED_TYPES and native.rsplit(".", 1)[-1] in ("w1", "w2", "w3") and ".experts." in native:
            group = experts.setdefault(native.rsplit(".", 1)[0], {})
            group[native.rsplit(".", 1)[1]] = t
            if len(group) == 3 and len({g.tensor_type for g in group.values()}) == 1 and \
                    all(n % 16 == 0 for g in group.values() for n in g.shape[:2]):
                raws = [np.asarray(group[w].data) for w in ("w1", "w3", "w2")]
                _set(model, native.rsplit(".", 1)[0], packed_experts(qtype, *raws))
                del experts[native.rsplit(".", 1)[0]]
                _release_freed_memory()        # per layer: the unpacking scratch would pile up in the heap
        elif qtype == "Q8_0" and native == "tok_embeddings.weight" and shape[1] % 16 == 0 and int8_embeddings:
            q, scale = int8_rows(q8_0_values(raw))
            emb = Int8Embedding(*shape, device="meta")
            emb.weight, emb.scale = _aligned(q), scale.to(COMPUTE_DTYPE)
            model.tok_embeddings = emb
        else:
            sd[native] = gl.tensor_to_torch(t, path)
    for name, group in experts.items():       # mixed types or odd shapes: dequantized to fp32 like any other tensor
        sd.update({f"{name}.{w}": gl.tensor_to_torch(t, path) for w, t in group.items()})
    if cfg.tie_embeddings:
        emb = model.tok_embeddings
        if isinstance(emb, Int8Embedding):        # one int8 matrix for the lookup and the output head
            head = Int8Linear(cfg.dim, cfg.vocab_size, device="meta")
            head.weight, head.scale = emb.weight, emb.scale
            model.output = head
        else:
            sd.pop("output.weight", None)
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings and not isinstance(model.tok_embeddings, Int8Embedding):
        model.output.weight = model.tok_embeddings.weight
    missing = [k for k, v in list(model.named_parameters()) + list(model.named_buffers()) if v.is_meta]
    if missing:
        raise gl.GGUFError(f"{path}: missing tensors {', '.join(missing[:5])}")
    if fuse:
        fuse_model(model)
    if herd_kernels:
        use_herd_kernels(model)
        use_decode_kernels(model)
    _release_freed_memory()
    return model.eval()


def _release_freed_memory():
    """Return the transient buffers of the load (one fp32 tensor at a time, the packers' scratch) to the OS.
    glibc keeps freed heap memory in the process otherwise: RSS measured 1.2 GB after the SmolLM2 load, 0.76 GB
    after malloc_trim (95 MB of it weights)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):     # not glibc: nothing to do
        pass


def weight_bytes(model: nn.Module) -> int:
    """Bytes of storage behind every parameter and buffer, each storage counted once (tied weights share one)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total
