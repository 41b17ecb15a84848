"""Guard rails of a served chat request, in OpenAI's terms: what the input guard reads (user and tool messages), the
output guard over an answer that grows while it streams, and the shapes a flagged request or `/v1/moderations`
returns. Knows no HTTP framework and no engine: the server's guard stage calls it with plain dicts and strings.
"""
from __future__ import annotations

import re
import threading
import uuid

from .verdict import GuardError, Verdict

# OpenAI moderation categories (the `categories` object of /v1/moderations) and the Llama Guard 4 codes that fall
# under each; a code with no OpenAI counterpart (S6, S7, S8, S13) is reported under the guard's own key only.
OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
                     "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
                     "sexual/minors", "violence", "violence/graphic")
LLAMA_GUARD_TO_OPENAI = {"S1": ("violence", "illicit/violent"), "S2": ("illicit",), "S3": ("sexual",),
                         "S4": ("sexual/minors",), "S5": ("harassment",), "S9": ("violence", "illicit/violent"),
                         "S10": ("hate",), "S11": ("self-harm",), "S12": ("sexual",), "S14": ("illicit",)}
CHECK_EVERY = 200          # characters of new answer text between two output-guard checks while streaming


def category_key(name: str) -> str:
    """A guard category's key in a moderation result:
    'Prompt Injection and Jailbreaks.' -> 'prompt_injection_and_jailbreaks'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def message_text(msg: dict) -> str:
    content = msg.get("content")
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text")


class GuardRails:
    """The input guard (user and tool messages) and the output guard (the assistant's answer) of one server, with
    counts of what each flagged. A guard's check runs under a lock: one model, one caller at a time."""

    def __init__(self, input_guard=None, output_guard=None, check_every: int = CHECK_EVERY):
        self.input_guard, self.output_guard, self.check_every = input_guard, output_guard, check_every
        self.flagged = {"input": 0, "output": 0}
        self.checked = {"input": 0, "output": 0}
        self.seconds = {"input": 0.0, "output": 0.0}
        self._locks = {"input": threading.Lock(), "output": threading.Lock()}
        self.on_check = None          # called with (rail, verdict) after every check: the server's metrics

    def _check(self, rail: str, guard, content) -> Verdict:
        with self._locks[rail]:
            v = guard.check(content)
        self.checked[rail] += 1
        self.seconds[rail] += v.seconds
        if v.flagged:
            self.flagged[rail] += 1
        if self.on_check is not None:
            self.on_check(rail, v)
        return v

    def moderate(self, inputs, model_name: str) -> dict:
        """/v1/moderations with the input guard (else the output guard), under that rail's lock."""
        rail = "input" if self.input_guard is not None else "output"
        with self._locks[rail]:
            return moderation_response(self.input_guard or self.output_guard, inputs, model_name)

    def check_input(self, messages: list[dict]) -> tuple[int, Verdict] | None:
        """(message index, verdict) of the first user or tool message the input guard flags; None when all pass.
        Tool results are what an agent reads from outside (pages, files, mail): they get the same check."""
        if self.input_guard is None:
            return None
        for i, m in enumerate(messages):
            if m.get("role") not in ("user", "tool"):
                continue
            text = message_text(m)
            if not text.strip():
                continue
            v = self._check("input", self.input_guard, text)
            if v.flagged:
                return i, v
        return None

    def output_check(self, messages: list[dict]) -> "OutputCheck | None":
        return None if self.output_guard is None else OutputCheck(self, messages)

    def metrics(self) -> dict:
        return {"flagged": dict(self.flagged), "checked": dict(self.checked), "seconds": dict(self.seconds)}


class OutputCheck:
    """The output guard over one answer: `feed(delta)` checks again each time `check_every` more characters have
    arrived (so a streamed answer is cut soon after it turns unsafe), `finish()` checks the whole answer. Each
    returns the flagging verdict, or None. A Llama Guard that reads conversations judges the answer as the Agent
    turn after the last user message; other guards read the answer alone."""

    def __init__(self, rails: GuardRails, messages: list[dict]):
        self.rails, self.text, self.checked_len = rails, "", 0
        users = [message_text(m) for m in messages if m.get("role") == "user"]
        self.last_user = users[-1] if users and users[-1].strip() else None
        self.verdict: Verdict | None = None

    def _content(self):
        g = self.rails.output_guard
        if getattr(g, "reads_conversations", False) and self.last_user is not None:
            return [{"role": "user", "content": self.last_user}, {"role": "assistant", "content": self.text}]
        return self.text

    def _run(self) -> Verdict | None:
        self.checked_len = len(self.text)
        if not self.text.strip():
            return None
        v = self.rails._check("output", self.rails.output_guard, self._content())
        if v.flagged:
            self.verdict = v
            return v
        return None

    def feed(self, delta: str) -> Verdict | None:
        self.text += delta
        if self.verdict is None and len(self.text) - self.checked_len >= self.rails.check_every:
            return self._run()
        return None

    def finish(self) -> Verdict | None:
        if self.verdict is None and len(self.text) > self.checked_len:
            return self._run()
        return self.verdict


# ---- OpenAI shapes --------------------------------------------------------------------------------------------------
def guard_info(v: Verdict, rail: str, message_index: int | None = None) -> dict:
    """The verdict as herd's extension object (`guard` in a refused response, `herd_guard` in a stream chunk)."""
    out = {"rail": rail, **v.to_dict()}
    if message_index is not None:
        out["message_index"] = message_index
    return out


def refusal_text(v: Verdict, rail: str) -> str:
    what = "request" if rail == "input" else "answer"
    cats = f" ({', '.join(v.categories)})" if v.categories else ""
    done = "answered" if rail == "input" else "completed"
    return f"This {what} was flagged by the {rail} guard{cats} and was not {done}."


def moderation_result(guard, v: Verdict, input_types=("text",)) -> dict:
    """One result of /v1/moderations for a verdict: OpenAI's categories (from Llama Guard codes where they map) plus
    the guard's own categories under their names, with scores (the verdict's score on what it flagged)."""
    from .llama_guard import CATEGORIES
    own = getattr(guard, "categories", None)
    # a code means Llama Guard 4's category only where the guard was asked about that category (the default
    # guard's S1 is prompt injection, not violent crimes)
    lg4 = [code for code in v.categories if own and own.get(code) == CATEGORIES.get(code)]
    flagged_openai = {c for code in lg4 for c in LLAMA_GUARD_TO_OPENAI.get(code, ())}
    categories = {c: c in flagged_openai for c in OPENAI_CATEGORIES}
    scores = {c: (v.score if c in flagged_openai else 0.0) for c in OPENAI_CATEGORIES}
    if own:                               # a Llama Guard: every category it was asked about
        listed = [(code, name) for code, name in own.items() if code not in getattr(guard, "excluded", ())]
        for code, name in listed:
            hit = code in v.categories or (v.flagged and not v.categories and len(listed) == 1)
            categories[category_key(name)] = hit
            scores[category_key(name)] = v.score if hit else 0.0
    else:                                 # Prompt Guard: one label, a prompt attack
        categories["prompt_attack"], scores["prompt_attack"] = v.flagged, v.score
    types = {c: list(input_types) if categories[c] else [] for c in categories}
    return {"flagged": v.flagged, "categories": categories, "category_scores": scores,
            "category_applied_input_types": types, "herd_guard": v.to_dict()}


def moderation_response(guard, inputs, model_name: str) -> dict:
    """The body of POST /v1/moderations: `inputs` is a string or a list of strings (one result each)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
        raise GuardError("input must be a string or a non-empty list of strings")
    return {"id": f"modr-{uuid.uuid4().hex[:24]}", "model": model_name,
            "results": [moderation_result(guard, guard.check(x)) for x in inputs]}


__all__ = ["CHECK_EVERY", "GuardRails", "LLAMA_GUARD_TO_OPENAI", "OPENAI_CATEGORIES", "OutputCheck", "guard_info",
           "message_text", "moderation_response", "moderation_result", "refusal_text"]
