"""Grammar-constrained decoding with xgrammar: output that must match a JSON Schema, any JSON object, or a tool call.

The engine stays token-ids-only: a request may carry a `Constraint`, whose `mask(logits)` the engine calls before
sampling and `accept(token_id)` after (engine.Request.constraint). This file turns a tokenizer's vocabulary into
xgrammar's TokenizerInfo once per model (`Compiler`) and compiles schemas into per-request matchers.

JSON is generated compactly (`", "` and `": "` separators, no free whitespace): a small model cannot wander off
into endless whitespace, and every output parses with `json.loads`.
"""
from __future__ import annotations

import json
import re
import threading

from .tokenizer import Tokenizer


class GrammarError(ValueError):
    """A schema xgrammar cannot compile, or a tokenizer it cannot describe; the message says which."""


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte -> the byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def token_bytes(tok: Tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each token id adds to the text, for every id below vocab_size. Special tokens (and ids past the
    tokenizer's vocabulary) map to b"": xgrammar then treats them as special and allows them only as stop tokens."""
    out = [b""] * vocab_size
    if tok._tiktoken:
        enc = tok.backend
        for i in range(min(enc.n_vocab, vocab_size)):
            if not tok.is_special(i):
                try:
                    out[i] = enc.decode_single_token_bytes(i)
                except KeyError:          # a hole in the rank table
                    pass
        return out
    spec = json.loads(tok.backend.to_str())
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise GrammarError("structured output needs a byte-level BPE tokenizer (GPT-2 / Llama 3 / Llama 4 style); "
                           f"this one decodes with {decoder.get('type')!r}")
    byte_of = _byte_level_decoder()
    added = {t.content for t in tok.backend.get_added_tokens_decoder().values()}
    for text, i in tok.backend.get_vocab(with_added_tokens=True).items():
        if i >= vocab_size or tok.is_special(i):
            continue
        if text in added:                 # added tokens are stored as plain text, not in the byte alphabet
            out[i] = text.encode("utf-8")
        else:
            try:
                out[i] = bytes(byte_of[c] for c in text)
            except KeyError:
                out[i] = text.encode("utf-8")
    return out


class Constraint:
    """One request's grammar state. mask(): logits (V,) of tokens the grammar forbids -> -inf, in place.
    accept(): advance by the sampled token. Used by the engine thread only."""

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits):
        if self.matcher.is_terminated():
            return
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device))

    def accept(self, token_id: int):
        if not self.matcher.is_terminated():
            self.matcher.accept_token(int(token_id))


class Compiler:
    """xgrammar's view of one model's vocabulary (built once; ~1 s for a 200k vocabulary) and a cache of compiled
    grammars. stop_ids: the tokens that may end a constrained answer once the grammar is complete."""

    def __init__(self, tok: Tokenizer, vocab_size: int, stop_ids: list[int]):
        import xgrammar as xgr
        self.vocab_size = vocab_size
        # NOTE: xgrammar's JSON string rule lets raw control characters (bytes < 0x20) through, which JSON forbids
        # (json.loads rejects them). Compact JSON never needs one (escapes are printable), so tokens containing
        # one are hidden from the grammar, like special tokens.
        table = [b"" if any(c < 0x20 for c in t) else t for t in token_bytes(tok, vocab_size)]
        info = xgr.TokenizerInfo(table, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._lock = threading.Lock()     # compile from several request threads at once

    def json_schema(self, schema: dict, strict: bool = True):
        """A compiled grammar for JSON text matching `schema`. strict: objects take no properties beyond the
        schema's (OpenAI's strict mode; a bare {"type": "object"} then allows any properties only if not strict)."""
        try:
            text = json.dumps(schema)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"schema is not JSON-serialisable: {e}") from None
        try:
            with self._lock:
                return self._compiler.compile_json_schema(text, any_whitespace=False, strict_mode=strict)
        except Exception as e:            # xgrammar raises RuntimeError / ValueError subclasses with its reason
            reason = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e).splitlines()[0] if str(e) else repr(e))
            raise GrammarError(f"cannot enforce this JSON schema: {reason}") from None

    def json_object(self):
        """Any JSON object (OpenAI's response_format json_object)."""
        return self.json_schema({"type": "object"}, strict=False)

    def constraint(self, compiled) -> Constraint:
        return Constraint(compiled, self.vocab_size)


def tool_call_schema(tools: list[dict], key: str = "arguments", name: str | None = None,
                     parallel: bool = True) -> dict:
    """The JSON Schema of a tool call answer: {"name": NAME, key: <that function's parameters>}. With `name`, exactly
    that function; otherwise any of `tools`, as a JSON list of one or more calls when `parallel`."""
    def one(fn: dict) -> dict:
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object", "properties": {"name": {"const": fn["name"]}, key: params},
                "required": ["name", key], "additionalProperties": False}

    fns = [t.get("function", t) for t in tools]
    if name is not None:
        match = [f for f in fns if f.get("name") == name]
        if not match:
            raise GrammarError(f"tool_choice names {name!r}, which is not among the tools")
        return one(match[0])
    calls = [one(f) for f in fns]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"type": "array", "items": call, "minItems": 1} if parallel else call
