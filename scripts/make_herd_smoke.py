"""Writes herd's local evaluation suite, herd/eval/tasks/herd_smoke/*.jsonl, from the items below (written for herd,
Apache-2.0 like the rest of the repository) and a seeded generator. Deterministic: rerunning gives the same files.

    python -m scripts.make_herd_smoke [--out herd/eval/tasks/herd_smoke]

Multiple-choice files hold {"id", "context", "choices", "gold"}; the loglikelihood file {"id", "context", "target"}.
Each choice / target carries its own leading space (the tasks' target_delimiter is empty), so code continuations can
follow the code directly.
ci.jsonl takes 5 items from each multiple-choice file: the 20-item task tests run against a live server.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# Country -> capital: facts, listed here by hand.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Canada": "Ottawa", "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago",
    "Argentina": "Buenos Aires", "Brazil": "Brasilia", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Cuba": "Havana", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Greece": "Athens",
    "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "South Korea": "Seoul", "North Korea": "Pyongyang", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Australia": "Canberra", "New Zealand": "Wellington", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Switzerland": "Bern", "Czech Republic": "Prague", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Ukraine": "Kyiv", "Belarus": "Minsk",
    "Lithuania": "Vilnius", "Latvia": "Riga", "Estonia": "Tallinn", "Iceland": "Reykjavik", "Morocco": "Rabat",
    "Algeria": "Algiers", "Tunisia": "Tunis", "Libya": "Tripoli", "Nigeria": "Abuja", "Ghana": "Accra",
    "Senegal": "Dakar", "Ethiopia": "Addis Ababa", "Uganda": "Kampala", "Tanzania": "Dodoma",
    "South Africa": "Pretoria", "Zimbabwe": "Harare", "Zambia": "Lusaka", "Pakistan": "Islamabad",
    "Afghanistan": "Kabul", "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Sri Lanka": "Colombo",
    "Malaysia": "Kuala Lumpur", "Singapore": "Singapore", "Mongolia": "Ulaanbaatar", "Israel": "Jerusalem",
    "Jordan": "Amman", "Syria": "Damascus", "Lebanon": "Beirut", "Qatar": "Doha", "Ecuador": "Quito",
    "Bolivia": "Sucre", "Uruguay": "Montevideo", "Paraguay": "Asuncion", "Jamaica": "Kingston",
}

# (grammatical, ungrammatical) minimal pairs, written here: agreement, tense, articles, pronouns, word order.
GRAMMAR = [
    ("The cat sleeps on the sofa.", "The cat sleep on the sofa."),
    ("The dogs bark at night.", "The dogs barks at night."),
    ("She has finished her homework.", "She have finished her homework."),
    ("They were happy to see us.", "They was happy to see us."),
    ("I am going to the market.", "I is going to the market."),
    ("He doesn't like coffee.", "He don't like coffee."),
    ("My brother and I went to school.", "My brother and me went to school."),
    ("The children are playing outside.", "The children is playing outside."),
    ("Yesterday we walked to the park.", "Yesterday we walk to the park."),
    ("She wrote a letter last week.", "She writed a letter last week."),
    ("He went home early.", "He goed home early."),
    ("I have seen that film twice.", "I have saw that film twice."),
    ("They bought a new car.", "They buyed a new car."),
    ("An apple a day keeps the doctor away.", "A apple a day keeps the doctor away."),
    ("She is an engineer.", "She is a engineer."),
    ("He gave me a book.", "He gave I a book."),
    ("We saw them at the station.", "We saw they at the station."),
    ("Where are you going?", "Where you are going?"),
    ("What did she say?", "What she did say?"),
    ("I don't have any money.", "I don't have no money."),
    ("The book that I read was long.", "The book who I read was long."),
    ("The man who called you is here.", "The man which called you is here."),
    ("Each of the students has a pen.", "Each of the students have a pen."),
    ("Neither of them is ready.", "Neither of them are ready."),
    ("There are many people here.", "There is many people here."),
    ("There is a bird on the roof.", "There are a bird on the roof."),
    ("She runs faster than her brother.", "She runs more fast than her brother."),
    ("This is the best day of my life.", "This is the goodest day of my life."),
    ("He is taller than me.", "He is more tall than me."),
    ("The mice ran into the hole.", "The mouses ran into the hole."),
    ("Two women walked into the shop.", "Two womans walked into the shop."),
    ("The teeth of the shark are sharp.", "The tooths of the shark are sharp."),
    ("If I were you, I would wait.", "If I would be you, I would wait."),
    ("She has been working here since May.", "She is working here since May."),
    ("I will call you tomorrow.", "I will called you tomorrow."),
    ("Can you help me, please?", "Can you helps me, please?"),
    ("He must leave now.", "He must to leave now."),
    ("She wants to learn French.", "She wants learn French."),
    ("We enjoy swimming in the lake.", "We enjoy to swim in the lake."),
    ("They made us wait for an hour.", "They made us to wait for an hour."),
    ("The news is good today.", "The news are good today."),
    ("Everybody knows the answer.", "Everybody know the answer."),
    ("The team has won the match.", "The team have winned the match."),
    ("I met her at the library.", "I met she at the library."),
    ("This book is mine.", "This book is my."),
    ("Whose bag is this?", "Who's bag is this?"),
    ("Its color is bright red.", "It's color is bright red."),
    ("They are waiting for their bus.", "They are waiting for there bus."),
    ("She sat between him and me.", "She sat between he and I."),
    ("The water was so cold that we left.", "The water was so cold than we left."),
    ("He asked me where I lived.", "He asked me where did I live."),
    ("I have lived here for ten years.", "I live here since ten years."),
    ("She speaks English very well.", "She speaks very well English."),
    ("We often go to the beach.", "We go often to the beach."),
    ("He has never been to London.", "He has never went to London."),
    ("The letters were sent yesterday.", "The letters was sent yesterday."),
    ("A pair of shoes is on the floor.", "A pair of shoes are on the floor."),
    ("The girl whose dog barked apologized.", "The girl who dog barked apologized."),
    ("Both of my parents are teachers.", "Both of my parents is teachers."),
    ("I would rather stay at home.", "I would rather to stay at home."),
]

# (code before the gap, correct continuation, three wrong ones), written here.
CODE = [
    ("def add(a, b):\n    return a", " + b", [" - b", " * b", " / b"]),
    ("for i in range(10):\n    print", "(i)", ["[i]", " i", "{i}"]),
    ("import numpy as", " np", [" numpy", " pd", " plt"]),
    ("if x > 0:\n    sign = 1\nelse:\n    sign =", " -1", [" 1", " 0", " x"]),
    ("def is_even(n):\n    return n % 2 ==", " 0", [" 1", " 2", " n"]),
    ("with open('data.txt') as f:\n    text = f.", "read()", ["write()", "close()", "open()"]),
    ("numbers = [3, 1, 2]\nnumbers.", "sort()", ["sorted()", "order()", "arrange()"]),
    ("def square(x):\n    return x", " * x", [" + x", " - x", " / x"]),
    ("words = ['a', 'b', 'c']\nline = ', '.", "join(words)", ["split(words)", "append(words)", "strip(words)"]),
    ("class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y =", " y", [" x", " self", " 0"]),
    ("try:\n    value = int(text)\nexcept", " ValueError:", [" ValueErr:", " ValuError:", " ErrorValue:"]),
    ("total = 0\nfor n in numbers:\n    total", " += n", [" -= n", " = 0", " *= 0"]),
    ("def maximum(a, b):\n    return a if a > b else", " b", [" a", " 0", " None"]),
    ("print('Hello, world", "!')", ["!\"", "!)", "!']"]),
    ("d = {'a': 1}\nfor key, value in d.", "items():", ["keys():", "values():", "item():"]),
    ("def factorial(n):\n    if n == 0:\n        return", " 1", [" 0", " n", " -1"]),
    ("squares = [x * x for x in", " range(10)]", [" range(10)}", " range(10))", " range(10)>"]),
    ("import os\npath = os.path.", "join('a', 'b')", ["concat('a', 'b')", "add('a', 'b')", "merge('a', 'b')"]),
    ("while True:\n    line = input()\n    if not line:\n        ", "break", ["continue", "pass", "return"]),
    ("def greet(name):\n    return f'Hello, {", "name}'", ["name'", "greet}'", "self}'"]),
    ("x = [1, 2, 3]\nprint(len(x", "))", [")]", "]]", ")}"]),
    ("def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(", "n - 2)",
     ["n + 1)", "n)", "n - 1)"]),
    ("s = 'hello'\nprint(s.", "upper())", ["uppercase())", "toUpper())", "capital())"]),
    ("import json\ndata = json.", "loads(text)", ["parse(text)", "read(text)", "decode(text)"]),
    ("def mean(xs):\n    return sum(xs) /", " len(xs)", [" sum(xs)", " max(xs)", " xs"]),
    ("if __name__ == '__main__", "':", ["\":", "';", "'."]),
    ("items = []\nitems.", "append(1)", ["push(1)", "add(1)", "insert(1)"]),
    ("def last(xs):\n    return xs[", "-1]", ["0]", "1]", "len(xs)]"]),
    ("for i, item in", " enumerate(items):", [" enumerate(items);", " items.enumerate():", " index(items):"]),
    ("numbers = {1, 2, 3}\nnumbers.", "add(4)", ["append(4)", "push(4)", "insert(4)"]),
    ("def reverse(s):\n    return s[", "::-1]", ["-1]", "::1]", "1:]"]),
    ("import math\nprint(math.", "sqrt(16))", ["root(16))", "square(16))", "sqr(16))"]),
    ("x = 5\ny = 10\nprint(x <", " y)", [" y]", " y}", " y>"]),
    ("def count(xs, target):\n    return xs.", "count(target)", ["find(target)", "number(target)", "len(target)"]),
    ("name = input('Your name: ')\nprint('Hi,',", " name)", [" name]", " name}", " input)"]),
    ("a, b = b,", " a", [" b", " 0", " c"]),
    ("def absolute(x):\n    return -x if x < 0 else", " x", [" -x", " 0", " 1"]),
    ("lines = text.", "splitlines()", ["lines()", "splits()", "newlines()"]),
    ("from collections import", " Counter", [" counter", " Countr", " Kounter"]),
    ("raise ValueError('bad input", "')", ["\")", "']", "'}"]),
]

# (context, the word that follows), written here: predictable continuations for the loglikelihood task.
COMPLETION = [
    ("Monday, Tuesday, Wednesday,", " Thursday"), ("January, February, March,", " April"),
    ("one, two, three,", " four"), ("The opposite of hot is", " cold"), ("The opposite of up is", " down"),
    ("The opposite of black is", " white"), ("The sky is", " blue"), ("Grass is", " green"),
    ("Snow is", " white"), ("A week has seven", " days"), ("A year has twelve", " months"),
    ("Cats say meow and dogs say", " woof"), ("The sun rises in the", " east"), ("The sun sets in the", " west"),
    ("Water freezes at zero degrees", " Celsius"), ("Bread is made from", " flour"), ("Bees make", " honey"),
    ("Cows give us", " milk"), ("We see with our", " eyes"), ("We hear with our", " ears"),
    ("Ice is frozen", " water"), ("Paris is the capital of", " France"), ("Tokyo is the capital of", " Japan"),
    ("The first letter of the alphabet is", " A"), ("A, B, C, D,", " E"), ("10, 20, 30,", " 40"),
    ("2, 4, 6, 8,", " 10"), ("Red, orange, yellow, green,", " blue"), ("Spring, summer, autumn,", " winter"),
    ("Thank you very", " much"), ("Once upon a", " time"), ("Good morning, how are", " you"),
    ("The Earth goes around the", " Sun"), ("The largest ocean on Earth is the", " Pacific"),
    ("A triangle has three", " sides"), ("A square has four", " sides"), ("Fish live in", " water"),
    ("Birds can", " fly"), ("In the morning I drink a cup of", " coffee"), ("Salt and", " pepper"),
    ("Ladies and", " gentlemen"), ("Rock and", " roll"), ("Bread and", " butter"),
    ("Ten minus three is", " seven"), ("Two plus two is", " four"), ("The capital of Italy is", " Rome"),
    ("Christmas is in", " December"), ("The color of a banana is", " yellow"),
    ("Python is a programming", " language"), ("An hour has sixty", " minutes"),
]


def arithmetic(rng: random.Random) -> list[dict]:
    """40 each of a + b, a - b (two digits), a * b (up to 12 x 12), with three wrong answers near the right one."""
    items = []
    for op in "+-*":
        seen = set()
        while len([i for i in items if i["op"] == op]) < 40:
            if op == "*":
                a, b = rng.randint(2, 12), rng.randint(2, 12)
            else:
                a, b = rng.randint(10, 99), rng.randint(10, 99)
                a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
            if (a, b) in seen:
                continue
            seen.add((a, b))
            answer = a + b if op == "+" else a - b if op == "-" else a * b
            # near misses with as many digits as the answer (" 1" would be a prefix of " 13")
            near = [answer + d for d in (-11, -10, -3, -2, -1, 1, 2, 3, 10, 11)]
            wrong = rng.sample([w for w in near if w >= 0 and len(str(w)) == len(str(answer))], 3)
            items.append({"op": op, "context": f"Question: What is {a} {op} {b}?\nAnswer:",
                          "answer": f" {answer}", "wrong": [f" {w}" for w in sorted(wrong)]})
    return [multiple_choice(f"arithmetic-{i}", it["context"], it["answer"], it["wrong"], rng)
            for i, it in enumerate(items)]


def multiple_choice(item_id: str, context: str, answer: str, wrong: list[str], rng: random.Random) -> dict:
    """Choices in a seeded random order. A choice that is a prefix of another is refused: it would be favoured (or
    disfavoured) for its length alone."""
    choices = [answer, *wrong]
    if len(set(choices)) != len(choices) or any(a != b and b.startswith(a) for a in choices for b in choices):
        raise ValueError(f"{item_id}: choices {choices} repeat, or one is a prefix of another")
    rng.shuffle(choices)
    return {"id": item_id, "context": context, "choices": choices, "gold": choices.index(answer)}


def capitals(rng: random.Random) -> list[dict]:
    names = sorted(set(CAPITALS.values()))
    out = []
    for i, (country, capital) in enumerate(CAPITALS.items()):
        wrong = rng.sample([c for c in names if c != capital], 3)
        out.append(multiple_choice(f"capitals-{i}", f"Question: What is the capital of {country}?\nAnswer:",
                                   f" {capital}", [f" {w}" for w in wrong], rng))
    return out


def grammar() -> list[dict]:
    """BLiMP's form: no context (lm-eval puts the model's prefix token before each sentence), the grammatical
    sentence is choice 0."""
    return [{"id": f"grammar-{i}", "context": "", "choices": [good, bad], "gold": 0}
            for i, (good, bad) in enumerate(GRAMMAR)]


def code(rng: random.Random) -> list[dict]:
    return [multiple_choice(f"code-{i}", before, right, wrong, rng) for i, (before, right, wrong) in enumerate(CODE)]


def completion() -> list[dict]:
    return [{"id": f"completion-{i}", "context": c, "target": t} for i, (c, t) in enumerate(COMPLETION)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "herd/eval/tasks/herd_smoke"))
    args = ap.parse_args()
    rng = random.Random(17)
    files = {"arithmetic": arithmetic(rng), "capitals": capitals(rng), "grammar": grammar(), "code": code(rng),
             "completion": completion()}
    files["ci"] = [it for name in ("arithmetic", "capitals", "grammar", "code") for it in files[name][:5]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, items in files.items():
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(it) + "\n" for it in items)
        print(f"{out / name}.jsonl: {len(items)} items")


if __name__ == "__main__":
    main()
