"""Soak and abuse (issue 22): while N normal clients stream, a hostile client sends each abusive input in turn. Reports
the normal streams' inter-token latency (ITL) p50 / p99 without and with the hostile client, /health's slowest answer
throughout, and what each hostile input got. Targets: ITL p99 under abuse < 2x its no-abuse value; /health < 1 s.

    python -m bench.soak [MODEL] [--clients 16] [--seconds 60] [--max-tokens 64] [--threads 2] [--serve-args ...]

Starts `herd serve MODEL` (default: the default model) on a free 127.0.0.1 port with an API key, warms it up with
normal load, runs a no-abuse phase then an abuse phase of --seconds each (the abuse phase lasts at least one pass over the hostile inputs), prints
the settings and the figures, and stops the server. tests/test_server_abuse.py runs a short one on a tiny model.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass

from herd.serve.limits import Limits

KEY = "soak-key"
STORY = [{"role": "user", "content": "Tell me a long story about a herd of llamas crossing the mountains."}]


@dataclass
class Hostile:
    """One abusive request. send: "post" (whole body), "declared" (a Content-Length of `declared` bytes, then only
    the body given), "chunked" (no Content-Length), "hangup" (the client leaves after 0.5 s). expect: the status
    it must get, None for a hang-up."""
    name: str
    path: str
    body: bytes
    expect: int | None
    send: str = "post"
    auth: bool = True
    declared: int = 0


def _json(**fields) -> bytes:
    return json.dumps(fields).encode()


def _nested(depth: int) -> dict:
    schema = {}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def hostile_inputs(tokenize_chars: int, seed: int = 0) -> list[Hostile]:
    """Issue 22's inputs and their kin. tokenize_chars: a prompt of random words that the server must tokenize (in
    a thread) before it can tell it is too long: pick it under the model's context x its longest token."""
    cap = Limits()
    rng = random.Random(seed)
    words = " ".join(rng.choice(["llama", "herd", "mountain", "stream", "token", "42", "ünïcode", "{"])
                     for _ in range(tokenize_chars // 4))[:tokenize_chars]
    chat = "/v1/chat/completions"
    cmpl = "/v1/completions"
    return [
        Hostile("one 300 KB stop string", cmpl, _json(prompt="hi", max_tokens=64, stop=["a" * 300_000]), 400),
        Hostile(f"{cap.max_stop} stop strings at the length cap, 64 tokens", cmpl,
                _json(prompt="hi", max_tokens=64, ignore_eos=True,
                      stop=[("ab" * cap.max_stop_chars)[:cap.max_stop_chars - 1] + c for c in "wxyz"[:cap.max_stop]]),
                200),
        Hostile("an 8 MB prompt", cmpl, _json(prompt="word " * 1_600_000, max_tokens=4), 400),
        Hostile(f"{len(words)} characters to tokenize", cmpl, _json(prompt=words, max_tokens=4), 400),
        Hostile("a 30 MB body (Content-Length)", cmpl, b"{" * (1 << 20), 413, send="declared", declared=30 << 20),
        Hostile("a 20 MB body in chunks", cmpl, b"{" * (20 << 20), 413, send="chunked"),
        Hostile("a lone surrogate in a message", chat, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
        Hostile("a lone surrogate in a prompt", cmpl, b'{"prompt": "\\ud800", "max_tokens": 2}', 400),
        Hostile("malformed JSON with no API key", chat, b"{not json", 401, auth=False),
        Hostile("JSON nested 100k deep", chat, b"[" * 100_000 + b"]" * 100_000, 400),
        Hostile("a schema nested 900 deep", chat, _json(messages=STORY, max_tokens=4, response_format={
            "type": "json_object", "schema": _nested(900)}), 400),
        Hostile("2000 messages", chat, _json(messages=STORY * 2000, max_tokens=4), 400),
        Hostile(f"{cap.max_body_objects - 100} content parts (objects, just under the cap)", chat,
                _json(messages=[{"role": "user", "content": [{"type": "text", "text": "llama"}] * 99}]
                      * ((cap.max_body_objects - 100) // 100), max_tokens=4), 400),
        Hostile(f"{cap.max_body_objects * 2} content parts", chat, _json(messages=[
            {"role": "user", "content": [{"type": "text", "text": "llama"}] * 199}] * 100, max_tokens=4), 413),
        Hostile(f"{cap.max_body_items - 10} token ids (values, just under the cap)", cmpl,
                _json(prompt=[7] * (cap.max_body_items - 10), max_tokens=4), 400),
        Hostile(f"{cap.max_body_items * 2} token ids", cmpl, _json(prompt=[7] * (cap.max_body_items * 2)), 413),
        Hostile('stream: "yes"', cmpl, _json(prompt="hi", max_tokens=2, stream="yes"), 400),
        Hostile("prompt [[false]]", cmpl, _json(prompt=[[False]], max_tokens=2), 400),
        Hostile("a non-streaming client that hangs up", cmpl, _json(prompt="hi", max_tokens=2000, ignore_eos=True),
                None, send="hangup"),
    ]


def send_hostile(port: int, h: Hostile, key: str = KEY, timeout: float = 120) -> tuple[int | None, float]:
    """(the status the server answered, None if none; seconds) over a raw socket, so a body can lie about its size."""
    t0 = time.perf_counter()
    head = [f"POST {h.path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", "Connection: close"]
    if h.auth:
        head.append(f"Authorization: Bearer {key}")
    head.append("Transfer-Encoding: chunked" if h.send == "chunked" else
                f"Content-Length: {h.declared if h.send == 'declared' else len(h.body)}")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            if h.send == "chunked":
                for i in range(0, len(h.body), 1 << 20):
                    piece = h.body[i:i + (1 << 20)]
                    s.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
                s.sendall(b"0\r\n\r\n")
            else:
                s.sendall(h.body)
        except OSError:              # the server answered and closed before taking it all (a 413)
            pass
        if h.send == "hangup":
            time.sleep(0.5)
            return None, time.perf_counter() - t0
        reply = b""
        try:
            while len(reply) < 16 and (chunk := s.recv(4096)):
                reply += chunk
        except OSError:
            pass
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None
    return status, time.perf_counter() - t0


def normal_client(port: int, done: threading.Event, max_tokens: int, gaps: list, errors: list, key: str = KEY):
    """Streams chat completions back to back until `done`; appends the gap between successive content chunks."""
    body = json.dumps({"messages": STORY, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8,
                       "stream": True})
    while not done.is_set():
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json",
                                                                "Authorization": f"Bearer {key}"})
            r = conn.getresponse()
            if r.status != 200:
                errors.append(f"HTTP {r.status}: {r.read()[:200]!r}")
                continue
            last = None
            for line in r:
                if line.startswith(b"data: [DONE]"):
                    break
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
            conn.close()
        except (OSError, http.client.HTTPException, ValueError) as e:
            errors.append(repr(e))


def poll_health(port: int, stop: threading.Event, latencies: list):
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
                r.read()
        except OSError:
            latencies.append(float("inf"))
        else:
            latencies.append(time.perf_counter() - t0)
        stop.wait(0.1)


def run_phase(port: int, clients: int, seconds: float, max_tokens: int, hostile: list[Hostile] | None) -> dict:
    """One phase: `clients` normal streams for `seconds` (and, with `hostile`, the hostile client sending each input
    in turn, at least once each, until the phase ends). The ITL gaps, /health latencies, errors, hostile outcomes."""
    until = time.monotonic() + seconds
    gaps, errors, health, outcomes = [], [], [], []
    done, stop = threading.Event(), threading.Event()
    threads = [threading.Thread(target=normal_client, args=(port, done, max_tokens, gaps, errors))
               for _ in range(clients)]
    threads.append(threading.Thread(target=poll_health, args=(port, stop, health)))
    for t in threads:
        t.start()
    while hostile and (len(outcomes) < len(hostile) or time.monotonic() < until):
        h = hostile[len(outcomes) % len(hostile)]
        status, secs = send_hostile(port, h)
        outcomes.append((h, status, secs))
    time.sleep(max(0.0, until - time.monotonic()))
    done.set()                   # the normal clients finish the requests they are in
    for t in threads[:-1]:
        t.join()
    stop.set()
    threads[-1].join()
    return {"gaps": gaps, "errors": errors, "health": health, "outcomes": outcomes}


def itl(phase: dict) -> tuple[float, float]:
    """ITL p50 and p99 of a phase, in seconds."""
    q = statistics.quantiles(phase["gaps"], n=100)
    return q[49], q[98]


def report(base: dict, abuse: dict) -> str:
    lines = ["", f"{'phase':<24}{'tokens':>8}{'ITL p50 ms':>12}{'ITL p99 ms':>12}{'/health max ms':>16}{'errors':>8}"]
    for name, p in (("no abuse", base), ("hostile client", abuse)):
        p50, p99 = itl(p)
        lines.append(f"{name:<24}{len(p['gaps']):>8}{p50 * 1e3:>12.1f}{p99 * 1e3:>12.1f}"
                     f"{max(p['health']) * 1e3:>16.1f}{len(p['errors']):>8}")
    lines += ["", "hostile inputs (the last time each was sent):"]
    last = {h.name: (h, status, secs) for h, status, secs in abuse["outcomes"]}
    for h, status, secs in last.values():
        ok = "ok " if status == h.expect else "BAD"
        lines.append(f"  {ok} {h.name:<48} {status if status is not None else 'hung up':>7} "
                     f"(expected {h.expect if h.expect is not None else 'hung up'}) in {secs:.2f} s")
    ratio = itl(abuse)[1] / itl(base)[1]
    worst = max(max(base["health"]), max(abuse["health"]))
    lines += ["", f"ITL p99 hostile / no abuse: {ratio:.2f}x (target < 2x): {'PASS' if ratio < 2 else 'FAIL'}",
              f"/health max {worst * 1e3:.0f} ms (target < 1000 ms): {'PASS' if worst < 1 else 'FAIL'}"]
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="default", help="what `herd serve` loads (default: the default model)")
    ap.add_argument("--clients", type=int, default=16, help="normal streaming clients")
    ap.add_argument("--seconds", type=float, default=60, help="length of each phase")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per normal request")
    ap.add_argument("--warmup", type=float, default=15, help="seconds of normal load before the measured phases")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="the server's torch threads")
    ap.add_argument("--tokenize-chars", type=int, default=300_000,
                    help="characters of the prompt the server must tokenize before refusing it")
    ap.add_argument("--serve-args", default="", help="more `herd serve` flags, e.g. '--dequantize'")
    args = ap.parse_args()
    port = _free_port()
    cmd = [sys.executable, "-m", "herd.cli", "serve", args.model, "--port", str(port), "--threads", str(args.threads),
           "--api-key", KEY, "--log-level", "warning", "--max-batch", str(args.clients), *args.serve_args.split()]
    print(f"server: {' '.join(cmd[2:])}\nclients {args.clients}, {args.seconds:.0f} s per phase, max_tokens "
          f"{args.max_tokens}, machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    server = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the server did not start")
                time.sleep(0.5)
        run_phase(port, args.clients, args.warmup, args.max_tokens, None)      # first prefills, allocations
        base = run_phase(port, args.clients, args.seconds, args.max_tokens, None)
        abuse = run_phase(port, args.clients, args.seconds, args.max_tokens, hostile_inputs(args.tokenize_chars))
        print(report(base, abuse))
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
