"""What one request may ask for: each limit with its default and the `herd serve` flag that changes it, which the
error a request gets names. Only the values live here (no imports: the CLI builds its flags from them); the checks
are where a request's inputs are read (inputs.py) and, for the body's size, in front of the routes (gate.py)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields


def _limit(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Limits:
    max_body_mb: float = _limit(16.0, "largest request body in MB, refused with 413 before it is read (images come "
                                      "inline as base64)")
    max_messages: int = _limit(1024, "messages in one chat request")
    max_tools: int = _limit(128, "tools in one chat request (OpenAI's limit)")
    max_stop: int = _limit(4, "stop strings in one request (OpenAI's limit)")
    max_stop_chars: int = _limit(1000, "characters in one stop string")
    max_schema_chars: int = _limit(65536, "characters of JSON in a request's tools or response_format schema")
    max_schema_depth: int = _limit(64, "nesting depth of a request's tools or response_format schema as JSON "
                                       "(grammar compiling grows faster: depth 300 took 4 s, 950 took 78 s)")
    default_max_tokens: int = _limit(1024, "a chat request's max_tokens when it gives none (0: the rest of the "
                                           "context, which can hold a batch slot for minutes)")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def flag(name: str) -> str:
    """The `herd serve` flag of a Limits field."""
    return "--" + name.replace("_", "-")


def limit_fields():
    """(name, default, help) of each limit, for the CLI's flags."""
    return [(f.name, f.default, f.metadata["help"]) for f in fields(Limits)]
