"""Data parallelism over torch.distributed, applied to an already-built model from outside (model.py knows nothing
of it): DDP (replicated weights, averaged gradients) or FSDP2 `fully_shard` (weights, gradients and optimizer state
sharded across ranks). Launch with torchrun; gloo on CPU, nccl on GPU."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> Dist:
    """Join the torchrun process group when RANK/WORLD_SIZE are set; a plain single process otherwise."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(device=torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev)


@contextlib.contextmanager
def distributed(device: str | None = None):
    """init_distributed for the length of a `with` block. A process group joined here is destroyed on leaving it,
    error or not: gloo's worker threads still alive when the interpreter exits abort the process ("terminate called
    without an active exception", SIGABRT), which failed a 2-process FSDP run that had finished its work. A group the
    caller had already joined is left to the caller."""
    joined_here = not (dist.is_available() and dist.is_initialized())
    d = init_distributed(device)
    try:
        yield d
    finally:
        if joined_here:
            cleanup()


def apply_ddp(model, d: Dist):
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def apply_fsdp(model, param_dtype=None):
    """FSDP2: each block is one all-gather unit, then the root (embeddings, final norm, output)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (default) over ranks, in place; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
