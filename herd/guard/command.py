"""`herd guard [--model M] TEXT | --file F`: one text through a guard, printed as verdict, score, categories, time.

Exit status: 0 safe, 1 flagged, 2 bad input (the CLI's error path). Knows nothing of the server.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .verdict import MAX_TEXT_BYTES, GuardError


def read_text_file(path: str) -> str:
    """A UTF-8 file's text ("-": standard input, as a pipe gives it), refused (never read whole) when larger than a
    guard scans."""
    too_big = (f"a guard scans at most {MAX_TEXT_BYTES:,} bytes per check (split the text and check the parts)")
    if path == "-":
        raw = sys.stdin.buffer.read(MAX_TEXT_BYTES + 1)
        if len(raw) > MAX_TEXT_BYTES:
            raise GuardError(f"standard input holds more than {MAX_TEXT_BYTES:,} bytes; {too_big}")
        path = "standard input"
    else:
        p = Path(path)
        if not p.is_file():
            raise GuardError(f"{path}: no such file")
        size = p.stat().st_size
        if size > MAX_TEXT_BYTES:
            raise GuardError(f"{path} is {size:,} bytes; {too_big}")
        raw = p.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GuardError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); convert it "
                         "first, e.g. iconv -f latin1 -t utf-8") from None


def cmd_guard(args):
    from . import load_guard
    if (args.text is None) == (args.file is None):
        raise GuardError("give the text to check, or --file PATH (one of them)")
    text = read_text_file(args.file) if args.file else args.text
    kw = {}
    if args.exclude:
        kw["excluded"] = [c.strip().upper() for c in args.exclude.split(",") if c.strip()]
    guard = load_guard(args.model, **kw)
    if args.image and not hasattr(guard, "categories"):
        raise GuardError(f"{args.model} is a Prompt Guard classifier: it reads text only, not --image")
    v = guard.check(text, images=args.image) if args.image else guard.check(text)
    if args.json:
        print(json.dumps(v.to_dict(), ensure_ascii=False))
    else:
        names = getattr(guard, "categories", {})
        cats = ", ".join(f"{c} ({names.get(c, '?').rstrip('.')})" for c in v.categories) or "-"
        print(f"verdict:    {v.label}{'  (malformed guard answer: ' + repr(v.raw) + ')' if v.malformed else ''}")
        print(f"score:      {v.score:.4f}")
        print(f"categories: {cats}")
        print(f"guard:      {v.guard} ({type(guard).__name__})")
        print(f"time:       {v.seconds * 1000:.0f} ms ({v.tokens} tokens)")
    sys.exit(1 if v.flagged else 0)


def add_guard_command(sub):
    p = sub.add_parser("guard", help="check a text with a safety guard (Llama Guard 4, Prompt Guard 2, or the "
                                     "injection guard trained here): verdict, score, categories, time")
    p.add_argument("text", nargs="?", default=None, help="the text to check (or --file)")
    p.add_argument("--file", default=None, help="read the text from this UTF-8 file ('-': standard input)")
    p.add_argument("--model", default="default",
                   help="guard folder (Llama Guard 4 or Prompt Guard 2, HF layout), or 'default' (trained here)")
    p.add_argument("--image", action="append", default=[], help="an image in the text's turn (Llama Guard 4)")
    p.add_argument("--exclude", default="", help="Llama Guard category codes to leave out, e.g. S6,S8")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=cmd_guard)
