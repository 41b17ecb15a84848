"""A server that one bad request cannot stall (issue 22), live on 127.0.0.1 with a tiny random model: each defect the
issue found has its regression test here, then a short soak (bench/soak.py's, on the tiny model: normal streams while
a hostile client sends each abusive input), graceful shutdown on SIGTERM, and schemathesis with all its checks."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jsonschema
import pytest

from bench.soak import KEY as SOAK_KEY, hostile_inputs, itl, report, run_phase, send_hostile
from herd.tokenizer import load_tokenizer
from test_server import LiveServer
from tiny_chat import write_tiny_chat_model

openai = pytest.importorskip("openai")
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("abuse_models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    """The key the soak uses, /metrics and the docs behind it, a browser origin, chat's default max_tokens at 7."""
    s = LiveServer([f"tiny={tiny_folder}", "--api-key", SOAK_KEY, "--protect-metrics", "--cors-origin", ORIGIN,
                    "--default-max-tokens", "7", "--max-seq-len", "4096", "--max-batch", "8"],
                   tmp_path_factory.mktemp("logs") / "abuse.log")
    yield s
    s.stop()


def request(s, method, path, body=None, headers=None, key=SOAK_KEY, conn=None):
    """(status, headers, parsed JSON or text) of one request; conn: an http.client connection to reuse."""
    conn = conn or http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
    hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, data, hdrs)
    r = conn.getresponse()
    text = r.read().decode()
    try:
        return r.status, r.headers, json.loads(text)
    except ValueError:
        return r.status, r.headers, text


def user(text):
    return [{"role": "user", "content": text}]


def metric(s, name, **labels) -> float:
    status, _, text = request(s, "GET", "/metrics")
    assert status == 200
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and want <= set(line[len(name) + 1:line.index("}")].split(",")):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- the five defects ----------------------------------------------------------------------------------------------
def test_stop_string_limits(server):
    """1: a stop string's length and their count are capped, and the 400 names the flag; stop strings at the cap
    cost linear time (tests/test_stops.py), so a request with them is served like any other."""
    status, _, body = request(server, "POST", "/v1/completions", {"prompt": "hi", "stop": ["a" * 300_000]})
    assert status == 400 and "--max-stop-chars" in body["error"]["message"] and body["error"]["param"] == "stop"
    status, _, body = request(server, "POST", "/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]})
    assert status == 400 and "(herd serve --max-stop)" in body["error"]["message"]
    t0 = time.monotonic()
    status, _, body = request(server, "POST", "/v1/completions", {
        "prompt": "hi", "max_tokens": 64, "ignore_eos": True, "stop": [("ab" * 500)[:999] + c for c in "wxyz"]})
    assert status == 200 and body["usage"]["completion_tokens"] == 64 and time.monotonic() - t0 < 30


def test_body_limit_and_prompt_length_before_tokenizing(server):
    """2: a body past --max-body-mb is refused (413) from its Content-Length or as its chunks arrive, before it is
    read whole; a prompt longer than the context could hold is refused before it is tokenized."""
    for h in hostile_inputs(1000):
        if h.expect == 413:
            status, secs = send_hostile(server.port, h)
            assert status == 413 and secs < 30, h.name
    t0 = time.monotonic()
    status, _, body = request(server, "POST", "/v1/completions", {"prompt": "word " * 1_600_000})   # 8 MB
    assert status == 400 and body["error"]["code"] == "context_length_exceeded" and time.monotonic() - t0 < 10
    assert "no token is longer than" in body["error"]["message"]


def test_tokenizing_releases_the_gil(tiny_folder):
    """2: the server tokenizes in a thread; that only frees the event loop if the tokenizer lets go of the GIL
    (tokenizers' encode holds it: 6.7 s of 6.9 s on 2.2 MB; encode_batch_fast, which Tokenizer.encode uses, does
    not). The main thread keeps ticking while a thread encodes ~1.3 MB."""
    tok = load_tokenizer(tiny_folder)
    text = "The quick brown fox jumps over the lazy dog; llamas live in herds. " * 20_000
    done, gaps = threading.Event(), []
    worker = threading.Thread(target=lambda: (tok.encode(text), done.set()))
    t_last = time.perf_counter()
    worker.start()
    while not done.is_set():
        time.sleep(0.002)
        now = time.perf_counter()
        gaps.append(now - t_last)
        t_last = now
    worker.join()
    assert len(gaps) > 10 and max(gaps) < 0.5, f"main thread stalled {max(gaps):.2f} s while tokenizing"


def test_lone_surrogates_are_a_clean_400(server):
    """3: "\\ud800" is valid JSON but not text; it was a TypeError in the tokenizer, a 500 and a dropped
    keep-alive connection. Now a 400 naming where it is, on a connection that goes on serving."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    bodies = {
        "/v1/chat/completions": [b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
                                 b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
                                 b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
                                 b'"function": {"name": "f", "parameters": {"type": "object", "x\\ud800": 1}}}]}'],
        "/v1/completions": [b'{"prompt": "\\ud800", "max_tokens": 2}', b'{"prompt": ["ok", "\\ud83d"]}',
                            b'{"prompt": "hi", "stop": ["\\udc00"]}'],
    }
    for path, items in bodies.items():
        for raw in items:
            status, headers, body = request(server, "POST", path, raw, conn=conn)
            assert status == 400 and "lone UTF-16 surrogate" in body["error"]["message"], raw
            assert headers.get("connection") != "close"
    status, _, body = request(server, "POST", "/v1/completions", {"prompt": "hi \U0001f999", "max_tokens": 2},
                              conn=conn)                               # a real pair still works, same connection
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def test_non_streaming_disconnect_is_a_quiet_499(server):
    """4: a non-streaming client that hangs up logged two asyncio.InvalidStateError tracebacks and counted a 500.
    Now its request is cancelled and counted as 499 (client closed request), with nothing in the log."""
    before_499 = metric(server, "herd_requests_total", endpoint="/v1/completions", status="499")
    cancelled = metric(server, "herd_finished_requests_total", reason="cancelled")
    (hangup,) = [h for h in hostile_inputs(1000) if h.send == "hangup"]
    for _ in range(2):
        assert send_hostile(server.port, hangup)[0] is None
    deadline = time.monotonic() + 30
    while metric(server, "herd_finished_requests_total", reason="cancelled") - cancelled < 2:
        assert time.monotonic() < deadline, "the abandoned requests were not cancelled"
        time.sleep(0.2)
    assert metric(server, "herd_requests_total", endpoint="/v1/completions", status="499") - before_499 == 2
    assert metric(server, "herd_requests_total", status="500") == 0
    log = open(server.log_path).read()
    assert "InvalidStateError" not in log and "Traceback" not in log


# ---- 5: protocol details -------------------------------------------------------------------------------------------
PICK = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}}, "required": ["city", "n"]}}}


def test_forced_call_cut_by_max_tokens_agrees_streamed_and_not(server):
    """A forced call cut by max_tokens: non-streamed, it was the raw JSON text in content; now both paths give the
    same tool calls (arguments as far as they got), no content, finish_reason length."""
    c = server.client(api_key=SOAK_KEY)
    seen_partial = 0
    for max_tokens in (6, 14, 22, 30):
        kw = dict(model="tiny", messages=user("call it"), max_tokens=max_tokens, temperature=0, tools=[PICK],
                  tool_choice="required")
        whole = c.chat.completions.create(**kw).choices[0]
        args, names, content, finish = {}, {}, "", None
        for ch in c.chat.completions.create(**kw, stream=True):
            for choice in ch.choices:
                content += choice.delta.content or ""
                finish = choice.finish_reason or finish
                for d in choice.delta.tool_calls or []:
                    names[d.index] = names.get(d.index, "") + (d.function.name or "")
                    args[d.index] = args.get(d.index, "") + (d.function.arguments or "")
        assert whole.finish_reason == finish
        assert whole.message.content is None and content == ""
        calls = whole.message.tool_calls or []
        assert [(x.function.name, x.function.arguments) for x in calls] == \
            [(names[k], args[k]) for k in sorted(args)]
        if whole.finish_reason == "length" and calls:
            seen_partial += 1
    assert seen_partial >= 2


def test_json_object_with_a_schema_is_honoured(server):
    """instructor's JSON_SCHEMA mode: response_format {"type": "json_object", "schema": ...}; random weights at
    temperature 1 still answer JSON that validates."""
    schema = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["city", "n"], "additionalProperties": False}
    r = server.client(api_key=SOAK_KEY).chat.completions.create(
        model="tiny", messages=user("json"), max_tokens=40, temperature=1.0, n=4, seed=1,
        response_format={"type": "json_object", "schema": schema})
    for ch in r.choices:
        jsonschema.validate(json.loads(ch.message.content), schema)


def test_key_before_body_405_allow_and_cors(server):
    status, _, body = request(server, "POST", "/v1/chat/completions", b"{not json", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"          # the key first: 401, not 400
    status, _, body = request(server, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, headers, _ = request(server, "DELETE", "/v1/models")
    assert status == 405 and headers["allow"] == "GET"
    status, headers, _ = request(server, "OPTIONS", "/v1/chat/completions", key=None, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = request(server, "GET", "/v1/models", headers={"Origin": ORIGIN})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = request(server, "GET", "/v1/models", headers={"Origin": "http://elsewhere.example"})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_strict_types_and_openai_rules(server):
    for path, body, param in [("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
                              ("/v1/completions", {"prompt": [[False]]}, "prompt"),
                              ("/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
                              ("/v1/completions", {"prompt": []}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "17 C"}]},
                               "messages"),
                              ("/v1/chat/completions", {"messages": [{"role": "tool", "tool_call_id": "c1"}]},
                               "messages")]:
        status, _, r = request(server, "POST", path, body)
        assert status == 400 and r["error"]["param"].startswith(param), (body, r)
    status, _, r = request(server, "POST", "/v1/completions", {"prompt": "", "max_tokens": 3})   # as OpenAI does
    assert status == 200 and r["usage"]["prompt_tokens"] == 1 and r["usage"]["completion_tokens"] >= 1
    # chat's default max_tokens is --default-max-tokens (7 here), not the rest of the context
    status, _, r = request(server, "POST", "/v1/chat/completions", {"messages": user("hi"), "ignore_eos": True})
    assert status == 200 and r["usage"]["completion_tokens"] == 7


def test_limits_name_their_flag(server):
    deep = {}
    for _ in range(100):
        deep = {"type": "array", "items": deep}
    tool = lambda i, params=None: {"type": "function", "function": {"name": f"t{i}", "parameters": params or {}}}
    cases = [({"messages": user("hi") * 1025}, "--max-messages"),
             ({"messages": user("hi"), "tools": [tool(i) for i in range(129)]}, "--max-tools"),
             ({"messages": user("hi"), "tools": [tool(0, deep)]}, "--max-schema-depth"),
             ({"messages": user("hi"), "response_format": {"type": "json_schema", "json_schema": {
                 "name": "x", "schema": {"type": "object", "description": "x" * 70_000}}}}, "--max-schema-chars")]
    for body, flag in cases:
        status, _, r = request(server, "POST", "/v1/chat/completions", body)
        assert status == 400 and flag in r["error"]["message"] and r["error"]["code"] == "limit_exceeded", r


def test_metrics_and_docs_behind_the_key(server):
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert request(server, "GET", path, key=None)[0] == 401
        assert request(server, "GET", path)[0] == 200
    assert request(server, "GET", "/health", key=None)[0] == 200
    doc = request(server, "GET", "/openapi.json")[2]
    assert doc["paths"]["/v1/chat/completions"]["post"]["security"] == [{"apiKey": []}]
    assert "security" not in doc["paths"]["/health"]["get"]


# ---- a short soak: normal streams while a hostile client sends each abusive input -------------------------------
def test_soak_with_a_hostile_client(server):
    """bench/soak.py on the tiny model (4 streams, 8 s phases): every hostile input gets its answer, /health answers
    within 1 s throughout, no normal stream fails, and their ITL p99 stays under 2x the no-abuse value plus 100 ms:
    the tiny model's steps take ~15 ms, so parsing the largest bodies the limits allow (~0.1 s each on a loaded
    2-core machine) shows in its p99; the defects this guards against stalled streams for 8-13 s. The issue's
    target (2x, 16 streams, the default model): python -m bench.soak."""
    base = run_phase(server.port, 4, 8, 32, None)
    abuse = run_phase(server.port, 4, 8, 32, hostile_inputs(40_000))  # tokenized: under 4095 x 13 characters
    print(report(base, abuse))
    assert base["errors"] == abuse["errors"] == []
    assert all(status == h.expect for h, status, _ in abuse["outcomes"]), report(base, abuse)
    assert max(base["health"] + abuse["health"]) < 1.0
    assert itl(abuse)[1] < 2 * itl(base)[1] + 0.1, report(base, abuse)
    log = open(server.log_path).read()
    assert "Traceback" not in log


# ---- 429 and shutdown ----------------------------------------------------------------------------------------------
def _stream(port, out):
    body = json.dumps({"prompt": "go", "max_tokens": 4000, "ignore_eos": True, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    out.append((r.status, r.read().decode().strip().split("\n\n")))


def test_retry_after_then_sigterm_exits_within_5_s(tiny_folder, tmp_path):
    s = LiveServer([f"tiny={tiny_folder}", "--max-batch", "1", "--max-queue", "1", "--max-seq-len", "4096"],
                   tmp_path / "shutdown.log")
    try:
        out = []
        threads = [threading.Thread(target=_stream, args=(s.port, out)) for _ in range(2)]   # one runs, one waits
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while True:
            tiny = json.loads(urllib.request.urlopen(s.url + "/health", timeout=10).read())["models"]["tiny"]
            if tiny["running"] == 1 and tiny["waiting"] == 1:
                break
            assert time.monotonic() < deadline, tiny
            time.sleep(0.1)
        status, headers, body = request(s, "POST", "/v1/completions", {"prompt": "me too"}, key=None)
        assert status == 429 and headers["retry-after"] == "1" and body["error"]["code"] == "rate_limit_exceeded"
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(timeout=30)
        took = time.monotonic() - t0
        for t in threads:
            t.join(timeout=30)
        assert took < 5, f"exited {took:.1f} s after SIGTERM"
        # both streams ended properly: OpenAI's error shape, then [DONE]
        assert len(out) == 2 and all(status == 200 and events[-1] == "data: [DONE]" and
                                     "server shutting down" in events[-2] for status, events in out)
    finally:
        s.stop()


# ---- schemathesis, every check -------------------------------------------------------------------------------------
def test_schemathesis_all_checks(server, tmp_path):
    """schemathesis's CLI with --checks all (status codes, content types, headers and bodies against the server's
    own OpenAPI document, schema-invalid data refused, undeclared methods 405 with Allow, the declared key
    enforced) over every phase. One exception, stated in the config: a request the schema allows may still be a
    400 for what a JSON schema cannot say (the context length, tool_choice without tools, top_logprobs without
    logprobs), so positive_data_acceptance takes 400 as well."""
    config = tmp_path / "schemathesis.toml"
    config.write_text('[checks.positive_data_acceptance]\nexpected-statuses = ["2xx", "400", "401", "404", "429"]\n')
    r = subprocess.run([sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
                        server.url + "/openapi.json", "-H", f"Authorization: Bearer {SOAK_KEY}", "--checks", "all",
                        "--max-examples", "40", "--seed", "1", "--request-timeout", "60"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)     # its cache: not in the repo
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "No issues found" in r.stdout
    assert metric(server, "herd_requests_total", status="500") == 0
