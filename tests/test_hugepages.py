"""herd.cpu.hugepages: a prepared model's weights copied into one 2 MB-paged arena decode the same tokens, shared
tensors stay shared, a GGUF file's mapped experts stay in the file, and the arena gets huge pages where the kernel
offers them."""
import copy
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from herd.config import preset
from herd.cpu import decode, hugepages, kernels
from herd.cpu.extension import ext
from herd.cpu.fuse import fuse_model
from herd.engine import Engine, SamplingParams
from herd.gguf import GGUFExperts
from herd.model import Transformer
from herd.quantize import quantize_model

needs_kernels = pytest.mark.skipif(ext() is None, reason="herd's C++ kernels are not built for this CPU")


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]


def _decode(model) -> tuple[list[int], torch.Tensor]:
    engine = Engine(model, max_batch=1)
    req = engine.add(list(range(3, 23)), SamplingParams(max_tokens=30, ignore_eos=True, logprobs=0))
    with torch.inference_mode():
        while not req.finished:
            engine.step()
    return req.output, torch.tensor([x["logprob"] for x in req.logprobs])


@needs_kernels
def test_moved_model_decodes_the_same_tokens_from_one_arena():
    """The tiny Llama 4 (MoE layers, int4 trunk and experts on herd's kernels, C++ decode layers): every tensor moves
    into one arena starting on a 2 MB boundary, and greedy decoding gives the same tokens and the same logprobs to
    the bit (the same arithmetic on the same values)."""
    cfg = preset("debug")
    model = quantize_model(Transformer(cfg).init_weights(std=0.3, seed=3).eval(), "int4", 32, only="all")
    fuse_model(model)
    assert kernels.use_herd_kernels(model) > 0 and decode.use_decode_kernels(model) > 0
    moved = copy.deepcopy(model)
    total = hugepages.move_to_huge_pages(moved)
    tensors = _tensors(moved)
    assert total >= sum(t.numel() * t.element_size() for t in tensors)
    start = min(t.data_ptr() for t in tensors)
    assert start % hugepages.HUGE_PAGE == 0 or not hasattr(hugepages.mmap, "MADV_HUGEPAGE")
    assert all(start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + total
               for t in tensors), "a tensor outside the arena"
    assert type(moved.layers[1].feed_forward.experts) is kernels.HerdInt4Experts
    tokens, lp = _decode(moved)
    ref_tokens, ref_lp = _decode(model)
    assert tokens == ref_tokens and len(set(tokens)) > 5
    assert torch.equal(lp, ref_lp)
    assert hugepages.move_to_huge_pages(moved) == 0, "a second call moves nothing"
    twin = copy.deepcopy(moved)                   # a copy's tensors are new, in ordinary memory: it moves them
    assert hugepages.move_to_huge_pages(twin) == total


def test_shared_tensors_stay_shared_and_mapped_experts_stay_in_the_file():
    """A weight tied between two modules is copied once and both point at the copy; GGUF experts (views of a
    file's map: larger-than-memory models) keep their memory; dtypes, shapes and values survive."""
    shared = torch.randn(64, 32)
    a, b = nn.Linear(32, 64, bias=False), nn.Linear(32, 64, bias=False)
    a.weight = b.weight = nn.Parameter(shared.clone(), requires_grad=False)
    blocks = torch.randint(0, 255, (2, 32, 18), dtype=torch.uint8)        # 2 experts of 32 rows of Q4_0 blocks
    experts = GGUFExperts("Q4_0", blocks, blocks.clone(), torch.randint(0, 255, (2, 32, 18), dtype=torch.uint8))
    owner = nn.Module()
    owner.a, owner.b, owner.experts = a, b, experts
    owner.register_buffer("steps", torch.arange(5))
    mapped = [t.data_ptr() for t in (experts.w1, experts.w3, experts.w2)]
    hugepages.move_to_huge_pages(owner)
    assert owner.a.weight is owner.b.weight and torch.equal(owner.a.weight, shared)
    assert owner.steps.dtype == torch.long and torch.equal(owner.steps, torch.arange(5))
    assert [t.data_ptr() for t in (experts.w1, experts.w3, experts.w2)] == mapped


def _anon_huge_kb(address: int) -> int | None:
    """AnonHugePages of the mapping holding `address` in /proc/self/smaps (None where there is none)."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        lo, hi = (int(x, 16) for x in block.split(" ", 1)[0].split("-"))
        if lo <= address < hi:
            m = re.search(r"AnonHugePages:\s+(\d+) kB", block)
            return int(m.group(1)) if m else None
    return None


def _thp_fallbacks() -> int:
    """The kernel's count of huge-page faults that fell back to 4 KB pages (0 where it does not say)."""
    try:
        m = re.search(r"thp_fault_fallback (\d+)", Path("/proc/vmstat").read_text())
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


@pytest.mark.skipif(hugepages.thp_mode() not in ("always", "madvise") or not os.path.exists("/proc/self/smaps"),
                    reason="the kernel offers no transparent huge pages here")
def test_arena_is_in_huge_pages():
    before = _thp_fallbacks()
    buf = hugepages.huge_buffer(8 << 20)
    buf.fill_(1)                                  # pages are made when first written
    if _thp_fallbacks() > before:
        pytest.skip("the kernel had no free 2 MB page and fell back to 4 KB pages (memory fragmented)")
    assert buf.data_ptr() % hugepages.HUGE_PAGE == 0
    assert (_anon_huge_kb(buf.data_ptr()) or 0) >= 8 << 10
