"""Parameter and byte counts: of a config, from a model built on the meta device (no memory is allocated), and of a
built model's resident weights."""
from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import build_meta
from .config import ModelConfig

# Bytes per weight of each storage scheme for the big matrices. Norms and other vectors stay bf16.
#   int4: Meta's int4 recipe, groups of 128 input elements, one fp32 scale per group and output row.
#   fp8: e4m3 with one fp32 scale per output row (scales counted per row below).
INT4_GROUP = 128


@dataclass
class ParamCount:
    total: int
    active: int          # trunk parameters one text token touches: routed experts count top_k / n_experts
    vision: int          # vision encoder + adapter + projector (run once per image tile, not per token)
    routed_experts: int
    matrices: int        # elements of >= 2-D tensors (the ones quantization applies to)
    matrix_rows: int     # output rows of those matrices (per-row scales)


def count_params(cfg: ModelConfig) -> ParamCount:
    model = build_meta(cfg)
    total = routed = vision = matrices = rows = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if ".experts." in name:
            routed += n
        if name.startswith("vision"):        # vision.* encoder + adapter, vision_proj
            vision += n
        if p.dim() >= 2:
            matrices += n
            rows += n // p.shape[-1]
    active = total - vision - routed + (routed * cfg.moe.top_k // cfg.moe.n_experts if cfg.moe else 0)
    return ParamCount(total, active, vision, routed, matrices, rows)


def weight_bytes(count: ParamCount, scheme: str) -> int:
    """Bytes of all weights when every matrix is stored in `scheme` and vectors in bf16."""
    vectors = count.total - count.matrices
    if scheme == "bf16":
        return 2 * count.total
    if scheme == "fp8":
        return count.matrices + 4 * count.matrix_rows + 2 * vectors
    if scheme == "int4":
        return count.matrices // 2 + 4 * (count.matrices // INT4_GROUP) + 2 * vectors
    raise ValueError(f"unknown scheme {scheme!r}; expected bf16, fp8 or int4")


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def resident_bytes(model) -> int:
    """Bytes of storage behind a built model's parameters and buffers, each storage counted once (tied weights
    share one)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total
