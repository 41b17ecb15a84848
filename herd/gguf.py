"""GGUF files (llama.cpp's format) -> a plain herd Transformer, in one walk over the tensors through the `gguf`
package. It applies no kernels and fuses nothing: herd.cpu.prepare does that to the built model.

Architectures: `llama` (Llama 2/3, SmolLM2, ...) and `llama4`. GGUF keeps q/k rows in the interleaved RoPE order
(the HF->GGUF converter permutes them), which is the order model.py rotates, so no permutation happens here.
Tensor data is read through the gguf reader's memory map. Each tensor is either dequantized to a float dtype with
gguf's own block decoders, or, with packed=True, a Q4_0 / Q4_1 / Q8_0 matrix is repacked into quantize.py's
Int4Linear / Int8Linear (and a Q8_0 token embedding into an Int8Embedding) with no float copy kept.

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
  by Int8Embedding (the lookup) and Int8Linear (the output head). The extra error is measured in
  tests/test_gguf_packed.py and bench/perplexity.py.
- A layer's routed experts (ffn_{gate,up,down}_exps, all three of one of these types) -> Int4Experts / Int8Experts
  by the same mappings, one expert at a time (packed_experts); a layer whose three differ is dequantized.
- With mmap_experts=True they stay where they are instead: GGUFExperts holds zero-copy views of the file's memory
  map in GGUF's own blocks, so their pages are file-backed (the kernel can drop and re-read them: a model larger
  than memory still runs, as llama.cpp's mmap does) and herd.cpu's gguf_mm kernel reads them in place.
Other types (F32, F16, BF16, K-quants, ...) are dequantized to fp32.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import MoEConfig, ModelConfig
from . import ops
from .quantize import (COMPUTE_DTYPE, Int4Experts, Int4Linear, Int8Embedding, Int8Experts, Int8Linear, aligned_copy,
                       dequantize, pack_int4, round_bf16, set_module)

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
    scale = round_bf16(w.abs().amax(-1) / 127).clamp(min=1e-6)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


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


def dequantize_rows(raw: np.ndarray, qtype: str) -> torch.Tensor:
    """GGUF rows of a PACKED_TYPES type, raw uint8 (N, K/32 * bytes) -> fp32 (N, K), gguf's values exactly."""
    if qtype == "Q8_0":
        return q8_0_values(raw)
    return dequantize(*q4_values(raw, qtype))


class GGUFExperts(nn.Module):
    """E SwiGLU routed experts left in a GGUF file's own blocks (one PACKED_TYPES type): w1 (gate) and w3 (up) uint8
    (E, F, D/32 * bytes), w2 (down) uint8 (E, D, F/32 * bytes), each a zero-copy view of the file's memory map
    (map_gguf_experts). The views hold the mapping open for as long as they live. This forward is the plain twin:
    the routed expert's matrices dequantized a slab of rows at a time (transient: ROWS_PER_SLAB rows in fp32) and
    matmuls; herd.cpu.kernels swaps in HerdGGUFExperts, which reads the blocks in place."""

    ROWS_PER_SLAB = 1024

    def __init__(self, qtype: str, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor):
        super().__init__()
        if qtype not in PACKED_TYPES:
            raise ValueError(f"GGUFExperts reads {', '.join(PACKED_TYPES)} blocks, not {qtype}")
        self.qtype, self.n_experts, self.hidden_dim, self.dim = qtype, w1.shape[0], w1.shape[1], w2.shape[1]
        self.register_buffer("w1", w1)
        self.register_buffer("w3", w3)
        self.register_buffer("w2", w2)

    def matmul(self, x2: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """x2 (n, K) times one expert matrix's blocks raw (N, K/32 * bytes) transposed -> (n, N) fp32."""
        N = raw.shape[0]
        out = torch.empty(x2.shape[0], N, dtype=torch.float32)
        for r in range(0, N, self.ROWS_PER_SLAB):
            w = dequantize_rows(raw[r:r + self.ROWS_PER_SLAB].numpy(), self.qtype)     # (rows, K)
            out[:, r:r + self.ROWS_PER_SLAB] = x2.float() @ w.t()
        return out

    def expert(self, e: int, seg):                                    # seg (n, D) gated inputs -> (n, D)
        x2 = seg.reshape(-1, self.dim)
        h = torch.nn.functional.silu(self.matmul(x2, self.w1[e])) * self.matmul(x2, self.w3[e])    # (n, F)
        return self.matmul(h, self.w2[e]).to(seg.dtype)

    def forward(self, x, expert_idx, gate):
        return ops.dispatch_experts(x, expert_idx, gate, self.n_experts, self.expert)


def map_gguf_experts(mapping: np.ndarray, gate, up, down) -> GGUFExperts:
    """One layer's routed-expert tensors (gguf reader tensors, one PACKED_TYPES type) -> GGUFExperts whose buffers
    are views of `mapping` (the whole file as np.memmap) at the tensors' offsets: nothing is read or copied here."""
    def view(t):
        E, N = (int(x) for x in reversed(t.shape[1:]))           # GGUF dims innermost first: (K, N, E)
        raw = mapping[t.data_offset:t.data_offset + t.n_bytes]
        return torch.from_numpy(raw.reshape(E, N, -1))           # (E, N, K/32 * bytes), shares the pages
    return GGUFExperts(gate.tensor_type.name, view(gate), view(up), view(down))


def routed_expert_bytes(path: str | Path) -> int:
    """Bytes of the file's routed-expert tensors (ffn_*_exps): what packed loading copies into memory."""
    return sum(int(t.n_bytes) for t in open_gguf(path).tensors if t.name.endswith("_exps.weight"))


def available_memory() -> int | None:
    """Bytes this process may still take: MemAvailable, lowered to a cgroup's limit minus its usage (v2 or v1)
    where one is set; None where neither can be read."""
    avail = None
    try:
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable"))
        avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, StopIteration):
        pass
    for limit_file, usage_file in _cgroup_memory_files():
        try:
            limit = limit_file.read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                left = int(limit) - int(usage_file.read_text())
                avail = left if avail is None else min(avail, left)
        except (OSError, ValueError):
            continue
    return avail


def _cgroup_memory_files():
    """(limit, usage) files of this process's memory cgroup, v2 then v1."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            d = Path("/sys/fs/cgroup") / rel.lstrip("/")
            out.append((d / "memory.max", d / "memory.current"))
        elif "memory" in controllers.split(","):
            d = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            out.append((d / "memory.limit_in_bytes", d / "memory.usage_in_bytes"))
    return out


# The in-memory packed load's peak anonymous memory per byte of routed experts: the packed Int4Experts and the kernel
# streams use_herd_kernels builds from them are both alive while it swaps, plus one expert's unpacking scratch.
# Measured (bench/mmap_experts.py, 2-layer Scout-width Q4_0): 6.18 GiB peak for 2.11 GiB of experts (2.9x).
IN_MEMORY_PEAK_PER_EXPERT_BYTE = 3


def experts_exceed_memory(path: str | Path) -> bool:
    """Whether loading the file's routed experts into memory would not fit: the in-memory load's peak
    (IN_MEMORY_PEAK_PER_EXPERT_BYTE x their bytes) exceeds what this process may still take (available_memory).
    herd.load maps them from the file then, unless told otherwise."""
    avail = available_memory()
    return avail is not None and IN_MEMORY_PEAK_PER_EXPERT_BYTE * routed_expert_bytes(path) > avail


def read_config(path: str | Path) -> ModelConfig:
    """The config of a GGUF file, from its metadata and tensor names (no tensor data is read)."""
    reader = open_gguf(path)
    return _config_of(reader, metadata(reader), Path(path))


def _config_of(reader, meta: dict, path: Path) -> ModelConfig:
    names = {t.name for t in reader.tensors}
    cfg = config_from_metadata(meta, names, str(path))
    if "rope_freqs.weight" in names:
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        cfg.rope_freq_factors = tensor_to_torch(t, path).tolist()
    return cfg


@torch.no_grad()
def load_gguf(path: str | Path, dtype=None, device="cpu", progress=False, packed=False,
              int8_embeddings=True, mmap_experts=False) -> nn.Module:
    """A GGUF file -> a Transformer in eval mode, every tensor checked against the config's shapes on the way.
    packed=False: every tensor dequantized to `dtype` (fp32 by default). packed=True (CPU, the packed modules' own
    dtypes): Q4_0 / Q4_1 / Q8_0 linears become Int4Linear / Int8Linear and a Q8_0 token embedding an Int8Embedding
    (int8_embeddings=False keeps it, and a tied head, in fp32); every other tensor is dequantized to fp32.
    mmap_experts=True (with packed): routed experts of those types become GGUFExperts, views of the file's pages."""
    from tqdm import tqdm

    from .checkpoint import build_meta

    path = Path(path)
    if packed and (dtype is not None or str(device) != "cpu"):
        raise GGUFError(f"{path}: packed loading runs on the CPU with the packed modules' own dtypes")
    if mmap_experts and not packed:
        raise GGUFError(f"{path}: mmap_experts maps packed GGUF blocks; it needs packed=True (quant='packed')")
    # copy-on-write: the views are writable numpy arrays (torch.from_numpy takes them without a warning), the pages
    # stay the file's until something writes to one, which nothing does
    mapping = np.memmap(path, dtype=np.uint8, mode="c") if mmap_experts else None
    reader = open_gguf(path)
    meta = metadata(reader)
    cfg = _config_of(reader, meta, path)
    model = build_meta(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    linears = {n + ".weight" for n, m in model.named_modules() if type(m) is nn.Linear}
    sd, experts = {}, {}       # experts: a layer's "experts" module name -> {w1|w3|w2: reader tensor}, until all 3
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", disable=not progress, leave=False):
        if t.name == "rope_freqs.weight" or t.name.endswith("attn_rot_embd"):
            continue
        native = gguf_name_to_native(t.name)
        if native is None:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} for architecture {meta['general.architecture']}")
        shape = tuple(int(x) for x in reversed(t.shape))           # GGUF lists dims innermost first
        if shape != expected.get(native):
            want = expected[native] if native in expected else "no such tensor in this config"
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {shape}, expected {want}")
        qtype = t.tensor_type.name
        if packed and qtype in PACKED_TYPES and native in linears and shape[0] % 16 == 0 and shape[1] % 16 == 0:
            set_module(model, native.removesuffix(".weight"), packed_linear(qtype, np.asarray(t.data)))
        elif packed and qtype in PACKED_TYPES and ".experts." in native:
            _gather_experts(model, experts, native, t, mapping)
        elif packed and qtype == "Q8_0" and native == "tok_embeddings.weight" and shape[1] % 16 == 0 \
                and int8_embeddings:
            model.tok_embeddings = _int8_embedding(np.asarray(t.data), shape)
        else:
            sd[native] = tensor_to_torch(t, path).to(dtype or torch.float32)
    for name, group in experts.items():       # mixed types or odd shapes: dequantized to fp32 like any other tensor
        sd.update({f"{name}.{w}": tensor_to_torch(t, path) for w, t in group.items()})
    _tie_and_assign(model, sd, path)
    _release_freed_memory()
    return model.to(device).eval()


def _gather_experts(model: nn.Module, experts: dict, native: str, t, mapping: np.ndarray | None):
    """Hold a layer's routed-expert tensors until all three are read, then pack them (same type, shapes the
    packed modules take) into one Int4Experts / Int8Experts, or with a file mapping make them one GGUFExperts;
    otherwise they stay in `experts` to be dequantized."""
    name, w = native.rsplit(".", 1)
    group = experts.setdefault(name, {})
    group[w] = t
    if len(group) == 3 and len({g.tensor_type for g in group.values()}) == 1 and mapping is not None:
        set_module(model, name, map_gguf_experts(mapping, group["w1"], group["w3"], group["w2"]))
        del experts[name]
    elif len(group) == 3 and len({g.tensor_type for g in group.values()}) == 1 and \
            all(n % 16 == 0 for g in group.values() for n in g.shape[:2]):
        raws = [np.asarray(group[k].data) for k in ("w1", "w3", "w2")]
        set_module(model, name, packed_experts(t.tensor_type.name, *raws))
        del experts[name]
        _release_freed_memory()        # per layer: the unpacking scratch would pile up in the heap


def _int8_embedding(raw: np.ndarray, shape: tuple) -> Int8Embedding:
    q, scale = int8_rows(q8_0_values(raw))
    emb = Int8Embedding(*shape, device="meta")
    emb.weight, emb.scale = aligned_copy(q), scale.to(COMPUTE_DTYPE)
    return emb


def _tie_and_assign(model: nn.Module, sd: dict, path: Path):
    """Load the float tensors, tie the output head to the embedding where the config says so (an Int8Embedding
    shares its int8 matrix with an Int8Linear head), and refuse a model with tensors missing."""
    cfg = model.config
    emb = model.tok_embeddings
    if cfg.tie_embeddings and isinstance(emb, Int8Embedding):        # one int8 matrix for the lookup and the head
        head = Int8Linear(cfg.dim, cfg.vocab_size, device="meta")
        head.weight, head.scale = emb.weight, emb.scale
        model.output = head
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings and not isinstance(model.tok_embeddings, Int8Embedding):
        model.output.weight = model.tok_embeddings.weight
    missing = [k for k, v in list(model.named_parameters()) + list(model.named_buffers()) if v.is_meta]
    if missing:
        raise GGUFError(f"{path}: missing tensors {', '.join(missing[:5])}")


def _release_freed_memory():
    """Return the transient buffers of the load (one fp32 tensor at a time, the packers' scratch) to the OS.
    glibc keeps freed heap memory in the process otherwise: RSS measured 1.2 GB after the SmolLM2 load, 0.76 GB
    after malloc_trim (95 MB of it weights)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):     # not glibc: nothing to do
        pass
