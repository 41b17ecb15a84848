"""A request's inputs turned into what the engine takes: chat messages and their images, the prompt ids, the tool
mode and the grammar's schema, stop strings, the context check, sampling parameters and the jobs. It runs on the
event loop or, for blocking work (image decoding), in a thread; it knows nothing of routes or streaming."""
from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from ..chat import tool_call_key
from ..constrain import tool_call_schema
from ..engine import SamplingParams
from .schemas import (COMPLETIONS_DEFAULT_MAX_TOKENS, MAX_PROMPTS, APIError, ChatCompletionRequest, ChatMessage,
                      CompletionRequest, NamedToolChoice, SamplingFields)
from .worker import Job, ServedModel


def stop_strings(stop) -> list[str]:
    """The request's stop strings as a list (their count and length: limits.check_body)."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    return [s for s in stop if s]


def check_prompt_chars(sm: ServedModel, n_chars: int, param: str):
    """A text of more than (context - 1) x the longest token's characters cannot fit, whatever it tokenizes to:
    refused before it is tokenized (tokenizing megabytes takes seconds of CPU)."""
    most = (sm.context_len - 1) * sm.max_token_chars
    if n_chars > most:
        raise APIError(400, f"This model's maximum context length is {sm.context_len} tokens, and no token is "
                            f"longer than {sm.max_token_chars} characters, so {n_chars} characters of {param} cannot "
                            f"fit (at most {most}). Please reduce the length of the {param}.",
                       param=param, code="context_length_exceeded")


def check_context(sm: ServedModel, prompt_len: int, max_tokens: int | None, param: str, prompt_param: str,
                  default: int = 0) -> int:
    """max_tokens to use (when None: `default`, or the rest of the context if that is smaller or 0); 400 with the
    limits when the request cannot fit."""
    ctx = sm.context_len
    if prompt_len >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {prompt_param} "
                            f"take {prompt_len} tokens, which leaves no room for a completion (at most {ctx - 1} "
                            f"prompt tokens). Please reduce the length of the {prompt_param}.",
                       param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        return min(default, ctx - prompt_len) if default else ctx - prompt_len
    if prompt_len + max_tokens > ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                            f"completion). Please reduce the length of the prompt or of {param}.",
                       param=param, code="context_length_exceeded")
    return max_tokens


def sampling_params(req: SamplingFields, sm: ServedModel, max_tokens: int, logprobs: int | None, index: int,
                     constrained: bool, prompt_logprobs: int | None = None) -> SamplingParams:
    ignore_eos = req.ignore_eos and not constrained      # a finished grammar must be able to stop
    bias = {int(t): b for t, b in (req.logit_bias or {}).items()}
    vocab = sm.model.config.vocab_size
    if any(t >= vocab for t in bias):
        raise APIError(400, f"logit_bias: token id {max(bias)} is outside this model's vocabulary (0..{vocab - 1})",
                       param="logit_bias", code="invalid_value")
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else max(req.top_p, 1e-9), top_k=req.top_k or 0, min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0, presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=None if req.seed is None else (req.seed + index) % 2 ** 63,
        stop_token_ids=() if ignore_eos else tuple(sm.stop_ids), ignore_eos=ignore_eos, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, logit_bias=bias or None)


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for m in messages:
        d = {"role": "system" if m.role == "developer" else m.role}
        if isinstance(m.content, list):
            d["content"] = [p.model_dump() for p in m.content]
        else:
            d["content"] = m.content
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def chat_chars(messages: list[dict]) -> int:
    """Characters of text in chat messages (contents and tool-call arguments), for check_prompt_chars."""
    n = 0
    for m in messages:
        content = m.get("content")
        n += len(content) if isinstance(content, str) else sum(len(p.get("text", "")) for p in content or [])
        n += sum(len(c["function"]["arguments"]) for c in m.get("tool_calls") or [])
    return n


def chat_images(sm: ServedModel, messages: list[dict]) -> tuple[list[list[int]] | None, Any]:
    """(the token block of every image part in order, for chat.format_chat; their pixel values (n_tiles, 3, S, S),
    for Engine.add), or (None, None) for text only. The flow of `herd run --image` (cli.py). Blocking (decoding and
    resizing): call it off the event loop."""
    parts = [(f"messages[{i}].content[{j}]", p["image_url"]["url"])
             for i, m in enumerate(messages) if isinstance(m.get("content"), list)
             for j, p in enumerate(m["content"]) if p["type"] == "image_url"]
    if not parts:
        return None, None
    elsewhere = [f"messages[{i}]" for i, m in enumerate(messages) if m["role"] != "user"
                 and isinstance(m.get("content"), list) and any(p["type"] == "image_url" for p in m["content"])]
    if elsewhere:       # as in OpenAI's API; the Llama 4 format would also drop a system message's image blocks
        raise APIError(400, f"{elsewhere[0]}: image parts are accepted in user messages only", param=elsewhere[0],
                       code="invalid_image_url")
    if getattr(sm.model.config, "vision", None) is None:
        raise APIError(400, f"model {sm.name!r} reads text only; image input needs a Llama 4 model with a vision "
                            "encoder", param="messages", code="image_input_not_supported")
    from ..images import MAX_IMAGES, ImageError, ImageTokenIds, decode_image, prepare_images
    try:
        ids = ImageTokenIds.from_tokenizer(sm.tok)
    except ImageError as e:
        raise APIError(400, f"model {sm.name!r}: {e}", param="messages", code="image_input_not_supported") from None
    if len(parts) > MAX_IMAGES:
        raise APIError(400, f"{len(parts)} images given; at most {MAX_IMAGES} per request", param="messages")
    decoded = []
    for where, url in parts:
        try:
            decoded.append(decode_image(data_url_bytes(where, url)))   # decoded here to name the part that fails
        except ImageError as e:
            raise APIError(400, f"{where}: {e}", param=f"{where}.image_url.url", code="invalid_image") from None
    pixels, blocks = prepare_images(decoded, sm.model.config.vision, ids)
    return blocks, pixels


def data_url_bytes(where: str, url: str) -> bytes:
    """The bytes of a base64 `data:` URL. Remote URLs are refused, not fetched: a request must not make the server
    reach into its network (SSRF) or wait on a slow host while holding a batch slot."""
    param = f"{where}.image_url.url"
    if url[:5].lower() != "data:":
        raise APIError(400, f"{param}: only data URLs are accepted (data:image/png;base64,...); herd does not "
                            "fetch remote images", param=param, code="invalid_image_url")
    header, comma, payload = url[5:].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise APIError(400, f"{param}: not a base64 data URL (expected data:<media type>;base64,<data>)",
                       param=param, code="invalid_image_url")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as e:
        raise APIError(400, f"{param}: the data URL's base64 is malformed ({e})", param=param,
                       code="invalid_image_url") from None


def make_jobs(sm: ServedModel, body: SamplingFields, prompts: list[list[int]], max_tokens: int, logprobs,
              compiled, images=None, prompt_logprobs: int | None = None) -> list[Job]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    jobs = []
    for p, prompt in enumerate(prompts):
        for i in range(body.n):
            index = p * body.n + i
            constraint = sm.compiler().constraint(compiled) if compiled is not None else None
            params = sampling_params(body, sm, max_tokens, logprobs, i, constraint is not None, prompt_logprobs)
            jobs.append(Job(index, prompt, params, events, loop, constraint, images))
    return jobs


def tool_setup(body: ChatCompletionRequest, tok) -> tuple[list[dict], str, set[str] | None, dict | None, bool]:
    """(tools, tool mode "off" | "auto" | "forced", tool names or None, the JSON schema the answer is held to or
    None, whether that schema is strict) for a chat request. Forced tool calls (tool_choice required / named) and
    response formats are enforced by grammar-constrained decoding."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if named is not None and named not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"tool_choice names {named!r}, which is not among the tools", param="tool_choice")
    mode = "off" if choice == "none" else ("auto" if choice == "auto" else "forced")
    names = {t["function"]["name"] for t in tools} if mode != "off" else None
    schema, strict = None, True
    fmt = body.response_format
    if mode == "forced":
        schema = tool_call_schema(tools, key=tool_call_key(tok), name=named, parallel=bool(body.parallel_tool_calls))
    elif fmt is not None and fmt.type == "json_object" and fmt.object_schema is not None:
        schema = fmt.object_schema           # instructor's JSON_SCHEMA mode: the schema is honoured
    elif fmt is not None and fmt.type == "json_object":
        schema, strict = {"type": "object"}, False
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(400, "response_format.json_schema is required for type json_schema",
                           param="response_format")
        schema = fmt.json_schema.json_schema or {}
    return tools, mode, names, schema, strict


def completion_prompts(body: CompletionRequest, sm: ServedModel) -> list[list[int]]:
    """The token ids of each prompt of a completions request: a string, a list of strings, a token-id array or a
    list of them; ids outside the vocabulary are refused. An empty prompt is the start of a document, as in
    OpenAI's API. Blocking (tokenizing): call it off the event loop."""
    raw = body.prompt
    if isinstance(raw, str):
        raw = [raw]
    elif isinstance(raw[0], int):       # the schema refuses an empty list
        raw = [raw]
    if len(raw) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    for p in raw:
        if isinstance(p, str):
            check_prompt_chars(sm, len(p), "prompt")
    prompts, vocab = [], sm.model.config.vocab_size
    for p in raw:
        ids = sm.tok.encode(p, bos=sm.tok.add_bos) if isinstance(p, str) else list(p)
        if not ids:
            ids = [document_start(sm)]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary 0..{vocab - 1}", param="prompt")
        prompts.append(ids)
    return prompts


def document_start(sm: ServedModel) -> int:
    """The token an empty prompt stands for: <|endoftext|> (what OpenAI's models condition on), else the model's
    begin-of-text token."""
    start = sm.tok.token_id("<|endoftext|>")
    start = sm.tok.bos_id if start is None else start
    if start is None:
        raise APIError(400, f"model {sm.name!r} has no begin-of-text token to stand for an empty prompt",
                       param="prompt")
    return start


def completion_max_tokens(body: CompletionRequest, sm: ServedModel, prompts: list[list[int]]) -> int:
    """max_tokens as asked (OpenAI's 16 when not given), checked against the context; 0 only with echo (score the
    prompt, generate nothing)."""
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 generates nothing: it is for scoring a prompt, with echo: true (and "
                            "logprobs for the prompt tokens' logprobs)", param="max_tokens")
    for ids in prompts:
        check_context(sm, len(ids), max_tokens, "max_tokens", "prompt")
    return max_tokens
