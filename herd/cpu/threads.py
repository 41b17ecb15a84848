"""How many CPU threads herd's matmuls should use: the cores this process may actually run on. Knows nothing of
models or kernels.

Why: torch's default is the machine's physical core count, which ignores a container's CPU quota (cgroup v2
cpu.max: `docker run --cpus 2` on a 64-core host still shows 64 cores) and, for some builds, the affinity mask
(`taskset`). More threads than the cores granted makes every parallel step wait for a thread the OS has not run yet.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """min(the CPUs in this process's affinity mask, the cgroup v2 quota rounded up), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_quota(cpu_max)
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def cgroup_quota(cpu_max: Path = CGROUP_CPU_MAX) -> float | None:
    """CPUs granted by cgroup v2's cpu.max ("QUOTA PERIOD" in microseconds, QUOTA "max" = no limit), or None."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max" or int(period) <= 0:
        return None
    return int(quota) / int(period)


def set_threads(n: int | None) -> int:
    """torch's intra-op threads (which herd's kernels use too) to n, or with n None / 0 to available_cores().
    Returns the count set."""
    import torch
    if n is not None and n < 0:
        raise ValueError(f"--threads must be >= 0 (0 = the cores this process may use), got {n}")
    count = n or available_cores()
    torch.set_num_threads(count)
    return count
