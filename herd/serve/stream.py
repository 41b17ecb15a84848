"""A response as it streams: each choice's tokens -> text (stop strings), tool-call deltas and logprobs
(ChoiceStream); the jobs of one HTTP request fed from its event queue (Run); and the one SSE function both endpoints
stream through. It knows nothing of the engine thread beyond the events it sends, and nothing of routes."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Callable

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..chat import json_call_spans, parse_tool_calls, tool_call_start
from ..textgen import TextStream
from ..tokenizer import Tokenizer
from .schemas import APIError
from .spans import CallSpans
from .worker import Job, ServedModel


class ChoiceStream:
    """Detokenizes one choice with its stop strings, holds back text that may be a tool call, splits the final text
    into content and tool calls, and cuts both into stream deltas. call_key: the arguments' key in a forced (JSON)
    call, chat.tool_call_key."""

    def __init__(self, index: int, tok: Tokenizer, stop: list[str], tool_mode: str, tool_names: set[str] | None,
                 call_key: str = "arguments"):
        self.index, self.tok = index, tok
        self.stream = TextStream(tok, stop)
        self.tool_mode, self.tool_names = tool_mode, tool_names   # "off" | "auto" | "forced"
        self.call_key = call_key
        self.spans = CallSpans(call_key)     # a forced answer's calls as it grows (json_call_spans, incremental)
        self.text, self.sent = "", 0
        self.tokens = 0
        self.logprobs: list[dict] = []       # engine entries: {"logprob", "top": [(id, lp)]}, with "id"
        self.finish_reason: str | None = None
        self.content: str | None = None
        self.calls: list[dict] = []
        self.call_ids: list[str] = []        # made when a call is first streamed, kept in the final message
        self.args_sent: list[int] = []       # per call streamed so far: characters of its arguments sent
        self.t_last: float | None = None
        self.guard: dict | None = None        # set by the output rail (serve/guard.py) when it cut this choice
        self.refusal: str | None = None

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
            elif self.tool_mode == "forced":
                self._close_cut_calls()

    def _close_cut_calls(self):
        """A forced answer cut short (max_tokens, a stop string): the calls as far as they got, as they were
        streamed (OpenAI's shape: tool_calls with the arguments' text so far, finish_reason length); no content,
        as none was streamed (it had been the raw JSON text, and disagreed with the stream)."""
        self.content = None
        self.calls = [{"id": self._call_id(k), "type": "function", "function": {"name": name, "arguments":
                                                                              self.text[a:b]}}
                      for k, (name, a, b) in enumerate(json_call_spans(self.text, self.call_key))]

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
            elif self.tool_mode == "forced":     # cut short: what there was went out as tool-call deltas
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
            calls = [(name, self.text[a:b]) for name, a, b in self.spans.update(self.text)]
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

    def completion_logprobs(self, entries: list[dict], offset: int) -> dict:
        """Engine entries -> OpenAI's completions `logprobs` object; text_offset counts from `offset` (the characters
        of the choice's text before these tokens). An echoed prompt's first token has null logprob and top."""
        toks = [self.tok.decode([e["id"]], skip_special=False) for e in entries]
        offsets, pos = [], offset
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": toks, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [None if e["top"] is None else self._top_dict(e["top"]) for e in entries],
                "text_offset": offsets}

    def _top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """OpenAI's {token text: logprob}. Two ids can decode to the same text (two halves of a character both show
        as U+FFFD): the larger logprob keeps the key, so max() of the dict is still the top logprob (lm-eval's
        is_greedy test)."""
        out: dict[str, float] = {}
        for i, lp in top:                        # largest first
            out.setdefault(self.tok.decode([i], skip_special=False), lp)
        return out

    def scored(self, finish: str):
        """The choice of a prompt only scored (max_tokens 0) ends without a token."""
        self._close(finish)


def prompt_entries(prompt: list[int], prompt_logprobs: list[dict | None]) -> list[dict]:
    """An engine request's prompt_logprobs as completion_logprobs entries: the first token's logprob and top null."""
    return [{"id": t, "logprob": None, "top": None} if e is None else {**e, "id": t}
            for t, e in zip(prompt, prompt_logprobs)]


class Run:
    """The jobs of one HTTP request and their choices, fed from the request's event queue."""

    def __init__(self, sm: ServedModel, jobs: list[Job], states: list[ChoiceStream], t0: float, endpoint: str):
        self.sm, self.jobs, self.states, self.t0, self.endpoint = sm, jobs, states, t0, endpoint
        self.events = jobs[0].events

    async def updates(self):
        """Yield (choice, new logprob entries) after every token, until every choice is finished."""
        m = self.sm.metrics
        while not all(s.finished for s in self.states):
            item = await self.events.get()
            if item[0] == "error":
                raise item[2]
            if item[0] == "scored":
                s = self.states[item[1]]
                if not s.finished:
                    s.scored(item[2])
                    m.latency.labels(self.sm.name, self.endpoint).observe(time.perf_counter() - self.t0)
                    yield s, []
                continue
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
            # tool_choice auto: the push that ends the choice parses all its text for calls (chat.parse_tool_calls,
            # seconds on adversarial text such as 8000 '['), so it runs in a thread, where the loop still gets the
            # GIL every switch interval (5 ms)
            stopped = await run_in_threadpool(s.push, token, lp, finish) if s.tool_mode == "auto" else \
                s.push(token, lp, finish)
            if stopped:
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
        gone = asyncio.ensure_future(until_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                self.cancel_unfinished()
        if not work.done():
            # cancel() only asks: the task is not cancelled until it runs again, and its result() meanwhile raised
            # InvalidStateError (two tracebacks and a 500 counted for every client that gave up)
            await asyncio.wait({work})
        if work.cancelled():
            raise APIError(499, "client closed the request", code="client_closed_request")
        work.result()                             # re-raise an engine error as its APIError

    def cancel_unfinished(self):
        for job, s in zip(self.jobs, self.states):
            if not s.finished:
                self.sm.cancel(job)


def sse(obj) -> str:
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


def event_stream(run: Run, chunks) -> EventStream:
    """A streamed response: each chunk as an event, an error that ends the run early as OpenAI's error body, then
    [DONE]. However the stream ends (done, error, client gone), the run's unfinished choices are cancelled."""
    async def events():
        try:
            async for c in chunks:
                yield sse(c)
        except APIError as e:
            yield sse(e.body())
        finally:
            run.cancel_unfinished()
        yield "data: [DONE]\n\n"
    return EventStream(events(), media_type="text/event-stream")


async def until_disconnect(request: HTTPRequest):
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def stream_chunks(run: Run, envelope: dict, opening: list[dict],
                  choice_chunks: Callable[[ChoiceStream, list[dict]], list[dict]], usage: Callable[[], dict],
                  include_usage: bool) -> EventStream:
    """The streamed answer of either endpoint: `opening` choice entries first (chat's role deltas, completions'
    echoed prompts), then the entries choice_chunks makes of each update (a choice and its new logprob entries),
    each as a chunk {**envelope, "choices": [entry]}; with include_usage every chunk carries "usage": null and a
    last chunk with no choices carries the usage (OpenAI's stream_options)."""
    def chunk(choices: list[dict], with_usage: dict | None = None) -> dict:
        c = {**envelope, "choices": choices}
        if include_usage:
            c["usage"] = with_usage
        return c

    async def chunks() -> AsyncIterator[dict]:
        for entry in opening:
            yield chunk([entry])
        async for s, new_lps in run.updates():
            for entry in choice_chunks(s, new_lps):
                yield chunk([entry])
        if include_usage:
            yield chunk([], usage())
    return event_stream(run, chunks())


def respond(envelope: dict, choices: list[dict], usage: dict) -> JSONResponse:
    """The whole answer of either endpoint at once."""
    return JSONResponse({**envelope, "choices": choices, "usage": usage})


def new_envelope(prefix: str, object_name: str, model: str) -> dict:
    """The fields every response and chunk of one request share: a new id, the object name, created, model."""
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": object_name, "created": int(time.time()),
            "model": model}
