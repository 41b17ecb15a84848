"""herd's OpenAI-compatible HTTP server: the route table, the handlers, errors in OpenAI's shape, and `serve`.

A request travels: a handler (here) checks it and builds the engine's inputs (inputs.py), submits jobs to the model's
engine thread (worker.py: admission, 429, cancel), and streams or gathers each choice's tokens as text, tool calls
and logprobs (stream.py). Schemas and limits: schemas.py; metrics: metrics.py.
- Several models are served at once, picked by `model` (none: the first). Each model's Engine is driven by one
  background thread with continuous batching.
- Chat prompts are built in the model's own format (chat.format_chat); replies are split into content and tool
  calls. `response_format` and `tool_choice` required / named are enforced by grammar-constrained decoding
  (constrain.py), so such replies always parse, and their arguments stream as they are generated.
- Images come as base64 `data:` URLs in `image_url` parts, never fetched from elsewhere.
- A client that disconnects (streaming or not) has its requests cancelled, which frees their cache rows.
- Nothing a request sends can hold the event loop: the API key and the body's size are checked before the body is
  read (gate.py), tokenizing, image decoding and grammar compiling run in threads, stop strings cost linear time,
  and every size a request chooses has a limit (limits.py) whose error names the flag that changes it.
- SIGTERM: nothing new is admitted, what runs may finish for SHUTDOWN_GRACE_S, then it is cancelled; the process
  exits within 5 s.
It contains no model code.
"""
from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match

from ..chat import ChatError, format_chat, tool_call_key
from ..constrain import GrammarError
from .gate import Gate
from .inputs import (chat_chars, chat_images, chat_messages, check_context, check_prompt_chars, completion_max_tokens,
                     completion_prompts, make_jobs, stop_strings, tool_setup)
from .limits import Limits
from .metrics import CountRequests, Metrics
from .schemas import (APIError, ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest,
                      DetokenizeResponse, ErrorResponse, ModelCard, ModelList, TokenizeResponse, TokenizerInfo)
from .stream import ChoiceStream, Run, new_envelope, prompt_entries, respond, stream_chunks
from .tokenize import detokenize, tokenize, tokenizer_info
from .webui import chat_page, webui_asset
from .worker import ServedModel
from .guard import GuardStage, moderations

log = logging.getLogger("herd.serve")
ERRORS = {c: {"model": ErrorResponse} for c in (400, 401, 404, 413, 429, 500, 503)}
STREAMED = {**ERRORS, 200: {"content": {"text/event-stream": {}}}}
DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
SHUTDOWN_GRACE_S = 2.0         # SIGTERM: how long running requests may go on before they are cancelled


def create_app(models: list[ServedModel], api_key: str | None = None, limits: Limits | None = None,
               cors_origins: list[str] | None = None, protect_metrics: bool = False, webui: bool = True,
               rails=None) -> FastAPI:
    """protect_metrics: /metrics and the API docs need the API key too (by default they are open, as in vLLM).
    cors_origins: browser origins allowed to call the API ("*": any). webui: GET / answers the chat page.
    rails: the guards (guard.load_rails), None to serve unguarded."""
    app = FastAPI(title="herd", version="0.1.0", lifespan=_lifespan,
                  description="OpenAI-compatible API over herd's engine.")
    app.state.server = Server(models, api_key, limits or Limits(), protect_metrics, rails)
    key = [Depends(check_key)]
    # the route table: path, handler, and what each needs
    if webui:                  # the chat page and its two files; the page itself asks for the key (sessionStorage)
        app.add_api_route("/", chat_page, methods=["GET"], include_in_schema=False)
        app.add_api_route("/webui/{name}", webui_asset, methods=["GET"], include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"], responses={503: {"model": ErrorResponse}})
    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"], response_class=Response,
                      responses={401: {"model": ErrorResponse}})      # 401: with protect_metrics
    app.add_api_route("/v1/models", list_models, methods=["GET"], dependencies=key, response_model=ModelList,
                      responses=ERRORS)
    app.add_api_route("/v1/models/{model_id}", get_model, methods=["GET"], dependencies=key,
                      response_model=ModelCard, responses=ERRORS)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], dependencies=key,
                      response_model=ChatCompletion, responses=STREAMED)
    app.add_api_route("/v1/completions", completions, methods=["POST"], dependencies=key,
                      response_model=Completion, responses=STREAMED)
    # the tokenizer, as vLLM serves it and lm-eval's local-completions probes it (tokenize.py)
    app.add_api_route("/tokenize", tokenize, methods=["POST"], dependencies=key, response_model=TokenizeResponse,
                      response_model_exclude_none=True, responses=ERRORS)
    app.add_api_route("/detokenize", detokenize, methods=["POST"], dependencies=key,
                      response_model=DetokenizeResponse, responses=ERRORS)
    app.add_api_route("/tokenizer_info", tokenizer_info, methods=["GET"], dependencies=key,
                      response_model=TokenizerInfo, responses=ERRORS)
    # without a guard it answers a 404 that says how to start one, and is left out of the OpenAPI document
    app.add_api_route("/v1/moderations", moderations, methods=["POST"], dependencies=key, responses=ERRORS,
                      include_in_schema=rails is not None)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    endpoints = {r.path for r in app.routes if not r.path.startswith(("/docs", "/openapi", "/redoc"))}
    endpoints -= {"/v1/models/{model_id}", "/webui/{name}"}
    # outermost last: CORS answers preflights itself; every answer, the gate's 401 and 413 too, is counted
    app.add_middleware(Gate, check_key=lambda scope: _gate_key(app, scope), limits=app.state.server.limits)
    app.add_middleware(CountRequests, metrics=app.state.server.metrics, endpoints=endpoints)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"])
    if api_key is not None:
        _declare_key(app)
    return app


def _declare_key(app: FastAPI):
    """The OpenAPI document says which operations need the bearer key (clients and schemathesis read it)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = build()
            doc.setdefault("components", {})["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            for path, operations in doc["paths"].items():
                for method, op in operations.items():
                    scope = {"type": "http", "path": path, "method": method.upper(), "headers": []}
                    if _gate_key(app, scope) is not None:      # refused with no key: it needs one
                        op["security"] = [{"apiKey": []}]
        return app.openapi_schema
    app.openapi = openapi


def check_address(host: str, port: int):
    """Whether this server could listen on host:port, tried before any model loads (minutes, for a large one):
    an address in use or a host that is not this machine's is an error naming it, not uvicorn's after the load."""
    import errno
    import socket
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host}: not an address of this machine ({e})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)      # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind(address)
        except OSError as e:
            hint = {errno.EADDRINUSE: "another server there? choose --port",
                    errno.EADDRNOTAVAIL: "not an address of this machine: choose --host",
                    errno.EACCES: "ports below 1024 need privileges: choose --port"}.get(e.errno, "")
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}" + (f" ({hint})" if hint else "")
                             ) from None


def serve(models: list[ServedModel], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info", limits: Limits | None = None, cors_origins: list[str] | None = None,
          protect_metrics: bool = False, webui: bool = True, rails=None):
    """Run the server until interrupted (SIGINT, SIGTERM: see the module's docstring)."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise ValueError(f"port must be from 0 to 65535, got {port}")

    class ClosingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            for m in models:      # streams end with a 503 event by the grace's end, so connections close in time
                m.close(SHUTDOWN_GRACE_S)
            await super().shutdown(sockets)

    app = create_app(models, api_key, limits, cors_origins, protect_metrics, webui, rails)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S + 1)
    ClosingServer(config).run()


class Server:
    """What the handlers share: the served models by name, the API key, the limits, the metrics."""

    def __init__(self, models: list[ServedModel], api_key: str | None, limits: Limits, protect_metrics: bool,
                 rails=None):
        if not models:
            raise ValueError("create_app needs at least one model")
        self.models, self.api_key, self.limits, self.protect_metrics = models, api_key, limits, protect_metrics
        self.by_name = {m.name: m for m in models}
        if len(self.by_name) != len(models):
            raise ValueError("model names must be unique")
        self.metrics = Metrics()
        self.guard = GuardStage(rails, self.metrics.registry) if rails is not None else None
        for m in models:
            m.metrics = self.metrics
            self.metrics.queue_depth.labels(m.name).set_function(m.queue_depth)
            self.metrics.running.labels(m.name).set_function(m.running)

    def pick(self, name: str | None) -> ServedModel:
        if name is None or name == "":
            return self.models[0]
        if name not in self.by_name:
            raise APIError(404, f"The model {name!r} does not exist. Served models: {', '.join(self.by_name)}",
                           param="model", code="model_not_found")
        return self.by_name[name]


def _server(request: HTTPRequest) -> Server:
    return request.app.state.server


@asynccontextmanager
async def _lifespan(app: FastAPI):
    models = app.state.server.models
    for m in models:
        m.start()
    try:
        yield
    finally:
        for m in models:
            m.stop()


def check_key(request: HTTPRequest):
    """A route's declaration that it needs the API key (dependencies=[Depends(check_key)]). The gate checks it
    before the body is read (_gate_key); checked here again, it holds for any route the gate could miss."""
    refused = key_error(_server(request).api_key, request.headers.get("authorization", ""))
    if refused is not None:
        raise refused


def key_error(api_key: str | None, given: str) -> APIError | None:
    if api_key is None or hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        return None
    return APIError(401, "Incorrect API key provided." if given else
                    "Missing API key: send 'Authorization: Bearer KEY'.", code="invalid_api_key")


def _gate_key(app: FastAPI, scope: dict) -> APIError | None:
    """The API key's verdict before the body is read: for the routes that declare check_key, and with
    protect_metrics, for /metrics and the docs."""
    server = app.state.server
    if server.api_key is None:
        return None
    matches = [(route.matches(scope)[0], route) for route in app.routes]
    found = [route for match, route in matches if match == Match.FULL] or \
        [route for match, route in matches if match == Match.PARTIAL]   # the path, another method: 405 after the key
    if not found:
        return None
    guarded = any(d.dependency is check_key for d in getattr(found[0], "dependencies", ()))
    if guarded or (server.protect_metrics and found[0].path in ("/metrics", *DOCS)):
        return key_error(server.api_key, dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"))
    return None


# ---- handlers -----------------------------------------------------------------------------------------------------
async def health(request: HTTPRequest):
    models = _server(request).models
    dead = [m.name for m in models if not m.alive()]
    if dead:
        raise APIError(503, f"engine thread not running for {', '.join(dead)}", type="server_error")
    return {"status": "ok", "models": {m.name: {"running": m.running(), "waiting": m.queue_depth(),
                                                "max_batch": m.max_batch, "max_queue": m.max_queue}
                                       for m in models}}


async def prometheus_metrics(request: HTTPRequest):
    from prometheus_client import CONTENT_TYPE_LATEST
    return Response(_server(request).metrics.text(), media_type=CONTENT_TYPE_LATEST)


def _card(m: ServedModel) -> dict:
    # vision: whether the model reads images (herd's field; the chat page offers image attachments only then)
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "herd", "max_model_len": m.context_len,
            "vision": m.model.config.vision is not None}


async def list_models(request: HTTPRequest):
    return {"object": "list", "data": [_card(m) for m in _server(request).models]}


async def get_model(model_id: str, request: HTTPRequest):
    return _card(_server(request).pick(model_id))


async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
    t0 = time.perf_counter()
    server = _server(request)
    sm = server.pick(body.model)
    if body.echo:
        raise APIError(400, "echo is a /v1/completions parameter (the prompt and, with logprobs, its tokens' "
                            "logprobs); chat completions do not echo", param="echo")
    sm.check_capacity(body.n)
    tok = sm.tok
    messages = chat_messages(body.messages)
    check_prompt_chars(sm, chat_chars(messages), "messages")
    guard = server.guard
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    if guard is not None:              # the input rail: a flagged user or tool message is refused, not run
        refused = await guard.screen_input(messages, new_envelope("chatcmpl", "chat.completion", sm.name),
                                           body.stream, include_usage)
        if refused is not None:
            return refused
    image_blocks, pixels = await run_in_threadpool(chat_images, sm, messages)
    tools, tool_mode, tool_names, schema, strict = tool_setup(body, tok)
    try:           # rendering and tokenizing: in a thread (the tokenizer runs without the GIL)
        prompt = await run_in_threadpool(format_chat, tok, messages, tools if tool_mode != "off" else None,
                                         image_blocks=image_blocks)
    except ChatError as e:
        raise APIError(400, str(e), param="messages") from None
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_tokens = check_context(sm, len(prompt), body.max_completion_tokens or body.max_tokens, param, "messages",
                               default=server.limits.default_max_tokens)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    stop = stop_strings(body.stop)
    compiled = None
    if schema is not None:
        try:
            compiled = await run_in_threadpool(lambda: sm.compiler().json_schema(schema, strict))
        except GrammarError as e:
            raise APIError(400, str(e), param="tools" if tool_mode == "forced" else "response_format") from None
    states = [ChoiceStream(i, tok, stop, tool_mode, tool_names, tool_call_key(tok)) for i in range(body.n)]
    jobs = make_jobs(sm, body, [prompt], max_tokens, logprobs, compiled, pixels)
    run = _submit(sm, jobs, states, t0, "chat", len(prompt))
    if guard is not None:              # the output rail: the answer is released only as it passes the guard
        run = guard.watch_output(run, messages)
    head = new_envelope("chatcmpl", "chat.completion", sm.name)
    usage = lambda: _usage(len(prompt), states)
    if body.stream:
        opening = [{"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for s in states]
        return stream_chunks(run, {**head, "object": "chat.completion.chunk"}, opening, _chat_chunks, usage,
                             include_usage)
    await run.wait(request)
    return respond(head, [_chat_choice(s, logprobs is not None) for s in states], usage())


def _chat_chunks(s: ChoiceStream, new_lps: list[dict]) -> list[dict]:
    """A chat choice's stream entries after an update: its new content and tool-call deltas and logprobs, then, when
    it has finished, an empty delta with the finish reason."""
    out, delta = [], {}
    text = s.content_delta()
    if text:
        delta["content"] = text
    calls = s.tool_call_deltas()
    if calls:
        delta["tool_calls"] = calls
    lp = {"content": s.chat_logprobs(new_lps)} if new_lps else None
    if delta or lp is not None:
        out.append({"index": s.index, "delta": delta, "logprobs": lp, "finish_reason": None})
    if s.finished:
        end = {"index": s.index, "delta": {"refusal": s.refusal} if s.refusal else {}, "logprobs": None,
               "finish_reason": s.finish_reason}
        out.append({**end, "herd_guard": s.guard} if s.guard else end)
    return out


def _chat_choice(s: ChoiceStream, with_logprobs: bool) -> dict:
    msg = {"role": "assistant", "content": s.content}
    if s.calls:
        msg["tool_calls"] = s.calls
    if s.refusal:                      # the output rail cut this answer (serve/guard.py)
        msg.update(content=None, refusal=s.refusal)
    choice = {"index": s.index, "message": msg, "finish_reason": s.finish_reason,
              "logprobs": {"content": s.chat_logprobs(s.logprobs)} if with_logprobs else None}
    return {**choice, "herd_guard": s.guard} if s.guard else choice


async def completions(body: CompletionRequest, request: HTTPRequest):
    """Completions of one or more prompts. echo: each choice's text starts with its prompt; with logprobs too, the
    logprobs object starts with the prompt's tokens (null for the first), computed in the engine's batched prefill;
    max_tokens 0 (echo only) scores the prompt and generates nothing."""
    t0 = time.perf_counter()
    server = _server(request)
    sm = server.pick(body.model)
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    stop = stop_strings(body.stop)
    prompts = await run_in_threadpool(completion_prompts, body, sm)      # tokenizing: in a thread
    max_tokens = completion_max_tokens(body, sm, prompts)
    guard = server.guard
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    if guard is not None:              # the input rail: each prompt is user text (decoded in a thread, like tokenizing)
        texts = await run_in_threadpool(lambda: [sm.tok.decode(p) for p in prompts])
        refused = await guard.screen_prompts(texts,
                                             new_envelope("cmpl", "text_completion", sm.name), body.stream,
                                             include_usage)
        if refused is not None:
            return refused
    states = [ChoiceStream(i, sm.tok, stop, "off", None) for i in range(len(prompts) * body.n)]
    scoring = body.echo and body.logprobs is not None
    jobs = make_jobs(sm, body, prompts, max_tokens, body.logprobs, None,
                     prompt_logprobs=body.logprobs if scoring else 0 if max_tokens == 0 else None)
    n_prompt = sum(map(len, prompts))
    run = _submit(sm, jobs, states, t0, "completions", n_prompt)
    if guard is not None:              # the output rail over the generated text alone
        run = guard.watch_output(run, [])
    head = new_envelope("cmpl", "text_completion", sm.name)
    echoed = [sm.tok.decode(prompts[s.index // body.n], skip_special=False) if body.echo else "" for s in states]
    usage = lambda: _usage(n_prompt, states)

    def echo_entries(s: ChoiceStream) -> list[dict]:      # the prompt's logprob entries (ready once it is prefilled)
        return prompt_entries(prompts[s.index // body.n], jobs[s.index].request.prompt_logprobs) if scoring else []
    if body.stream:
        offsets = [0] * len(states)
        pending = [body.echo] * len(states)               # echo goes out with the choice's first chunk

        def choice_chunks(s: ChoiceStream, new_lps: list[dict]) -> list[dict]:
            text, entries = s.content_delta(), list(new_lps)
            if pending[s.index]:
                pending[s.index] = False
                text, entries = echoed[s.index] + text, echo_entries(s) + entries
            lp = None
            if body.logprobs is not None and entries:
                lp = s.completion_logprobs(entries, offsets[s.index])
                offsets[s.index] += sum(len(t) for t in lp["tokens"])
            if text or lp is not None or s.finished:
                entry = {"index": s.index, "text": text, "logprobs": lp, "finish_reason": s.finish_reason}
                return [{**entry, "herd_guard": s.guard} if s.guard else entry]
            return []
        return stream_chunks(run, head, [], choice_chunks, usage, include_usage)
    await run.wait(request)
    choices = []
    for s in states:
        lp = None
        if body.logprobs is not None:
            lp = s.completion_logprobs(echo_entries(s) + s.logprobs, 0)
        choices.append({"index": s.index, "text": echoed[s.index] + s.text, "finish_reason": s.finish_reason,
                        "logprobs": lp, **({"herd_guard": s.guard} if s.guard else {})})
    return respond(head, choices, usage())


def _submit(sm: ServedModel, jobs, states: list[ChoiceStream], t0: float, endpoint: str, n_prompt: int) -> Run:
    sm.submit(jobs)
    sm.metrics.prompt_tokens.labels(sm.name).inc(n_prompt)
    return Run(sm, jobs, states, t0, endpoint)


def _usage(n_prompt: int, states: list[ChoiceStream]) -> dict:
    n_out = sum(s.tokens for s in states)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


# ---- errors in OpenAI's shape -------------------------------------------------------------------------------------
async def _api_error(request, exc: APIError):
    return exc.response()


async def _validation_error(request, exc: RequestValidationError):
    errs = exc.errors()
    # herd's own checks (value errors), then other rules (too short, too large), say more than a union's every
    # branch failing on type
    first = next((e for e in errs if e.get("type") == "value_error"), None) or \
        next((e for e in errs if not e.get("type", "").endswith("_type")), errs[0] if errs else None)
    first = first or {"loc": (), "msg": "invalid request"}
    if first.get("type") == "limit_exceeded":        # limits.check_body, on the raw JSON
        return APIError(400, str(first.get("msg")), param=(first.get("ctx") or {}).get("param"),
                        code="limit_exceeded").response()
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the body is not valid JSON: {reason} (at character {first['loc'][-1]})",
                        code="invalid_json").response()
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    where = ".".join(loc)
    msg = str(first.get("msg")).removeprefix("Value error, ")
    return APIError(400, f"{where}: {msg}" if where else msg, param=where or None, code="invalid_value").response()


async def _http_error(request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()   # 405: Allow


async def _server_error(request, exc: Exception):
    log.exception("unhandled error")
    return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error").response()
