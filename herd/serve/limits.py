"""What one request may ask for: each limit with its default and the `herd serve` flag that changes it, which the
error a request gets names; and the checks of a request's counts and sizes on its raw JSON, before pydantic builds
anything from it (validating 500k tiny messages took 5.5 s on the event loop; refused by count first, 15 ms).

The body's bytes and items are checked in front of the routes (gate.py), which also makes the serving app's
Limits the `current` ones of the request; the request schemas' first validator (schemas.py) runs check_body. It
imports nothing of FastAPI or pydantic: the CLI builds its flags from Limits."""
from __future__ import annotations

import json
import math
from contextvars import ContextVar
from dataclasses import dataclass, field, fields


def _limit(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Limits:
    max_body_mb: float = _limit(16.0, "largest request body in MB, refused with 413 before it is read (images come "
                                      "inline as base64)")
    max_body_items: int = _limit(200_000, "JSON values in a request body, counted by its commas before it is "
                                           "parsed (413): parsing small values costs ~85 ms per MB on the event loop")
    max_body_objects: int = _limit(10_000, "JSON objects in a request body, counted by their '{' before it is "
                                           "parsed (413): validating one (a message, a content part) costs ~10 us")
    max_messages: int = _limit(1024, "messages in one chat request")
    max_tools: int = _limit(128, "tools in one chat request (OpenAI's limit)")
    max_stop: int = _limit(4, "stop strings in one request (OpenAI's limit)")
    max_stop_chars: int = _limit(1000, "characters in one stop string")
    max_schema_chars: int = _limit(65536, "characters of JSON in a request's tools or response_format schema")
    max_schema_depth: int = _limit(64, "nesting depth of a request's tools or response_format schema as JSON "
                                       "(grammar compiling grows faster: depth 300 took 4 s, 950 took 78 s)")
    default_max_tokens: int = _limit(1024, "a chat request's max_tokens when it gives none (0: the rest of the "
                                           "context, which can hold a batch slot for minutes)")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise ValueError(f"limit {f.name} must be a number >= 0 (herd serve {flag(f.name)}), got {value!r}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


current: ContextVar[Limits] = ContextVar("current", default=Limits())   # the serving app's, set by its gate


class LimitError(ValueError):
    """A request past one of its limits: the message names the limit and its flag; param, the request field."""

    def __init__(self, what: str, given: int, name: str, limits: Limits, param: str):
        super().__init__(f"{what}: {given} given, at most {getattr(limits, name)} (herd serve {flag(name)})")
        self.param = param


def flag(name: str) -> str:
    """The `herd serve` flag of a Limits field."""
    return "--" + name.replace("_", "-")


def limit_fields():
    """(name, default, help) of each limit, for the CLI's flags."""
    return [(f.name, f.default, f.metadata["help"]) for f in fields(Limits)]


def check_body(body, limits: Limits):
    """A request body's counts and sizes, on its raw JSON (what the schema will validate): messages, tools, stop
    strings and their length, the tools' and response_format's schemas (depth first: json.dumps recurses)."""
    if not isinstance(body, dict):
        return                                   # not an object: the schema says so
    for param, name, what in (("messages", "max_messages", "messages"), ("tools", "max_tools", "tools")):
        if isinstance(body.get(param), list) and len(body[param]) > getattr(limits, name):
            raise LimitError(what, len(body[param]), name, limits, param)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stop) > limits.max_stop:
        raise LimitError("stop strings", len(stop), "max_stop", limits, "stop")
    for i, s in enumerate(stop):
        if isinstance(s, str) and len(s) > limits.max_stop_chars:
            raise LimitError(f"stop[{i}] characters", len(s), "max_stop_chars", limits, "stop")
    fmt = body.get("response_format")
    for param, schema in (("tools", body.get("tools")), ("response_format", fmt if isinstance(fmt, dict) else None)):
        if not schema:
            continue
        depth = json_depth(schema)
        if depth > limits.max_schema_depth:
            raise LimitError(f"{param} as JSON, nesting depth", depth, "max_schema_depth", limits, param)
        size = len(json.dumps(schema, ensure_ascii=False))
        if size > limits.max_schema_chars:
            raise LimitError(f"{param} as JSON, characters", size, "max_schema_chars", limits, param)


def json_depth(value) -> int:
    """How deeply lists and dicts nest in JSON data (0 for a scalar), level by level: no recursion to run out of."""
    depth, level = 0, [value]
    while True:
        containers = [x for x in level if isinstance(x, (dict, list))]
        if not containers:
            return depth
        depth += 1
        level = [v for x in containers for v in (x.values() if isinstance(x, dict) else x)]
