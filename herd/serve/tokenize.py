"""The tokenizer endpoints, in the shapes vLLM serves and lm-eval's `local-completions` probes (its RemoteTokenizer:
lm_eval/utils.py), so an evaluation client needs no tokenizer of its own and no hub download:

- POST /tokenize {"prompt", "add_special_tokens" (BOS where the model adds one; default true, lm-eval sends false),
  "return_token_strs"} -> {"count", "max_model_len", "tokens", "token_strs"}. Special-token text in the prompt
  ("<|im_end|>") encodes to its id: lm-eval finds the eos / bos ids as encode(eos_token)[0].
- POST /detokenize {"tokens"} -> {"prompt"}, special tokens kept as text; ids outside the vocabulary are a 400.
- GET /tokenizer_info -> {"eos_token", "bos_token", "pad_token", "chat_template", "model_max_length", ...}; lm-eval
  requires eos_token.
Each takes the model (body field, or ?model= for GET) like the completions endpoints. No engine, no model code.
"""
from __future__ import annotations

from fastapi import Request as HTTPRequest

from .schemas import APIError, DetokenizeRequest, TokenizeRequest


def _pick(request: HTTPRequest, name: str | None):
    return request.app.state.server.pick(name)


def _token_text(tok, token_id: int | None) -> str | None:
    return None if token_id is None else tok.decode([token_id], skip_special=False)


async def tokenize(body: TokenizeRequest, request: HTTPRequest):
    sm = _pick(request, body.model)
    ids = sm.tok.encode(body.prompt, bos=body.add_special_tokens and sm.tok.add_bos)
    out = {"count": len(ids), "max_model_len": sm.context_len, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = [_token_text(sm.tok, i) for i in ids]
    return out


async def detokenize(body: DetokenizeRequest, request: HTTPRequest):
    sm = _pick(request, body.model)
    vocab = sm.model.config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary 0..{vocab - 1}", param="tokens")
    return {"prompt": sm.tok.decode(body.tokens, skip_special=False)}


async def tokenizer_info(request: HTTPRequest, model: str | None = None):
    sm = _pick(request, model)
    tok = sm.tok
    return {"tokenizer_class": f"herd.{type(tok.backend).__module__.split('.')[0]}",
            "eos_token": tok.eos_token or _token_text(tok, tok.eos_ids[0] if tok.eos_ids else None),
            "bos_token": tok.bos_token or _token_text(tok, tok.bos_id),
            "pad_token": None, "chat_template": tok.chat_template, "add_bos_token": tok.add_bos,
            "model_max_length": sm.context_len, "vocab_size": sm.model.config.vocab_size}
