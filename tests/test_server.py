"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client.

Servers run as `herd serve` subprocesses (one torch thread each): tiny random models where only the plumbing is
under test (answers are compared with the engine run in this process), the default model where answers matter
(tool calls, structured output, batching). Every loop is bounded and every server is shut down afterwards."""
import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jsonschema
import numpy as np
import pytest
from PIL import Image

import herd
from herd.chat import format_chat
from herd.engine import Engine, SamplingParams, generate
from herd.images import ImageTokenIds, prepare_images
from herd.tokenizer import load_tokenizer
from tiny_chat import write_tiny_chat_model, write_tiny_vision_model

openai = pytest.importorskip("openai")
KEY = "sekrit-test-key"
PROMPTS = ["hello there", "What is the weather in Oslo?", "Tell me about llamas.", "1 2 3 4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`herd serve ARGS` on a free port; waits (bounded) until /health answers."""

    def __init__(self, args, log_path, startup_s=240):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", *args, "--host", "127.0.0.1",
                                      "--port", str(self.port), "--threads", "1", "--log-level", "warning"],
                                     stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {open(log_path).read()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not start in {startup_s}s: {open(log_path).read()[-3000:]}")

    def client(self, api_key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                             timeout=kw.pop("timeout", 120), **kw)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus series over the samples whose labels include `labels`."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        want = {f'{k}="{v}"' for k, v in labels.items()}
        return sum(float(m.group(2)) for m in re.finditer(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M)
                   if want <= set((m.group(1) or "").split(",")))

    def wait_metric(self, name: str, at_least: float, timeout_s: float = 30, **labels: str) -> float:
        """The series once it reaches at_least (or its value at the deadline). The engine thread counts a request's
        end when it handles the cancel or finish, which may come just after the HTTP answer went out."""
        deadline = time.monotonic() + timeout_s
        while (value := self.metric(name, **labels)) < at_least and time.monotonic() < deadline:
            time.sleep(0.05)
        return value

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("server_models")
    return write_tiny_chat_model(root / "tiny", seed=0), write_tiny_chat_model(root / "tiny_b", seed=1)


@pytest.fixture(scope="module")
def tiny_ref(tiny_folders):
    """The engine in this process: what the server must answer at temperature 0."""
    models = {name: (herd.load(f), load_tokenizer(f)) for name, f in zip(("tiny", "tiny-b"), tiny_folders)}

    def answer(name, messages, max_tokens):
        model, tok = models[name]
        prompt = format_chat(tok, messages)
        req = generate(model, [prompt], SamplingParams(max_tokens=max_tokens, stop_token_ids=(2,)))[0]
        return prompt, req.output, tok.decode(req.output)
    return answer


@pytest.fixture(scope="module")
def tiny_server(tiny_folders, tmp_path_factory):
    s = LiveServer([f"tiny={tiny_folders[0]}", f"tiny-b={tiny_folders[1]}", "--api-key", KEY, "--max-batch", "16",
                    "--max-queue", "64", "--max-seq-len", "512"], tmp_path_factory.mktemp("logs") / "tiny.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def one_slot_server(tiny_folders, tmp_path_factory):
    """One running request and one waiting at most: for cancellation and 429."""
    s = LiveServer([f"tiny={tiny_folders[0]}", "--max-batch", "1", "--max-queue", "1", "--max-seq-len", "4096"],
                   tmp_path_factory.mktemp("logs") / "one_slot.log")
    yield s
    s.stop()


def user(text):
    return [{"role": "user", "content": text}]


# ---- basics on the tiny models ---------------------------------------------------------------------------------
def test_models_list_and_unknown_model(tiny_server):
    c = tiny_server.client()
    models = c.models.list().data
    assert [m.id for m in models] == ["tiny", "tiny-b"] and models[0].max_model_len == 512
    assert c.models.retrieve("tiny-b").id == "tiny-b"
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-nope", messages=user("hi"), max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "tiny, tiny-b" in e.value.body["message"]


def test_chat_equals_the_engine_for_each_model(tiny_server, tiny_ref):
    c = tiny_server.client()
    answers = {}
    for name in ("tiny", "tiny-b"):
        prompt, out, text = tiny_ref(name, user(PROMPTS[1]), 12)
        r = c.chat.completions.create(model=name, messages=user(PROMPTS[1]), max_tokens=12, temperature=0)
        assert r.model == name and r.object == "chat.completion"
        assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == ("stop" if out[-1] == 2 else "length")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(out))
        assert r.usage.total_tokens == len(prompt) + len(out)
        answers[name] = text
    assert answers["tiny"] != answers["tiny-b"]          # the `model` field really picks the model


def test_stream_with_usage(tiny_server, tiny_ref):
    c = tiny_server.client()
    prompt, out, text = tiny_ref("tiny", user(PROMPTS[2]), 16)
    chunks = list(c.chat.completions.create(model="tiny", messages=user(PROMPTS[2]), max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["stop" if out[-1] == 2 else "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(out)
    assert chunks[-1].usage.prompt_tokens == len(prompt)
    assert all(ch.usage is None for ch in chunks[:-1])
    # on the wire: server-sent events closed by [DONE]
    conn = http.client.HTTPConnection("127.0.0.1", tiny_server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": user("hi"), "max_tokens": 3,
                                                             "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    body = r.read().decode()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_sampling_fields(tiny_server, tiny_ref):
    c = tiny_server.client()
    _, _, text = tiny_ref("tiny", user(PROMPTS[0]), 20)
    # stop strings cut the answer before the match
    stop = text[4:7]
    r = c.chat.completions.create(model="tiny", messages=user(PROMPTS[0]), max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"
    # n choices, seeded: reproducible, and different from each other
    kw = dict(model="tiny", messages=user(PROMPTS[0]), max_tokens=8, temperature=1.0, n=3, seed=7,
              extra_body={"ignore_eos": True})
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    texts = [ch.message.content for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2] and texts == [ch.message.content for ch in b.choices]
    assert len(set(texts)) > 1 and a.usage.completion_tokens == 3 * 8
    # logprobs: one entry per token; greedy picks the top entry
    r = c.chat.completions.create(model="tiny", messages=user(PROMPTS[0]), max_tokens=6, temperature=0,
                                  logprobs=True, top_logprobs=3, presence_penalty=0.5, frequency_penalty=0.5)
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in lps)
    assert all(abs(e.logprob - e.top_logprobs[0].logprob) < 1e-5 for e in lps)
    # max_completion_tokens is max_tokens' new name
    r = c.chat.completions.create(model="tiny", messages=user(PROMPTS[0]), max_completion_tokens=2, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"


def test_logit_bias(tiny_server, tiny_folders, tiny_ref):
    """OpenAI's logit_bias reaches the sampler (it was accepted and ignored): +100 makes one token the whole answer,
    on both endpoints; -100 keeps the greedy answer's first token out; a key that is no token id, a bias past 100 or
    an id past the vocabulary is a 400 naming logit_bias."""
    c, tok = tiny_server.client(), load_tokenizer(tiny_folders[0])
    forced = tok.encode(" cat")[-1]
    kw = dict(model="tiny", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    r = c.chat.completions.create(messages=user(PROMPTS[0]), logit_bias={str(forced): 100}, logprobs=True, **kw)
    assert [e.token for e in r.choices[0].logprobs.content] == [tok.decode([forced])] * 4
    r = c.completions.create(prompt="The quick brown", logit_bias={str(forced): 100}, **kw)
    assert r.choices[0].text == tok.decode([forced] * 4)
    _, greedy, _ = tiny_ref("tiny", user(PROMPTS[0]), 4)
    plain = c.chat.completions.create(messages=user(PROMPTS[0]), **kw).choices[0].message.content
    assert plain == tok.decode(greedy)
    r = c.chat.completions.create(messages=user(PROMPTS[0]), logit_bias={str(greedy[0]): -100}, **kw)
    assert r.choices[0].message.content != plain
    for bias, says in (({"cat": 1}, "logit_bias.cat"), ({"5": 101}, "logit_bias.5"),
                       ({"999999": 1}, "outside this model's vocabulary")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(messages=user("hi"), logit_bias=bias, **kw)
        assert says in e.value.body["message"] and e.value.body["param"].startswith("logit_bias")


def test_completions_endpoint(tiny_server, tiny_folders):
    c = tiny_server.client()
    model, tok = herd.load(tiny_folders[0]), load_tokenizer(tiny_folders[0])
    out = generate(model, [tok.encode("The quick brown")], SamplingParams(max_tokens=6, stop_token_ids=(2,)))[0]
    r = c.completions.create(model="tiny", prompt="The quick brown", max_tokens=6, temperature=0, logprobs=2,
                             echo=True)
    assert r.choices[0].text == "The quick brown" + tok.decode(out.output)
    # echo + logprobs: the prompt's tokens (first logprob null) and then the generated ones
    n_prompt = len(tok.encode("The quick brown"))
    assert len(r.choices[0].logprobs.tokens) == n_prompt + len(out.output) == n_prompt + r.usage.completion_tokens
    assert r.choices[0].logprobs.token_logprobs[0] is None
    r = c.completions.create(model="tiny", prompt=["a", "b"], max_tokens=3, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=6, temperature=0, stream=True))
    assert text == tok.decode(out.output)


def test_wrong_api_key_is_401(tiny_server):
    with pytest.raises(openai.AuthenticationError) as e:
        tiny_server.client(api_key="wrong-key").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(urllib.error.HTTPError) as e:            # no key at all
        urllib.request.urlopen(tiny_server.url + "/v1/models", timeout=10)
    assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        tiny_server.client(api_key="wrong-key").chat.completions.create(model="tiny", messages=user("hi"))
    with urllib.request.urlopen(tiny_server.url + "/health", timeout=10) as r:     # health needs no key
        assert r.status == 200


def test_errors_use_openai_shape(tiny_server):
    c = tiny_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=user("llama " * 600), max_tokens=4)
    assert "maximum context length is 512 tokens" in e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=500)
    assert "512" in e.value.body["message"] and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=user("hi"), temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    assert "reads text only" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=user("hi"), response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}})
    assert "schema" in e.value.body["message"]
    req = urllib.request.Request(tiny_server.url + "/v1/chat/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and set(json.loads(e.value.read())["error"]) == {"message", "type", "param", "code"}


def test_structured_output_on_a_random_model(tiny_server):
    """Through the HTTP layer: json_schema and a forced tool call hold even for random weights at temperature 1."""
    c = tiny_server.client()
    schema = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["city", "n"], "additionalProperties": False}
    r = c.chat.completions.create(model="tiny", messages=user("json please"), max_tokens=60, temperature=1.0, n=4,
                                  seed=3, response_format={"type": "json_schema",
                                                           "json_schema": {"name": "x", "schema": schema}})
    for ch in r.choices:
        jsonschema.validate(json.loads(ch.message.content), schema)
    tool = {"type": "function", "function": {"name": "pick", "parameters": schema}}
    r = c.chat.completions.create(model="tiny", messages=user("call it"), max_tokens=80, temperature=1.0, n=4,
                                  seed=5, tools=[tool], tool_choice="required", parallel_tool_calls=False)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        for call in ch.message.tool_calls:
            assert call.function.name == "pick" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), schema)


def test_64_concurrent_streams(tiny_server, tiny_ref):
    refs = {p: tiny_ref("tiny", user(p), 8) for p in PROMPTS}
    results, errors = [None] * 64, []

    def run(i):
        try:
            c = tiny_server.client(timeout=240)
            p = PROMPTS[i % len(PROMPTS)]
            text, finish, usage = "", None, None
            for ch in c.chat.completions.create(model="tiny", messages=user(p), max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
                    finish = ch.choices[0].finish_reason or finish
                if ch.usage:
                    usage = ch.usage
            results[i] = (p, text, finish, usage)
        except Exception as e:      # recorded, then asserted empty
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "clients still running after 300 s"
    assert errors == []
    for p, text, finish, usage in results:
        prompt, out, ref_text = refs[p]
        assert text == ref_text and finish == ("stop" if out[-1] == 2 else "length")
        assert usage.completion_tokens == len(out) and usage.prompt_tokens == len(prompt)


def test_streamed_auto_tool_calls_hold_back_the_call(tiny_folders):
    """tool_choice auto, streaming: prose goes out as it comes, a call is never streamed as text."""
    from herd.serve.stream import ChoiceStream
    tok = load_tokenizer(tiny_folders[0])

    def stream(text):
        s = ChoiceStream(0, tok, [], "auto", {"get_weather"})
        ids = tok.encode(text) + [2]
        sent = ""
        for k, t in enumerate(ids):
            s.push(t, None, "stop" if k == len(ids) - 1 else None)
            sent += s.content_delta()
        return s, sent

    s, sent = stream('Let me check. [get_weather(city="Oslo", days=2)]')
    assert s.finish_reason == "tool_calls" and sent.strip() == s.content == "Let me check." and "[" not in sent
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in s.calls] == \
        [("get_weather", {"city": "Oslo", "days": 2})]
    s, sent = stream("See [1] and {x}; get_weather is a tool.")
    assert s.finish_reason == "stop" and not s.calls and sent == s.content == "See [1] and {x}; get_weather is a tool."


def test_streamed_forced_call_arguments_add_up(tiny_folders):
    """A forced call streams its arguments as the JSON grows; the pieces add up to the final `arguments`, which is
    the generated text itself (json.dumps would respell the escape and turn 1e400 into Infinity, not JSON)."""
    from herd.serve.stream import ChoiceStream
    tok = load_tokenizer(tiny_folders[0])
    args = '{"city": "Z\\u00fcrich", "n": 1e400, "tags": ["a}", "b\\""]}'
    ids = tok.encode('{"name": "pick", "arguments": ' + args + "}") + [2]
    s = ChoiceStream(0, tok, [], "forced", {"pick"})
    deltas = []
    for k, t in enumerate(ids):
        s.push(t, None, "stop" if k == len(ids) - 1 else None)
        assert s.content_delta() == ""
        deltas += s.tool_call_deltas()
    assert s.finish_reason == "tool_calls" and s.content is None
    (call,) = s.calls
    assert call["function"]["arguments"] == args and json.loads(args)["n"] == float("inf")
    first, *rest = deltas
    assert len(rest) > 3 and first["id"] == call["id"] and first["function"]["name"] == "pick"
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in rest)
    assert "".join(d["function"]["arguments"] for d in deltas) == args


def _tool_call_deltas(stream) -> tuple[dict, dict]:
    """choice index -> its tool-call deltas in order, and choice index -> finish reason."""
    deltas, finish = {}, {}
    for ch in stream:
        for choice in ch.choices:
            deltas.setdefault(choice.index, []).extend(choice.delta.tool_calls or [])
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return deltas, finish


def test_streamed_tool_calls_arrive_in_pieces(tiny_server):
    """Live, random weights at temperature 1: a named call's arguments arrive over several deltas, only the first of
    which carries the id, type and name; they add up to the non-streamed answer's arguments and to JSON that
    validates; the client's own stream accumulation agrees. Parallel calls (tool_choice required) keep their
    indices apart."""
    c = tiny_server.client()
    schema = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["city", "n"], "additionalProperties": False}
    pick = {"type": "function", "function": {"name": "pick", "parameters": schema}}
    kw = dict(model="tiny", messages=user("call it"), max_tokens=80, temperature=1.0, n=3, seed=11, tools=[pick],
              tool_choice={"type": "function", "function": {"name": "pick"}})
    whole = c.chat.completions.create(**kw)
    deltas, finish = _tool_call_deltas(c.chat.completions.create(**kw, stream=True))
    for choice in whole.choices:
        first, *rest = deltas[choice.index]
        assert finish[choice.index] == choice.finish_reason == "tool_calls" and len(rest) >= 2
        assert first.id.startswith("call_") and first.type == "function" and first.function.name == "pick"
        assert all(d.id is None and d.type is None and d.function.name is None for d in rest)
        assert {d.index for d in deltas[choice.index]} == {0}
        arguments = "".join(d.function.arguments or "" for d in deltas[choice.index])
        assert arguments == choice.message.tool_calls[0].function.arguments
        jsonschema.validate(json.loads(arguments), schema)
    with c.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    assert [ch.message.tool_calls[0].function.arguments for ch in final.choices] == \
        [ch.message.tool_calls[0].function.arguments for ch in whole.choices]

    # a list of calls (the tiny model's context holds one tool's instructions, so all calls are to `pick`)
    deltas, finish = _tool_call_deltas(c.chat.completions.create(
        model="tiny", messages=user("call them"), max_tokens=80, temperature=1.0, n=3, seed=2, stream=True,
        tools=[pick], tool_choice="required", parallel_tool_calls=True))
    for index, ds in deltas.items():
        calls = {}
        for d in ds:
            if d.index not in calls:           # a call's first delta: id, type and name, in index order
                assert d.index == len(calls) and d.id.startswith("call_") and d.function.name == "pick"
                calls[d.index] = [d.id, ""]
            else:
                assert d.id is None and d.function.name is None
            calls[d.index][1] += d.function.arguments or ""
        assert calls and len({cid for cid, _ in calls.values()}) == len(calls)
        if finish[index] == "tool_calls":
            for _, arguments in calls.values():
                jsonschema.validate(json.loads(arguments), schema)
    print(f"\nparallel: {[len({d.index for d in ds}) for ds in deltas.values()]} calls, finish {finish}")


def test_bench_serve_cli(tiny_server):
    r = subprocess.run([sys.executable, "-m", "herd.cli", "bench-serve", tiny_server.url, "--concurrency", "3",
                        "--requests", "6", "--max-tokens", "5", "--ignore-eos", "--usd-per-hour", "2",
                        "--api-key", KEY], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "6 ok, 0 failed, concurrency 3" in out and "30 tokens" in out
    for line in ("TTFT ms", "ITL ms", "per 1M output tokens at $2/h"):
        assert line in out
    assert re.search(r"p50 +[\d.]+ +p95 +[\d.]+ +p99 +[\d.]+", out)
    bad = subprocess.run([sys.executable, "-m", "herd.cli", "bench-serve", tiny_server.url, "--requests", "1",
                          "--max-tokens", "2", "--model", "tiny", "--api-key", "wrong"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "1 failed" in bad.stdout and "HTTP 401" in bad.stdout


# ---- image input on a tiny Llama 4 with a vision encoder ---------------------------------------------------------
@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    return write_tiny_vision_model(tmp_path_factory.mktemp("server_models") / "tiny_vision", seed=0)


@pytest.fixture(scope="module")
def vision_server(vision_folder, tmp_path_factory):
    s = LiveServer([f"tiny-vision={vision_folder}", "--max-batch", "4", "--max-seq-len", "512"],
                   tmp_path_factory.mktemp("logs") / "vision.log")
    yield s
    s.stop()


def png(seed: int, size=(50, 40)) -> bytes:
    """A random-pixel PNG (50x40 -> 2x2 tiles + the global tile at 28-pixel tiles)."""
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def image_message(url: str, text: str = "What is in this picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_image_chat_equals_the_engine(vision_server, vision_folder):
    """A data-URL PNG through the openai client is answered token for token as the engine answers the same prompt
    and pixels in this process (greedy); another image of the same size (so the same prompt ids) changes the
    answer: the pixels reach the model."""
    model = herd.load(vision_folder)
    tok = load_tokenizer(vision_folder, eos_ids=model.config.eos_token_ids)
    c = vision_server.client()
    kw = dict(model="tiny-vision", max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
              extra_body={"ignore_eos": True})
    answers = []
    for seed in (0, 1):
        data = png(seed)
        messages = image_message(data_url(data))
        pixels, blocks = prepare_images([data], model.config.vision, ImageTokenIds.from_tokenizer(tok))
        prompt = format_chat(tok, messages, image_blocks=blocks)
        engine = Engine(model, max_batch=1, max_seq_len=512)
        ref = engine.add(prompt, SamplingParams(max_tokens=8, ignore_eos=True, logprobs=3), images=pixels)
        while engine.has_work():
            engine.step()

        r = c.chat.completions.create(messages=messages, **kw)
        lps = r.choices[0].logprobs.content
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 8)
        assert prompt.count(model.config.image_token_id) == pixels.shape[0] * 4 == 5 * 4
        assert [e.token for e in lps] == [tok.decode([i], skip_special=False) for i in ref.output]
        assert max(abs(e.logprob - want["logprob"]) for e, want in zip(lps, ref.logprobs)) < 1e-3
        assert r.choices[0].message.content == tok.decode(ref.output)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            messages=messages, stream=True, **kw) if ch.choices)
        assert streamed == tok.decode(ref.output)
        answers.append((ref.output, [[(t.token, round(t.logprob, 3)) for t in e.top_logprobs] for e in lps]))
    (out_a, top_a), (out_b, top_b) = answers
    assert out_a != out_b or top_a[0] != top_b[0]


def test_bad_image_input_is_400(vision_server):
    c = vision_server.client()
    cases = [("https://example.com/cat.png", "invalid_image_url", "only data URLs are accepted"),
             ("data:image/png;base64,not*base64!", "invalid_image_url", "base64 is malformed"),
             ("data:image/png,rawbytes", "invalid_image_url", "not a base64 data URL"),
             (data_url(b"hello, not a picture"), "invalid_image", "not a readable image"),
             (data_url(png(0)[:60]), "invalid_image", "not a readable image")]
    for url, code, words in cases:
        messages = [{"role": "user", "content": "first"}] + image_message(url)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny-vision", messages=messages, max_tokens=2)
        body = e.value.body
        assert body["code"] == code and words in body["message"], body
        assert body["message"].startswith("messages[1].content[0]") and body["param"].startswith("messages[1]")
    system_image = [{"role": "system", "content": image_message(data_url(png(2)))[0]["content"]}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-vision", messages=system_image + user("hi"), max_tokens=2)
    assert "user messages only" in e.value.body["message"] and e.value.body["param"] == "messages[0]"
    r = c.chat.completions.create(model="tiny-vision", messages=image_message(data_url(png(2))), max_tokens=2)
    assert r.usage.completion_tokens >= 1          # the server is still serving


# ---- admission: cancellation frees the slot, a full queue is 429 ----------------------------------------------
def _long_stream(c):
    return c.chat.completions.create(model="tiny", messages=user("go on"), max_tokens=4000, temperature=0,
                                     stream=True, extra_body={"ignore_eos": True})


def test_disconnect_frees_the_slot(one_slot_server):
    s = one_slot_server
    c = s.client(timeout=120)
    before = s.metric("herd_generation_tokens_total")
    cancelled = s.metric("herd_finished_requests_total", reason="cancelled")
    by_length = s.metric("herd_finished_requests_total", reason="length")
    stream = _long_stream(c)                   # alone, it would decode 4000 tokens on the only slot
    for _, _ in zip(range(3), stream):
        pass
    stream.close()                             # the client goes away
    t0 = time.monotonic()
    r = c.chat.completions.create(model="tiny", messages=user("next"), max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4 and time.monotonic() - t0 < 60
    # a non-streaming client that gives up is cancelled too
    with pytest.raises(openai.APITimeoutError):
        s.client(timeout=1).chat.completions.create(model="tiny", messages=user("go on"), max_tokens=4000,
                                                     temperature=0, extra_body={"ignore_eos": True})
    r = c.chat.completions.create(model="tiny", messages=user("next"), max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4
    # Both abandoned requests ended as cancelled. With one slot, each 4-token request got it only once the abandoned
    # one before it had left the engine, so had the engine kept decoding it, its 4000 tokens would all be counted:
    # neither bound assumes the machine's decode speed (only that 4000 tokens take more than the 1-second timeout).
    assert s.metric("herd_finished_requests_total", reason="cancelled") - cancelled == 2
    assert s.metric("herd_finished_requests_total", reason="length") - by_length == 2     # the two 4-token ones
    used = s.metric("herd_generation_tokens_total") - before
    assert used < 4000, f"{used} tokens generated: the abandoned requests kept decoding"
    assert s.metric("herd_running_requests") == 0 and s.metric("herd_queue_depth") == 0


def test_full_queue_is_429_not_a_hang(one_slot_server):
    s = one_slot_server
    c = s.client(timeout=120)
    running = _long_stream(c)
    next(iter(running))
    waiting = _long_stream(c)                  # queued behind it: the one waiting place
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError) as e:
        s.client(timeout=30).chat.completions.create(model="tiny", messages=user("me too"), max_tokens=4)
    assert time.monotonic() - t0 < 10
    assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
    running.close()
    waiting.close()
    deadline = time.monotonic() + 20          # the server notices both disconnects and frees their places
    while time.monotonic() < deadline and s.metric("herd_running_requests") + s.metric("herd_queue_depth") > 0:
        time.sleep(0.1)
    r = c.chat.completions.create(model="tiny", messages=user("after"), max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert "herd_requests_total" in s.metrics_text() and s.metric("herd_queue_depth") == 0


def test_settings_that_would_hang_or_crash_the_server_are_refused(tiny_folders):
    """In Python as on the command line (tests/test_cli.py): a negative queue, a limit that is negative or not a
    number, a port past 65535, each refused with the setting's name before anything listens."""
    from herd.serve.app import serve
    from herd.serve.limits import Limits
    from herd.serve.worker import ServedModel
    model, tok = herd.load(tiny_folders[0]), load_tokenizer(tiny_folders[0])
    with pytest.raises(ValueError, match="max_queue must be >= 0"):
        ServedModel("tiny", model, tok, max_queue=-1)
    with pytest.raises(ValueError, match="max_batch and max_seq_len must be >= 1"):
        ServedModel("tiny", model, tok, max_batch=0)
    for bad in (-1, float("nan"), float("inf"), "16"):
        with pytest.raises(ValueError, match=r"limit max_body_mb must be a number >= 0 \(herd serve --max-body-mb\)"):
            Limits(max_body_mb=bad)
    assert Limits(max_tools=0, default_max_tokens=0).max_tools == 0          # 0 is a limit too: no tools
    with pytest.raises(ValueError, match="port must be from 0 to 65535"):
        serve([ServedModel("tiny", model, tok)], port=70000)


# ---- schemathesis: no input makes the server fail ------------------------------------------------------------------
def test_schemathesis_finds_no_server_errors(tiny_folders, tmp_path):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    s = LiveServer([f"tiny={tiny_folders[0]}", "--max-batch", "8", "--max-seq-len", "64", "--max-queue", "64"],
                   tmp_path / "fuzz.log")
    try:
        schema = schemathesis.openapi.from_url(s.url + "/openapi.json")
        failures = []
        for mode, examples in ((GenerationMode.POSITIVE, 120), (GenerationMode.NEGATIVE, 80)):
            @given(case=schema.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                r = case.call(base_url=s.url, timeout=60)
                if r.status_code >= 500:
                    failures.append((case.method, case.path, case.body, r.status_code, r.text[:300]))
                elif r.status_code >= 400:   # every error is OpenAI's shape
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
            check()
        assert failures == [], "\n".join(map(repr, failures))
        assert s.proc.poll() is None
    finally:
        s.stop()


# ---- the default model: answers that must be right ---------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    s = LiveServer(["--max-batch", "16", "--max-seq-len", "1024"], tmp_path_factory.mktemp("logs") / "default.log")
    yield s
    s.stop()


def test_default_model_chat(default_server):
    c = default_server.client(api_key="unused")
    model = c.models.list().data[0].id
    # greedy margins on this prompt are >= 0.7 nats at every token: robust to kernel and quantization rounding
    r = c.chat.completions.create(model=model, messages=user("What is the capital of France? Answer in one short "
                                                           "sentence."), max_tokens=20, temperature=0)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


def test_shared_system_prompt_is_prefilled_once(default_server):
    """The same long system prompt twice: the second request takes its keys and values from the prefix cache
    (herd_prefix_cache_hit_tokens) and answers as the first did."""
    c = default_server.client(api_key="unused")
    model = c.models.list().data[0].id
    system = ("You are a concise geography tutor. Answer every question with one short, correct sentence, naming "
              "the place asked about. Do not add greetings, lists, caveats or follow-up questions; if a question is "
              "ambiguous, pick its most common reading and answer that.")
    msgs = [{"role": "system", "content": system}, *user("What is the capital of France?")]
    before = default_server.metric("herd_prefix_cache_hit_tokens_total")
    first = c.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=0)
    second = c.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=0)
    hits = default_server.metric("herd_prefix_cache_hit_tokens_total") - before
    assert hits >= 64 and hits % 32 == 0 and hits < first.usage.prompt_tokens
    assert "Paris" in first.choices[0].message.content
    assert second.choices[0].message.content == first.choices[0].message.content


def test_named_tool_call_validates(default_server):
    c = default_server.client(api_key="unused")
    model = c.models.list().data[0].id
    msgs = user("What's the weather like in Oslo right now?")
    kw = dict(model=model, messages=msgs, tools=[WEATHER], max_tokens=60, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = c.chat.completions.create(**kw)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert "Oslo" in args["city"]
    # streamed: tool-call deltas add up to the same call
    name, arguments, finish = "", "", None
    for ch in c.chat.completions.create(**kw, stream=True):
        if ch.choices:
            for d in ch.choices[0].delta.tool_calls or []:
                name += d.function.name or ""
                arguments += d.function.arguments or ""
            finish = ch.choices[0].finish_reason or finish
    assert (name, json.loads(arguments), finish) == ("get_weather", args, "tool_calls")
    # the result goes back in the template's way, and the model answers in text
    msgs += [r.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": -3, "sky": "snow"})}]
    r = c.chat.completions.create(model=model, messages=msgs, tools=[WEATHER], tool_choice="none", max_tokens=20,
                                  temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_json_schema_output_validates(default_server):
    c = default_server.client(api_key="unused")
    model = c.models.list().data[0].id
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 40},
        "colors": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
        "required": ["name", "age", "colors"], "additionalProperties": False}
    r = c.chat.completions.create(model=model, messages=user("Describe a cat as JSON with name, age and colors."),
                                  max_tokens=80, temperature=0,
                                  response_format={"type": "json_schema", "json_schema": {"name": "cat",
                                                                                          "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = c.chat.completions.create(model=model, messages=user("Give me a JSON object describing a cat with name and "
                                                           "age."), max_tokens=60, temperature=0,
                                  response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


def test_16_clients_share_decode_steps(default_server):
    """16 concurrent clients are decoded together (the batch-size histogram), and their aggregate tokens/s is
    reported against one client's. The >= 6x target is measured by bench/serve_batching.py: on a shared 2-core
    machine a timing ratio is too noisy to assert here."""
    from herd.serve.bench import run_bench

    s = default_server
    one = run_bench(s.url, concurrency=1, requests=2, max_tokens=16, ignore_eos=True, api_key="unused")
    steps_before = s.metric("herd_batch_size_count")
    small_before = _bucket(s, "8")
    # 48 tokens each: arrivals prefill a budget at a time while the first decode (engine.py), so the batch fills
    # over the first steps
    many = run_bench(s.url, concurrency=16, requests=16, max_tokens=48, ignore_eos=True, api_key="unused")
    assert one["failed"] == many["failed"] == 0 and many["output_tokens"] == 16 * 48
    steps = s.metric("herd_batch_size_count") - steps_before
    wide = steps - (_bucket(s, "8") - small_before)          # engine steps that advanced more than 8 requests
    assert wide >= 16, f"only {wide} of {steps} steps batched more than 8 requests"
    ratio = many["tokens_per_s"] / one["tokens_per_s"]
    print(f"\n16 clients {many['tokens_per_s']:.1f} tok/s vs 1 client {one['tokens_per_s']:.1f} tok/s: {ratio:.1f}x")


def _bucket(s, le):
    """Cumulative count of engine steps that advanced at most `le` requests."""
    lines = [ln for ln in s.metrics_text().splitlines()
             if ln.startswith("herd_batch_size_bucket{") and f'le="{le}.0"' in ln]
    return float(lines[0].rsplit(" ", 1)[1])
