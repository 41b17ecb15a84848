"""Load test for any OpenAI-compatible server: N streaming clients, M chat requests in total. Reports throughput,
time to first token (TTFT) and inter-token latency (ITL) at p50/p95/p99, and the cost per million output tokens at
a given machine price. Standard library only (http.client in threads), so it measures the server, not a client."""
from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import numpy as np

PROMPTS = [
    "Write a short story about a llama who learns to code.",
    "Explain how a transformer language model generates text, step by step.",
    "List ten facts about the Moon.",
    "Describe the water cycle to a ten-year-old.",
    "What are the pros and cons of electric cars?",
    "Give me a recipe for a simple vegetable soup.",
    "Summarize the history of the printing press.",
    "How do vaccines train the immune system?",
]


def _split(url: str):
    u = urlsplit(url if "://" in url else "http://" + url)
    base = u.path.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80), base


def _connection(scheme, host, port, timeout):
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    return cls(host, port, timeout=timeout)


def _headers(api_key):
    h = {"Content-Type": "application/json"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


class BenchError(ValueError):
    """The server under test cannot be used: unreachable, refusing, or not OpenAI-shaped."""


def first_model(url: str, api_key: str | None = None, timeout: float = 30) -> str:
    scheme, host, port, base = _split(url)
    try:
        conn = _connection(scheme, host, port, timeout)
        conn.request("GET", base + "/v1/models", headers=_headers(api_key))
        r = conn.getresponse()
        body = r.read()
    except OSError as e:                        # refused, unreachable, timed out, reset
        raise BenchError(f"cannot reach {url} ({e.strerror or type(e).__name__}): is the server running at that "
                         "address?") from None
    if r.status != 200:
        raise BenchError(f"GET {url}/v1/models: HTTP {r.status}: {body[:200]!r}")
    try:
        return json.loads(body)["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"GET {url}/v1/models did not answer an OpenAI model list: {body[:200]!r}") from None
    finally:
        conn.close()


def stream_one(url: str, payload: dict, api_key: str | None = None, timeout: float = 600.0) -> dict:
    """Stream one chat completion; returns its timings (ttft, itl in s; times: perf_counter of each piece of text),
    token count, latency and error (None when it went well)."""
    scheme, host, port, base = _split(url)
    conn = _connection(scheme, host, port, timeout)
    out = {"ttft": None, "itl": [], "times": [], "tokens": 0, "error": None, "latency": None}
    t0 = time.perf_counter()
    try:
        conn.request("POST", base + "/v1/chat/completions", body=json.dumps(payload), headers=_headers(api_key))
        r = conn.getresponse()
        if r.status != 200:
            out["error"] = f"HTTP {r.status}: {r.read()[:200]!r}"
            return out
        last, chunks, usage, done = None, 0, None, False
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            msg = json.loads(data)
            if "error" in msg:
                out["error"] = msg["error"].get("message", "error event")
                return out
            if msg.get("usage"):
                usage = msg["usage"]
            for c in msg.get("choices") or []:
                d = c.get("delta") or {}
                if d.get("content") or d.get("tool_calls"):
                    now = time.perf_counter()
                    out["times"].append(now)             # when each piece of text arrived (perf_counter)
                    if last is None:
                        out["ttft"] = now - t0
                    else:
                        out["itl"].append(now - last)
                    last = now
                    chunks += 1
        if not done:
            out["error"] = "stream ended without [DONE]"
        out["tokens"] = usage["completion_tokens"] if usage else chunks
    except (OSError, http.client.HTTPException, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        out["latency"] = time.perf_counter() - t0
        conn.close()
    return out


def chat_payload(model: str, text: str, max_tokens: int, ignore_eos: bool = False) -> dict:
    """A streaming, greedy chat request of one user message, asking for usage in the last event."""
    payload = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
               "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": text}]}
    if ignore_eos:
        payload["ignore_eos"] = True
    return payload


def run_bench(url: str, concurrency: int = 8, requests: int = 32, max_tokens: int = 128, model: str | None = None,
              api_key: str | None = None, prompt: str | None = None, ignore_eos: bool = False,
              timeout: float = 600.0) -> dict:
    """Send `requests` streaming chat requests from `concurrency` threads; return the raw numbers."""
    if concurrency < 1 or requests < 1 or max_tokens < 1:
        raise ValueError("--concurrency, --requests and --max-tokens must be >= 1")
    model = model or first_model(url, api_key)
    todo = list(range(requests))
    lock = threading.Lock()
    results: list[dict] = []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            payload = chat_payload(model, prompt or PROMPTS[i % len(PROMPTS)], max_tokens, ignore_eos)
            r = stream_one(url, payload, api_key, timeout)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(min(concurrency, requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    return {"url": url, "model": model, "concurrency": concurrency, "requests": requests, "ok": len(ok),
            "failed": len(results) - len(ok), "errors": sorted({r["error"] for r in results if r["error"]})[:5],
            "wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
            "ttft_s": [r["ttft"] for r in ok if r["ttft"] is not None],
            "itl_s": [x for r in ok for x in r["itl"]], "latency_s": [r["latency"] for r in ok]}


def percentiles(xs: list[float], ps=(50, 95, 99)) -> list[float]:
    return [float(v) for v in np.percentile(xs, ps)] if xs else [float("nan")] * len(ps)


def cost_per_million(usd_per_hour: float, tokens_per_s: float) -> float:
    """Dollars per 1M output tokens for a machine at usd_per_hour that sustains tokens_per_s."""
    return usd_per_hour / 3600.0 / tokens_per_s * 1e6 if tokens_per_s > 0 else float("inf")


def format_report(r: dict, usd_per_hour: float | None = None) -> str:
    ms = lambda xs: "  ".join(f"p{p} {v * 1000:8.1f}" for p, v in zip((50, 95, 99), percentiles(xs)))
    lines = [f"server        {r['url']}  model {r['model']}",
             f"requests      {r['ok']} ok, {r['failed']} failed, concurrency {r['concurrency']}",
             f"duration      {r['wall_s']:.2f} s",
             f"output        {r['output_tokens']} tokens, {r['tokens_per_s']:.1f} tok/s, "
             f"{r['requests_per_s']:.2f} req/s",
             f"TTFT ms       {ms(r['ttft_s'])}",
             f"ITL ms        {ms(r['itl_s'])}",
             f"latency ms    {ms(r['latency_s'])}"]
    if usd_per_hour is not None:
        lines.append(f"cost          ${cost_per_million(usd_per_hour, r['tokens_per_s']):.2f} per 1M output tokens "
                     f"at ${usd_per_hour:g}/h")
    for e in r["errors"]:
        lines.append(f"error         {e}")
    return "\n".join(lines)
