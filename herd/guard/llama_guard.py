"""Llama Guard 4 on herd's own Llama 4 code: Meta's prompt template, greedy verdict generation, verdict parsing.

Llama Guard 4 is a dense `Llama4ForConditionalGeneration` (Scout with its routed experts and routers removed, the
shared expert kept as each layer's FFN); herd.load reads it like any Llama 4 checkpoint (no MoE layers, and its
`attention_chunk_size: null` means no chunked attention, as in Meta's reference: see config.py). This module builds
the classification prompt, runs the model, and reads `safe` / `unsafe` + category codes back. It knows nothing of
HTTP or of Prompt Guard.

The template is the one shipped with the checkpoint (its chat template, as transformers renders it; spec 8.1):

    <|begin_of_text|><|header_start|>user<|header_end|>\\n\\n
    Task: Check if there is unsafe content in '{Role}' messages in conversations according to our safety policy
    with the below categories.\\n\\n<BEGIN UNSAFE CONTENT CATEGORIES>\\nS1: Violent Crimes.\\n ... S14: Code
    Interpreter Abuse.\\n<END UNSAFE CONTENT CATEGORIES>\\n\\n<BEGIN CONVERSATION>\\n
    User: {text}\\\\n\\\\n\\n\\n  Agent: {text}\\\\n\\\\n\\n\\n   (one line per turn, images where they occur)
    <END CONVERSATION>\\n\\nProvide your safety assessment for ONLY THE LAST {Role} message in the above
    conversation:\\n - First line must read 'safe' or 'unsafe'.\\n - If unsafe, a second line must include a
    comma-separated list of violated categories. <|eot|><|header_start|>assistant<|header_end|>

{Role} is 'User' when the conversation ends with a user turn, 'Agent' when it ends with the assistant's. Each turn
ends with a literal backslash-n backslash-n (four characters: the released template escapes it twice) and then two
real newlines: herd reproduces that byte for byte, since it is what the weights were run with through transformers.
The generation header has no "\\n\\n": the model writes it, then `safe` or `unsafe` (and a line of codes).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .verdict import GuardError, Verdict, check_text

# The categories of the released template, in its own short wording (S3 "Sex Crimes", S11 "Self-Harm", ...).
CATEGORIES = {
    "S1": "Violent Crimes.", "S2": "Non-Violent Crimes.", "S3": "Sex Crimes.", "S4": "Child Exploitation.",
    "S5": "Defamation.", "S6": "Specialized Advice.", "S7": "Privacy.", "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.", "S10": "Hate.", "S11": "Self-Harm.", "S12": "Sexual Content.",
    "S13": "Elections.", "S14": "Code Interpreter Abuse.",
}
TURN_END = "\\n\\n" + "\n\n"            # literal backslash-n twice, then two newlines (see the module docstring)
INSTRUCTIONS = ("Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
                " - First line must read 'safe' or 'unsafe'.\n"
                " - If unsafe, a second line must include a comma-separated list of violated categories. ")
ROLE_NAMES = {"user": "User", "assistant": "Agent"}


# ---- the prompt -----------------------------------------------------------------------------------------------------
def conversation_turns(messages) -> list[tuple[str, list[dict]]]:
    """(Role, parts) per message: a non-empty list alternating user / assistant, starting with the user (the
    released template refuses anything else); a plain string is one user message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise GuardError("expected text or a non-empty list of messages")
    turns = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise GuardError(f"message {i}: role {role!r}; Llama Guard reads a conversation of user and assistant "
                             f"turns alternating from the user (expected {want!r} here)")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list) or not parts or any(
                not isinstance(p, dict) or p.get("type") not in ("text", "image") for p in parts):
            raise GuardError(f"message {i}: content must be a string or a list of text / image parts")
        turns.append((ROLE_NAMES[role], parts))
    return turns


def prompt_ids(tok, messages, categories: dict[str, str] | None = None, excluded=(),
               image_blocks: list[list[int]] | None = None) -> list[int]:
    """Token ids of the Llama Guard 4 prompt for `messages` (see the module docstring). Categories whose code is
    in `excluded` are left out of the list; image_blocks: one token block per image part, in order."""
    categories = CATEGORIES if categories is None else categories
    unknown = sorted(set(excluded) - set(categories))
    if unknown:
        raise GuardError(f"excluded categories {unknown} are not among {', '.join(categories)}")
    if not tok.is_llama4:
        raise GuardError("Llama Guard's prompt needs Llama 4's special tokens (<|header_start|>, <|eot|>, ...); "
                         "this tokenizer has none")
    turns = conversation_turns(messages)
    role = turns[-1][0]
    listed = "".join(f"{code}: {name}\n" for code, name in categories.items() if code not in excluded)
    # The prompt as text runs and image blocks. Each text run is encoded in one piece with special-token parsing
    # off: the same ids as encoding the rendered template whole (special tokens split text anyway), while text in a
    # message cannot forge a control token.
    pieces = [f"\n\nTask: Check if there is unsafe content in '{role}' messages in conversations according to our "
              "safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n" + listed
              + "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n"]
    blocks = iter(image_blocks or [])
    for name, parts in turns:
        pieces.append(f"{name}: ")
        for p in parts:
            if p["type"] == "text":
                pieces.append(str(p.get("text", "")).strip())
                continue
            block = next(blocks, None)
            if block is None:
                raise GuardError("an image part has no prepared image")
            pieces.append(list(block))
        pieces.append(TURN_END)
    pieces.append("<END CONVERSATION>\n\n" + INSTRUCTIONS.format(role=role))
    sid = tok.token_id
    ids = [sid("<|begin_of_text|>"), sid("<|header_start|>")] + tok.encode("user", allow_special=False) + \
        [sid("<|header_end|>")]
    run = ""
    for piece in pieces + [[]]:
        if isinstance(piece, str):
            run += piece
            continue
        ids += tok.encode(run, allow_special=False) + piece
        run = ""
    return ids + [sid("<|eot|>"), sid("<|header_start|>")] + tok.encode("assistant", allow_special=False) + \
        [sid("<|header_end|>")]


# ---- the verdict ----------------------------------------------------------------------------------------------------
def parse_verdict(raw: str, known=CATEGORIES) -> tuple[bool, list[str], bool]:
    """(flagged, categories, malformed) from the guard's answer. `safe` alone passes; `unsafe`, optionally with one
    line of comma-separated codes from `known`, is flagged. Anything else (empty, other words, unknown codes, extra
    lines) is malformed and flagged: a guard whose answer cannot be read must not let the content through."""
    lines = [line.strip() for line in raw.strip().splitlines() if line.strip()]
    if not lines or lines[0].lower() not in ("safe", "unsafe"):
        return True, [], True
    if lines[0].lower() == "safe":
        return (False, [], False) if len(lines) == 1 else (True, [], True)
    if len(lines) == 1:
        return True, [], False
    codes = [c.strip().upper() for c in lines[1].split(",")]
    good = [c for c in codes if c in known]
    return True, good, len(lines) > 2 or len(good) != len(codes)


# ---- the guard ------------------------------------------------------------------------------------------------------
class LlamaGuard:
    """A Llama Guard checkpoint (or one trained in its format) and its tokenizer. `check` classifies the last turn
    of a conversation; a text too long for the context is split into windows of its last turn, each checked in
    the same conversation, and flagged when any window is (score: the maximum)."""

    def __init__(self, model, tok, name: str = "llama-guard", categories: dict[str, str] | None = None,
                 excluded=(), max_new_tokens: int = 32, reads_conversations: bool = True):
        self.model, self.tok, self.name = model.eval(), tok, name
        # False for a guard trained on single texts (the default one): rails give it an answer alone, not a chat
        self.reads_conversations = reads_conversations
        self.categories = dict(CATEGORIES if categories is None else categories)
        self.excluded = tuple(excluded)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = {i for i in [tok.token_id("<|eot|>"), tok.token_id("<|eom|>"),
                                     tok.token_id("<|end_of_text|>"), *model.config.eos_token_ids] if i is not None}
        prompt_ids(tok, "probe", self.categories, self.excluded)      # a tokenizer without Llama 4's tokens fails here
        # first tokens of the two verdicts: the score is P(unsafe) at the step where the verdict word starts
        self.unsafe_id, self.safe_id = tok.encode("unsafe")[0], tok.encode("safe")[0]

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len

    def check(self, content, images=None) -> Verdict:
        """content: a text (one user message) or a list of user / assistant messages whose parts may include
        {"type": "image", "image": path | bytes | PIL image}; images: extra images for a text's single turn."""
        start = time.perf_counter()
        if isinstance(content, str):
            check_text(content)
            parts = [{"type": "image", "image": im} for im in (images or [])] + [{"type": "text", "text": content}]
            content = [{"role": "user", "content": parts}]
        turns = conversation_turns(content)
        for _, parts in turns:
            for p in parts:
                if p["type"] == "text":
                    check_text(p.get("text"))
        pixels, blocks = self._images([p.get("image") for _, parts in turns for p in parts if p["type"] == "image"])
        windows = []
        for ids in self._windows(content, blocks):
            raw, score, complete, n = self._classify(ids, pixels)
            windows.append((raw, score, complete, n, *parse_verdict(raw, self.categories)))
        # report the window that decided: the most confident flagged one, else the highest score
        raw, score, complete, _, flagged, cats, malformed = max(windows, key=lambda w: (w[4], w[1]))
        malformed = malformed or not complete          # an answer cut at max_new_tokens is not a verdict
        return Verdict(flagged=flagged or malformed, score=score, guard=self.name, categories=cats, raw=raw,
                       malformed=malformed, seconds=time.perf_counter() - start,
                       tokens=sum(w[3] for w in windows))

    def _images(self, sources):
        if not sources:
            return None, None
        cfg = self.model.config
        if cfg.vision is None:
            raise GuardError(f"{self.name} reads text only; this conversation has {len(sources)} image(s)")
        from ..images import ImageError, ImageTokenIds, prepare_images
        try:
            return prepare_images(sources, cfg.vision, ImageTokenIds.from_tokenizer(self.tok))
        except ImageError as e:
            raise GuardError(f"image the guard cannot read: {e}") from None

    def _windows(self, messages, blocks) -> list[list[int]]:
        """The prompt, or one prompt per window of the last turn's text when the whole does not fit."""
        ids = prompt_ids(self.tok, messages, self.categories, self.excluded, blocks)
        room = self.context - self.max_new_tokens
        if len(ids) <= room:
            return [ids]
        last = messages[-1]
        texts = [p["text"] for p in last["content"] if p["type"] == "text"] if isinstance(last["content"], list) \
            else [last["content"]]
        text_ids = self.tok.encode(" ".join(t.strip() for t in texts), allow_special=False)
        overhead = len(ids) - len(text_ids)
        step = room - overhead
        if blocks or step < 16:
            raise GuardError(f"the conversation is {len(ids)} tokens and does not fit this guard's context of "
                             f"{self.context} tokens, even with its last turn split into windows")
        out = []
        for s in range(0, len(text_ids), step):
            window = self.tok.decode(text_ids[s:s + step], skip_special=False)
            out.append(prompt_ids(self.tok, messages[:-1] + [{"role": last["role"], "content": window}],
                                  self.categories, self.excluded))
        return out

    @torch.inference_mode()
    def _classify(self, ids: list[int], pixels) -> tuple[str, float, bool, int]:
        """Greedy answer to one prompt: (text, P(unsafe) where the verdict starts, finished before the limit, prompt
        tokens). A KV cache sized for this prompt; the prompt runs as one forward, then one token per step."""
        from ..kv_cache import KVCache
        model, cfg = self.model, self.model.config
        p = next(model.parameters())
        cache = KVCache(cfg, 1, len(ids) + self.max_new_tokens, p.dtype if p.is_floating_point() else torch.float32,
                        p.device)
        tokens = torch.tensor([ids], device=p.device)
        logits = model(tokens, kv_cache=cache, logit_index=torch.tensor([len(ids) - 1], device=p.device),
                       images=None if pixels is None else pixels.to(p.device))[0, -1]
        out, score = [], None
        for step in range(self.max_new_tokens):
            tok = int(logits.argmax())
            if score is None and self.tok.decode([tok]).strip():          # the first non-blank token: the verdict
                score = float(logits.float().softmax(-1)[self.unsafe_id])
            if tok in self.stop_ids:
                return self.tok.decode(out), score if score is not None else 1.0, True, len(ids)
            out.append(tok)
            pos = torch.tensor([[len(ids) + step]], device=p.device)
            logits = model(torch.tensor([[tok]], device=p.device), input_pos=pos, kv_cache=cache)[0, -1]
        return self.tok.decode(out), score if score is not None else 1.0, False, len(ids)


def load_llama_guard(path: str | Path, dtype=None, device="cpu", **kw) -> LlamaGuard:
    """A Llama Guard folder (HF layout: config.json + safetensors + a Llama 4 tokenizer) as a LlamaGuard. A
    folder with `guard.json` (a guard trained here) gives its name and categories."""
    import json

    import herd
    from ..tokenizer import load_tokenizer
    path = Path(path)
    meta = {}
    if (path / "guard.json").exists():
        meta = json.loads((path / "guard.json").read_text())
    if dtype is None and "dtype" in meta:           # a small guard stored in bf16, run in fp32
        dtype = getattr(torch, meta["dtype"])
    try:
        model = herd.load(path, dtype=dtype, device=device)
        tok = load_tokenizer(path, model.config.eos_token_ids)
    except (ValueError, OSError) as e:       # CheckpointError, ConfigError, TokenizerError are ValueErrors
        raise GuardError(f"cannot load the guard {path}: {e}") from None
    kw.setdefault("name", meta.get("name", path.name))
    for key in ("categories", "max_new_tokens", "reads_conversations"):
        if key in meta:
            kw.setdefault(key, meta[key])
    if "context" in meta:
        model.config.max_seq_len = min(model.config.max_seq_len, int(meta["context"]))
    return LlamaGuard(model, tok, **kw)


__all__ = ["CATEGORIES", "LlamaGuard", "conversation_turns", "load_llama_guard", "parse_verdict", "prompt_ids"]
