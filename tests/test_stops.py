"""Stop strings in streamed text: stops.StopMatcher (Aho-Corasick) and textgen.TextStream on it agree with a plain
reference (re-scan the whole text after every piece), and cost time linear in the text, whatever the stop strings'
length (issue 22: one 300 KB stop string froze the server)."""
import random
import time

from herd.stops import StopMatcher
from herd.textgen import TextStream


def reference_stream(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """The deltas a stream of text pieces gives, by brute force: after each piece, the first character at which a
    stop string ends (the longest one there) cuts the text before it; otherwise the longest suffix that is a
    proper prefix of a stop string is held back."""
    stops = [s for s in stops if s]
    text, sent, deltas = "", 0, []
    for k, piece in enumerate(pieces):
        start = len(text)
        text += piece
        for end in range(start + 1, len(text) + 1):
            found = [s for s in stops if text[:end].endswith(s)]
            if found:
                deltas.append(text[sent:end - max(map(len, found))])
                return deltas, True
        final = k == len(pieces) - 1
        hold = 0 if final else max((j for s in stops for j in range(1, len(s)) if text.endswith(s[:j])), default=0)
        deltas.append(text[sent:len(text) - hold])
        sent = len(text) - hold
    return deltas, False


class CharTokenizer:
    """Token id = a character's code point: enough for TextStream's decoder."""
    def decode(self, ids, skip_special=True):
        return "".join(map(chr, ids))


def stream(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """TextStream fed one character per token, with a piece's last character marking a delta boundary."""
    ts, deltas = TextStream(CharTokenizer(), stops), []
    for k, piece in enumerate(pieces):
        out = "".join(ts.push(ord(c)) for c in piece)
        if ts.stopped:
            return deltas + [out], True
        deltas.append(out + (ts.finish() if k == len(pieces) - 1 else ""))
    return deltas, False


def test_matches_the_reference_on_random_text():
    rng = random.Random(0)
    for trial in range(3000):
        alphabet = "ab" if trial % 2 else "abc"
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(0, 4))]
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(1, 8))]
        want = reference_stream(pieces, stops)
        got = stream(pieces, stops)
        assert "".join(got[0]) == "".join(want[0]) and got[1] == want[1], (pieces, stops, got, want)
        # deltas may only differ in where held-back text comes out: never earlier than the reference
        sent_got = sent_want = 0
        for g, w in zip(got[0], want[0]):
            sent_got, sent_want = sent_got + len(g), sent_want + len(w)
            assert sent_got == sent_want, (pieces, stops, got, want)


def test_nested_and_overlapping_stops():
    m = StopMatcher(["abcd", "bc"])
    assert m.feed("xab") is None and m.held == 2
    assert m.feed("c") == 1 and m.matched == 2        # "bc" ends first: the cut is before it
    m = StopMatcher(["cd", "abcd"])
    assert m.feed("abcd") == 4 and m.matched == 4      # both end at 'd': the longer one, so the cut is earliest
    assert StopMatcher([]).feed("anything") is None and StopMatcher([""]).held == 0


def test_long_stop_strings_cost_linear_time():
    """Four 50k-character stop strings (50x `herd serve`'s default cap), 20k characters streamed one at a time,
    with held-back text as long as it can be."""
    stops = ["a" * 50_000 + "b", "ab" * 25_000, "a" * 49_999, "xyz" * 16_666]
    t0 = time.perf_counter()
    ts = TextStream(CharTokenizer(), stops)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = "".join(ts.push(ord("a")) for _ in range(20_000))
    per_char = (time.perf_counter() - t0) / 20_000
    assert out == "" and len(ts.pending) == 20_000 and not ts.stopped     # all of it may still begin a stop string
    assert ts.finish() == "a" * 20_000
    # ~2 us per character on a loaded 2-core machine; the old check re-tested every prefix of every stop string
    # after each token: O(len^2), minutes per token at 300 KB
    assert per_char < 1e-3 and built < 10, (per_char, built)
