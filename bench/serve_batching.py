"""Serving as operators read it: herd's server beside llama.cpp's server on the same GGUF, 1 to 32 concurrent
streaming clients, and one long prompt arriving while 8 streams decode. Not a test: on a shared machine the numbers
move with whatever else runs, so they are measured here and reported.

    python -m bench.serve_batching [--model GGUF] [--clients 1,2,4,8,16,32] [--max-tokens 64] [--threads N]
        [--llama-server PATH] [--usd-per-hour 0.10] [--long-prompt 2000]

For each engine and each client count: aggregate output tok/s, per-stream tok/s (aggregate / clients), TTFT and
ITL p50/p95/p99 (ms) and $ per 1M output tokens; every request produces exactly --max-tokens tokens (ignore_eos),
2 requests per client. Then 8 clients stream 400 tokens each; once they run, a --long-prompt-token prompt arrives:
its prefill time, and the 8 streams' ITL p99 while it prefills against their ITL p99 before it came.

Each engine runs in its own process in its own documented configuration, printed beside its figures:
- herd: `herd serve GGUF --threads N --max-batch <most clients> --max-seq-len 4096` (continuous batching; prefill in
  budgeted pieces between decode steps; prefix cache), in the environment this script runs in.
- llama.cpp: its own HTTP server, `llama-server -m GGUF -t N -tb N --parallel <clients> -c <clients x 4096>`
  (continuous batching is on by default; one slot per client, as its docs advise), started afresh for each client
  count, in its default environment (no OMP_* variable). llama-cpp-python's own server handles one request at a
  time, so it is not the anchor. No PyPI package ships the llama-server binary; build it from the llama.cpp source
  vendored in llama-cpp-python's sdist (the same llama.cpp as the installed llama-cpp-python):
      pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d SRC && tar xzf SRC/*.tar.gz -C SRC
      cd SRC/llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -S . -B build -DCMAKE_BUILD_TYPE=Release \\
        -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF \\
        -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF && cmake --build build --target llama-server -j2
  and pass --llama-server build/bin/llama-server (or put it on PATH). Without it only herd is measured.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np

from herd.serve.bench import PROMPTS, chat_payload, cost_per_million, first_model, percentiles, run_bench, stream_one

SLOT_CONTEXT = 4096         # tokens of context per request (prompt + output), both engines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One engine's server process: started, waited for, stopped; `settings` says how it runs."""

    def __init__(self, name: str, argv: list[str], settings: str, env: dict | None = None):
        self.name, self.settings, self.port = name, settings, int(argv[argv.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{name} server did not start: {argv}\n{self.proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
        self.model = first_model(self.url)
        run_bench(self.url, concurrency=1, requests=1, max_tokens=4, ignore_eos=True)          # warm-up

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_herd(model: str, threads: int, max_batch: int) -> Server:
    argv = [sys.executable, "-m", "herd.cli", "serve", model, "--port", str(free_port()), "--threads", str(threads),
            "--max-batch", str(max_batch), "--max-seq-len", str(SLOT_CONTEXT), "--log-level", "warning"]
    return Server("herd", argv, f"herd serve --threads {threads} --max-batch {max_batch} "
                                f"--max-seq-len {SLOT_CONTEXT}")


def start_llama(binary: str, model: str, threads: int, slots: int) -> Server:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
    argv = [binary, "-m", model, "--port", str(free_port()), "--host", "127.0.0.1", "-t", str(threads),
            "-tb", str(threads), "--parallel", str(slots), "-c", str(slots * SLOT_CONTEXT), "--log-disable"]
    return Server("llama.cpp", argv, f"llama-server -t {threads} -tb {threads} --parallel {slots} "
                                     f"-c {slots * SLOT_CONTEXT}", env=env)


def sweep_row(server: Server, clients: int, max_tokens: int, usd_per_hour: float | None) -> dict:
    r = run_bench(server.url, concurrency=clients, requests=2 * clients, max_tokens=max_tokens, ignore_eos=True)
    if r["failed"]:
        print(f"  {server.name} {clients} clients: {r['failed']} failed: {r['errors']}", file=sys.stderr)
    ttft, itl = percentiles(r["ttft_s"]), percentiles(r["itl_s"])
    return {"engine": server.name, "clients": clients, "settings": server.settings, "agg": r["tokens_per_s"],
            "per_stream": r["tokens_per_s"] / clients, "ttft": ttft, "itl": itl, "failed": r["failed"],
            "usd": cost_per_million(usd_per_hour, r["tokens_per_s"]) if usd_per_hour else None}


def long_prompt_text(model_path: str, tokens: int) -> str:
    """A user message of about `tokens` tokens of the model's tokenizer (varied sentences, so no prefix repeats)."""
    from herd.tokenizer import load_tokenizer
    tok = load_tokenizer(model_path)
    parts, n, i = [], 0, 0
    while n < tokens:
        parts.append(f"Note {i}: {PROMPTS[i % len(PROMPTS)]} ")
        n += len(tok.encode(parts[-1]))
        i += 1
    return "Summarize these notes in one sentence. " + "".join(parts)


def long_prompt_during_decode(server: Server, text: str, streams: int = 8, stream_tokens: int = 400) -> dict:
    """`streams` clients decode; after 3 s a long prompt arrives. The streams' ITL p99 while it prefills (from its
    sending to its first token) against their ITL p99 before it arrived."""
    results = [None] * streams

    def client(i):
        results[i] = stream_one(server.url, chat_payload(server.model, PROMPTS[i % len(PROMPTS)], stream_tokens,
                                                         ignore_eos=True))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    sent = time.perf_counter()
    long = stream_one(server.url, chat_payload(server.model, text, 1, ignore_eos=True))
    first = sent + (long["ttft"] or float("nan"))
    for t in threads:
        t.join()
    before, during = [], []              # gaps between a stream's tokens: ending before the prompt came, or
    for r in results:                    # overlapping its prefill (a stall shows as one long gap across it)
        for a, b in zip(r["times"], r["times"][1:]):
            (during if a < first and b > sent else before if b < sent else []).append(b - a)
    p_before, p_during = np.percentile(before, 99) if before else float("nan"), \
        np.percentile(during, 99) if during else float("nan")
    return {"prefill_s": long["ttft"], "error": long["error"], "itl_p99_before": p_before,
            "itl_p99_during": p_during, "ratio": p_during / p_before, "n_during": len(during)}


def print_table(rows: list[dict]):
    print(f"{'engine':10} {'clients':>7} {'agg tok/s':>10} {'per stream':>10} {'TTFT p50':>9} "
          f"{'ITL p50':>8} {'p95':>7} {'p99':>7} {'$/1M':>7}  settings")
    for r in rows:
        usd = f"{r['usd']:.2f}" if r["usd"] is not None else "-"
        print(f"{r['engine']:10} {r['clients']:>7} {r['agg']:>10.1f} {r['per_stream']:>10.1f} "
              f"{r['ttft'][0] * 1e3:>9.0f} {r['itl'][0] * 1e3:>8.1f} {r['itl'][1] * 1e3:>7.1f} "
              f"{r['itl'][2] * 1e3:>7.1f} {usd:>7}  {r['settings']}")


def main():
    from herd.textgen import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model, SmolLM2-135M-Instruct)")
    ap.add_argument("--clients", default="1,2,4,8,16,32", help="client counts, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads of each engine")
    ap.add_argument("--llama-server", default=shutil.which("llama-server"), help="llama.cpp's server binary")
    ap.add_argument("--usd-per-hour", type=float, default=None, help="machine price, for the $/1M column")
    ap.add_argument("--long-prompt", type=int, default=2000, help="tokens of the prompt sent while 8 streams decode "
                                                                  "(0: skip)")
    args = ap.parse_args()
    model = args.model or str(default_model_path())
    clients = [int(c) for c in args.clients.split(",")]
    engines = ["herd"] + (["llama.cpp"] if args.llama_server else [])
    if not args.llama_server:
        print("llama.cpp: no llama-server binary (--llama-server, or on PATH): measuring herd only; see this "
              "script's docstring for how to build it", file=sys.stderr)
    print(f"model {model}\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    rows, long_rows = [], {}
    long_text = long_prompt_text(model, args.long_prompt) if args.long_prompt else None
    for engine in engines:
        if engine == "herd":
            server = start_herd(model, args.threads, max(max(clients), 9))
            try:
                rows += [sweep_row(server, c, args.max_tokens, args.usd_per_hour) for c in clients]
                if long_text:
                    long_rows[engine] = (long_prompt_during_decode(server, long_text), server.settings)
            finally:
                server.stop()
            continue
        for c in clients:
            server = start_llama(args.llama_server, model, args.threads, c)
            try:
                rows.append(sweep_row(server, c, args.max_tokens, args.usd_per_hour))
            finally:
                server.stop()
        if long_text:
            server = start_llama(args.llama_server, model, args.threads, 9)
            try:
                long_rows[engine] = (long_prompt_during_decode(server, long_text), server.settings)
            finally:
                server.stop()
    print_table(rows)
    report_ratios(rows, long_rows, args.long_prompt)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


def report_ratios(rows: list[dict], long_rows: dict, long_tokens: int):
    by = {(r["engine"], r["clients"]): r for r in rows}
    one, sixteen = by.get(("herd", 1)), by.get(("herd", 16))
    if one and sixteen:
        print(f"herd 16 clients vs 1: aggregate {sixteen['agg'] / one['agg']:.2f}x (target >= 6x); ITL p95 at 16 / "
              f"ITL p50 at 1: {sixteen['itl'][1] / one['itl'][0]:.2f}x (target <= 4x)")
    if sixteen and ("llama.cpp", 16) in by:
        print(f"herd vs llama.cpp server at 16 clients: {sixteen['agg'] / by[('llama.cpp', 16)]['agg']:.2f}x "
              "(target >= 2x)")
    for engine, (r, settings) in long_rows.items():
        print(f"{engine}: a {long_tokens}-token prompt while 8 streams decode: prefill {r['prefill_s']:.1f} s; "
              f"the streams' ITL p99 {r['itl_p99_before'] * 1e3:.0f} ms before, {r['itl_p99_during'] * 1e3:.0f} ms "
              f"during ({r['n_during']} gaps): {r['ratio']:.2f}x (target <= 3x)  [{settings}]"
              + (f"  error: {r['error']}" if r["error"] else ""))


if __name__ == "__main__":
    main()
