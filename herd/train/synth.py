"""Synthetic training text: a teacher answers prompts (batched through the engine) and each answer is written as
one JSONL record {"prompt", "response", "text"}, where "text" is the whole exchange in the teacher's chat format
(special tokens included), ready for `herd train/distill --data`."""
from __future__ import annotations

import json
from pathlib import Path

from ..chat import format_chat, stop_token_ids
from ..engine import SamplingParams, generate
from .data import DataError, jsonl_strings, read_text


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a text file (lines starting with '#' are comments), or the "prompt" field
    of each line of a .jsonl file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        prompts = jsonl_strings(path, read_text(path), "prompt")
    else:
        prompts = [l.strip() for l in read_text(path).splitlines() if l.strip() and not l.startswith("#")]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def synthesize(model, tok, prompts: list[str], out: str | Path, params: SamplingParams, batch_size: int = 16,
               system: str | None = None, max_seq_len: int = 1024, progress: bool = True) -> dict:
    """Generate one answer per prompt, batch_size prompts at a time, appending records to `out` as they finish (an
    interrupted run keeps what it wrote). Returns counts."""
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params.stop_token_ids = tuple(stop_token_ids(tok))
    n_tokens = 0
    with out.open("w", encoding="utf-8") as f, tqdm(total=len(prompts), desc="synth", unit="prompt",
                                                     disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            messages = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
                        for p in batch]
            ids = [format_chat(tok, m) for m in messages]
            for p, prompt_ids, req in zip(batch, ids, generate(model, ids, params, max_seq_len=max_seq_len)):
                response = tok.decode(req.output)
                text = tok.decode(prompt_ids + req.output, skip_special=False)
                f.write(json.dumps({"prompt": p, "response": response, "text": text}, ensure_ascii=False) + "\n")
                n_tokens += len(req.output)
            f.flush()
            bar.update(len(batch))
    return {"prompts": len(prompts), "generated_tokens": n_tokens, "out": str(out)}
