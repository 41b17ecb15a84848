"""Needle in a haystack: does a model recall one fact buried at a given depth of a long prompt?

The haystack is plain filler sentences (no digits) up to a target length in tokens; the needle "The secret number of
CITY is NUMBER." sits at a depth from 0 (the start) to 1 (the end); the question after the haystack asks for the
number. A grid cell is the share of needles whose number appears in the greedy answer. A length past the model's
context is reported as such and not run: nothing is truncated.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from ..chat import format_chat, stop_token_ids
from ..engine import Engine, SamplingParams
from ..tokenizer import Tokenizer

FILLER = [
    "The river bends twice before it reaches the old stone bridge.",
    "Most of the village wakes early, long before the bakery opens its doors.",
    "A narrow path climbs through the pine forest toward the ridge.",
    "In autumn the orchards smell of apples and wet leaves.",
    "The library keeps its oldest maps in a cool room without windows.",
    "Fishermen mend their nets on the harbour wall while gulls wait nearby.",
    "The market square fills with stalls of cheese, bread and honey on weekends.",
    "Snow closes the mountain pass for several months every winter.",
    "Children race paper boats along the canal after heavy rain.",
    "The lighthouse keeper writes down the weather every evening.",
    "An old clock tower chimes a little late, and nobody minds.",
    "Farmers rotate their fields so that the soil can rest.",
    "The museum shows pottery, tools and coins found in the valley.",
    "At dusk the bats leave the barn in a single dark ribbon.",
    "Travellers often stop at the inn to warm their hands by the fire.",
    "The choir practises in the chapel on quiet weekday nights.",
    "A ferry crosses the lake when the wind is calm enough.",
    "Moss covers the north side of almost every tree in the wood.",
    "The blacksmith's hammer can be heard from the far end of the lane.",
    "Wild strawberries grow along the edge of the meadow in early summer.",
    "The school garden grows beans, carrots and a few stubborn pumpkins.",
    "Every spring the town repaints the benches in the park.",
    "Fog rolls in from the sea and hides the islands until noon.",
    "The baker saves the burnt loaves for the ducks on the pond.",
    "A family of foxes lives under the roots of the fallen oak.",
    "The postman knows every dog on his route by name.",
    "Old letters in the attic describe a journey across the hills.",
    "The cheese cellar stays cold even in the heat of summer.",
    "Shepherds move their flocks to higher pastures as the snow melts.",
    "The festival ends with lanterns floating down the river.",
]
CITIES = ["Oslo", "Lima", "Cairo", "Hanoi", "Quito", "Dakar", "Perth", "Riga", "Sofia", "Tunis", "Accra", "Bergen"]
QUESTION = "What is the secret number of {city}? Answer with the number only."


def parse_length(text: str) -> int:
    """'1k' -> 1024, '64K' -> 65536, '1m' -> 1048576, '3000' -> 3000."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not m:
        raise ValueError(f"bad length {text!r}: expected a token count like 4096, 4k or 1m")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20}[m.group(2).lower()]


def parse_depths(text: str) -> list[float]:
    depths = [float(d) for d in text.split(",")]
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must be between 0 and 1, got {text!r}")
    return depths


@dataclass
class Needle:
    city: str
    number: str

    @property
    def sentence(self) -> str:
        return f"The secret number of {self.city} is {self.number}."


def build_prompt(tok: Tokenizer, length: int, depth: float, needle: Needle, chat: bool) -> list[int]:
    """Prompt ids of at most `length` tokens (as close below as whole filler sentences allow): haystack with the
    needle after round(depth * n) of its n sentences, then the question; in the model's chat format if `chat`."""
    question = QUESTION.format(city=needle.city)

    def encode(sentences: list[str]) -> list[int]:
        text = " ".join(sentences) + "\n\n" + question
        if chat:
            return format_chat(tok, [{"role": "user", "content": text}])
        return tok.encode(text, bos=tok.add_bos)

    budget = length - len(encode([needle.sentence]))
    if budget < 0:
        raise ValueError(f"a {length}-token prompt cannot even hold the needle and the question")
    cost = [len(tok.encode(" " + s)) for s in FILLER]
    hay, used = [], 0
    while used + cost[len(hay) % len(FILLER)] <= budget:
        used += cost[len(hay) % len(FILLER)]
        hay.append(FILLER[len(hay) % len(FILLER)])
    while True:       # merges across sentence boundaries can make the whole a few tokens longer than the parts
        at = round(depth * len(hay))
        ids = encode(hay[:at] + [needle.sentence] + hay[at:])
        if len(ids) <= length or not hay:
            return ids
        hay.pop()


@dataclass
class NiahResult:
    lengths: list[int]
    depths: list[float]
    context: int
    accuracy: list[list[float | None]] = field(default_factory=list)   # [depth][length]; None = past the context
    answers: list[tuple[int, float, str, str]] = field(default_factory=list)  # (length, depth, expected, answer)


def run_niah(model, tok: Tokenizer, lengths: list[int], depths: list[float], samples: int = 1, seed: int = 0,
             chat: bool = True, max_new_tokens: int = 16, prefill_chunk: int = 512, log=print) -> NiahResult:
    """Accuracy grid. One request at a time through the engine (chunked prefill, hybrid KV cache)."""
    context = model.config.max_seq_len
    res = NiahResult(lengths, depths, context, [[None] * len(lengths) for _ in depths])
    rng = random.Random(seed)
    stops = tuple(stop_token_ids(tok))
    for j, length in enumerate(lengths):
        if length + max_new_tokens > context:
            log(f"{length:,} tokens: exceeds the model's context of {context:,} tokens (prompt + {max_new_tokens} "
                "answer tokens): not run, nothing truncated")
            continue
        engine = Engine(model, max_batch=1, max_seq_len=length + max_new_tokens, prefill_chunk=prefill_chunk)
        for i, depth in enumerate(depths):
            hits = 0
            for _ in range(samples):
                needle = Needle(rng.choice(CITIES), str(rng.randrange(100000, 1000000)))
                ids = build_prompt(tok, length, depth, needle, chat)
                req = engine.add(ids, SamplingParams(max_tokens=max_new_tokens, stop_token_ids=stops))
                while not req.finished:
                    engine.step()
                answer = tok.decode(req.output)
                hit = needle.number in answer.replace(",", "").replace(" ", "")
                hits += hit
                res.answers.append((length, depth, needle.number, answer))
                log(f"{length:,} tokens (prompt {len(ids):,}), depth {depth:.2f}: {'ok  ' if hit else 'miss'} "
                    f"expected {needle.number}, got {answer.strip()[:40]!r}")
            res.accuracy[i][j] = hits / samples
    return res


def _length_label(n: int) -> str:
    return f"{n >> 10}k" if n % 1024 == 0 and n >= 1024 else str(n)


def format_grid(res: NiahResult) -> str:
    """Depth rows x length columns; 'n/a' where the length exceeds the context."""
    labels = [_length_label(n) for n in res.lengths]
    width = max(6, *(len(s) for s in labels))
    lines = ["depth \\ length " + "".join(f"{s:>{width + 2}}" for s in labels)]
    for d, row in zip(res.depths, res.accuracy):
        lines.append(f"{d:<15.2f}" + "".join(f"{'n/a' if a is None else f'{a:.2f}':>{width + 2}}" for a in row))
    ran = [a for row in res.accuracy for a in row if a is not None]
    lines.append(f"mean over the {len(ran)} cells run: {sum(ran) / len(ran):.2f}" if ran else "no cell could run")
    if any(a is None for row in res.accuracy for a in row):
        lines.append(f"n/a: prompt + answer longer than the model's context of {res.context:,} tokens")
    return "\n".join(lines)


def plot_heatmap(res: NiahResult, path, title: str):
    """PNG heatmap: depth (rows) x length (columns), green = found; grey cells were past the context."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[np.nan if a is None else a for a in row] for row in res.accuracy], dtype=float)
    fig, ax = plt.subplots(figsize=(1.3 * len(res.lengths) + 2.5, 0.6 * len(res.depths) + 1.8))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#cccccc")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(res.lengths)), [_length_label(n) for n in res.lengths])
    ax.set_yticks(range(len(res.depths)), [f"{d:.2f}" for d in res.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (0 = start)")
    for i in range(len(res.depths)):
        for j in range(len(res.lengths)):
            a = res.accuracy[i][j]
            ax.text(j, i, f"> ctx {_length_label(res.context)}" if a is None else f"{a:.2f}", ha="center",
                    va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
