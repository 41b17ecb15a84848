"""Stop strings found in streamed text in time linear in the text: an Aho-Corasick automaton over a request's stop
strings, fed one character at a time. It knows nothing of tokens: textgen.TextStream feeds it decoded text.

Each step tells two things at once: whether a stop string has just ended (the text is cut before it), and how many
of the last characters could still begin one (they are held back from the stream until it is clear either way).
The state's depth is that second number, so holding back costs nothing extra: a request's stop strings, however
long, cost O(1) amortized per character produced (the old check re-tested every prefix of every stop string
against the text after each token, O(len^2) per token on the event loop).
"""
from __future__ import annotations

from collections import deque


class StopMatcher:
    """The automaton of a set of stop strings (empty strings are ignored). Its state is the longest suffix of the
    text so far that is a prefix of some stop string, as a trie node; `depth` is that suffix's length."""

    def __init__(self, stops: list[str] | tuple[str, ...]):
        self.next: list[dict[str, int]] = [{}]    # trie edges per node
        self.depth = [0]                          # characters from the root per node
        self.ends = [0]                           # length of the longest stop string ending at the node, 0: none
        for s in stops:
            if s:
                self._insert(s)
        self.fail = self._link()
        self.state = 0
        self.matched = 0                          # length of the stop string feed() last found

    def _insert(self, s: str):
        node = 0
        for c in s:
            child = self.next[node].get(c)
            if child is None:
                child = len(self.next)
                self.next[node][c] = child
                self.next.append({})
                self.depth.append(self.depth[node] + 1)
                self.ends.append(0)
            node = child
        self.ends[node] = len(s)

    def _link(self) -> list[int]:
        """Failure links, breadth first: a node's link is the deepest other node whose string is a suffix of the
        node's. A node also ends the stop strings its link ends (a stop string inside another)."""
        fail = [0] * len(self.next)
        queue = deque(self.next[0].values())
        while queue:
            node = queue.popleft()
            for c, child in self.next[node].items():
                f = fail[node]
                while f and c not in self.next[f]:
                    f = fail[f]
                fail[child] = self.next[f].get(c, 0)
                self.ends[child] = self.ends[child] or self.ends[fail[child]]
                queue.append(child)
        return fail

    def feed(self, text: str) -> int | None:
        """Advance over text. The index in `text` just past the first stop string to end in it (its length is
        `self.matched`), or None when none ends; after a match the state is undefined (the stream is over)."""
        node, nxt, fail, ends = self.state, self.next, self.fail, self.ends
        for i, c in enumerate(text):
            while node and c not in nxt[node]:
                node = fail[node]
            node = nxt[node].get(c, 0)
            if ends[node]:
                self.state, self.matched = node, ends[node]
                return i + 1
        self.state = node
        return None

    @property
    def held(self) -> int:
        """How many of the last characters fed may be the beginning of a stop string."""
        return self.depth[self.state]
