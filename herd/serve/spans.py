"""Where a forced tool-call answer's arguments lie while it streams, in time linear in the text: the incremental twin
of chat.json_call_spans, which rescans the whole answer (O(len) per token, so O(len^2) per answer on the event
loop: 29 s for one 16k-character argument fed a character at a time). Complete calls are never looked at again;
the open call's argument value is scanned over its new characters only. It knows nothing of tokens or HTTP."""
from __future__ import annotations

import json
import re

# a head is '{"name": NAME, KEY: ' with NAME a tool name (FunctionDef: at most 64 plain characters): text that has
# not matched one within this many characters never will
_HEAD_MAX = 256


class CallSpans:
    """update(text) == chat.json_call_spans(text, key) for a text that only grows between calls."""

    def __init__(self, key: str):
        self.head = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), ' + re.escape(json.dumps(key)) + ": ")
        self.spans: list[tuple[str, int, int]] = []    # calls whose arguments are complete
        self.at: int | None = None       # where the next head is expected (None: the optional '[' not seen yet)
        self.open: tuple[str, int] | None = None       # (name, start) of the arguments still being generated
        self.i = self.depth = 0          # the open value's scan: next index, bracket depth, inside a string
        self.in_string = False
        self.over = False                # the text left the form: no more spans, ever

    def update(self, text: str) -> list[tuple[str, int, int]]:
        while not self.over and text:
            if self.at is None:
                self.at = 1 if text.startswith("[") else 0
            if self.open is not None:
                end = self._scan(text)
                if end is None:
                    return self.spans + [(*self.open, len(text))]
                self.spans.append((*self.open, end))
                self.open, self.at = None, -end          # negative: a value ended there, "}, " expected
            if self.at < 0:
                end, rest = -self.at, text[-self.at:-self.at + 3]
                if rest == "}, ":
                    self.at = end + 3
                elif not "}, ".startswith(rest):
                    self.over = True
                if self.at < 0:
                    break
            m = self.head.match(text, self.at)
            if m is None:
                self.over = len(text) - self.at > _HEAD_MAX
                break
            self.open = (json.loads(m.group(1)), m.end())
            self.i, self.depth, self.in_string = m.end(), 0, False
        return list(self.spans)

    def _scan(self, text: str) -> int | None:
        """chat._json_value_end from where the last scan stopped: the index just past the open value, or None."""
        i, depth, in_string = self.i, self.depth, self.in_string
        end = None
        while i < len(text):
            c = text[i]
            if in_string:
                if c == "\\":
                    i += 1
                elif c == '"':
                    in_string = False
                    if depth == 0:
                        end = i + 1
                        break
            elif c == '"':
                in_string = True
            elif c in "[{":
                depth += 1
            elif c in "]}":
                if depth == 0:
                    end = i
                    break
                depth -= 1
                if depth == 0:
                    end = i + 1
                    break
            elif c == "," and depth == 0:
                end = i
                break
            i += 1
        self.i, self.depth, self.in_string = i, depth, in_string
        return end
