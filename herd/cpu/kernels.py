"""herd's own CPU kernels for decode: int4 and int8 weights times int16-quantized activations (AVX512-VNNI).

Why: at batch 1 a decode step reads every weight once, so its matmuls are memory-bound. torch's packed kernels
(quantize.py) streamed SmolLM2's 66 MB of int4 matrices at ~6 GB/s on this machine (~10.5 GB/s for a plain sum on
one core); these stream them at ~9.5 GB/s from memory and at 1.5-2.5x torch's speed from cache
(bench/quant_matmul.py). kernels.cpp is built by extension.py; where it cannot run, extension.status() says why
and the model keeps torch's kernels: `use_herd_kernels(model)` is a no-op there.

Math, for activation rows x (M, K) fp32:
- Activations are quantized per block of 32 inputs: xs = max|x_block| / 32767, xq = round(x / xs) in int16
  (`quantize_activations_reference`). llama.cpp uses int8 here; on 512 tokens of SmolLM2 int8 activations cost
  +2.7% perplexity (outlier channels leave the rest of their block a few levels), int16 ones +0.17% (bf16 ones, in
  torch's kernels, +0.25%); bench/perplexity.py's 4096 tokens: +0.09%.
- int4: w[n, k] = (u[n, k] - 8) * scale[n, g] + zero[n, g] (torch's CPU int4 convention, g = k // G):
  y[m, n] = sum_g scale[n, g] * sum_{b in g} xs[m, b] * sum_{k in b} u[n, k] xq[m, k]
            + (zero[n, g] - 8 scale[n, g]) * sum_{k in g} x[m, k]          (the exact input sum, not the quantized one)
- int8: y[m, n] = row_scale[n] * sum_b xs[m, b] * sum_{k in b} w[n, k] xq[m, k].
`int4_mm_reference` / `int8_mm_reference` compute exactly these sums in float64: the kernels' twins.
- GGUF blocks (`gguf_mm`, for HerdGGUFExperts: Q4_0 / Q4_1 / Q8_0 matrices read where they lie in the file's memory
  map, row by row in GGUF's own layout): y[m, n] = sum_b d[n, b] xs[m, b] sum_{k in b} w[n, k] xq[m, k]
  (+ m[n, b] * sum_{k in b} x[m, k] for Q4_1), w = u - 8 (Q4_0), u (Q4_1) or q (Q8_0). Twin: `gguf_mm_reference`
  (gguf's own dequantize, then float64 sums).
- fp32 (`fp32_mm`, for decode.HerdLinear / HerdExperts): y = x @ w_t with w_t (K, N) the matrix transposed, each
  thread streaming its own range of w_t's rows; twin: x @ w_t.

Layouts ("streams": one flat buffer per matrix, read front to back by one thread per block of 16 output rows):
- int4, per block of 16 rows, per group g: 16 scales then 16 zeros (bf16, 64 bytes), then G/8 chunks of 64 bytes;
  in chunk c, bytes 4r..4r+3 belong to row r, byte j = u[r, 8c + j] | u[r, 8c + 4 + j] << 4. Same bytes as torch's
  packed layout (K/2 per row plus the bf16 scales and zeros). Where every zero is 0 (GGUF Q4_0, symmetric int4) the
  stream is symmetric: the 16 zeros are left out (32 bytes per group), 4.5 bits per weight at G = 32 as in Q4_0
  itself, not 5; the stream's size says which (`int4_header_bytes`).
- int8, per block of 16 rows: K/4 chunks of 64 bytes, bytes 4r..4r+3 = w[r, 4c .. 4c + 3].

Modules: `HerdInt4Linear` / `HerdInt8Linear` and `HerdInt4Experts` / `HerdInt8Experts` replace quantize.py's
Int4Linear / Int8Linear / Int4Experts / Int8Experts holding the same weights (`use_herd_kernels` swaps them in after
loading and fusing). Few rows run the kernels; from DEQUANT_ROWS rows on (prefill on AVX-512 CPUs; never on AVX2
ones, where the kernels win at every row count) they dequantize the matrix to quantize.dense_dtype() and run a
dense matmul, as quantize.py's modules do. `HerdGGUFExperts` replaces gguf.GGUFExperts (routed experts
mapped from a GGUF file) with the same views, run by `gguf_mm` at every row count.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn

from .. import ops
from . import extension
from .extension import ext
from ..gguf import GGUFExperts
from ..quantize import (COMPUTE_DTYPE, Int4Experts, Int4Linear, Int8Experts, Int8Linear, cpu_int4_block,
                       dense_dtype, int4_unpack_cpu, set_module)

ROWS = 16            # output rows per block (one 512-bit register of 32-bit lanes)
X_BLOCK = 32         # inputs per activation scale


def _dequant_rows() -> float:
    """From this many rows on the modules dequantize + dense matmul instead of the kernels. The kernels re-read the
    weights once per 4 rows, so their cost grows with the rows; the dense path's is mostly the dequantization.
    AVX512-VNNI (vs a bf16 dense matmul; SmolLM2's shapes, 1 thread, bench/quant_matmul.py): the kernels are faster
    up to 192 rows for every shape (int4: 1.3-1.8x at 192 rows), so 256, where quantize.py switches too. AVX2 (half
    the multiply width; vs an fp32 dense matmul, quantize.dense_dtype): never (inf). The kernels (~78 GMAC/s at 2
    threads) out-multiply torch's fp32 matmul itself (~70) before its dequantization is counted: AMD EPYC Zen 2, 2
    threads, 512 rows, int4 3072x576 11.6 vs 13.8 ms, Scout's 7168x5120 241 vs 334 ms, int8 7168x5120 203 vs 386 ms,
    and wider margins at 32-256 rows."""
    flags = extension.cpu_flags() or set()
    avx512 = set(extension.VARIANTS["avx512"][1]) <= flags and os.environ.get("HERD_KERNELS", "1").lower() != "avx2"
    return 256 if avx512 else math.inf


DEQUANT_ROWS = _dequant_rows()
# ---- layouts --------------------------------------------------------------------------------------------------------
def int4_header_bytes(stream: torch.Tensor, N: int, K: int, group_size: int) -> int:
    """Bytes of each group's header in an int4 stream of (N, K): 64 (16 bf16 scales, 16 bf16 zeros) or 32 (a
    symmetric stream: scales only). The two sizes of a whole stream differ, so its size says which."""
    groups = N // ROWS * (K // group_size)
    for header in (64, 32):
        if stream.numel() == groups * (header + group_size * 8):           # 16 rows of G nibbles: 8 G bytes
            return header
    raise ValueError(f"an int4 stream of ({N}, {K}) in groups of {group_size} has {groups * (64 + group_size * 8)} "
                     f"bytes (with zero points) or {groups * (32 + group_size * 8)} (symmetric), not {stream.numel()}")


def int4_stream(u: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """u (N, K) in 0..15 (any integer dtype), scales_and_zeros (K/G, N, 2) bf16 -> the int4 stream, uint8 (bytes,);
    symmetric (no zeros stored) when every zero is 0."""
    N, K = u.shape
    NB, NG = N // ROWS, K // group_size
    v = u.to(torch.uint8).reshape(NB, ROWS, K // 8, 2, 4).permute(0, 2, 3, 1, 4)    # (NB, K/8, lo|hi, 16, 4)
    chunks = (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(NB, NG, group_size // 8 * 64)
    sz = scales_and_zeros.to(torch.bfloat16).reshape(NG, NB, ROWS, 2).permute(1, 0, 3, 2)   # (NB, NG, s|z, 16)
    if not sz[:, :, 1].any():
        sz = sz[:, :, :1]                                                              # (NB, NG, s, 16)
    sz = sz.contiguous().view(torch.uint8).reshape(NB, NG, -1)
    return torch.cat((sz, chunks), dim=-1).reshape(-1)


def int4_stream_from_torch(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """A matrix in torch's packed CPU int4 layout (quantize.Int4Linear's weight, an Int4Experts expert's w13 / w2)
    with its scales_and_zeros -> the int4 stream."""
    return int4_stream(int4_unpack_cpu(packed, cpu_int4_block(), torch.uint8), scales_and_zeros, group_size)


def int4_unstream(stream: torch.Tensor, N: int, K: int, group_size: int):
    """Inverse of int4_stream: -> (u (N, K) uint8, scales_and_zeros (K/G, N, 2) bf16)."""
    NB, NG = N // ROWS, K // group_size
    header = int4_header_bytes(stream, N, K, group_size)
    s = stream.view(NB, NG, header + group_size // 8 * 64)
    sz = s[..., :header].contiguous().view(torch.bfloat16).reshape(NB, NG, header // 32, ROWS)
    if header == 32:                                                                  # symmetric: zeros are 0
        sz = torch.cat((sz, torch.zeros_like(sz)), dim=2)
    chunks = s[..., header:].reshape(NB, K // 8, ROWS, 4)
    u = torch.stack((chunks & 15, chunks >> 4), dim=2)                                 # (NB, K/8, 2, 16, 4)
    return (u.permute(0, 3, 1, 2, 4).reshape(N, K),
            sz.permute(1, 0, 3, 2).reshape(NG, N, 2).contiguous())


def int8_stream(w: torch.Tensor) -> torch.Tensor:
    """w (N, K) int8 -> the int8 stream (N * K,)."""
    N, K = w.shape
    return w.reshape(N // ROWS, ROWS, K // 4, 4).permute(0, 2, 1, 3).contiguous().reshape(-1)


def int8_unstream(stream: torch.Tensor, N: int, K: int) -> torch.Tensor:
    return stream.view(N // ROWS, K // 4, ROWS, 4).permute(0, 2, 1, 3).reshape(N, K)


# ---- kernels and their twins ----------------------------------------------------------------------------------------
def int4_mm(x: torch.Tensor, stream: torch.Tensor, N: int, group_size: int) -> torch.Tensor:
    """x (M, K) -> (M, N) fp32 through the int4 kernel."""
    return ext().int4_mm(x.float().contiguous(), stream, N, group_size)


def int8_mm(x: torch.Tensor, stream: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> (M, N) fp32 through the int8 kernel; row_scale (N,) fp32."""
    return ext().int8_mm(x.float().contiguous(), stream, row_scale)


GGML_TYPE = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}        # gguf.GGMLQuantizationType's numbers, as kernels.cpp takes them


def gguf_mm(x: torch.Tensor, raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """x (M, K) -> (M, N) fp32 through the GGUF block kernel; raw uint8 (N, K/32 * block bytes), read in place."""
    return ext().gguf_mm(x.float().contiguous(), raw, raw.shape[0], GGML_TYPE[qtype])


def gguf_mm_reference(x: torch.Tensor, raw, qtype: str) -> torch.Tensor:
    """gguf_mm's sums in float64: the matrix dequantized by the `gguf` package, the int16-quantized x, and for Q4_1
    the block minimum m times the exact input sum of its block (kernels.cpp adds it so)."""
    from gguf import GGMLQuantizationType, quants

    raw = raw.numpy() if isinstance(raw, torch.Tensor) else raw
    w = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[qtype])).double()          # (N, K)
    xq, xs = quantize_activations_reference(x)
    M, K = x.shape
    xd = (xq.double().unflatten(-1, (-1, X_BLOCK)) * xs.double()[..., None]).reshape(M, K)
    if qtype != "Q4_1":
        return (xd @ w.t()).float()
    blocks = raw.reshape(raw.shape[0], K // X_BLOCK, 20)
    m = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float64))  # (N, K/32)
    du = w - m.repeat_interleave(X_BLOCK, dim=1)                                     # d * u, (N, K)
    bsum = x.double().unflatten(-1, (-1, X_BLOCK)).sum(-1)                            # (M, K/32)
    return (xd @ du.t() + bsum @ m.t()).float()


def quantize_activations_reference(x: torch.Tensor):
    """x (M, K) -> (xq (M, K) int16, xs (M, K/32) fp32), as the kernels do (round half to even, max|x| -> 32767)."""
    xb = x.float().unflatten(-1, (-1, X_BLOCK))                                        # (M, K/32, 32)
    amax = xb.abs().amax(-1)
    xs = amax / 32767
    inv = torch.where(amax > 0, 32767 / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv[..., None]).clamp(-32768, 32767).to(torch.int16)      # torch.round: half to even
    return xq.flatten(-2), xs


def int4_mm_reference(x, u, scales_and_zeros, group_size: int) -> torch.Tensor:
    """The int4 kernel's sums written out in float64: u (N, K) in 0..15, scales_and_zeros (K/G, N, 2)."""
    xq, xs = quantize_activations_reference(x)
    M, K = x.shape
    xd = (xq.double().unflatten(-1, (-1, X_BLOCK)) * xs.double()[..., None]).reshape(M, K)   # dequantized x
    scale, zero = scales_and_zeros[..., 0].double().t(), scales_and_zeros[..., 1].double().t()   # (N, K/G)
    us = (u.double().unflatten(-1, (-1, group_size)) * scale[..., None]).flatten(-2)    # (N, K): u * scale
    xsum = x.double().unflatten(-1, (-1, group_size)).sum(-1)                           # (M, K/G)
    return (xd @ us.t() + xsum @ (zero - 8 * scale).t()).float()


def int8_mm_reference(x, w, row_scale) -> torch.Tensor:
    """The int8 kernel's sums in float64: w (N, K) int8, row_scale (N,)."""
    xq, xs = quantize_activations_reference(x)
    M, K = x.shape
    xd = (xq.double().unflatten(-1, (-1, X_BLOCK)) * xs.double()[..., None]).reshape(M, K)
    return (xd @ w.double().t() * row_scale.double()).float()


# ---- one matrix, any number of rows (the modules below and their experts) ------------------------------------------
def int4_linear(x2: torch.Tensor, stream: torch.Tensor, N: int, K: int, group_size: int) -> torch.Tensor:
    """x2 (M, K) -> (M, N): the int4 kernel for few rows; from DEQUANT_ROWS rows on the matrix dequantized to
    quantize.dense_dtype() (bf16 where the CPU has bf16 matmuls, else fp32; kernels.cpp's int4_dequantize gives it
    as a contiguous (K, N) buffer) and a dense matmul in that dtype. fp32 or bf16."""
    if x2.shape[0] >= DEQUANT_ROWS:
        dt = dense_dtype()
        return x2.to(dt) @ ext().int4_dequantize(stream, N, K, group_size, dt == torch.bfloat16)
    return ext().int4_mm(x2.float().contiguous(), stream, N, group_size)     # the extension directly: ~120 calls a step


def int8_linear(x2: torch.Tensor, stream: torch.Tensor, row_scale: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """x2 (M, K) -> (M, N), as int4_linear: the int8 kernel for few rows, a dequantized matmul in
    quantize.dense_dtype() from DEQUANT_ROWS on."""
    if x2.shape[0] >= DEQUANT_ROWS:
        w, dt = int8_unstream(stream, N, K), dense_dtype()
        return x2.to(dt) @ (w.to(dt) * row_scale.to(dt)[:, None]).t()
    return ext().int8_mm(x2.float().contiguous(), stream, row_scale)


# ---- modules --------------------------------------------------------------------------------------------------------
class HerdInt4Linear(nn.Module):
    """quantize.Int4Linear's weights in the int4 stream layout. Buffer: stream uint8 (bytes,)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, stream: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("stream", stream)

    @classmethod
    def from_int4(cls, mod: Int4Linear) -> "HerdInt4Linear":
        return cls(mod.in_features, mod.out_features, mod.group_size,
                   int4_stream_from_torch(mod.weight, mod.scales_and_zeros, mod.group_size))

    def dequantize(self, dtype=COMPUTE_DTYPE) -> torch.Tensor:
        """The weight (N, K) in dtype (bf16 or fp32), (u - 8) * scale + zero, as the transposed view of a contiguous
        (K, N) buffer, for prefill's dense matmul: kernels.cpp's int4_dequantize, bit-identical to
        `dequantize_reference` and ~7x faster (SmolLM2's 66 MB of int4 matrices: 45 vs 326 ms at 2 threads)."""
        return ext().int4_dequantize(self.stream, self.out_features, self.in_features, self.group_size,
                                     dtype == torch.bfloat16).t()

    def dequantize_reference(self, dtype=COMPUTE_DTYPE) -> torch.Tensor:
        """dequantize's twin in torch ops: the nibbles are written straight to their (k, n) places and the
        arithmetic runs in place in fp32 (then one rounding to bf16 if asked), like quantize._int4_dequantize_packed."""
        N, K, G = self.out_features, self.in_features, self.group_size
        NB, NG = N // ROWS, K // G
        header = int4_header_bytes(self.stream, N, K, G)
        s = self.stream.view(NB, NG, header + G // 8 * 64)
        chunks = s[..., header:].view(NB, NG, G // 8, ROWS, 4)            # (NB, NG, G/8, 16 rows, 4 bytes)
        ut = torch.empty(K, N, dtype=torch.float32, device=self.stream.device)
        # k = g*G + 8c + 4*(high nibble) + j, n = 16*block + r
        dst = ut.view(NG, G // 8, 2, 4, NB, ROWS)
        src = chunks.permute(1, 2, 4, 0, 3)                                # (NG, G/8, 4, NB, 16)
        dst[:, :, 0].copy_(src & 15)
        dst[:, :, 1].copy_(src >> 4)
        sz = s[..., :header].contiguous().view(torch.bfloat16).view(NB, NG, header // 32, ROWS)
        sz = sz.permute(1, 2, 0, 3).reshape(NG, header // 32, N).float()  # (NG, scale[|zero], N)
        ut.view(NG, G, N).sub_(8).mul_(sz[:, 0, None])
        if header == 64:
            ut.view(NG, G, N).add_(sz[:, 1, None])
        return ut.to(dtype).t()

    def forward(self, x):
        y = int4_linear(x.reshape(-1, self.in_features), self.stream, self.out_features, self.in_features,
                        self.group_size)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class HerdInt8Linear(nn.Module):
    """quantize.Int8Linear's weights in the int8 stream layout. Buffers: stream int8 (N * K,), scale (N,) fp32."""

    def __init__(self, in_features: int, out_features: int, stream: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("stream", stream)
        self.register_buffer("scale", scale)

    @classmethod
    def from_int8(cls, mod: Int8Linear) -> "HerdInt8Linear":
        return cls(mod.in_features, mod.out_features, int8_stream(mod.weight), mod.scale.float().contiguous())

    def forward(self, x):
        y = int8_linear(x.reshape(-1, self.in_features), self.stream, self.scale, self.out_features, self.in_features)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class HerdInt8Embedding(nn.Module):
    """A token embedding reading its int8 rows from a tied HerdInt8Linear head's stream (one copy for both):
    row t = w[t] * scale[t] in `dtype`."""

    def __init__(self, head: HerdInt8Linear, dtype=torch.float32):
        super().__init__()
        self.head, self.dtype = [head], dtype          # a list: the head is the output module's, not a child here
        self._offsets = None                           # (K,) int64, made once (~20 us of torch ops a step)

    def forward(self, tokens):
        head = self.head[0]
        cpu_rows = self.dtype == torch.float32 and tokens.dtype == torch.long and tokens.device.type == "cpu"
        if cpu_rows and ext() is not None:
            rows = ext().int8_rows(head.stream, head.scale, tokens.reshape(-1).contiguous(), head.in_features)
            return rows.view(*tokens.shape, head.in_features)
        return self.forward_reference(tokens)

    def forward_reference(self, tokens):
        """forward's twin in torch ops (any device and dtype)."""
        head = self.head[0]
        K = head.in_features
        # int8_stream's layout: input k = 4c + j of row t is byte (t // 16) * 16K + 64c + 4 (t % 16) + j. One flat
        # index_select: indexing the (N/16, K/4, 16, 4) view as blocks[t // 16, :, t % 16] runs an OpenMP region
        # from a few tokens on, measured 1.7-12 ms for 16 tokens at 2 threads here (index_select: 13 us)
        offsets = self._offsets
        if offsets is None or offsets.device != tokens.device or offsets.numel() != K:
            with torch.inference_mode(False):          # kept across steps: a normal tensor, usable in and out of it
                offsets = self._offsets = ((torch.arange(K // 4, device=tokens.device) * 4 * ROWS)[:, None]
                                           + torch.arange(4, device=tokens.device)).reshape(-1)      # (K,)
        starts = (tokens // ROWS) * (ROWS * K) + (tokens % ROWS) * 4                    # (...,)
        rows = head.stream.index_select(0, (starts[..., None] + offsets).reshape(-1))   # (n * K,)
        return rows.view(*tokens.shape, K).to(self.dtype) * head.scale[tokens, None].to(self.dtype)


def _stacked(n: int, make) -> torch.Tensor:
    """torch.stack([make(0), ..., make(n - 1)]) with one expert's temporaries alive at a time, not all n."""
    first = make(0)
    out = torch.empty((n, *first.shape), dtype=first.dtype, device=first.device)
    out[0] = first
    for e in range(1, n):
        out[e] = make(e)
    return out


class _HerdExperts(nn.Module):
    """E SwiGLU experts, gate and up fused (w13: 2F outputs, rows 0..F-1 the gate), each matrix in a kernel stream;
    expert e's streams are row e of the stacked buffers w13 (E, ...) and w2 (E, ...). Sparse dispatch as
    quantize.py's experts (its twins): only routed experts run, each two products and one SiLU gating. A batch-1
    decode step of a top-1 MoE takes them inside decode.cpp's one call per layer (decode.HerdBlock) instead."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.n_experts, self.dim, self.hidden_dim = n_experts, dim, hidden_dim

    def expert(self, e: int, seg):                                    # seg (n, D) gated inputs -> (n, D)
        h = self.gate_up(e, seg.reshape(-1, self.dim)).float().contiguous()             # (n, 2F)
        return self.down(e, ext().silu_mul(h)).to(seg.dtype)

    def forward(self, x, expert_idx, gate):
        return ops.dispatch_experts(x, expert_idx, gate, self.n_experts, self.expert)


class HerdInt4Experts(_HerdExperts):
    """quantize.Int4Experts' weights in int4 streams. Buffers: w13 uint8 (E, stream bytes of (2F, D)), w2 uint8
    (E, stream bytes of (D, F))."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, group_size: int, w13: torch.Tensor,
                 w2: torch.Tensor):
        super().__init__(n_experts, dim, hidden_dim)
        self.group_size = group_size
        self.register_buffer("w13", w13)
        self.register_buffer("w2", w2)

    @classmethod
    def from_int4(cls, mod: Int4Experts) -> "HerdInt4Experts":
        G = mod.group_size
        w13 = _stacked(mod.n_experts, lambda e: int4_stream_from_torch(mod.w13[e], mod.w13_sz[e], G))
        w2 = _stacked(mod.n_experts, lambda e: int4_stream_from_torch(mod.w2[e], mod.w2_sz[e], G))
        return cls(mod.n_experts, mod.dim, mod.hidden_dim, G, w13, w2)

    def gate_up(self, e: int, x2):
        return int4_linear(x2, self.w13[e], 2 * self.hidden_dim, self.dim, self.group_size)

    def down(self, e: int, h):
        return int4_linear(h, self.w2[e], self.dim, self.hidden_dim, self.group_size)


class HerdInt8Experts(_HerdExperts):
    """quantize.Int8Experts' weights in int8 streams. Buffers: w13 int8 (E, 2F * D) with w13_scale (E, 2F) fp32,
    w2 int8 (E, D * F) with w2_scale (E, D) fp32."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, w13, w13_scale, w2, w2_scale):
        super().__init__(n_experts, dim, hidden_dim)
        self.register_buffer("w13", w13)
        self.register_buffer("w13_scale", w13_scale)
        self.register_buffer("w2", w2)
        self.register_buffer("w2_scale", w2_scale)

    @classmethod
    def from_int8(cls, mod: Int8Experts) -> "HerdInt8Experts":
        E = mod.n_experts
        return cls(E, mod.dim, mod.hidden_dim, _stacked(E, lambda e: int8_stream(mod.w13[e])),
                   mod.w13_scale.float().contiguous(), _stacked(E, lambda e: int8_stream(mod.w2[e])),
                   mod.w2_scale.float().contiguous())

    def gate_up(self, e: int, x2):
        return int8_linear(x2, self.w13[e], self.w13_scale[e], 2 * self.hidden_dim, self.dim)

    def down(self, e: int, h):
        return int8_linear(h, self.w2[e], self.w2_scale[e], self.dim, self.hidden_dim)


class HerdGGUFExperts(_HerdExperts):
    """gguf.GGUFExperts on the GGUF block kernel: the same buffers (views of the file's memory map, never copied),
    w1 / w3 / w2 uint8 (E, rows, K/32 * block bytes), the routed expert's gate and up as two products. Any number of
    rows runs the kernel, which reads each weight row once per call (the rows of x reuse it from L1). decode.HerdBlock's
    one-call layer takes them too (decode.cpp's gguf_expert_matrices)."""

    def __init__(self, mod: GGUFExperts):
        super().__init__(mod.n_experts, mod.dim, mod.hidden_dim)
        self.qtype = mod.qtype
        self.register_buffer("w1", mod.w1)
        self.register_buffer("w3", mod.w3)
        self.register_buffer("w2", mod.w2)

    def gate_up(self, e: int, x2):
        x2 = x2.float().contiguous()
        t = GGML_TYPE[self.qtype]
        return torch.cat((ext().gguf_mm(x2, self.w1[e], self.hidden_dim, t),
                          ext().gguf_mm(x2, self.w3[e], self.hidden_dim, t)), dim=-1)          # (n, 2F)

    def down(self, e: int, h):
        return ext().gguf_mm(h, self.w2[e], self.dim, GGML_TYPE[self.qtype])


def can_convert(mod: nn.Module) -> bool:
    """Shapes the kernels take: 16 | out_features, 32 | in_features, 32 | group size (int4); for experts, of both
    their matrices (2F x D and D x F)."""
    if type(mod) is GGUFExperts:                      # GGUF rows: any count, K a multiple of 32 by the format
        return True
    if type(mod) in (Int4Linear, Int4Experts) and cpu_int4_block() is None:
        return False
    if type(mod) in (Int4Experts, Int8Experts):
        shapes = ((2 * mod.hidden_dim, mod.dim), (mod.dim, mod.hidden_dim))
    elif type(mod) in (Int4Linear, Int8Linear):
        shapes = ((mod.out_features, mod.in_features),)
    else:
        return False
    group = getattr(mod, "group_size", X_BLOCK)
    return group % X_BLOCK == 0 and all(n % ROWS == 0 and k % X_BLOCK == 0 for n, k in shapes)


def _herd_version(mod: nn.Module) -> nn.Module:
    if type(mod) is GGUFExperts:
        return HerdGGUFExperts(mod)
    if type(mod) is Int4Linear:
        return HerdInt4Linear.from_int4(mod)
    if type(mod) is Int8Linear:
        return HerdInt8Linear.from_int8(mod)
    return HerdInt4Experts.from_int4(mod) if type(mod) is Int4Experts else HerdInt8Experts.from_int8(mod)


@torch.no_grad()
def use_herd_kernels(model: nn.Module) -> int:
    """Swap, in place, every Int4Linear / Int8Linear / Int4Experts / Int8Experts the kernels can run for its Herd*
    version, one module at a time (the old buffers are freed as each is replaced). Returns how many were swapped; 0
    when the kernels are off here (see extension.status())."""
    if ext() is None:
        return 0
    swaps = [(name, mod) for name, mod in model.named_modules() if can_convert(mod)]
    emb, head = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    tied = emb is not None and head is not None and getattr(emb, "weight", None) is getattr(head, "weight", False)
    for name, mod in swaps:
        new = _herd_version(mod)
        set_module(model, name, new)
        if tied and mod is head:        # an int8 embedding sharing the head's matrix: it reads the new stream
            model.tok_embeddings = HerdInt8Embedding(new, getattr(emb, "dtype", torch.float32))
    return len(swaps)
