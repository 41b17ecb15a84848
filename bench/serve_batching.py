"""Continuous batching through the HTTP server: aggregate output tokens/s of 16 concurrent streaming clients against
one client's, on the default model (SmolLM2-135M-Instruct). The issue's target is >= 6x. Not a test: on a shared
2-core machine the ratio moves with whatever else runs, so it is measured here and reported.

    python -m bench.serve_batching [--threads N] [--max-tokens 64] [--clients 16] [--usd-per-hour 0.10]

Starts `herd serve` on a free 127.0.0.1 port, runs `herd bench-serve`'s load generator (herd.serve.bench) with
concurrency 1, then with concurrency --clients, every request producing exactly --max-tokens tokens (ignore_eos),
prints both reports and the ratio, and stops the server.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from herd.serve.bench import format_report, run_bench


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads of the server (default: every core; on a loaded machine 1 does better)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients of the batched run")
    ap.add_argument("--usd-per-hour", type=float, default=None, help="machine price, for the cost lines")
    ap.add_argument("--target", type=float, default=6.0, help="ratio to report PASS against")
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", "--port", str(port), "--threads",
                               str(args.threads), "--max-batch", str(args.clients), "--max-seq-len", "1024",
                               "--log-level", "warning"], env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("server did not start")
                time.sleep(0.5)
        run_bench(url, concurrency=1, requests=1, max_tokens=4, ignore_eos=True)        # warm-up
        one = run_bench(url, concurrency=1, requests=3, max_tokens=args.max_tokens, ignore_eos=True)
        many = run_bench(url, concurrency=args.clients, requests=args.clients * 2, max_tokens=args.max_tokens,
                         ignore_eos=True)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    print("== 1 client")
    print(format_report(one, args.usd_per_hour))
    print(f"== {args.clients} clients")
    print(format_report(many, args.usd_per_hour))
    ratio = many["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else float("nan")
    verdict = "PASS" if ratio >= args.target else "BELOW TARGET"
    print(f"== aggregate tokens/s, {args.clients} clients vs 1: {ratio:.2f}x ({verdict}, target {args.target:g}x)")


if __name__ == "__main__":
    main()
