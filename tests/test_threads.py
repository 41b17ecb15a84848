"""herd/cpu/threads.py: the thread count from the cores this process may use (affinity, cgroup v2 quota)."""
import os

import pytest
import torch

from herd.cpu import threads


def test_cgroup_quota(tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("150000 100000\n")
    assert threads.cgroup_quota(f) == 1.5
    f.write_text("max 100000\n")
    assert threads.cgroup_quota(f) is None
    f.write_text("garbage")
    assert threads.cgroup_quota(f) is None
    assert threads.cgroup_quota(tmp_path / "absent") is None


def test_available_cores_takes_the_smaller_of_affinity_and_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    f = tmp_path / "cpu.max"
    f.write_text("max 100000\n")
    assert threads.available_cores(f) == affinity
    f.write_text("50000 100000\n")                  # half a CPU: still one thread
    assert threads.available_cores(f) == 1
    f.write_text(f"{(affinity + 8) * 100000} 100000\n")
    assert threads.available_cores(f) == affinity


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
        assert threads.set_threads(0) == threads.available_cores() == torch.get_num_threads()
        with pytest.raises(ValueError, match="--threads must be >= 0"):
            threads.set_threads(-1)
    finally:
        torch.set_num_threads(before)
