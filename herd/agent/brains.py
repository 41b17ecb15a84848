"""The model behind an agent: messages + tools in, one assistant turn (content and parsed tool calls) out. A local
model goes through the model's own chat format (chat.format_chat) and herd's tool-call parser (chat.parse_tool_calls);
a served model is any OpenAI-compatible /v1/chat/completions endpoint (`herd serve` parses the calls there). Knows
nothing of tools' handlers or the loop."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

from ..chat import format_chat, parse_tool_calls, stop_token_ids
from ..tokenizer import Tokenizer


class BrainError(RuntimeError):
    """The model could not answer: a served model's HTTP error, a prompt longer than the context."""


@dataclass
class Turn:
    content: str | None
    calls: list[dict] = field(default_factory=list)      # [{"name", "arguments": dict}]
    raw: str = ""                                          # the model's text as generated (local models)
    prompt_tokens: int | None = None


class LocalBrain:
    """A model in this process. complete(prompt ids) -> the generated text; `engine_completer` makes one over
    herd's engine, tests pass a scripted one. tool_format: Llama 4's call form (chat.llama4_call_text)."""

    def __init__(self, tok: Tokenizer, complete: Callable[[list[int]], str], name: str = "local",
                 tool_format: str = "python_list"):
        self.tok, self.complete, self.name, self.tool_format = tok, complete, name, tool_format

    def reply(self, messages: list[dict], tools: list[dict] | None) -> Turn:
        prompt = format_chat(self.tok, messages, tools or None, tool_format=self.tool_format)
        text = self.complete(prompt)
        names = {t["function"]["name"] for t in tools or []}
        content, calls = parse_tool_calls(text, names) if names else (text, [])
        return Turn(content, calls, text, len(prompt))


def engine_completer(engine, tok: Tokenizer, params) -> Callable[[list[int]], str]:
    """Greedy (or params') completion of one prompt on herd's engine. A Llama 4 answer keeps its special tokens in
    the text (<|python_start|> marks a code-interpreter call); the stop token that ended it is dropped."""
    from ..engine import ContextLengthError

    stops = set(params.stop_token_ids) | set(stop_token_ids(tok))

    def complete(prompt: list[int]) -> str:
        try:
            req = engine.add(prompt, params)
        except ContextLengthError as e:
            raise BrainError(f"the conversation no longer fits the model's context: {e}") from None
        while not req.finished:
            engine.step()
        out = req.output[:-1] if req.output and req.output[-1] in stops else req.output
        return tok.decode(out, skip_special=not tok.is_llama4)
    return complete


class ServedBrain:
    """A model behind an OpenAI-compatible server (`herd serve`, vLLM, ...): POST {url}/v1/chat/completions."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, max_tokens: int = 512,
                 temperature: float = 0.0, seed: int | None = None, timeout_s: float = 600):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.model, self.api_key, self.timeout_s = model, api_key, timeout_s
        self.sampling = {"max_tokens": max_tokens, "temperature": temperature,
                         **({"seed": seed} if seed is not None else {})}
        self.name = f"{self.url}" + (f" ({model})" if model else "")

    def reply(self, messages: list[dict], tools: list[dict] | None) -> Turn:
        body = {"messages": messages, **self.sampling, **({"model": self.model} if self.model else {}),
                **({"tools": tools, "tool_choice": "auto"} if tools else {})}
        request = urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {self.api_key}"}
                                                     if self.api_key else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise BrainError(f"{self.url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise BrainError(f"{self.url}: cannot reach the server ({e})") from None
        try:
            message = answer["choices"][0]["message"]
            calls = [{"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                     for c in message.get("tool_calls") or []]
        except (KeyError, IndexError, TypeError) as e:
            raise BrainError(f"{self.url}: not a chat completion ({e!r}): {str(answer)[:300]}") from None
        return Turn(message.get("content"), calls, message.get("content") or "",
                    answer.get("usage", {}).get("prompt_tokens"))


def _arguments(text) -> dict:
    """A served call's arguments (a JSON string); text that is not a JSON object is passed on as the model's
    mistake ({"_unparsed": text}), so the tool's argument check reports it back."""
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {"_unparsed": text}
    return value if isinstance(value, dict) else {"_unparsed": text}
