"""The guard stage of a served request (`herd serve --guard-input M --guard-output M`) and `POST /v1/moderations`.

- Input rail: before a request reaches the engine, every user and tool message (each prompt of /v1/completions) is
  checked (herd/guard/rails.py); a flagged one is answered at once with OpenAI's refusal shape: message.refusal
  (delta.refusal when streamed; an empty text for completions), finish_reason "content_filter", and herd's
  `herd_guard` object with the verdict.
- Output rail: the answer is checked as it grows (every rails.CHECK_EVERY characters, and at its end). Text reaches
  the client only after a check has passed it, so a flagged answer is cut before its unsafe part is sent: the engine
  request is cancelled and the choice ends with finish_reason "content_filter" and `herd_guard`.
- Flagged and checked counts per rail are Prometheus counters on the app's /metrics.
Guard models run in a worker thread (one check at a time per rail), never on the event loop. This module knows the
shapes of requests and responses, not the guards' internals.
"""
from __future__ import annotations

from fastapi import Request as HTTPRequest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from ..guard import GuardError, load_guard
from ..guard.rails import GuardRails, guard_info, refusal_text
from .schemas import APIError
from .stream import ChoiceStream, EventStream, Run, respond, sse


class ModerationRequest(BaseModel):
    input: str | list[str]
    model: str | None = None


def load_rails(input_spec: str | None, output_spec: str | None) -> GuardRails | None:
    """The guards named on the command line, loaded before the server starts: a guard that cannot be loaded stops
    the start with its reason (GuardError), so nothing is ever served unguarded by accident."""
    if not input_spec and not output_spec:
        return None
    loaded = {}
    for spec in filter(None, (input_spec, output_spec)):
        if spec not in loaded:
            try:
                loaded[spec] = load_guard(spec)
            except GuardError as e:
                raise GuardError(f"cannot start with guard {spec!r}: {e}") from None
    return GuardRails(loaded.get(input_spec), loaded.get(output_spec))


class GuardStage:
    """The rails of one server and their counters in its metrics registry."""

    def __init__(self, rails: GuardRails, registry):
        from prometheus_client import Counter
        self.rails = rails
        self.checked = Counter("herd_guard_checks", "texts a guard checked, by rail", ["rail"], registry=registry)
        self.flagged = Counter("herd_guard_flagged", "texts a guard flagged, by rail", ["rail"], registry=registry)
        self.rails.on_check = lambda rail, v: (self.checked.labels(rail).inc(),
                                               v.flagged and self.flagged.labels(rail).inc())

    @property
    def guard(self):
        """The guard /v1/moderations asks: the input guard, else the output guard."""
        return self.rails.input_guard or self.rails.output_guard

    async def screen_input(self, messages: list[dict], envelope: dict, stream: bool, include_usage: bool):
        """None when the input rail passes a chat request; else the refusal in chat.completion's shape."""
        hit = await self._flagged_input(messages, "messages")
        if hit is None:
            return None
        info, text = hit
        refused = {"index": 0, "message": {"role": "assistant", "content": None, "refusal": text},
                   "finish_reason": "content_filter", "logprobs": None}
        opening = {"index": 0, "delta": {"role": "assistant", "refusal": text}, "logprobs": None,
                   "finish_reason": None}
        return _refusal(envelope, "chat.completion.chunk", refused, opening, info, stream, include_usage)

    async def screen_prompts(self, prompts: list[str], envelope: dict, stream: bool, include_usage: bool):
        """The input rail over /v1/completions: each prompt is user text. None when all pass; else the refusal in
        text_completion's shape (an empty text, finish_reason content_filter: completions have no refusal field)."""
        hit = await self._flagged_input([{"role": "user", "content": p} for p in prompts], "prompt")
        if hit is None:
            return None
        info = hit[0]
        refused = {"index": 0, "text": "", "finish_reason": "content_filter", "logprobs": None}
        return _refusal(envelope, "text_completion", refused, None, info, stream, include_usage)

    async def _flagged_input(self, messages: list[dict], param: str) -> tuple[dict, str] | None:
        """(herd_guard's object, the refusal text) for the first message the input guard flags, None when all pass;
        text the guard cannot check (too long, say) is a 400, never passed unchecked."""
        if self.rails.input_guard is None:
            return None
        try:
            hit = await run_in_threadpool(self.rails.check_input, messages)
        except GuardError as e:
            raise APIError(400, f"the input guard cannot check this request: {e}", param=param) from None
        if hit is None:
            return None
        index, verdict = hit
        return guard_info(verdict, "input", index), refusal_text(verdict, "input")

    def watch_output(self, run: Run, messages: list[dict]) -> Run:
        return run if self.rails.output_guard is None else GuardedRun(run, self.rails, messages)


def _refusal(envelope: dict, chunk_object: str, refused: dict, opening: dict | None, info: dict, stream: bool,
             include_usage: bool):
    """A request the input rail refused, answered at once: one choice, no tokens used; streamed, an opening entry
    (chat's refusal delta) and a last one with finish_reason content_filter and herd_guard."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if not stream:
        return respond({**envelope, "herd_guard": info}, [refused], usage)
    head = {**envelope, "object": chunk_object}
    extra = {"usage": None} if include_usage else {}
    last = {k: v for k, v in refused.items() if k != "message"}
    if "message" in refused:
        last["delta"] = {}
    entries = ([opening] if opening else []) + [last]
    chunks = [{**head, **extra, "choices": [e]} for e in entries]
    chunks[-1]["herd_guard"] = info
    if include_usage:
        chunks.append({**head, "choices": [], "usage": usage})

    async def events():
        for c in chunks:
            yield sse(c)
        yield "data: [DONE]\n\n"
    return EventStream(events(), media_type="text/event-stream")


class GuardedRun(Run):
    """A Run whose updates pass the output rail: a choice's update is released only once the guard has checked all
    of its text (the stream lags by at most CHECK_EVERY characters), and a flagged choice is cut."""

    def __init__(self, run: Run, rails: GuardRails, messages: list[dict]):
        super().__init__(run.sm, run.jobs, run.states, run.t0, run.endpoint)
        self.checks = [rails.output_check(messages) for _ in run.states]
        self.released = [0] * len(run.states)            # per choice: logprob entries handed on so far

    async def updates(self):
        held: dict[int, list[dict]] = {}                 # logprob entries of updates not yet released
        async for s, lps in super().updates():
            held.setdefault(s.index, []).extend(lps)
            check = self.checks[s.index]
            new = s.text[len(check.text):]
            verdict = await run_in_threadpool(check.feed, new) if new else None
            if verdict is None and s.finished:
                verdict = await run_in_threadpool(check.finish)
            if verdict is not None:
                self.cut(s, verdict)
                held.pop(s.index, None)                   # unchecked tokens: their logprobs would spell them
            elif not s.finished and (check.checked_len < len(s.text) or check.checked_len == 0):
                continue      # unchecked text: hold it back; before the first check, tokens with no text yet too
            lps = held.pop(s.index, [])
            self.released[s.index] += len(lps)
            yield s, lps

    def cut(self, s: ChoiceStream, verdict):
        """End a choice the output guard flagged: its engine request cancelled, only text already sent kept."""
        if not s.finished:
            self.sm.cancel(self.jobs[s.index], "content_filter")
        s.text = s.content = s.text[:s.sent]
        # logprobs as far as text went out (streamed); a whole answer (not streamed) sent nothing, so keeps none
        s.logprobs = s.logprobs[:self.released[s.index]] if s.sent else []
        s.calls = []
        s.finish_reason = "content_filter"
        s.guard = guard_info(verdict, "output")
        s.refusal = refusal_text(verdict, "output")


async def moderations(body: ModerationRequest, request: HTTPRequest):
    """POST /v1/moderations: OpenAI's moderation object from the server's guard, one result per input."""
    stage: GuardStage | None = request.app.state.server.guard
    if stage is None:
        raise APIError(404, "this server has no guard: start it with --guard-input or --guard-output",
                       type="not_found_error", code="no_guard")
    guard = stage.guard
    try:
        return await run_in_threadpool(stage.rails.moderate, body.input, body.model or guard.name)
    except GuardError as e:
        raise APIError(400, str(e), param="input") from None
