"""Milliseconds per batched decode step on the default model (SmolLM2-135M, packed Q4_1): Engine(max_batch=B) with B
short prompts running, a few warm steps, then `--steps` timed steps. Prints the settings and one line per B.

    python -m bench.batch_decode --batches 1 4 16 32 --steps 20 --threads 2
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32], help="rows decoded per step")
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size")
    ap.add_argument("--warm", type=int, default=3, help="untimed decode steps first")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (0 = every core this process may use)")
    args = ap.parse_args()

    import herd
    from herd.cpu.threads import set_threads
    from herd.engine import Engine, SamplingParams
    from herd.textgen import default_model_path

    threads = set_threads(args.threads)
    model = herd.load(default_model_path(), quant="packed", prepare=True)
    print(f"model {default_model_path().name}, quant packed, threads {threads}, steps {args.steps}, "
          f"load average {os.getloadavg()[0]:.2f}")
    prompts = [[1, 504, 3458, 314, 260, 4586 + i, 30, 216] for i in range(max(args.batches))]      # 8 tokens each
    params = SamplingParams(max_tokens=args.warm + args.steps + 2, ignore_eos=True)
    for B in args.batches:
        engine = Engine(model, max_batch=B, max_seq_len=512)
        for p in prompts[:B]:
            engine.add(p, params)
        engine.step()                                   # prefill (and the first token)
        for _ in range(args.warm):
            engine.step()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            engine.step()
        ms = (time.perf_counter() - start) / args.steps * 1e3
        cpu_ms = (time.process_time() - cpu_start) / args.steps * 1e3
        # CPU time: what the step cost this process's threads (spinning pool workers included), which a busy
        # machine inflates less than the wall time
        print(f"B={B:3d}: {ms:7.1f} ms/step, {B * 1e3 / ms:7.1f} tok/s aggregate, CPU {cpu_ms:7.1f} ms/step, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
