"""Chat messages -> prompt token ids. Two formats:

- Llama 4's native format, written in code (spec 5.2): `<|begin_of_text|>`, then per message
  `<|header_start|>ROLE<|header_end|>\\n\\n CONTENT <|eot|>` (`<|eom|>` after tool results and tool calls), role
  `tool` becomes `ipython`, images expand to their token blocks where they appear, then the generation header.
  Message text is encoded with special-token parsing off, so user text cannot forge control tokens.
- Any other model: the checkpoint's own jinja chat template (GGUF `tokenizer.chat_template`,
  `tokenizer_config.json`), rendered in a sandbox, then encoded without adding a second BOS.
"""
from __future__ import annotations

import json
from datetime import datetime

from .tokenizer import Tokenizer


class ChatError(ValueError):
    """Messages that cannot be formatted, naming the message and what was expected."""


ROLES = ("system", "user", "assistant", "tool", "ipython")


def message_parts(msg: dict, index: int) -> list[dict]:
    """A message's content as a list of {"type": "text", "text"} / {"type": "image", ...} parts."""
    content = msg.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") not in ("text", "image", "image_url"):
                raise ChatError(f"message {index}: content parts must be objects of type text, image or image_url")
            parts.append(p)
        return parts
    raise ChatError(f"message {index}: content must be a string or a list of parts, got {type(content).__name__}")


def validate_messages(messages: list[dict]):
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ChatError(f"message {i}: role must be one of {', '.join(ROLES)}")


def pythonic_call(name: str, arguments: dict) -> str:
    """A tool call the way Llama 4 writes it: get_weather(city="Oslo", days=3)."""
    args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())
    return f"{name}({args})"


def _tool_call_text(calls: list[dict]) -> str:
    rendered = []
    for c in calls:
        fn = c.get("function", c)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args else {}
            except json.JSONDecodeError:
                raise ChatError(f"tool call {fn.get('name')!r}: arguments are not valid JSON") from None
        rendered.append(pythonic_call(fn["name"], args))
    return "[" + ", ".join(rendered) + "]"


def llama4_tool_instructions(tools: list[dict]) -> str:
    """The zero-shot function-calling system text of Llama 4's prompt format (spec 5.3), paraphrased."""
    specs = [t.get("function", t) for t in tools]
    return ("You can call functions. If the request needs one or more of them, answer ONLY with a Python list of "
            "calls, like [func_name1(param1=value1, param2=value2), func_name2(param=value)], and nothing else. "
            "If no function fits, answer normally in text.\n"
            "Here is a list of functions in JSON format:\n" + json.dumps(specs, indent=2, ensure_ascii=False))


def format_llama4(tok: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
                  add_generation_prompt: bool = True, image_blocks: list[list[int]] | None = None) -> list[int]:
    """Llama 4 native chat layout. image_blocks: the token block of each image part, in order of appearance."""
    sid = tok.token_id
    ids = [sid("<|begin_of_text|>")]
    images = iter(image_blocks or [])
    if tools:
        sys_text = llama4_tool_instructions(tools)
        if messages and messages[0]["role"] == "system":
            first = messages[0].get("content") or ""
            if not isinstance(first, str):
                first = "".join(p.get("text", "") for p in message_parts(messages[0], 0))
            messages = [{"role": "system", "content": first + "\n\n" + sys_text}] + messages[1:]
        else:
            messages = [{"role": "system", "content": sys_text}] + list(messages)
    for i, m in enumerate(messages):
        role = "ipython" if m["role"] == "tool" else m["role"]
        ids += [sid("<|header_start|>")] + tok.encode(role, allow_special=False) + [sid("<|header_end|>")]
        ids += tok.encode("\n\n", allow_special=False)
        for part in message_parts(m, i):
            if part["type"] == "text":
                ids += tok.encode(part["text"], allow_special=False)
            else:
                block = next(images, None)
                if block is None:
                    raise ChatError(f"message {i}: an image part has no prepared image")
                ids += block
        end = "<|eot|>"
        if m["role"] == "assistant" and m.get("tool_calls"):
            ids += tok.encode(_tool_call_text(m["tool_calls"]), allow_special=False)
            end = "<|eom|>"
        elif role == "ipython":
            end = "<|eom|>"
        ids.append(sid(end))
    if add_generation_prompt:
        ids += [sid("<|header_start|>")] + tok.encode("assistant", allow_special=False) + [sid("<|header_end|>")]
        ids += tok.encode("\n\n", allow_special=False)
    return ids


def _jinja_env():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_template(tok: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> str:
    if not tok.chat_template:
        raise ChatError("this model has no chat template; use `herd generate` for a raw completion")
    flat = []
    for i, m in enumerate(messages):
        m = dict(m)
        if isinstance(m.get("content"), list):   # text-only templates expect strings
            m["content"] = "".join(p.get("text", "") for p in message_parts(m, i))
        flat.append(m)
    from jinja2 import TemplateError
    try:
        return _jinja_env().from_string(tok.chat_template).render(
            messages=flat, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=tok.bos_token, eos_token=tok.eos_token)
    except TemplateError as e:
        raise ChatError(f"chat template failed to render: {e}") from None


def format_chat(tok: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
                add_generation_prompt: bool = True, image_blocks: list[list[int]] | None = None) -> list[int]:
    """Prompt token ids for a conversation, in the model's own format."""
    validate_messages(messages)
    if tok.is_llama4:
        return format_llama4(tok, messages, tools, add_generation_prompt, image_blocks)
    if image_blocks:
        raise ChatError("images need a Llama 4 vision model; this model reads text only")
    text = render_template(tok, messages, tools, add_generation_prompt)
    ids = tok.encode(text)     # the template writes its own BOS where it wants one
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids
    return ids


def stop_token_ids(tok: Tokenizer) -> list[int]:
    """Token ids that end an assistant turn for this tokenizer (EOS plus the chat end markers it has)."""
    ids = list(tok.eos_ids)
    for name in ("<|eot|>", "<|eom|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
        t = tok.token_id(name)
        if t is not None and t not in ids:
            ids.append(t)
    return ids
