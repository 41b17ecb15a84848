"""What every guard returns (a Verdict) and how bad guard input is refused (GuardError). Knows no model."""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_TEXT_BYTES = 512 * 1024     # longest text a guard scans (UTF-8); a 1 MB paste is refused, never cut silently


class GuardError(ValueError):
    """Input a guard cannot check, or a guard that cannot be loaded, naming what was wrong and what was expected."""


@dataclass
class Verdict:
    """One guard's decision on one text or conversation.

    flagged: the guard's decision (Llama Guard: it said `unsafe`, or its answer could not be parsed; Prompt Guard:
        score >= threshold). A guard fails closed: an answer it cannot read is flagged, never passed.
    score: probability of the unsafe / malicious verdict, 0..1 (Llama Guard: of the first verdict token; Prompt
        Guard: label 1's softmax, the maximum over 512-token windows).
    categories: Llama Guard category codes (e.g. ["S1", "S10"]); empty for Prompt Guard and for `safe`.
    raw: the guard's own output text (Llama Guard), for logs and malformed answers.
    malformed: the output was neither `safe` nor `unsafe` [+ a line of known codes].
    """
    flagged: bool
    score: float
    guard: str
    categories: list[str] = field(default_factory=list)
    raw: str = ""
    malformed: bool = False
    seconds: float = 0.0
    tokens: int = 0           # prompt tokens the guard read (all windows)

    @property
    def label(self) -> str:
        return "unsafe" if self.flagged else "safe"

    def to_dict(self) -> dict:
        return {"verdict": self.label, "flagged": self.flagged, "score": round(self.score, 6),
                "categories": self.categories, "guard": self.guard, "malformed": self.malformed,
                "raw": self.raw, "seconds": round(self.seconds, 4), "tokens": self.tokens}


def check_text(text) -> str:
    """The text a guard may scan, or a GuardError: a string, not empty or only whitespace, at most
    MAX_TEXT_BYTES of UTF-8."""
    if not isinstance(text, str):
        raise GuardError(f"expected text (a string), got {type(text).__name__}")
    if not text.strip():
        raise GuardError("empty text: there is nothing to check (give at least one non-space character)")
    n = len(text.encode("utf-8", errors="surrogatepass"))
    if n > MAX_TEXT_BYTES:
        raise GuardError(f"text is {n:,} bytes; a guard scans at most {MAX_TEXT_BYTES:,} bytes per check "
                         "(split it and check the parts)")
    return text
