"""OpenAI-compatible HTTP server (FastAPI + uvicorn): OpenAI schemas <-> engine calls, SSE streaming. No model code.

- `ServedModel` wraps one model: its Engine is driven by one background thread (continuous batching: requests join
  and leave the running batch between decode steps). Handlers talk to that thread through a thread-safe inbox, and
  tokens come back on one asyncio queue per HTTP request. Several models are served at once, picked by `model`.
- Admission: at most max_batch running + max_queue waiting requests per model; the next one gets HTTP 429 at once.
  A client that disconnects (streaming or not) has its requests cancelled, which frees their cache rows.
- Chat prompts are built in the model's own format (chat.format_chat); replies are split into content and tool
  calls (chat.parse_tool_calls). `response_format` and `tool_choice` required / named are enforced by
  grammar-constrained decoding (constrain.py), so such replies always parse, and their arguments stream as they
  are generated (OpenAI's tool-call deltas); calls found in free text (tool_choice auto) are sent when complete.
- Images come as base64 `data:` URLs in `image_url` parts (never fetched from elsewhere), prepared as `herd run
  --image` does (images.prepare_images) for Llama 4 models with a vision encoder.
- Every error is OpenAI's JSON shape {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import (ChatError, format_chat, json_call_spans, parse_tool_calls, stop_token_ids, tool_call_key,
                   tool_call_start)
from .constrain import Compiler, GrammarError, tool_call_schema
from .engine import Engine, SamplingParams
from .textgen import TextStream
from .tokenizer import Tokenizer

log = logging.getLogger("herd.server")

# Limits
MAX_N = 8                      # choices per request
MAX_STOP = 4                   # stop strings per request (OpenAI's limit)
MAX_TOP_LOGPROBS = 20          # chat top_logprobs
MAX_COMPLETION_LOGPROBS = 5    # completions logprobs
MAX_PROMPTS = 32               # prompts in one /v1/completions request
DEFAULT_MAX_BATCH = 16         # requests decoded together
DEFAULT_MAX_QUEUE = 64         # requests waiting for a batch slot before 429
DEFAULT_MAX_SEQ_LEN = 4096     # context (prompt + output) per request
COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions


# ---- errors -------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---- request schemas (OpenAI's, plus a few herd / vLLM extensions) ------------------------------------------------
class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")     # OpenAI fields herd does not use (user, metadata, ...) pass


class TextPart(_In):
    type: Literal["text"]
    text: str


class ImageURL(_In):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_In):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: str
    arguments: str       # JSON text


class ToolCallIn(_In):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_In):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_In):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_In):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_In):
    name: str


class NamedToolChoice(_In):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(_In):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_In):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(_In):
    include_usage: bool = False


class _Sampling(_In):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    # extensions (vLLM spells them the same way)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)   # bounded: 1e-300 would turn logits to inf
    ignore_eos: bool = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: str | None = None


# ---- response schemas (for the OpenAPI document; handlers build the same shapes as dicts) -------------------------
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


# ---- metrics ------------------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        r = self.registry = CollectorRegistry()
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.requests = Counter("herd_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("herd_prompt_tokens", "prompt tokens admitted", ["model"], registry=r)
        self.generation_tokens = Counter("herd_generation_tokens", "tokens generated", ["model"], registry=r)
        self.finished = Counter("herd_finished_requests", "sequences ended, by why: stop, length, tool_calls, "
                                "cancelled (the client went away), error", ["model", "reason"], registry=r)
        self.queue_depth = Gauge("herd_queue_depth", "requests waiting for a batch slot", ["model"], registry=r)
        self.running = Gauge("herd_running_requests", "requests in the running batch", ["model"], registry=r)
        self.batch_size = Histogram("herd_batch_size", "requests advanced together per engine step", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.ttft = Histogram("herd_time_to_first_token_seconds", "request arrival to its first token", ["model"],
                              buckets=lat, registry=r)
        self.itl = Histogram("herd_inter_token_latency_seconds", "time between a request's successive tokens",
                             ["model"], buckets=lat, registry=r)
        self.latency = Histogram("herd_request_latency_seconds", "request arrival to its last token",
                                 ["model", "endpoint"], buckets=lat, registry=r)

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


# ---- one model and the thread that drives its engine ----------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One engine request as the HTTP side sees it. The engine thread puts ("token", choice, id, logprob entry,
    finish reason) and ("error", choice, APIError) on `events` through the request's event loop."""
    choice: int
    prompt: list[int]
    params: SamplingParams
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    constraint: object | None = None
    images: Any = None           # pixel values (n_tiles, 3, S, S) for the prompt's image tokens, or None
    request: Any = None          # engine.Request, set by the engine thread
    cancel_reason: str = "cancelled"
    done: bool = False           # engine thread only

    def push(self, item):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:     # the event loop is gone (server shutting down)
            pass


class ServedModel:
    """A model, its tokenizer and an Engine driven by one background thread."""

    def __init__(self, name: str, model, tok: Tokenizer, max_batch: int = DEFAULT_MAX_BATCH,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN, max_queue: int = DEFAULT_MAX_QUEUE, cache_dtype=None):
        self.name, self.model, self.tok = name, model, tok
        self.engine = Engine(model, max_batch=max_batch, max_seq_len=max_seq_len, cache_dtype=cache_dtype)
        self.max_queue = max_queue
        self.stop_ids = sorted(set(stop_token_ids(tok)) | set(model.config.eos_token_ids))
        self.created = int(time.time())
        self.metrics: Metrics | None = None
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._outstanding = 0    # submitted and not finished: running + waiting
        self._running = 0
        self._jobs: dict = {}    # engine.Request -> Job
        self._compiler: Compiler | None = None
        self._compiler_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def context_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    def queue_depth(self) -> int:
        return max(0, self._outstanding - self._running)

    def compiler(self) -> Compiler:
        """The grammar compiler for this model's vocabulary, built on first use (blocking: call off the loop)."""
        with self._compiler_lock:
            if self._compiler is None:
                self._compiler = Compiler(self.tok, self.model.config.vocab_size, self.stop_ids)
            return self._compiler

    # -- called from request handlers (event loop thread) -------------------------------------------------------
    def check_capacity(self, n: int):
        """The 400 (never fits) or 429 (does not fit now) that submitting n sequences would get. Handlers call it
        first, so a refused request costs no image decoding or grammar compilation; `submit` checks again under
        the lock, which is the check that counts."""
        if n > self.max_batch + self.max_queue:
            raise APIError(400, f"{n} sequences requested (prompts x n), but model {self.name!r} holds at most "
                                f"{self.max_batch + self.max_queue} at once", param="n")
        if self._outstanding + n > self.max_batch + self.max_queue:
            raise APIError(429, f"model {self.name!r} is at capacity ({self.max_batch} running, {self.max_queue} "
                                "waiting); retry later", type="rate_limit_error", code="rate_limit_exceeded")

    def submit(self, jobs: list[Job]):
        """Queue all of one HTTP request's jobs, or none: 429 when they do not fit now, 400 when they never can."""
        with self._lock:
            self.check_capacity(len(jobs))
            self._outstanding += len(jobs)
        for job in jobs:
            self._inbox.append(("add", job))
        self._wake.set()

    def cancel(self, job: Job, reason: str = "cancelled"):
        self._inbox.append(("cancel", job, reason))
        self._wake.set()

    # -- the engine thread ------------------------------------------------------------------------------------------
    def start(self):
        self._thread = threading.Thread(target=self._run, name=f"herd-engine-{self.name}", daemon=True)
        self._thread.start()

    def stop(self):
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _finish(self, job: Job, reason: str):
        if job.done:
            return
        job.done = True
        if self.metrics is not None:
            self.metrics.finished.labels(self.name, reason).inc()
        self._jobs.pop(job.request, None)
        with self._lock:
            self._outstanding -= 1

    def _drain(self):
        while self._inbox:
            op, job, *rest = self._inbox.popleft()
            if op == "add":
                try:
                    job.request = self.engine.add(job.prompt, job.params, constraint=job.constraint, images=job.images)
                except ValueError as e:          # checked by the handler already; kept for safety
                    job.push(("error", job.choice, APIError(400, str(e))))
                    self._finish(job, "error")
                    continue
                self._jobs[job.request] = job
            elif not job.done:                   # cancel
                if job.request is not None:
                    self.engine.cancel(job.request, rest[0])
                self._finish(job, rest[0])

    def _run(self):
        while not self._stopping:
            try:
                self._drain()
                self._running = len(self.engine.running)
                if not self.engine.has_work():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                events = self.engine.step()
            except Exception as e:              # never leave a client waiting on a dead thread
                log.exception("engine step failed")
                self._fail_all(APIError(500, f"engine failure: {type(e).__name__}: {e}", type="server_error"))
                continue
            self._running = len(self.engine.running)
            if self.metrics is not None and events:
                self.metrics.batch_size.labels(self.name).observe(len(events))
                self.metrics.generation_tokens.labels(self.name).inc(len(events))
            for req, token in events:
                job = self._jobs.get(req)
                if job is None:
                    continue
                lp = req.logprobs[-1] if req.params.logprobs is not None and req.logprobs else None
                job.push(("token", job.choice, token, lp, req.finish_reason))
                if req.finished:
                    self._finish(job, req.finish_reason)
        self._fail_all(APIError(503, "server shutting down", type="server_error"))

    def _fail_all(self, err: APIError):
        for job in list(self._jobs.values()):
            job.push(("error", job.choice, err))
            if job.request is not None:
                self.engine.cancel(job.request)
            self._finish(job, "error")
        self._running = 0


def short_name(path: str | Path) -> str:
    """A model id from its path: a GGUF file's name up to the first dot, or the folder's name."""
    p = Path(path)
    return p.name.split(".")[0] if p.is_file() else p.name


# ---- one choice of a response: tokens -> text, tool calls, logprobs ---------------------------------------------
class _Choice:
    """Detokenizes one choice with its stop strings, holds back text that may be a tool call, splits the final text
    into content and tool calls, and cuts both into stream deltas. call_key: the arguments' key in a forced (JSON)
    call, chat.tool_call_key."""

    def __init__(self, index: int, tok: Tokenizer, stop: list[str], tool_mode: str, tool_names: set[str] | None,
                 call_key: str = "arguments"):
        self.index, self.tok = index, tok
        self.stream = TextStream(tok, stop)
        self.tool_mode, self.tool_names = tool_mode, tool_names   # "off" | "auto" | "forced"
        self.call_key = call_key
        self.text, self.sent = "", 0
        self.tokens = 0
        self.logprobs: list[dict] = []       # engine entries: {"logprob", "top": [(id, lp)]}, with "id"
        self.finish_reason: str | None = None
        self.content: str | None = None
        self.calls: list[dict] = []
        self.call_ids: list[str] = []        # made when a call is first streamed, kept in the final message
        self.args_sent: list[int] = []       # per call streamed so far: characters of its arguments sent
        self.t_last: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int, lp: dict | None, finish: str | None) -> bool:
        """Take one generated token; True when a stop string ended the choice (the engine request must stop)."""
        self.tokens += 1
        if lp is not None:
            self.logprobs.append({**lp, "id": token})
        self.text += self.stream.push(token)
        if self.stream.stopped:
            self._close("stop")
            return True
        if finish is not None:
            self._close("stop" if finish == "stop" else finish)
        return False

    def _close(self, reason: str):
        self.text += self.stream.finish()
        self.finish_reason = reason
        self.content = self.text
        if self.tool_mode != "off":
            content, calls = parse_tool_calls(self.text, self.tool_names)
            # forced calls are all the text there is: anything left over means the answer was cut (length)
            if calls and not (self.tool_mode == "forced" and content is not None):
                self.content, self.finish_reason = content, "tool_calls"
                raw = self._generated_arguments(calls)
                self.calls = [{"id": self._call_id(k), "type": "function",
                               "function": {"name": c["name"], "arguments": raw[k] if raw else
                                            json.dumps(c["arguments"], ensure_ascii=False)}}
                              for k, c in enumerate(calls)]

    def _generated_arguments(self, calls: list[dict]) -> list[str] | None:
        """A forced answer's argument texts exactly as generated, when they are the parsed calls (the grammar makes
        them so): streamed pieces then add up to the final `arguments`, which json.dumps could respell (escapes,
        number forms). None for free-text calls."""
        if self.tool_mode != "forced":
            return None
        spans = json_call_spans(self.text, self.call_key)
        raw = [self.text[a:b] for _, a, b in spans]
        try:
            same = len(spans) == len(calls) and all(
                name == c["name"] and json.loads(r) == c["arguments"] for (name, _, _), r, c in zip(spans, raw, calls))
        except json.JSONDecodeError:
            same = False
        return raw if same else None

    def _call_id(self, k: int) -> str:
        while len(self.call_ids) <= k:
            self.call_ids.append(f"call_{uuid.uuid4().hex[:24]}")
        return self.call_ids[k]

    def content_delta(self) -> str:
        """Content that can be streamed now: all new text, except what might still turn into a tool call."""
        if self.finished:
            if self.calls:               # what the parser kept as content, minus what was already sent
                sent = self.text[:self.sent].lstrip()
                content = self.content or ""
                out = content[len(sent):] if content.startswith(sent) else ""
            elif self.args_sent:         # a forced call cut short (length): its text went out as tool-call deltas
                out = ""
            else:
                out = self.text[self.sent:]
            self.sent = len(self.text)
            return out
        if self.tool_mode == "forced":
            return ""
        cut = tool_call_start(self.text, self.tool_names) if self.tool_mode == "auto" else len(self.text)
        cut = max(cut, self.sent)
        out, self.sent = self.text[self.sent:cut], cut
        return out

    def tool_call_deltas(self) -> list[dict]:
        """Tool-call deltas that can be streamed now, in OpenAI's shape: a call's first delta carries its index, id,
        type, name and the arguments so far; later ones only {index, function: {arguments: the next piece}}. Forced
        calls stream while their grammar-constrained JSON grows; calls found in free text (tool_choice auto) can
        only be told apart from prose at the end, so they go out whole when the choice finishes."""
        if self.calls:
            calls = [(c["function"]["name"], c["function"]["arguments"]) for c in self.calls]
        elif self.tool_mode == "forced":
            calls = [(name, self.text[a:b]) for name, a, b in json_call_spans(self.text, self.call_key)]
        else:
            return []
        out = []
        for k, (name, args) in enumerate(calls):
            if k == len(self.args_sent):
                out.append({"index": k, "id": self._call_id(k), "type": "function",
                            "function": {"name": name, "arguments": args}})
                self.args_sent.append(len(args))
            elif len(args) > self.args_sent[k]:
                out.append({"index": k, "function": {"arguments": args[self.args_sent[k]:]}})
                self.args_sent[k] = len(args)
        return out

    def chat_logprobs(self, entries: list[dict]) -> list[dict]:
        def one(i, lp):
            text = self.tok.decode([i], skip_special=False)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        return [{**one(e["id"], e["logprob"]), "top_logprobs": [one(i, lp) for i, lp in e["top"]]}
                for e in entries]


# ---- the app ------------------------------------------------------------------------------------------------------
def _card(m: ServedModel) -> dict:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "herd", "max_model_len": m.context_len}


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that also notice a client leaving while nothing is being sent (a queued request) and
    always close the generator, whose `finally` cancels the engine requests."""

    async def __call__(self, scope, receive, send):
        import anyio
        try:
            async with anyio.create_task_group() as tg:
                async def watch():
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                try:
                    await self.stream_response(send)
                except OSError:
                    pass
                tg.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


def _event_stream(run: _Run, chunks) -> EventStream:
    """A streamed response: each chunk as an event, an error that ends the run early as OpenAI's error body, then
    [DONE]. However the stream ends (done, error, client gone), the run's unfinished choices are cancelled."""
    async def events():
        try:
            async for c in chunks:
                yield _sse(c)
        except APIError as e:
            yield _sse(e.body())
        finally:
            run.cancel_unfinished()
        yield "data: [DONE]\n\n"
    return EventStream(events(), media_type="text/event-stream")


async def _until_disconnect(request: HTTPRequest):
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _stop_strings(stop) -> list[str]:
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} sequences", param="stop")
    return [s for s in stop if s]


def _check_context(sm: ServedModel, prompt_len: int, max_tokens: int | None, param: str, prompt_param: str) -> int:
    """max_tokens to use (the rest of the context when None); 400 with the limits when the request cannot fit."""
    ctx = sm.context_len
    if prompt_len >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {prompt_param} "
                            f"take {prompt_len} tokens, which leaves no room for a completion (at most {ctx - 1} "
                            f"prompt tokens). Please reduce the length of the {prompt_param}.",
                       param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        return ctx - prompt_len
    if prompt_len + max_tokens > ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                            f"completion). Please reduce the length of the prompt or of {param}.",
                       param=param, code="context_length_exceeded")
    return max_tokens


def _sampling_params(req: _Sampling, sm: ServedModel, max_tokens: int, logprobs: int | None, index: int,
                     constrained: bool) -> SamplingParams:
    ignore_eos = req.ignore_eos and not constrained      # a finished grammar must be able to stop
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else max(req.top_p, 1e-9), top_k=req.top_k or 0, min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0, presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=None if req.seed is None else (req.seed + index) % 2 ** 63,
        stop_token_ids=() if ignore_eos else tuple(sm.stop_ids), ignore_eos=ignore_eos, logprobs=logprobs)


def _chat_messages(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for m in messages:
        d = {"role": "system" if m.role == "developer" else m.role}
        if isinstance(m.content, list):
            d["content"] = [p.model_dump() for p in m.content]
        else:
            d["content"] = m.content
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def _chat_images(sm: ServedModel, messages: list[dict]) -> tuple[list[list[int]] | None, Any]:
    """(the token block of every image part in order, for chat.format_chat; their pixel values (n_tiles, 3, S, S),
    for Engine.add), or (None, None) for text only. The flow of `herd run --image` (cli.py). Blocking (decoding and
    resizing): call it off the event loop."""
    parts = [(f"messages[{i}].content[{j}]", p["image_url"]["url"])
             for i, m in enumerate(messages) if isinstance(m.get("content"), list)
             for j, p in enumerate(m["content"]) if p["type"] == "image_url"]
    if not parts:
        return None, None
    elsewhere = [f"messages[{i}]" for i, m in enumerate(messages) if m["role"] != "user"
                 and isinstance(m.get("content"), list) and any(p["type"] == "image_url" for p in m["content"])]
    if elsewhere:       # as in OpenAI's API; the Llama 4 format would also drop a system message's image blocks
        raise APIError(400, f"{elsewhere[0]}: image parts are accepted in user messages only", param=elsewhere[0],
                       code="invalid_image_url")
    if getattr(sm.model.config, "vision", None) is None:
        raise APIError(400, f"model {sm.name!r} reads text only; image input needs a Llama 4 model with a vision "
                            "encoder", param="messages", code="image_input_not_supported")
    from .images import MAX_IMAGES, ImageError, ImageTokenIds, decode_image, prepare_images
    try:
        ids = ImageTokenIds.from_tokenizer(sm.tok)
    except ImageError as e:
        raise APIError(400, f"model {sm.name!r}: {e}", param="messages", code="image_input_not_supported") from None
    if len(parts) > MAX_IMAGES:
        raise APIError(400, f"{len(parts)} images given; at most {MAX_IMAGES} per request", param="messages")
    decoded = []
    for where, url in parts:
        try:
            decoded.append(decode_image(_data_url_bytes(where, url)))   # decoded here to name the part that fails
        except ImageError as e:
            raise APIError(400, f"{where}: {e}", param=f"{where}.image_url.url", code="invalid_image") from None
    pixels, blocks = prepare_images(decoded, sm.model.config.vision, ids)
    return blocks, pixels


def _data_url_bytes(where: str, url: str) -> bytes:
    """The bytes of a base64 `data:` URL. Remote URLs are refused, not fetched: a request must not make the server
    reach into its network (SSRF) or wait on a slow host while holding a batch slot."""
    param = f"{where}.image_url.url"
    if url[:5].lower() != "data:":
        raise APIError(400, f"{param}: only data URLs are accepted (data:image/png;base64,...); herd does not "
                            "fetch remote images", param=param, code="invalid_image_url")
    header, comma, payload = url[5:].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise APIError(400, f"{param}: not a base64 data URL (expected data:<media type>;base64,<data>)",
                       param=param, code="invalid_image_url")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as e:
        raise APIError(400, f"{param}: the data URL's base64 is malformed ({e})", param=param,
                       code="invalid_image_url") from None


def create_app(models: list[ServedModel], api_key: str | None = None) -> FastAPI:
    if not models:
        raise ValueError("create_app needs at least one model")
    by_name = {m.name: m for m in models}
    if len(by_name) != len(models):
        raise ValueError("model names must be unique")
    metrics = Metrics()
    for m in models:
        m.metrics = metrics
        metrics.queue_depth.labels(m.name).set_function(m.queue_depth)
        metrics.running.labels(m.name).set_function(lambda m=m: m._running)

    @asynccontextmanager
    async def lifespan(app):
        for m in models:
            m.start()
        try:
            yield
        finally:
            for m in models:
                m.stop()

    app = FastAPI(title="herd", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API over herd's engine.")
    errors = {c: {"model": ErrorResponse} for c in (400, 401, 404, 429, 500)}

    # -- errors in OpenAI's shape -----------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        msg = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return APIError(400, msg, param=where or None, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error").response()

    # -- request counting (a plain ASGI wrapper: it does not buffer streamed bodies) ------------------------------
    known = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics"}   # metric labels

    class CountRequests:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            status = 500

            async def send_status(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)
            try:
                await self.app(scope, receive, send_status)
            finally:
                path = scope.get("path", "")
                metrics.requests.labels(path if path in known else "other", str(status)).inc()

    app.add_middleware(CountRequests)

    # -- auth and model choice --------------------------------------------------------------------------------------
    def check_key(request: HTTPRequest):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect API key provided." if given else
                           "Missing API key: send 'Authorization: Bearer KEY'.", code="invalid_api_key")

    def pick(name: str | None) -> ServedModel:
        if name is None or name == "":
            return models[0]
        if name not in by_name:
            raise APIError(404, f"The model {name!r} does not exist. Served models: {', '.join(by_name)}",
                           param="model", code="model_not_found")
        return by_name[name]

    auth = [Depends(check_key)]

    # -- endpoints --------------------------------------------------------------------------------------------------
    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        dead = [m.name for m in models if m._thread is None or not m._thread.is_alive()]
        if dead:
            raise APIError(503, f"engine thread not running for {', '.join(dead)}", type="server_error")
        return {"status": "ok", "models": {m.name: {"running": m._running, "waiting": m.queue_depth(),
                                                    "max_batch": m.max_batch, "max_queue": m.max_queue}
                                           for m in models}}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth, response_model=ModelList, responses=errors)
    async def list_models():
        return {"object": "list", "data": [_card(m) for m in models]}

    @app.get("/v1/models/{model_id}", dependencies=auth, response_model=ModelCard, responses=errors)
    async def get_model(model_id: str):
        return _card(pick(model_id))

    @app.post("/v1/chat/completions", dependencies=auth, response_model=ChatCompletion,
              responses={**errors, 200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        t0 = time.perf_counter()
        sm = pick(body.model)
        sm.check_capacity(body.n)
        tok = sm.tok
        messages = _chat_messages(body.messages)
        image_blocks, pixels = await run_in_threadpool(_chat_images, sm, messages)

        # tools and structured output
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
        if choice != "none" and not tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if named is not None and named not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names {named!r}, which is not among the tools", param="tool_choice")
        tool_mode = "off" if choice == "none" else ("auto" if choice == "auto" else "forced")
        tool_names = {t["function"]["name"] for t in tools} if tool_mode != "off" else None
        schema, strict = None, True
        if tool_mode == "forced":
            schema = tool_call_schema(tools, key=tool_call_key(tok), name=named,
                                      parallel=bool(body.parallel_tool_calls))
        elif body.response_format is not None and body.response_format.type == "json_object":
            schema, strict = {"type": "object"}, False
        elif body.response_format is not None and body.response_format.type == "json_schema":
            if body.response_format.json_schema is None:
                raise APIError(400, "response_format.json_schema is required for type json_schema",
                               param="response_format")
            schema = body.response_format.json_schema.json_schema or {}

        try:
            prompt = format_chat(tok, messages, tools if tool_mode != "off" else None, image_blocks=image_blocks)
        except ChatError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        max_tokens = _check_context(sm, len(prompt), max_tokens,
                                    "max_completion_tokens" if body.max_completion_tokens else "max_tokens",
                                    "messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        stop = _stop_strings(body.stop)

        compiled = None
        if schema is not None:
            try:
                compiled = await run_in_threadpool(lambda: sm.compiler().json_schema(schema, strict))
            except GrammarError as e:
                raise APIError(400, str(e), param="tools" if tool_mode == "forced" else "response_format") from None
        states = [_Choice(i, tok, stop, tool_mode, tool_names, tool_call_key(tok)) for i in range(body.n)]
        jobs = _make_jobs(sm, body, [prompt], max_tokens, logprobs, compiled, pixels)
        sm.submit(jobs)
        sm.metrics.prompt_tokens.labels(sm.name).inc(len(prompt))
        run = _Run(sm, jobs, states, t0, "chat")
        rid, created = _new_id("chatcmpl"), int(time.time())
        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": sum(s.tokens for s in states),
                         "total_tokens": len(prompt) + sum(s.tokens for s in states)}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(choices, with_usage=None):
                c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": sm.name,
                     "choices": choices}
                if include_usage:
                    c["usage"] = with_usage
                return c

            async def chunks():
                for s in states:
                    yield chunk([{"index": s.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
                async for s, new_lps in run.updates():
                    delta = {}
                    text = s.content_delta()
                    if text:
                        delta["content"] = text
                    calls = s.tool_call_deltas()
                    if calls:
                        delta["tool_calls"] = calls
                    lp = {"content": s.chat_logprobs(new_lps)} if new_lps else None
                    if delta or lp is not None:
                        yield chunk([{"index": s.index, "delta": delta, "logprobs": lp, "finish_reason": None}])
                    if s.finished:
                        yield chunk([{"index": s.index, "delta": {}, "logprobs": None,
                                      "finish_reason": s.finish_reason}])
                if include_usage:
                    yield chunk([], usage())

            return _event_stream(run, chunks())

        await run.wait(request)
        choices = []
        for s in states:
            msg = {"role": "assistant", "content": s.content}
            if s.calls:
                msg["tool_calls"] = s.calls
            choices.append({"index": s.index, "message": msg, "finish_reason": s.finish_reason,
                            "logprobs": {"content": s.chat_logprobs(s.logprobs)} if logprobs is not None else None})
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": sm.name,
                             "choices": choices, "usage": usage()})

    @app.post("/v1/completions", dependencies=auth, response_model=Completion,
              responses={**errors, 200: {"content": {"text/event-stream": {}}}})
    async def completions(body: CompletionRequest, request: HTTPRequest):
        t0 = time.perf_counter()
        sm = pick(body.model)
        tok = sm.tok
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        raw = body.prompt
        if isinstance(raw, str):
            raw = [raw]
        elif raw and isinstance(raw[0], int):
            raw = [raw]
        if not raw:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if len(raw) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        prompts = []
        for p in raw:
            ids = tok.encode(p, bos=tok.add_bos) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            bad = [t for t in ids if not 0 <= t < sm.model.config.vocab_size]
            if bad:
                raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary "
                                    f"0..{sm.model.config.vocab_size - 1}", param="prompt")
            prompts.append(ids)
        max_tokens = body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        for ids in prompts:
            _check_context(sm, len(ids), max_tokens, "max_tokens", "prompt")
        stop = _stop_strings(body.stop)
        states = [_Choice(i, tok, stop, "off", None) for i in range(len(prompts) * body.n)]
        jobs = _make_jobs(sm, body, prompts, max_tokens, body.logprobs, None)
        sm.submit(jobs)
        sm.metrics.prompt_tokens.labels(sm.name).inc(sum(map(len, prompts)))
        run = _Run(sm, jobs, states, t0, "completions")
        rid, created = _new_id("cmpl"), int(time.time())
        prefixes = [tok.decode(ids) if body.echo else "" for ids in prompts]
        n_prompt = sum(map(len, prompts))
        usage = lambda: {"prompt_tokens": n_prompt, "completion_tokens": sum(s.tokens for s in states),
                         "total_tokens": n_prompt + sum(s.tokens for s in states)}

        def logprobs_of(s: _Choice, entries: list[dict], offset: int) -> dict:
            toks = [tok.decode([e["id"]], skip_special=False) for e in entries]
            offsets, pos = [], offset
            for t in toks:
                offsets.append(pos)
                pos += len(t)
            return {"tokens": toks, "token_logprobs": [e["logprob"] for e in entries],
                    "top_logprobs": [{tok.decode([i], skip_special=False): lp for i, lp in e["top"]}
                                     for e in entries],
                    "text_offset": offsets}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(choices, with_usage=None):
                c = {"id": rid, "object": "text_completion", "created": created, "model": sm.name,
                     "choices": choices}
                if include_usage:
                    c["usage"] = with_usage
                return c

            async def chunks():
                offsets = [len(prefixes[s.index // body.n]) for s in states]
                if body.echo:
                    for s in states:
                        yield chunk([{"index": s.index, "text": prefixes[s.index // body.n], "logprobs": None,
                                      "finish_reason": None}])
                async for s, new_lps in run.updates():
                    text = s.content_delta()
                    lp = None
                    if new_lps:
                        lp = logprobs_of(s, new_lps, offsets[s.index])
                        offsets[s.index] += sum(len(t) for t in lp["tokens"])
                    if text or lp is not None or s.finished:
                        yield chunk([{"index": s.index, "text": text, "logprobs": lp,
                                      "finish_reason": s.finish_reason}])
                if include_usage:
                    yield chunk([], usage())

            return _event_stream(run, chunks())

        await run.wait(request)
        choices = []
        for s in states:
            prefix = prefixes[s.index // body.n]
            choices.append({"index": s.index, "text": prefix + s.text, "finish_reason": s.finish_reason,
                            "logprobs": logprobs_of(s, s.logprobs, len(prefix)) if body.logprobs is not None
                            else None})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": sm.name,
                             "choices": choices, "usage": usage()})

    return app


def _make_jobs(sm: ServedModel, body: _Sampling, prompts: list[list[int]], max_tokens: int, logprobs,
               compiled, images=None) -> list[Job]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    jobs = []
    for p, prompt in enumerate(prompts):
        for i in range(body.n):
            index = p * body.n + i
            constraint = sm.compiler().constraint(compiled) if compiled is not None else None
            params = _sampling_params(body, sm, max_tokens, logprobs, i, constraint is not None)
            jobs.append(Job(index, prompt, params, events, loop, constraint, images))
    return jobs


class _Run:
    """The jobs of one HTTP request and their choices, fed from the request's event queue."""

    def __init__(self, sm: ServedModel, jobs: list[Job], states: list[_Choice], t0: float, endpoint: str):
        self.sm, self.jobs, self.states, self.t0, self.endpoint = sm, jobs, states, t0, endpoint
        self.events = jobs[0].events

    async def updates(self):
        """Yield (choice, new logprob entries) after every token, until every choice is finished."""
        m = self.sm.metrics
        while not all(s.finished for s in self.states):
            item = await self.events.get()
            if item[0] == "error":
                raise item[2]
            _, index, token, lp, finish = item
            s = self.states[index]
            if s.finished:
                continue
            now = time.perf_counter()
            if s.t_last is None:
                m.ttft.labels(self.sm.name).observe(now - self.t0)
            else:
                m.itl.labels(self.sm.name).observe(now - s.t_last)
            s.t_last = now
            n_lp = len(s.logprobs)
            if s.push(token, lp, finish):
                self.sm.cancel(self.jobs[index], "stop")
            if s.finished:
                m.latency.labels(self.sm.name, self.endpoint).observe(now - self.t0)
            yield s, s.logprobs[n_lp:]

    async def wait(self, request: HTTPRequest):
        """Run to the end; if the client goes away first, cancel everything and answer nothing."""
        async def consume():
            async for _ in self.updates():
                pass
        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                self.cancel_unfinished()
        if work.cancelled():
            raise APIError(499, "client closed the request")
        work.result()                             # re-raise an engine error as its APIError

    def cancel_unfinished(self):
        for job, s in zip(self.jobs, self.states):
            if not s.finished:
                self.sm.cancel(job)


def serve(models: list[ServedModel], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info"):
    """Run the server until interrupted."""
    import uvicorn
    uvicorn.run(create_app(models, api_key), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)
