"""The step that makes a built model fast on the CPU, applied after loading (as torchtitan's parallelize and
gpt-fast's tp.py are): `prepare(model)` swaps modules in place, `status(model)` says what runs and why.

1. fuse.fuse_model: one q/k/v and one gate/up matmul per layer.
2. kernels.use_herd_kernels: quantize.py's int4 / int8 modules onto herd's own decode kernels (kernels.cpp).
3. decode.use_decode_kernels: a batch-1 decode step's small steps, and whole layers, in C++ (decode.cpp).
4. hugepages.move_to_huge_pages: the CPU weights into 2 MB pages (a decode step streams them all).
Steps 2 and 3 need the C++ extension (extension.py); where it cannot run they swap nothing and torch's kernels run.
Loaders never import this package; models stay plain until prepared. Every swapped module has its plain twin.
"""
from __future__ import annotations

from collections import Counter

from torch import nn

from . import extension
from .decode import use_decode_kernels
from .fuse import fuse_model
from .hugepages import move_to_huge_pages, thp_mode
from .kernels import use_herd_kernels


def prepare(model: nn.Module) -> nn.Module:
    """Fuse, then herd's kernels, then the C++ decode steps, then huge pages, in place. Returns the model."""
    fuse_model(model)
    use_herd_kernels(model)
    use_decode_kernels(model)
    move_to_huge_pages(model)
    return model


def status(model: nn.Module | None = None) -> str:
    """One line: whether herd's C++ kernels run here (and why not), and for a model, which of its modules run
    where (counts by module kind)."""
    line = f"herd C++ kernels {extension.status()}; transparent huge pages {thp_mode()}"
    if model is None:
        return line
    kinds = Counter(type(m).__name__ for m in model.modules()
                    if type(m).__module__.startswith(("herd.cpu", "herd.quantize")))
    if not kinds:
        return line + "; the model has no fused, packed or C++ modules"
    return line + "; " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
