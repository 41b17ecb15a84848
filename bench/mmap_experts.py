"""Decode with a GGUF file's routed experts mapped from the file (herd.load(..., mmap_experts=True)) against the
in-memory packed load, each in its own process, optionally under a memory limit smaller than the file: decode tok/s,
peak anonymous memory, file-backed memory and the page faults that went to the disk.

    python -m bench.mmap_experts MODEL.gguf [--modes mapped,in_memory] [--threads 2] [--decode 16] [--limit-gib G]

--limit-gib puts each run in a new memory cgroup below this process's own (v1 memory.limit_in_bytes or v2 memory.max;
it counts page cache as well as anonymous memory) and drops the file from the page cache first, so its pages are
read, and charged, inside the limit. Where no cgroup can be made the run says so and stops.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 2**30


# ---- the measured process ------------------------------------------------------------------------------------------
def status_kib(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def major_faults() -> int:
    """Page faults of this process that read from the disk (/proc/self/stat field 12)."""
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[9])


class PeakAnon:
    """The largest RssAnon seen, sampled every 5 ms by a thread (load transients included)."""

    def __init__(self):
        self.peak, self._stop = status_kib("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, status_kib("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_kib("RssAnon")) * 1024


def child(args) -> dict:
    import torch

    import herd
    from herd.cpu import status
    from herd.cpu.threads import set_threads
    from herd.engine import Engine, SamplingParams

    threads = set_threads(args.threads)
    anon_start = status_kib("RssAnon") * 1024
    peak = PeakAnon()
    t0 = time.perf_counter()
    model = herd.load(args.model, quant="packed", prepare=True, mmap_experts=args.mode == "mapped")
    load_s = time.perf_counter() - t0
    anon_loaded = status_kib("RssAnon") * 1024
    prompt = torch.randint(3, model.config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0))
    engine = Engine(model, max_batch=1, max_seq_len=args.prompt + args.decode + 8)
    req = engine.add(prompt.tolist(), SamplingParams(max_tokens=args.decode + 1, ignore_eos=True))
    t1 = time.perf_counter()
    while not req.output:                                # prefill, a piece per step, + the first token
        engine.step()
    t2, faults = time.perf_counter(), major_faults()
    step_s = []
    while not req.finished:
        s = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - s)
    t3 = time.perf_counter()
    return {"mode": args.mode, "threads": threads, "load_s": round(load_s, 1),
            "prefill_tok_s": round(args.prompt / (t2 - t1), 2), "decode_tok_s": round(args.decode / (t3 - t2), 3),
            "decode_step_ms_min_median_max": [round(1000 * f(step_s), 1) for f in
                                              (min, lambda v: sorted(v)[len(v) // 2], max)],
            "major_faults_per_token": round((major_faults() - faults) / args.decode, 1),
            "peak_anon_gib": round((peak.stop()) / GIB, 3), "anon_at_start_gib": round(anon_start / GIB, 3),
            "anon_after_load_gib": round(anon_loaded / GIB, 3), "anon_end_gib": round(status_kib("RssAnon") / 2**20, 3),
            "file_backed_end_gib": round(status_kib("RssFile") * 1024 / GIB, 3),
            "peak_rss_gib": round(status_kib("VmHWM") * 1024 / GIB, 3), "kernels": status(model)}


# ---- the parent: a cgroup per run ----------------------------------------------------------------------------------
def own_memory_cgroup() -> tuple[Path, str] | None:
    """(this process's memory cgroup folder, 'v1' or 'v2'), or None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), "v1"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/"), "v2"
    return None


def make_limited_cgroup(limit: int) -> tuple[Path, str]:
    found = own_memory_cgroup()
    if found is None:
        raise SystemExit("no memory cgroup found for this process (/proc/self/cgroup): cannot set --limit-gib")
    parent, version = found
    d = parent / f"herd_mmap_bench_{os.getpid()}"
    try:
        d.mkdir()
        (d / ("memory.limit_in_bytes" if version == "v1" else "memory.max")).write_text(str(limit))
    except OSError as e:
        raise SystemExit(f"cannot make a memory cgroup under {parent} ({e}): run without --limit-gib") from None
    return d, version


def drop_from_page_cache(path: Path):
    """Ask the kernel to drop the file's clean cached pages, so the next reads come from the disk and are charged to
    the reader's cgroup."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_one(args, mode: str, limit: int | None) -> dict:
    cmd = [sys.executable, "-m", "bench.mmap_experts", str(args.model), "--child", mode, "--threads",
           str(args.threads), "--decode", str(args.decode), "--prompt", str(args.prompt)]
    drop_from_page_cache(args.model)
    cg = None
    if limit:
        cg, version = make_limited_cgroup(limit)
    try:
        procs = cg / "cgroup.procs" if cg else None
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                preexec_fn=(lambda: procs.write_text(str(os.getpid()))) if procs else None)
        out, _ = proc.communicate()
        peak_cg = None
        if cg is not None and version == "v1":
            peak_cg = int((cg / "memory.max_usage_in_bytes").read_text()) / GIB
        elif cg is not None:
            peak_file = cg / "memory.peak"
            peak_cg = int(peak_file.read_text()) / GIB if peak_file.exists() else None
    finally:
        if cg is not None:
            for _ in range(50):                     # the cgroup empties once the child is reaped
                try:
                    cg.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
    if proc.returncode != 0:
        why = "killed (SIGKILL: the memory limit's OOM killer)" if proc.returncode == -9 else f"rc {proc.returncode}"
        return {"mode": mode, "failed": why}
    res = json.loads(out.strip().splitlines()[-1])
    if peak_cg is not None:
        res["cgroup_peak_gib"] = round(peak_cg, 3)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="a GGUF file with routed experts (bench/scout_gguf.py writes one)")
    ap.add_argument("--modes", default="mapped,in_memory", help="comma-separated: mapped, in_memory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (random ids)")
    ap.add_argument("--decode", type=int, default=16, help="tokens decoded after the first")
    ap.add_argument("--limit-gib", type=float, default=None, help="memory limit of each run (a cgroup), GiB")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return
    from herd.gguf import routed_expert_bytes

    limit = int(args.limit_gib * GIB) if args.limit_gib else None
    size = args.model.stat().st_size
    print(json.dumps({"file": str(args.model), "file_gib": round(size / GIB, 3),
                      "routed_experts_gib": round(routed_expert_bytes(args.model) / GIB, 3),
                      "limit_gib": args.limit_gib, "threads": args.threads, "prompt": args.prompt,
                      "decode": args.decode, "loadavg": os.getloadavg(), "cpu": os.cpu_count()}))
    for mode in args.modes.split(","):
        print(json.dumps(run_one(args, mode, limit)), flush=True)
    print(json.dumps({"loadavg_end": os.getloadavg()}))


if __name__ == "__main__":
    main()
