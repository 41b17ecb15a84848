"""Tokenizers through maintained libraries: HF `tokenizers` (tokenizer.json, or the BPE vocab embedded in a GGUF
file) and `tiktoken` (Llama 4's tokenizer.model with its 2,048 special tokens). Only encode and decode, plus the
incremental decoder that streaming uses."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path


class TokenizerError(ValueError):
    """A tokenizer herd cannot build, naming the file and what was wrong."""


# Llama 4's special tokens, in id order from len(ranks) (= 200000 in the real file). Spec section 5.1.
def llama4_special_tokens() -> list[str]:
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
             "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    names += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6)]
    names += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    names += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(8, 69)]
    names += ["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
              "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
    names += [f"<|vision_reserved_special_token_{i}|>" for i in range(2, 6)]
    names += ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
    names += [f"<|vision_reserved_special_token_{i}|>" for i in range(7, 1048)]
    names += [f"<|reasoning_reserved_special_token_{i}|>" for i in range(8)]
    names += ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(904)]
    assert len(names) == 2048
    return names


# Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre` (the facts llama.cpp's vocabulary code uses).
O200K_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gguf_pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("default", "gpt-2", "gpt2"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)        # GPT-2's own split
    if pre == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pt.Sequence([pt.Split(Regex(LLAMA3_PATTERN), behavior="isolated"), byte_level])
    if pre == "llama4":
        return pt.Sequence([pt.Split(Regex(O200K_PATTERN), behavior="isolated"), byte_level])
    raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported "
                         "(supported: default, gpt2, smollm, llama-bpe, llama3, llama4)")


# Llama 4's reference tokenizer encodes text in pieces: at most 400,000 characters each (tiktoken's Rust side can
# panic on longer input) and no run of more than 25,000 whitespace or non-whitespace characters (BPE on such runs is
# quadratic). The cuts change the tokens of such inputs, so herd makes the same ones.
TIKTOKEN_MAX_CHARS = 400_000
TIKTOKEN_MAX_RUN = 25_000
_RUNS = re.compile(r"\s+|\S+")


def tiktoken_pieces(text: str) -> list[str]:
    """text cut where Llama 4's reference cuts it before encoding: every 400,000 characters, then inside each piece
    every 25,000 characters of a longer run of whitespace or non-whitespace (counted from the run's start)."""
    if len(text) <= TIKTOKEN_MAX_RUN:           # no run can be too long
        return [text]
    pieces = []
    for start in range(0, len(text), TIKTOKEN_MAX_CHARS):
        chunk = text[start:start + TIKTOKEN_MAX_CHARS]
        cuts = [m.start() + k for m in _RUNS.finditer(chunk) if m.end() - m.start() > TIKTOKEN_MAX_RUN
                for k in range(TIKTOKEN_MAX_RUN, m.end() - m.start(), TIKTOKEN_MAX_RUN)]
        bounds = [0] + cuts + [len(chunk)]
        pieces += [chunk[a:b] for a, b in zip(bounds, bounds[1:])]
    return pieces


class Tokenizer:
    """encode/decode over either a `tokenizers.Tokenizer` or a `tiktoken.Encoding`."""

    def __init__(self, backend, *, bos_id: int | None, eos_ids: list[int], add_bos: bool,
                 chat_template: str | None = None, bos_token: str = "", eos_token: str = ""):
        self.backend = backend
        self.bos_id, self.eos_ids, self.add_bos = bos_id, list(eos_ids), add_bos
        self.chat_template, self.bos_token, self.eos_token = chat_template, bos_token, eos_token
        self._tiktoken = not hasattr(backend, "encode_batch_fast") and hasattr(backend, "n_vocab")
        if self._tiktoken:
            self._special = dict(backend._special_tokens)
            self.vocab_size = backend.n_vocab
        else:
            # A second copy that leaves special-token text alone, for untrusted text (see encode).
            from tokenizers import Tokenizer as HFTokenizer
            self._plain = HFTokenizer.from_str(backend.to_str())
            self._plain.encode_special_tokens = True
            self._special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._special_ids = set(self._special.values())

    # Special tokens ------------------------------------------------------------------------------------------
    def token_id(self, token: str) -> int | None:
        """Id of a special token such as '<|eot|>' (None when this vocabulary has no such token)."""
        return self._special.get(token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @property
    def is_llama4(self) -> bool:
        return "<|header_start|>" in self._special and "<|eot|>" in self._special

    # Encode / decode -------------------------------------------------------------------------------------------
    def encode(self, text: str, *, bos: bool = False, allow_special: bool = True) -> list[int]:
        """Token ids of text. allow_special=False encodes special-token text ('<|eot|>') as ordinary characters,
        as Llama 4's reference does for message content, so user text cannot forge control tokens."""
        if self._tiktoken:
            allowed = "all" if allow_special else set()
            ids = [i for piece in tiktoken_pieces(text)
                   for i in self.backend.encode(piece, allowed_special=allowed, disallowed_special=())]
        else:
            ids = (self.backend if allow_special else self._plain).encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        if self._tiktoken:
            return self.backend.decode_bytes(ids).decode("utf-8", errors="replace")
        return self.backend.decode(ids, skip_special_tokens=False)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas without ever emitting half a UTF-8 character.

    Byte-level BPE tokens can split a character's bytes; the decoder holds text back while the decoded tail is the
    replacement character, and decodes only a short window (prefix_offset..) so the cost stays constant per token.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tok, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = []
        self.prefix_offset = 0   # start of the window decoded for context (spaces depend on the previous token)
        self.read_offset = 0     # ids before this have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip_special)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """Whatever is still held back (a genuinely invalid byte sequence at the very end)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip_special)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


# ---- loading -------------------------------------------------------------------------------------------------------
def tokenizer_from_gguf(path: str | Path) -> Tokenizer:
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models

    from .gguf import metadata, open_gguf

    meta = metadata(open_gguf(path))
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (herd reads byte-level BPE, "
                             "'gpt2')")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    # token_type 3 = control, 4 = user-defined: matched whole in text before BPE runs
    added = [AddedToken(tokens[i], special=types[i] == 3, normalized=False) for i in range(len(tokens))
             if types[i] in (3, 4)]
    backend.add_tokens(added)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [eos] if eos is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if meta.get(key) is not None and meta[key] not in eos_ids:
            eos_ids.append(meta[key])
    return Tokenizer(backend, bos_id=bos, eos_ids=eos_ids, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                     chat_template=meta.get("tokenizer.chat_template"),
                     bos_token=tokens[bos] if bos is not None else "", eos_token=tokens[eos] if eos is not None else "")


def _read_tokenizer_config(folder: Path) -> dict:
    cfg_path = folder / "tokenizer_config.json"
    cfg = {}
    if cfg_path.exists():
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{cfg_path}: not valid JSON ({e})") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):   # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    cfg["chat_template"] = template
    return cfg


def _token_text(x) -> str:
    return x.get("content", "") if isinstance(x, dict) else (x or "")


def tokenizer_from_folder(folder: str | Path, eos_ids: list[int] | None = None) -> Tokenizer:
    """An HF tokenizer folder: tokenizer.json (+ tokenizer_config.json), or Llama 4's tiktoken tokenizer.model."""
    folder = Path(folder)
    cfg = _read_tokenizer_config(folder)
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTokenizer
        try:
            backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise TokenizerError(f"{folder / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
        backend.post_processor = None    # BOS is herd's decision (chat templates add their own): no double BOS
        bos_text, eos_text = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        bos = backend.token_to_id(bos_text) if bos_text else None
        eos = [backend.token_to_id(eos_text)] if eos_text and backend.token_to_id(eos_text) is not None else []
        add_bos = bool(cfg.get("add_bos_token", bos is not None))
    elif (folder / "tokenizer.model").exists():
        backend = llama4_tiktoken(folder / "tokenizer.model")
        special = backend._special_tokens
        bos, eos = special["<|begin_of_text|>"], [special[t] for t in ("<|end_of_text|>", "<|eom|>", "<|eot|>")]
        bos_text, eos_text, add_bos = "<|begin_of_text|>", "<|eot|>", True
    else:
        raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model")
    for e in eos_ids or []:
        if e not in eos:
            eos.append(e)
    return Tokenizer(backend, bos_id=bos, eos_ids=eos, add_bos=add_bos, chat_template=cfg["chat_template"],
                     bos_token=bos_text, eos_token=eos_text)


def llama4_tiktoken(path: Path):
    """Llama 4's tokenizer.model: one 'base64-token rank' line per BPE token; specials follow the ranks."""
    import tiktoken

    ranks = {}
    try:
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: line {n} is not 'base64-token rank' ({e})") from None
    base = len(ranks)
    special = {name: base + i for i, name in enumerate(llama4_special_tokens())}
    return tiktoken.Encoding(name=Path(path).stem, pat_str=O200K_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special)


def load_tokenizer(path: str | Path, eos_ids: list[int] | None = None) -> Tokenizer:
    """The tokenizer that belongs to a model path (a GGUF file or an HF folder)."""
    from .gguf import is_gguf

    path = Path(path)
    if is_gguf(path):
        return tokenizer_from_gguf(path)
    if path.is_dir():
        return tokenizer_from_folder(path, eos_ids)
    raise TokenizerError(f"{path}: not a GGUF file or a folder with a tokenizer")


def save_tokenizer(tok, folder: Path):
    """Write tokenizer.json + tokenizer_config.json next to a checkpoint, so `herd run FOLDER` and
    tokenizer.load_tokenizer find the tokenizer the model was trained with (a GGUF-embedded one included)."""
    backend = getattr(tok, "backend", None)
    if backend is None or not hasattr(backend, "to_str"):
        return      # tiktoken (Llama 4's tokenizer.model) or bytes: nothing portable to write here
    folder = Path(folder)
    backend.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": tok.bos_token or None, "eos_token": tok.eos_token or None, "add_bos_token": tok.add_bos}
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "preprocessor_config.json")


def copy_tokenizer(src: str | Path, folder: str | Path) -> list[str]:
    """Give a checkpoint written from `src` (an HF folder or a GGUF file) the tokenizer `src` has, so it runs: an HF
    folder's tokenizer files are copied as they are, a GGUF's embedded tokenizer is written as tokenizer.json.
    Returns the files written."""
    import shutil

    src, folder = Path(src), Path(folder)
    if src.is_dir():
        names = [n for n in TOKENIZER_FILES if (src / n).exists()]
        for n in names:
            shutil.copyfile(src / n, folder / n)
        return names
    save_tokenizer(load_tokenizer(src), folder)
    return [n for n in ("tokenizer.json", "tokenizer_config.json") if (folder / n).exists()]
