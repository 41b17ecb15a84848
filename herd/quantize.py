"""Weight quantization, in layers: primitives, packed modules, quantize_model(), the on-disk quantized state dict.

1. Primitives. `quantize_tensor(w, scheme, group_size, symmetric)` -> (q, scale, zero) in the on-disk layout, zero
   None except for asymmetric int4; `dequantize(q, scale, zero)` inverts it for every scheme. Schemes, weight-only:
   - int8: one scale per output row, scale = max|w_row| / 127, q = clamp(round(w / scale), -127, 127).
   - int4: Meta's int4 recipe (spec 7.1): groups of `group_size` (default 128) consecutive input elements per
     output row, scale = max|w_group| / 8 (>= 1e-6), q = clamp(round(w / scale), -8, 7), so +max saturates to 7.
     On disk two weights share a byte as offset-binary nibbles, q + 8: even input index low, odd index high.
   - int4 asymmetric (symmetric=False): the same groups and nibbles, plus a float zero point per group, w = q * scale
     + zero: the 16 levels span the group's min..max, scale ~ (max - min) / 15, zero ~ min + 8 * scale. torch's
     int4 kernel computes exactly this, so the zero is free at run time. It is GGUF Q4_1's min/max recipe (and
     torchao's for this kernel): groups of 32 land on a Q4_1 model's own grid, which symmetric int4 cannot.
   - fp8: e4m3 with one fp32 scale per output row, scale = max|w_row| / 448 (HF FP8 Maverick layout, spec 7.2).
   int8 and int4 scales and zeros are rounded to bf16 when quantizing: the packed kernels multiply by bf16 scales and
   add bf16 zeros, so a file stores exactly what runs. Scales (and zeros) are always (..., out, groups) fp32,
   groups = 1 except for int4.
2. Modules, each documenting its buffers: Int8Linear, Int4Linear, Fp8Linear for nn.Linear, Int8Embedding (a
   GGUF Q8_0 token embedding, gguf.py), and Int8Experts,
   Int4Experts, Fp8Experts for model.Experts (sparse dispatch through ops.dispatch_experts: only routed experts run).
   `linear_reference` is the plain dequantize-then-matmul twin every module is tested against.
   NOTE: bf16 activations. Int8/Int4 modules cast their input to bf16, run torch's packed CPU kernel
   (torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu) and cast the output back. Fed fp32, the same
   kernels take a slow path (bench/quant_matmul.py, SmolLM2 shapes: 7-50x slower than with bf16 at 1 row,
   40-110x at 512 rows), which would make quantized models slower than fp32 ones. With many rows (prefill) even
   the bf16 kernels lose to a dense bf16 matmul, so from INT8_DEQUANT_ROWS / INT4_DEQUANT_ROWS rows on a module
   dequantizes its matrix to a transient bf16 copy instead. These kernels exist on CPU only; the packed int4
   layout is the CPU kernel's own (it depends on the CPU's vector width), which is why checkpoints store the
   portable nibbles and `runtime_state_dict` packs them at load.
3. `quantize_model(model, scheme, group_size, only)` swaps modules, on real weights or on the meta device. Routed
   experts by default (that is where the bytes are); only="all" adds every trunk nn.Linear except the router
   (top-1 routing is a discrete choice: it stays exact) and the output head when tied to the embeddings.
   Embeddings, norms and the vision tower always stay in their float dtype.
4. `quantized_state_dict(model, spec)` is the on-disk format (herd names; checkpoint.py maps them to HF names:
   `X.weight` + `X.weight_scale` (+ `X.weight_zero` when asymmetric), routed experts per expert like the HF FP8
   repo). `runtime_state_dict` turns it into the modules' buffers for `load_state_dict(assign=True)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .model import Experts

SCHEMES = ("int8", "int4", "fp8")
ONLY = ("experts", "all")
DEFAULT_GROUP_SIZE = 128               # Meta's int4 recipe
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts
INT4_ROWS_MULTIPLE = 16                # the CPU int4 packing needs out_features % 16 == 0
INT8_COLS_MULTIPLE = 16                # torch._weight_int8pack_mm (torch 2.13, AVX512) segfaults otherwise
FP8_MAX = 448.0                        # largest finite float8_e4m3fn
# From this many activation rows on, dequantizing the matrix to bf16 + a dense bf16 matmul beats the packed
# kernel (crossover measured at SmolLM2 shapes, 1 thread: int8 from ~32 rows; int4, whose unpacking costs
# ~10 ns per weight, from ~128-256; at 512 rows the dense path is 2-5x faster, see bench/quant_matmul.py).
INT8_DEQUANT_ROWS = 32
INT4_DEQUANT_ROWS = 256
COMPUTE_DTYPE = torch.bfloat16         # activations of the packed kernels (see NOTE above)
_MIN_SCALE = 1e-6                      # Meta's clamp: all-zero rows/groups get a tiny scale, not a division by 0


class QuantizationError(ValueError):
    """A scheme, group size or module shape quantization cannot handle, with the module and the reason."""


@dataclass(frozen=True)
class QuantSpec:
    """What a checkpoint's `quantization_config` records; the only source of truth when loading."""
    scheme: str                    # int8 | int4 | fp8
    group_size: int | None = None  # int4 only
    only: str = "experts"          # experts | all
    symmetric: bool = True         # False: int4 with a zero point per group (int8 and fp8 are symmetric only)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise QuantizationError(f"unknown quantization scheme {self.scheme!r}; expected one of {', '.join(SCHEMES)}")
        if self.only not in ONLY:
            raise QuantizationError(f"unknown module selection {self.only!r}; expected one of {', '.join(ONLY)}")
        if self.scheme == "int4":
            if self.group_size not in INT4_GROUP_SIZES:
                raise QuantizationError(f"int4 group size {self.group_size} is not supported; torch's CPU int4 "
                                        f"kernel takes {', '.join(map(str, INT4_GROUP_SIZES))}")
        elif self.group_size is not None:
            raise QuantizationError(f"{self.scheme} has one scale per output row; --group-size applies to int4 only")
        if not isinstance(self.symmetric, bool):
            raise QuantizationError(f"quantization 'symmetric' must be true or false, not {self.symmetric!r}")
        if not self.symmetric and self.scheme != "int4":
            raise QuantizationError(f"{self.scheme} is symmetric only (one scale per output row, no zero point); "
                                    "--asymmetric applies to int4 only")

    def to_config(self) -> dict:
        return {"quant_method": "herd", "scheme": self.scheme, "group_size": self.group_size, "modules": self.only,
                "symmetric": self.symmetric}


def make_spec(scheme: str, group_size: int | None = None, only: str = "experts", symmetric: bool = True) -> QuantSpec:
    """QuantSpec with int4's default group size filled in."""
    if scheme == "int4" and group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    return QuantSpec(scheme, group_size, only, symmetric)


def spec_from_hf_config(hf: dict, path: str = "config.json") -> QuantSpec | None:
    """The QuantSpec of a config.json dict: herd's own block, or an FP8 block of the HF FP8 Maverick kind
    (compressed-tensors float 8-bit or fbgemm_fp8, routed experts stored per expert with row scales).
    None for unquantized checkpoints."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise QuantizationError(f"{path}: quantization_config must be a JSON object")
    method = qc.get("quant_method")
    if method == "herd":
        try:   # no "symmetric": written before asymmetric int4 existed, so symmetric
            return QuantSpec(qc["scheme"], qc.get("group_size"), qc.get("modules", "experts"),
                             qc.get("symmetric", True))
        except KeyError as e:
            raise QuantizationError(f"{path}: quantization_config has no {e.args[0]!r}") from None
    if method == "fbgemm_fp8" or (method == "compressed-tensors" and _is_fp8_compressed_tensors(qc)):
        return QuantSpec("fp8", None, "experts")
    raise QuantizationError(f"{path}: quantization_config with quant_method {method!r} is not supported; herd reads "
                            "its own (quant_method 'herd') and FP8 row-scaled checkpoints (compressed-tensors, "
                            "fbgemm_fp8)")


def _is_fp8_compressed_tensors(qc: dict) -> bool:
    groups = qc.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values()]
    return bool(weights) and all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights)


# ---- 1. primitives ---------------------------------------------------------------------------------------------
def quantize_tensor(w: torch.Tensor, scheme: str, group_size: int | None = None, symmetric: bool = True):
    """w (..., N, K) float -> (q, scale, zero), the on-disk layout: q is int8 (..., N, K), fp8 (..., N, K), or for
    int4 uint8 (..., N, K/2) nibbles; scale is fp32 (..., N, G) with G = K / group_size for int4, else 1; zero is
    None, except for asymmetric int4 (symmetric=False): fp32 (..., N, G) like scale."""
    wf = w.float()
    if not symmetric and scheme in ("int8", "fp8"):
        raise QuantizationError(f"{scheme} is symmetric only; a zero point (symmetric=False) applies to int4 only")
    if scheme == "int8":
        scale = round_bf16(wf.abs().amax(-1, keepdim=True) / 127).clamp(min=_MIN_SCALE)
        return (wf / scale).round().clamp(-127, 127).to(torch.int8), scale, None
    if scheme == "int4":
        q, scale, zero = quantize_int4(wf, group_size, symmetric)
        return pack_int4(q), scale, zero
    if scheme == "fp8":
        scale = (wf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        return (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale, None
    raise QuantizationError(f"unknown quantization scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = True):
    """Group-wise int4: w (..., N, K) -> (q int8 in [-8, 7] (..., N, K), scale fp32 (..., N, K/G), zero).
    symmetric: Meta's recipe, w ~ q * scale, zero None. Asymmetric: w ~ q * scale + zero, zero fp32 like scale,
    every weight within scale / 2 of its value (the grid covers each group's min..max: nothing saturates)."""
    K = w.shape[-1]
    if K % group_size:
        raise QuantizationError(f"int4 group size {group_size} does not divide the input dim {K}")
    wg = w.float().unflatten(-1, (K // group_size, group_size))             # (..., N, G, group)
    if symmetric:
        scale = round_bf16(wg.abs().amax(-1) / 8).clamp(min=_MIN_SCALE)          # (..., N, G)
        q = (wg / scale[..., None]).round().clamp(-8, 7).to(torch.int8)
        return q.flatten(-2), scale, None
    lo, hi = wg.amin(-1), wg.amax(-1)                                       # (..., N, G)
    zero = round_bf16(lo + 8 * (hi - lo) / 15)                                   # q = -8 at lo, 7 at hi
    # The bf16 zero moves the grid [zero - 8 scale, zero + 7 scale] off [lo, hi] by up to 2^-8 |zero|, so the step
    # is widened (and rounded up to bf16) until the grid covers [lo, hi] again: no weight saturates. A constant
    # group gets the tiny step, or the one that reaches the bf16-rounded zero: no division by 0.
    scale = _bf16_up(torch.maximum((zero - lo) / 8, (hi - zero) / 7).clamp(min=_MIN_SCALE))
    q = ((wg - zero[..., None]) / scale[..., None]).round().clamp(-8, 7).to(torch.int8)
    return q.flatten(-2), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values in [-8, 7] (..., K) -> uint8 (..., K/2): q + 8, even index in the low nibble."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 (..., K/2) -> int8 (..., K) in [-8, 7]."""
    lo, hi = (p & 15).to(torch.int8) - 8, (p >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """(q, scale[, zero]) -> fp32 weights w = q * scale (+ zero), one scale per group of K / G inputs.
    q: int8 or fp8 values (..., N, K) (int4 as values: unpack_int4 the on-disk nibbles first);
    scale, zero: (..., N, G), or (..., N) for one scale per row."""
    if scale.dim() == q.dim() - 1:
        scale = scale[..., None]
    G = scale.shape[-1]
    w = q.float().unflatten(-1, (G, q.shape[-1] // G)) * scale.float()[..., None]   # (..., N, G, K/G)
    if zero is not None:
        w = w + zero.float().reshape(scale.shape)[..., None]
    return w.flatten(-2)


def linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero=None) -> torch.Tensor:
    """The reference twin of every quantized linear: dequantize, then an fp32 matmul. x (..., K) -> (..., N) fp32."""
    return x.float() @ dequantize(q, scale, zero).t()


def round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _bf16_up(t: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= t, as fp32, for t > 0: the fp32 bits rounded up to bf16's 7 mantissa bits."""
    return ((t.float().view(torch.int32) + 0xFFFF) & -0x10000).view(torch.float32)


# ---- 2. modules ------------------------------------------------------------------------------------------------
def _int8_mm(x2, weight, scale):
    """x2 (M, K) bf16 @ (weight (N, K) int8 * scale (N,) bf16)^T -> (M, N) bf16. Few rows (decode): the packed
    kernel, which reads 1 byte per weight. Many rows (prefill): the packed kernel is slower than a dense bf16
    matmul (bench/quant_matmul.py), so dequantize this one matrix to bf16 and use that."""
    if x2.shape[0] >= INT8_DEQUANT_ROWS:
        return x2 @ (weight.to(COMPUTE_DTYPE) * scale[:, None]).t()
    return torch._weight_int8pack_mm(x2, weight, scale)


def _int4_mm(x2, weight, scales_and_zeros, group_size: int):
    """x2 (M, K) bf16 @ dequantized int4 weight^T -> (M, N) bf16; weight in the CPU kernel's packed layout.
    Like _int8_mm: the packed kernel for few rows, a transient bf16 copy and a dense matmul for many."""
    if x2.shape[0] >= INT4_DEQUANT_ROWS and cpu_int4_block() is not None:
        return x2 @ _int4_dequantize_packed(weight, scales_and_zeros, group_size).t()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, group_size, scales_and_zeros)


def int4_unpack_cpu(packed: torch.Tensor, block: int, dtype=torch.uint8) -> torch.Tensor:
    """torch's CPU int4 layout -> u (N, K) in 0..15 as `dtype`. Full blocks of `block` rows are stored
    (K, block/2), byte j holding row j (low nibble) and row j + block/2 (high); a last partial block of n rows is
    stored (K, n/2) with rows 2i, 2i + 1 in one byte. `cpu_int4_block` checks this against torch's packer.
    The result is the transposed view of a contiguous (K, N) buffer: that order is the layout's own (no element
    transpose while unpacking), and dequantize + x @ w^T on it measured 20-25% faster at SmolLM2's shapes with 512
    rows than building (N, K) first."""
    N, K = packed.shape[0], packed.shape[1] * 2
    flat = packed.reshape(-1)
    full, half = N // block * block, block // 2
    ut = torch.empty(K, N, dtype=dtype, device=packed.device)                     # u transposed
    if full:
        fb = flat[: full * K // 2].view(full // block, K, half)                    # (NB, K, block/2)
        ov = ut[:, :full].view(K, full // block, 2, half)                          # (K, NB, 2, block/2)
        ov[:, :, 0].copy_((fb & 15).transpose(0, 1))
        ov[:, :, 1].copy_((fb >> 4).transpose(0, 1))
    if full < N:
        tb = flat[full * K // 2:].view(K, (N - full) // 2)                          # (K, n/2)
        tv = ut[:, full:].view(K, (N - full) // 2, 2)
        tv[:, :, 0].copy_(tb & 15)
        tv[:, :, 1].copy_(tb >> 4)
    return ut.t()


_cpu_int4_block_found: list = []


def cpu_int4_block() -> int | None:
    """The row block of this machine's CPU int4 layout (64 on AVX512, 32 on AVX2), found by packing a probe with
    torch's own packer; None (always use the packed kernel) if neither matches."""
    if not _cpu_int4_block_found:
        u = torch.randint(0, 16, (112, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
        found = [b for b in (64, 32) if torch.equal(int4_unpack_cpu(packed, b).to(torch.int32), u)]
        _cpu_int4_block_found.append(found[0] if found else None)
    return _cpu_int4_block_found[0]


def _int4_dequantize_packed(packed, scales_and_zeros, group_size: int) -> torch.Tensor:
    """Packed int4 + (G, N, 2) scales/zeros -> bf16 weight (N, K): (u - 8) * scale + zero, as the kernel does.
    A transposed view of a contiguous (K, N) tensor, like `int4_unpack_cpu`."""
    # fp32 arithmetic (faster than bf16 on CPU and exact up to the final rounding), one rounding to bf16
    ut = int4_unpack_cpu(packed, cpu_int4_block(), torch.float32).t()             # (K, N) u, contiguous
    K, N = ut.shape
    scale, zero = scales_and_zeros[..., 0].float(), scales_and_zeros[..., 1].float()   # (G, N) each
    ut.view(K // group_size, group_size, N).sub_(8).mul_(scale[:, None]).add_(zero[:, None])
    return ut.to(COMPUTE_DTYPE).t()


def _int4_pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None):
    """q int8 (N, K) in [-8, 7], scale and zero (N, G) -> (packed uint8 (N, K/2) in the CPU kernel's layout,
    scales_and_zeros (G, N, 2) bf16). The kernel computes w = (u - 8) * scale + zero for u = q + 8."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
    zero = torch.zeros_like(scale) if zero is None else zero
    sz = torch.stack((scale.t(), zero.t()), dim=-1).to(COMPUTE_DTYPE).contiguous()
    return packed, sz


def _check_int4(name: str, in_features: int, out_features: int, group_size: int):
    if group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(f"{name}: int4 group size {group_size} is not supported; torch's CPU int4 kernel "
                                f"takes {', '.join(map(str, INT4_GROUP_SIZES))}")
    if in_features % group_size:
        raise QuantizationError(f"{name}: int4 group size {group_size} does not divide the input dim "
                                f"{in_features}; pick a group size that does")
    if out_features % INT4_ROWS_MULTIPLE:
        raise QuantizationError(f"{name}: output dim {out_features} is not a multiple of {INT4_ROWS_MULTIPLE}, which "
                                "torch's CPU int4 packing needs; leave this module unquantized")


def aligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous copy. NOTE: the packed kernels use aligned vector loads and crash (segfault) on tensors
    that alias a file buffer at an unaligned offset, as safetensors / mmap loads do; torch's allocator aligns."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _flat(x, in_features):
    """x (..., K) -> (M, K) bf16, contiguous and 64-byte aligned (see aligned_copy)."""
    x2 = x.reshape(-1, in_features).to(COMPUTE_DTYPE).contiguous()
    return aligned_copy(x2) if x2.data_ptr() % 64 else x2


def _check_int8(name: str, in_features: int):
    if in_features % INT8_COLS_MULTIPLE:
        raise QuantizationError(f"{name}: input dim {in_features} is not a multiple of {INT8_COLS_MULTIPLE}, which "
                                "torch's int8 kernel needs (it crashes otherwise); leave this module unquantized")


class Int8Linear(nn.Module):
    """Weight-only int8 linear: y = x @ (weight * scale)^T.
    Buffers: weight (N, K) int8, scale (N,) bf16 (one per output row). Runs torch._weight_int8pack_mm in bf16."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        _check_int8("Int8Linear", in_features)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=COMPUTE_DTYPE, device=device))

    @staticmethod
    def pack(weight, weight_scale) -> dict:
        """On-disk (q (N, K) int8, scale (N, 1)) -> this module's buffers."""
        return {"weight": aligned_copy(weight.to(torch.int8)), "scale": weight_scale.reshape(-1).to(COMPUTE_DTYPE)}

    def forward(self, x):
        y = _int8_mm(_flat(x, self.in_features), self.weight, self.scale)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


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


class Int4Linear(nn.Module):
    """Weight-only group-wise int4 linear: y = x @ w^T with w[n, k] = q[n, k] * scale[n, g] + zero[n, g],
    g = k // group_size, q in [-8, 7] (zero = 0 for Meta's symmetric recipe; asymmetric int4 and GGUF Q4_1 use it).
    Buffers: weight (N, K/2) uint8 in torch's CPU int4 layout (machine-specific: never saved, see runtime_state_dict),
    scales_and_zeros (K/G, N, 2) bf16. Runs torch._weight_int4pack_mm_for_cpu in bf16."""

    def __init__(self, in_features: int, out_features: int, group_size: int = DEFAULT_GROUP_SIZE, device=None):
        super().__init__()
        _check_int4("Int4Linear", in_features, out_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2,
                                                             dtype=COMPUTE_DTYPE, device=device))

    @staticmethod
    def pack(weight, weight_scale, weight_zero=None) -> dict:
        """On-disk (nibbles (N, K/2) uint8, scale (N, G)[, zero (N, G)]) -> this module's buffers."""
        packed, sz = _int4_pack(unpack_int4(weight), weight_scale.float(),
                                None if weight_zero is None else weight_zero.float())
        return {"weight": packed, "scales_and_zeros": sz}

    def forward(self, x):
        y = _int4_mm(_flat(x, self.in_features), self.weight, self.scales_and_zeros, self.group_size)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Fp8Linear(nn.Module):
    """FP8 e4m3 weight with per-row fp32 scales: y = x @ (weight * weight_scale)^T, dequantized to the activation
    dtype on each call (no fp8 matmul on CPU). Buffers: weight (N, K) float8_e4m3fn, weight_scale (N, 1) fp32."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))

    @staticmethod
    def pack(weight, weight_scale) -> dict:
        return {"weight": weight.to(torch.float8_e4m3fn), "weight_scale": weight_scale.float().reshape(-1, 1)}

    def forward(self, x):
        return F.linear(x, dequantize(self.weight, self.weight_scale).to(x.dtype))


def _swiglu_fused(h, hidden: int):
    """h (n, 2F) = [gate | up] -> silu(gate) * up (n, F)."""
    return F.silu(h[:, :hidden]) * h[:, hidden:]


class Int8Experts(nn.Module):
    """E int8 SwiGLU experts, gate and up fused: w13 (E, 2F, D) int8 with w13_scale (E, 2F) bf16 (rows 0..F-1 =
    w1 gate, F..2F-1 = w3 up); w2 (E, D, F) int8 with w2_scale (E, D) bf16. Sparse dispatch: only routed experts run,
    two packed matmuls each."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, device=None):
        super().__init__()
        _check_int8("Int8Experts gate/up", dim)
        _check_int8("Int8Experts down", hidden_dim)
        self.n_experts, self.dim, self.hidden_dim = n_experts, dim, hidden_dim
        E, D, Fh = n_experts, dim, hidden_dim
        self.register_buffer("w13", torch.empty(E, 2 * Fh, D, dtype=torch.int8, device=device))
        self.register_buffer("w13_scale", torch.empty(E, 2 * Fh, dtype=COMPUTE_DTYPE, device=device))
        self.register_buffer("w2", torch.empty(E, D, Fh, dtype=torch.int8, device=device))
        self.register_buffer("w2_scale", torch.empty(E, D, dtype=COMPUTE_DTYPE, device=device))

    @staticmethod
    def pack(w1, w1_scale, w3, w3_scale, w2, w2_scale) -> dict:
        """On-disk per-matrix (q (E, N, K) int8, scale (E, N, 1)) -> fused buffers."""
        return {"w13": torch.cat((w1, w3), dim=1).to(torch.int8).contiguous(),
                "w13_scale": torch.cat((w1_scale, w3_scale), dim=1).flatten(1).to(COMPUTE_DTYPE),
                "w2": aligned_copy(w2.to(torch.int8)), "w2_scale": w2_scale.flatten(1).to(COMPUTE_DTYPE)}

    def expert(self, e: int, seg):
        h = _int8_mm(_flat(seg, self.dim), self.w13[e], self.w13_scale[e])             # (n, 2F)
        return _int8_mm(_swiglu_fused(h, self.hidden_dim), self.w2[e], self.w2_scale[e]).to(seg.dtype)

    def forward(self, x, expert_idx, gate):
        return ops.dispatch_experts(x, expert_idx, gate, self.n_experts, self.expert)


class Int4Experts(nn.Module):
    """E int4 SwiGLU experts (group-wise int4 per expert matrix, zero points optional), gate and up fused:
    w13 (E, 2F, D/2) uint8 and w13_sz (E, D/G, 2F, 2) bf16; w2 (E, D, F/2) uint8 and w2_sz (E, F/G, D, 2) bf16,
    packed in torch's CPU int4 layout (see Int4Linear). Sparse dispatch: only routed experts run, two packed matmuls
    each."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, group_size: int = DEFAULT_GROUP_SIZE,
                 device=None):
        super().__init__()
        _check_int4("Int4Experts gate/up", dim, 2 * hidden_dim, group_size)
        _check_int4("Int4Experts down", hidden_dim, dim, group_size)
        self.n_experts, self.dim, self.hidden_dim, self.group_size = n_experts, dim, hidden_dim, group_size
        E, D, Fh, G = n_experts, dim, hidden_dim, group_size
        self.register_buffer("w13", torch.empty(E, 2 * Fh, D // 2, dtype=torch.uint8, device=device))
        self.register_buffer("w13_sz", torch.empty(E, D // G, 2 * Fh, 2, dtype=COMPUTE_DTYPE, device=device))
        self.register_buffer("w2", torch.empty(E, D, Fh // 2, dtype=torch.uint8, device=device))
        self.register_buffer("w2_sz", torch.empty(E, Fh // G, D, 2, dtype=COMPUTE_DTYPE, device=device))

    @staticmethod
    def pack(w1, w1_scale, w3, w3_scale, w2, w2_scale, w1_zero=None, w3_zero=None, w2_zero=None) -> dict:
        """On-disk (nibbles (E, N, K/2), scales (E, N, G)[, zeros (E, N, G)]) -> packed buffers, one expert at a
        time so only one expert's unpacked int8 copy exists at once."""
        w13, w13_sz, w2p, w2_sz = [], [], [], []
        for e in range(w1.shape[0]):
            z13 = None if w1_zero is None else torch.cat((w1_zero[e], w3_zero[e])).float()
            p, sz = _int4_pack(torch.cat((unpack_int4(w1[e]), unpack_int4(w3[e]))),
                               torch.cat((w1_scale[e], w3_scale[e])).float(), z13)
            w13.append(p), w13_sz.append(sz)
            p, sz = _int4_pack(unpack_int4(w2[e]), w2_scale[e].float(), None if w2_zero is None else w2_zero[e].float())
            w2p.append(p), w2_sz.append(sz)
        return {"w13": torch.stack(w13), "w13_sz": torch.stack(w13_sz),
                "w2": torch.stack(w2p), "w2_sz": torch.stack(w2_sz)}

    def expert(self, e: int, seg):
        h = _int4_mm(_flat(seg, self.dim), self.w13[e], self.w13_sz[e], self.group_size)   # (n, 2F)
        return _int4_mm(_swiglu_fused(h, self.hidden_dim), self.w2[e], self.w2_sz[e], self.group_size).to(seg.dtype)

    def forward(self, x, expert_idx, gate):
        return ops.dispatch_experts(x, expert_idx, gate, self.n_experts, self.expert)


class Fp8Experts(nn.Module):
    """E FP8 e4m3 SwiGLU experts in the HF FP8 Maverick layout (spec 7.2), stacked: w1, w3 (E, F, D) and
    w2 (E, D, F) float8_e4m3fn, each with per-row fp32 scales w1_scale, w3_scale (E, F, 1), w2_scale (E, D, 1).
    Only routed experts are dequantized (to the activation dtype) and run."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, device=None):
        super().__init__()
        self.n_experts = n_experts
        E, D, Fh = n_experts, dim, hidden_dim
        for name, (rows, cols) in (("w1", (Fh, D)), ("w3", (Fh, D)), ("w2", (D, Fh))):
            self.register_buffer(name, torch.empty(E, rows, cols, dtype=torch.float8_e4m3fn, device=device))
            self.register_buffer(name + "_scale", torch.empty(E, rows, 1, dtype=torch.float32, device=device))

    @staticmethod
    def pack(w1, w1_scale, w3, w3_scale, w2, w2_scale) -> dict:
        out = {}
        for name, q, s in (("w1", w1, w1_scale), ("w3", w3, w3_scale), ("w2", w2, w2_scale)):
            out[name], out[name + "_scale"] = q.to(torch.float8_e4m3fn), s.float().reshape(*q.shape[:2], 1)
        return out

    def expert(self, e: int, seg):
        w1, w3, w2 = (dequantize(getattr(self, n)[e], getattr(self, n + "_scale")[e]).to(seg.dtype)
                      for n in ("w1", "w3", "w2"))
        return (F.silu(seg @ w1.t()) * (seg @ w3.t())) @ w2.t()

    def forward(self, x, expert_idx, gate):
        return ops.dispatch_experts(x, expert_idx, gate, self.n_experts, self.expert)


LINEAR_MODULES = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Fp8Linear}
EXPERT_MODULES = {"int8": Int8Experts, "int4": Int4Experts, "fp8": Fp8Experts}
QUANTIZED_MODULES = tuple(LINEAR_MODULES.values()) + tuple(EXPERT_MODULES.values())
_EXPERT_MATRICES = ("w1", "w3", "w2")


# ---- 3. quantize_model -------------------------------------------------------------------------------------------
def quantize_targets(model: nn.Module, only: str = "experts") -> list[tuple[str, nn.Module]]:
    """(name, module) of every module `only` selects: routed experts, plus with "all" every trunk nn.Linear except
    the router and a tied output head. Raises if the model is already quantized."""
    if only not in ONLY:
        raise QuantizationError(f"unknown module selection {only!r}; expected one of {', '.join(ONLY)}")
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, QUANTIZED_MODULES):
            raise QuantizationError(f"{name} is already quantized ({type(mod).__name__}); quantize a float model")
        if isinstance(mod, Experts):
            out.append((name, mod))
        elif only == "all" and isinstance(mod, nn.Linear) and (name.startswith("layers.") or name == "output"):
            if name.endswith(".router") or (name == "output" and tied):
                continue
            out.append((name, mod))
    return out


def _empty_module(name: str, mod: nn.Module, spec: QuantSpec, device) -> nn.Module:
    try:
        if isinstance(mod, Experts):
            E, Fh, D = mod.w1.shape
            if spec.scheme == "int4":
                return Int4Experts(E, D, Fh, spec.group_size, device=device)
            return EXPERT_MODULES[spec.scheme](E, D, Fh, device=device)
        N, K = mod.weight.shape
        if spec.scheme == "int4":
            return Int4Linear(K, N, spec.group_size, device=device)
        return LINEAR_MODULES[spec.scheme](K, N, device=device)
    except QuantizationError as e:
        raise QuantizationError(f"{name}: {e}") from None


def _disk_tensors(mod: nn.Module, spec: QuantSpec) -> dict:
    """The on-disk tensors of one float module, names relative to the module: `w`, `w_scale`[, `w_zero`] for each
    matrix w (`weight`, or the experts' w1, w3, w2)."""
    out = {}
    for w in _EXPERT_MATRICES if isinstance(mod, Experts) else ("weight",):
        q, scale, zero = quantize_tensor(getattr(mod, w).detach(), spec.scheme, spec.group_size, spec.symmetric)
        out[w], out[w + "_scale"] = q, scale
        if zero is not None:
            out[w + "_zero"] = zero
    return out


def set_module(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str | QuantSpec, group_size: int | None = None,
                   only: str = "experts", symmetric: bool = True) -> nn.Module:
    """Swap the selected modules for quantized ones, in place. On a meta-device model only the module types and
    buffer shapes change (the loader's path); on real weights the modules are quantized and packed for the CPU
    kernels. Every shape is checked before anything is swapped."""
    spec = scheme if isinstance(scheme, QuantSpec) else make_spec(scheme, group_size, only, symmetric)
    targets = quantize_targets(model, spec.only)
    meta = [_empty_module(name, mod, spec, "meta") for name, mod in targets]      # validates every shape first
    for (name, mod), new in zip(targets, meta):
        if not _is_meta(mod):
            new.load_state_dict(type(new).pack(**_disk_tensors(mod, spec)), assign=True)
        set_module(model, name, new)
    return model


def _is_meta(mod: nn.Module) -> bool:
    return any(p.is_meta for p in mod.parameters())


# ---- 4. state dicts ------------------------------------------------------------------------------------------------
@torch.no_grad()
def quantized_state_dict(model: nn.Module, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The on-disk state dict of a float model quantized with `spec` (herd names): every selected module's
    `X.weight` (or experts' `w1/w3/w2`) replaced by q plus an `X.weight_scale` (`w1_scale`, ...) next to it, and
    for asymmetric int4 an `X.weight_zero` (`w1_zero`, ...) of the same shape; every other tensor unchanged."""
    targets = quantize_targets(model, spec.only)
    for name, mod in targets:
        _empty_module(name, mod, spec, "meta")                                      # shape checks with names
    sd = dict(model.state_dict())
    for name, mod in targets:
        for k, t in _disk_tensors(mod, spec).items():
            sd[f"{name}.{k}"] = t
    return sd


def quantized_shapes(model: nn.Module, spec: QuantSpec) -> dict[str, torch.Size]:
    """The shapes of quantized_state_dict(model, spec), by arithmetic (the loader's check, on a meta model:
    computing on meta tensors would cost seconds of torch's one-time meta-kernel setup)."""
    targets = quantize_targets(model, spec.only)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for name, mod in targets:
        _empty_module(name, mod, spec, "meta")
        names = _EXPERT_MATRICES if isinstance(mod, Experts) else ("weight",)
        for w in names:
            *lead, N, K = getattr(mod, w).shape
            int4 = spec.scheme == "int4"
            shapes[f"{name}.{w}"] = torch.Size((*lead, N, K // 2 if int4 else K))
            shapes[f"{name}.{w}_scale"] = torch.Size((*lead, N, K // spec.group_size if int4 else 1))
            if not spec.symmetric:
                shapes[f"{name}.{w}_zero"] = shapes[f"{name}.{w}_scale"]
    return shapes


def runtime_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On-disk tensors -> the buffers of the quantized modules `model` already holds (after quantize_model on
    meta), for model.load_state_dict(sd, assign=True). Pops the on-disk tensors as it goes, so memory holds one
    copy plus one module's temporary."""
    sd = dict(sd)
    for name, mod in model.named_modules():
        if not isinstance(mod, QUANTIZED_MODULES):
            continue
        prefix = name + "."
        disk = {k[len(prefix):]: sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]}
        try:
            buffers = type(mod).pack(**disk)
        except TypeError:
            raise QuantizationError(f"{name}: on-disk tensors {sorted(disk)} do not match {type(mod).__name__}") from None
        sd.update({prefix + k: v for k, v in buffers.items()})
    return sd

