"""One served model and the background thread that drives its Engine (continuous batching: requests join and leave
the running batch between decode steps). Admission (at most max_batch running + max_queue waiting, then HTTP 429),
cancellation and the per-model metrics live here. It knows nothing of HTTP bodies or text: jobs carry token ids,
and tokens go back on each request's asyncio queue."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..chat import stop_token_ids
from ..constrain import Compiler
from ..engine import Engine, SamplingParams
from ..tokenizer import Tokenizer
from .metrics import Metrics
from .schemas import APIError

log = logging.getLogger("herd.serve")

DEFAULT_MAX_BATCH = 16         # requests decoded together
DEFAULT_MAX_QUEUE = 64         # requests waiting for a batch slot before 429
DEFAULT_MAX_SEQ_LEN = 4096     # context (prompt + output) per request


@dataclass(eq=False)
class Job:
    """One engine request as the HTTP side sees it. The engine thread puts ("token", choice, id, logprob entry,
    finish reason), ("scored", choice, finish reason) for a prompt only scored (max_tokens 0; its prompt logprobs
    are then on `request`) and ("error", choice, APIError) on `events` through the request's event loop."""
    choice: int
    prompt: list[int]
    params: SamplingParams
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    constraint: object | None = None
    images: Any = None           # pixel values (n_tiles, 3, S, S) for the prompt's image tokens, or None
    request: Any = None          # engine.Request, set by the engine thread
    done: bool = False           # engine thread only

    def push(self, item):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:     # the event loop is gone (server shutting down)
            pass


class ServedModel:
    """A model, its tokenizer and an Engine driven by one background thread."""

    def __init__(self, name: str, model, tok: Tokenizer, max_batch: int = DEFAULT_MAX_BATCH,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN, max_queue: int = DEFAULT_MAX_QUEUE, cache_dtype=None,
                 step_tokens: int | None = None, prefix_cache_mib: float = 256):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 (0: no request waits for a slot), got {max_queue}")
        self.name, self.model, self.tok = name, model, tok
        self.engine = Engine(model, max_batch=max_batch, max_seq_len=max_seq_len, cache_dtype=cache_dtype,
                             step_tokens=step_tokens, prefix_cache_mib=prefix_cache_mib)
        self._prefix_hits_counted = 0
        self.max_queue = max_queue
        self.stop_ids = sorted(set(stop_token_ids(tok)) | set(model.config.eos_token_ids))
        self.created = int(time.time())
        self.max_token_chars = longest_token_chars(tok)
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
        self._closing_at: float | None = None    # shutting down: monotonic time at which what runs is cancelled
        self._thread: threading.Thread | None = None

    @property
    def context_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    def queue_depth(self) -> int:
        return max(0, self._outstanding - self._running)

    def running(self) -> int:
        """Requests in the running batch (as of the engine thread's last step)."""
        return self._running

    def alive(self) -> bool:
        """Whether the engine thread runs (/health's check)."""
        return self._thread is not None and self._thread.is_alive()

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
        if self._closing_at is not None:
            raise APIError(503, "server shutting down", type="server_error")
        if self._outstanding + n > self.max_batch + self.max_queue:
            raise APIError(429, f"model {self.name!r} is at capacity ({self.max_batch} running, {self.max_queue} "
                                "waiting); retry later", type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})

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

    def close(self, grace_s: float):
        """Shutting down: admit nothing more; what runs may finish for grace_s seconds, then it is cancelled (its
        clients get a 503 'server shutting down'). Returns at once."""
        self._closing_at = time.monotonic() + grace_s
        self._wake.set()

    def stop(self, wait_s: float = 1.0):
        """Stop the engine thread after its current step. A step longer than wait_s (a batch's prefill can take
        seconds) is left to the daemon thread: the process exits without it (SIGTERM: within 5 s)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=wait_s)

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
            if self._closing_at is not None and time.monotonic() >= self._closing_at and self._jobs:
                self._fail_all(APIError(503, "server shutting down", type="server_error"))
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
            cache = self.engine.prefix_cache
            if self.metrics is not None and cache is not None and cache.hit_tokens > self._prefix_hits_counted:
                self.metrics.prefix_hit_tokens.labels(self.name).inc(cache.hit_tokens - self._prefix_hits_counted)
                self._prefix_hits_counted = cache.hit_tokens
            for req, token in events:
                job = self._jobs.get(req)
                if job is None:
                    continue
                lp = req.logprobs[-1] if req.params.logprobs is not None and req.logprobs else None
                job.push(("token", job.choice, token, lp, req.finish_reason))
                if req.finished:
                    self._finish(job, req.finish_reason)
            # prompts only scored (max_tokens 0) finish in their prefill without a token: no event above
            for req, job in [(r, j) for r, j in self._jobs.items() if r.finished and not r.output]:
                job.push(("scored", job.choice, req.finish_reason))
                self._finish(job, req.finish_reason)
        self._fail_all(APIError(503, "server shutting down", type="server_error"))

    def _fail_all(self, err: APIError):
        for job in list(self._jobs.values()):
            job.push(("error", job.choice, err))
            if job.request is not None:
                self.engine.cancel(job.request)
            self._finish(job, "error")
        self._running = 0


def longest_token_chars(tok: Tokenizer) -> int:
    """The most characters one token of tok decodes to (special tokens' text included), for inputs.check_prompt_chars.
    ~0.5 s for a 50k vocabulary."""
    longest = 1
    for i in range(tok.vocab_size):
        try:
            longest = max(longest, len(tok.decode([i], skip_special=False)))
        except (KeyError, ValueError):     # a hole in a tiktoken rank table
            pass
    return longest


def short_name(path: str | Path) -> str:
    """A model id from its path: a GGUF file's name up to the first dot, or the folder's name."""
    p = Path(path)
    return p.name.split(".")[0] if p.is_file() else p.name
