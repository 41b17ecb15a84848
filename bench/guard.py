"""The default guard (herd/guard/default, trained by `python -m scripts.train_guard`) on the held-out split it never
saw, beside a TF-IDF + logistic-regression baseline (scikit-learn) trained on the same training split:
precision, recall, false-positive rate on benign text, and latency per 512 tokens.

    python bench/guard.py [--threads 2] [--limit N] [--out results/guard_heldout.md]

"Same FPR": the baseline's threshold is set on the held-out scores so that its false-positive rate is at most the
guard's (the most favourable such threshold for the baseline), and recall is compared there. The held-out split is
the one scripts/guard_data.py makes (no template, attack instruction, document topic or request shared with
training; near-duplicate jailbreaks removed).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rates(labels, flags) -> dict:
    tp = sum(1 for y, f in zip(labels, flags) if y and f)
    fp = sum(1 for y, f in zip(labels, flags) if not y and f)
    pos, neg = sum(labels), len(labels) - sum(labels)
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(pos, 1), "fpr": fp / max(neg, 1), "tp": tp,
            "fp": fp}


def threshold_at_fpr(labels, scores, fpr: float) -> float:
    """The lowest threshold whose false-positive rate is <= fpr (flag when score >= threshold)."""
    neg = sorted((s for y, s in zip(labels, scores) if not y), reverse=True)
    allowed = int(fpr * len(neg) + 1e-9)             # this many benign texts may score at or above it
    if allowed >= len(neg):
        return min(scores)
    return neg[allowed] + 1e-12                      # just above the first benign score that must not be flagged


def baseline(train, held):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_features=200_000)
    X = vec.fit_transform([e.text for e in train])
    clf = LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced").fit(X, [e.label for e in train])
    t = time.perf_counter()
    scores = clf.predict_proba(vec.transform([e.text for e in held]))[:, 1].tolist()
    return scores, (time.perf_counter() - t) / len(held)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--guard", default="default", help="guard folder or 'default'")
    p.add_argument("--data", default=str(ROOT / "runs" / "guard"), help="scripts.train_guard's work folder")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--limit", type=int, default=0, help="check only the first N held-out texts (0: all)")
    p.add_argument("--out", default=str(ROOT / "results" / "guard_heldout.md"), help="markdown table to write")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from herd.guard import load_guard
    from scripts import guard_data

    data = Path(args.data) / "data"
    if (data / "train.jsonl").exists():
        train, held = guard_data.read_jsonl(data / "train.jsonl"), guard_data.read_jsonl(data / "heldout.jsonl")
    else:
        train, held = guard_data.build(Path(args.data) / "wheels")
    if args.limit:
        held = held[:args.limit]
    labels = [e.label for e in held]
    lr_scores, lr_seconds = baseline(train, held)

    guard = load_guard(args.guard)
    verdicts = []
    for i, e in enumerate(held):
        verdicts.append(guard.check(e.text))
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(held)} checked", file=sys.stderr, flush=True)
    g_flags = [v.flagged for v in verdicts]
    g_scores = [v.score for v in verdicts]
    g = rates(labels, g_flags)
    lr_half = rates(labels, [s >= 0.5 for s in lr_scores])
    t_same = threshold_at_fpr(labels, lr_scores, g["fpr"])
    lr_same = rates(labels, [s >= t_same for s in lr_scores])
    tokens, seconds = sum(v.tokens for v in verdicts), sum(v.seconds for v in verdicts)
    per512 = seconds / tokens * 512 * 1000
    med = statistics.median(v.seconds for v in verdicts) * 1000

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"Held-out split: {sum(labels)} attacks, {len(labels) - sum(labels)} benign texts "
             f"({len(train)} training texts). Machine: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), load average "
             f"{load:.1f} at the end.", "",
             "| detector | precision | recall | FPR (benign) | latency |", "|---|---|---|---|---|"]
    fmt = lambda r: f"{r['precision']:.3f} | {r['recall']:.3f} | {r['fpr']:.3f}"
    lines.append(f"| herd guard (`{args.guard}`), its own verdict | {fmt(g)} | {per512:.0f} ms per 512 tokens "
                 f"(median {med:.0f} ms per text; {tokens / len(held):.0f} prompt tokens per text, template "
                 "included) |")
    lines.append(f"| TF-IDF + logistic regression, threshold 0.5 | {fmt(lr_half)} | "
                 f"{lr_seconds * 1000:.2f} ms per text |")
    lines.append(f"| TF-IDF + logistic regression at the guard's FPR (threshold {t_same:.3f}) | {fmt(lr_same)} | |")
    lines += ["", "Recall at a fixed false-positive rate, each detector's threshold set on its held-out scores (the "
              "guard's score is P(unsafe) at its verdict token):", "",
              "| FPR at most | guard recall | baseline recall |", "|---|---|---|"]
    for fpr in (0.01, 0.02, 0.05, 0.10):
        rg = rates(labels, [x >= threshold_at_fpr(labels, g_scores, fpr) for x in g_scores])
        rl = rates(labels, [x >= threshold_at_fpr(labels, lr_scores, fpr) for x in lr_scores])
        lines.append(f"| {fpr:.2f} | {rg['recall']:.3f} (FPR {rg['fpr']:.3f}) | "
                     f"{rl['recall']:.3f} (FPR {rl['fpr']:.3f}) |")
    lines += ["", "Per source (guard / baseline at the guard's FPR):", "",
              "| source | kind | texts | guard flagged | baseline flagged |", "|---|---|---|---|---|"]
    by_source = {}
    for e, v, s in zip(held, verdicts, lr_scores):
        r = by_source.setdefault(e.source, [e.label, 0, 0, 0])
        r[1] += 1
        r[2] += v.flagged
        r[3] += s >= t_same
    for src, (lab, n, gf, lf) in sorted(by_source.items(), key=lambda kv: (-kv[1][0], kv[0])):
        lines.append(f"| {src} | {'attack' if lab else 'benign'} | {n} | {gf / n:.3f} | {lf / n:.3f} |")
    better = g["recall"] > lr_same["recall"]
    lines += ["", f"Recall at the same FPR ({g['fpr']:.3f}): guard {g['recall']:.3f} vs baseline "
              f"{lr_same['recall']:.3f}: the guard {'beats' if better else 'does NOT beat'} the baseline."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"`python bench/guard.py --threads {args.threads}`\n\n{text}\n")


if __name__ == "__main__":
    main()
