"""Safety guards in front of a model: one interface, `guard.check(text or messages) -> Verdict`, over two kinds.

- Llama Guard 4 (llama_guard.py): a generative classifier on herd's own Llama 4 code; answers `safe` or `unsafe`
  + category codes for the last user or assistant turn of a conversation, images included.
- Prompt Guard 2 (prompt_guard.py): a DeBERTa sequence classifier for prompt injection and jailbreaks.
- `default`: the injection guard trained here in Llama Guard's format (herd/guard/default, built by
  `python -m scripts.train_guard`), so a guarded server needs no download.

`load_guard(spec)` picks the kind from the folder's config.json. This package knows nothing of HTTP; the server's
guard stage (herd/serve) calls check() on what a request carries.
"""
from __future__ import annotations

import json
from pathlib import Path

from .verdict import MAX_TEXT_BYTES, GuardError, Verdict, check_text

DEFAULT_GUARD = Path(__file__).parent / "default"


def guard_kind(path: Path) -> str:
    """'prompt_guard' for a sequence classifier (DeBERTa), 'llama_guard' for a Llama 4 checkpoint."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise GuardError(f"{path}: no config.json (a guard is an HF folder: config.json + safetensors + "
                         "tokenizer)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GuardError(f"{path}/config.json: not valid JSON ({e})") from None
    arch = (cfg.get("architectures") or [""])[0]
    if cfg.get("model_type") in ("deberta-v2", "deberta") or arch.endswith("ForSequenceClassification"):
        return "prompt_guard"
    if cfg.get("model_type") in ("llama4", "llama4_text") or arch.startswith("Llama4"):
        return "llama_guard"
    raise GuardError(f"{path}: a {arch or cfg.get('model_type')!r} model is no guard herd knows (expected Llama Guard "
                     "4, a Llama4ForConditionalGeneration, or Prompt Guard 2, a DeBERTa sequence classifier)")


def load_guard(spec: str | Path, device="cpu", **kw):
    """A guard from a folder, or `default` (the guard trained here). Raises GuardError with the reason."""
    path = DEFAULT_GUARD if str(spec) == "default" else Path(spec)
    if str(spec) == "default" and not (path / "config.json").exists():
        raise GuardError(f"the default guard is missing from {path}; rebuild it with `python -m scripts.train_guard`")
    if not path.is_dir():
        raise GuardError(f"{spec}: no such guard folder (give an HF folder, or `default`)")
    if guard_kind(path) == "prompt_guard":
        if kw.get("excluded"):
            raise GuardError(f"{spec} is a Prompt Guard classifier: it has no categories to exclude")
        kw.pop("excluded", None)
        from .prompt_guard import load_prompt_guard
        return load_prompt_guard(path, device=device, **kw)
    from .llama_guard import load_llama_guard
    return load_llama_guard(path, device=device, **kw)


__all__ = ["DEFAULT_GUARD", "GuardError", "MAX_TEXT_BYTES", "Verdict", "check_text", "guard_kind", "load_guard"]
