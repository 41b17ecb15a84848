"""Chat messages -> prompt token ids. Two formats:

- Llama 4's native format, written in code (spec 5.2): `<|begin_of_text|>`, then per message
  `<|header_start|>ROLE<|header_end|>\\n\\n CONTENT <|eot|>` (`<|eom|>` after tool results and tool calls), role
  `tool` becomes `ipython`, images expand to their token blocks where they appear, then the generation header.
  Message text is encoded with special-token parsing off, so user text cannot forge control tokens.
- Any other model: the checkpoint's own jinja chat template (GGUF `tokenizer.chat_template`,
  `tokenizer_config.json`), rendered in a sandbox, then encoded without adding a second BOS. Templates that know
  no tools get the tool list and a JSON call format in the system message.
- Past tool calls written back into Llama 4 prompts as Meta's reference (llama-models) writes them
  (`llama4_call_text`; tests/test_llama4_reference.py compares token ids).
- Assistant text -> tool calls (`parse_tool_calls`): every form the reference reads (pythonic lists, JSON calls,
  `<function=NAME>{...}</function>`, built-in `X.call(query=...)`, code-interpreter blocks), parsed, never run;
  `json_call_spans` finds the arguments in a grammar-constrained call while it grows, for streaming.
"""
from __future__ import annotations

import ast
import json
import re
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


# ---- Llama 4 tool calls written into the prompt (Meta's reference: llama_models ToolUtils.encode_tool_call) ---------
TOOL_FORMATS = ("python_list", "json", "function_tag")
# Built-in tools of Meta's format, written in their own forms whatever the tool format: the code interpreter's call
# is its code, the others `NAME.call(query="...")`.
BUILTIN_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
CODE_INTERPRETER = "code_interpreter"


def python_value(value) -> str:
    """A JSON value as a Python literal, written as Meta's reference writes it (`True`, `None`, `"text"`, `[1, 2]`)
    wherever that is valid Python. Two places differ, where the reference's text is not Python that means the value:
    a string with a quote, backslash or control character (the reference puts it between double quotes unescaped)
    is escaped as JSON escapes it, which Python reads the same; a dict is `{"key": value}` (the reference writes
    `{key=value}`)."""
    if isinstance(value, str):
        if '"' in value or "\\" in value or any(ord(c) < 32 for c in value):
            return json.dumps(value, ensure_ascii=False)
        return f'"{value}"'
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(python_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{python_value(str(k))}: {python_value(v)}" for k, v in value.items()) + "}"
    raise ChatError(f"a tool call argument of type {type(value).__name__} has no Python literal form")


def pythonic_call(name: str, arguments: dict) -> str:
    """A tool call the way Llama 4 writes it: get_weather(city="Oslo", days=3, metric=True)."""
    return f"{name}(" + ", ".join(f"{k}={python_value(v)}" for k, v in arguments.items()) + ")"


def llama4_call_text(name: str, arguments: dict, tool_format: str = "python_list") -> str:
    """One past tool call as it goes back into a Llama 4 prompt, in Meta's reference forms: python_list
    `[f(a=1)]`, json `{"type": "function", "name": "f", "parameters": {...}}`, function_tag
    `<function=f>{...}</function>`; the code interpreter's call is its code, brave_search / wolfram_alpha /
    photogen `NAME.call(query="...")`. (The reference writes several calls one after another, each in its own
    brackets, not `[f(), g()]`; format_llama4 does the same.)"""
    if name == CODE_INTERPRETER:
        if not isinstance(arguments.get("code"), str):
            raise ChatError(f'a {CODE_INTERPRETER} call needs a string argument "code", got {sorted(arguments)}')
        return arguments["code"]
    if name in BUILTIN_QUERY_TOOLS:
        if not isinstance(arguments.get("query"), str):
            raise ChatError(f'a {name} call needs a string argument "query", got {sorted(arguments)}')
        return f"{name}.call(query={python_value(arguments['query'])})"
    if tool_format == "python_list":
        return f"[{pythonic_call(name, arguments)}]"
    if tool_format == "json":       # json.dumps defaults (ASCII escapes, ", " and ": "), as the reference
        return json.dumps({"type": "function", "name": name, "parameters": arguments})
    if tool_format == "function_tag":
        return f"<function={name}>{json.dumps(arguments)}</function>"
    raise ChatError(f"tool format {tool_format!r} is not one of {', '.join(TOOL_FORMATS)}")


_CALL_FORM_TEXT = {
    "python_list": ("answer ONLY with a Python list of calls, like [func_name1(param1=value1, param2=value2), "
                    "func_name2(param=value)], and nothing else"),
    "json": ('answer ONLY with a JSON object {"type": "function", "name": <function name>, "parameters": <object of '
             "argument values>} per call, and nothing else"),
    "function_tag": ('answer ONLY with <function=func_name>{"param": "value"}</function> per call, and nothing '
                     "else"),
}


def llama4_tool_instructions(tools: list[dict], tool_format: str = "python_list") -> str:
    """The zero-shot function-calling system text of Llama 4's prompt format (spec 5.3), paraphrased, asking for
    calls in tool_format."""
    if tool_format not in _CALL_FORM_TEXT:
        raise ChatError(f"tool format {tool_format!r} is not one of {', '.join(TOOL_FORMATS)}")
    specs = [t.get("function", t) for t in tools]
    return (f"You can call functions. If the request needs one or more of them, {_CALL_FORM_TEXT[tool_format]}. "
            "If no function fits, answer normally in text.\n"
            "Here is a list of functions in JSON format:\n" + json.dumps(specs, indent=2, ensure_ascii=False))


def format_llama4(tok: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
                  add_generation_prompt: bool = True, image_blocks: list[list[int]] | None = None,
                  tool_format: str = "python_list") -> list[int]:
    """Llama 4 native chat layout, token for token as Meta's reference (llama_models ChatFormat) lays it out: the
    role, "\\n\\n", each text part and each past tool call are encoded separately (their tokens can differ from
    one encoding of the joined text). image_blocks: the token block of each image part, in order of appearance;
    tool_format: how past calls are written (llama4_call_text) and which form the tool instructions ask for."""
    sid = tok.token_id
    ids = [sid("<|begin_of_text|>")]
    images = iter(image_blocks or [])
    if tools:
        sys_text = llama4_tool_instructions(tools, tool_format)
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
            for call in m["tool_calls"]:
                ids += tok.encode(llama4_call_text(*_arguments(call), tool_format), allow_special=False)
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
    except (TemplateError, TypeError, KeyError, AttributeError) as e:   # e.g. 'text' + None in a template
        raise ChatError(f"chat template failed to render: {e}") from None


def format_chat(tok: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
                add_generation_prompt: bool = True, image_blocks: list[list[int]] | None = None,
                tool_format: str = "python_list") -> list[int]:
    """Prompt token ids for a conversation, in the model's own format. tool_format: Llama 4's form for tool calls
    (llama4_call_text); other models' calls are written by their template or as JSON."""
    validate_messages(messages)
    if tok.is_llama4:
        return format_llama4(tok, messages, tools, add_generation_prompt, image_blocks, tool_format)
    if image_blocks:
        raise ChatError("images need a Llama 4 vision model; this model reads text only")
    messages, tools = _template_messages(tok, messages, tools)
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


# ---- tools for models without a native tool format ----------------------------------------------------------------
def template_has_tools(template: str | None) -> bool:
    """Whether a jinja chat template renders `tools` itself (Llama 3.1, Qwen and Hermes templates do; SmolLM2's
    ChatML template does not)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def tool_call_key(tok: Tokenizer) -> str:
    """The key that holds the arguments in this model's JSON call form: Llama 4's is "parameters"."""
    return "parameters" if tok.is_llama4 else "arguments"


def json_tool_instructions(tools: list[dict]) -> str:
    """System text for a template with no tool support: the functions, and the JSON call form `parse_tool_calls`
    reads."""
    specs = [t.get("function", t) for t in tools]
    return ('You can call functions. To call one, answer ONLY with a JSON object {"name": <function name>, '
            '"arguments": <object of argument values>} (a JSON list of such objects for several calls), and nothing '
            "else. If no function fits, answer normally in text.\n"
            "Here is a list of functions in JSON format:\n" + json.dumps(specs, indent=2, ensure_ascii=False))


def _arguments(call: dict) -> tuple[str, dict]:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise ChatError(f"tool call {fn.get('name')!r}: arguments are not valid JSON") from None
    if not isinstance(args, dict):
        raise ChatError(f"tool call {fn.get('name')!r}: arguments must be a JSON object")
    return fn.get("name", ""), args


def _text_of(msg: dict, index: int) -> str:
    return "".join(p.get("text", "") for p in message_parts(msg, index) if p["type"] == "text")


def _template_messages(tok: Tokenizer, messages: list[dict], tools: list[dict] | None):
    """(messages, tools) as the checkpoint's template gets them. A template that knows tools gets them as they are
    (call arguments as objects, the HF convention); one that does not gets the tool list and call format in the
    system message, past calls as their JSON text and tool results as plain `tool` turns."""
    if template_has_tools(tok.chat_template):
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{"type": "function", "id": c.get("id"),
                                    "function": dict(zip(("name", "arguments"), _arguments(c)))}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out, tools
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        text = _text_of(m, i)
        if m.get("tool_calls"):
            calls = [dict(zip(("name", "arguments"), _arguments(c))) for c in m["tool_calls"]]
            call_text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            text = (text + "\n" if text else "") + call_text
            m.pop("tool_calls")
        m["content"] = text
        out.append(m)
    if tools:
        sys_text = json_tool_instructions(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = (out[0]["content"] + "\n\n" if out[0]["content"] else "") + sys_text
        else:
            out.insert(0, {"role": "system", "content": sys_text})
    return out, None


# ---- assistant text -> tool calls ---------------------------------------------------------------------------------
_TAGS = ("<|python_start|>", "<|python_end|>", "<tool_call>", "</tool_call>")
_LITERAL_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _literal(node):
    """A call argument's value: constants, lists, tuples, dicts, signed numbers, true/false/null. Nothing is
    evaluated: anything else raises ValueError."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("**mapping in a literal")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
            and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    raise ValueError(f"not a literal: {type(node).__name__}")


def _pythonic_calls(src: str) -> list[dict] | None:
    """`[f(a=1), g(b="x")]` or a single `f(a=1)` -> [{"name", "arguments"}], or None if it is not exactly that."""
    try:
        tree = ast.parse(src.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return None
    nodes = tree.elts if isinstance(tree, ast.List) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, (ast.Name, ast.Attribute)):
            return None
        name = ast.unparse(node.func)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "call" and isinstance(node.func.value, ast.Name):
            name = node.func.value.id         # the built-in form brave_search.call(query="...")
        try:
            args = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
        except (ValueError, TypeError):   # TypeError: an unhashable dict key
            return None
        if len(args) != len(node.keywords):
            return None
        calls.append({"name": name, "arguments": args})
    return calls or None


def _json_call(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if obj.get("type") not in (None, "function"):
        return None
    extra = set(obj) - {"name", "type", "parameters", "arguments"}
    if extra:
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):             # arguments given as a JSON string, OpenAI style
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else None


def _closing(text: str, start: int) -> int | None:
    """Index of the bracket closing text[start] ('[' or '('), skipping quoted strings; None if unbalanced."""
    depth, quote, i = 0, None, start
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


_FUNCTION_TAG = re.compile(r"<function=([\w.\-]+)>\s*")
_FUNCTION_END = re.compile(r"\s*</function>")


def _object_at(text: str, i: int) -> tuple[dict | None, int]:
    """The JSON object at text[i] (or a Python dict literal, single quotes and all) and the index past it."""
    if not text.startswith("{", i):
        return None, i
    try:
        obj, end = json.JSONDecoder().raw_decode(text, i)
    except json.JSONDecodeError:
        close = _closing(text, i)
        if close is None:
            return None, i
        try:
            obj, end = _literal(ast.parse(text[i:close + 1], mode="eval").body), close + 1
        except (SyntaxError, ValueError, TypeError, RecursionError):
            return None, i
    return (obj, end) if isinstance(obj, dict) else (None, i)


def _separator_end(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n;,":
        i += 1
    return i


def _function_tag_calls(text: str, i: int) -> tuple[list[dict], int] | None:
    """`<function=NAME>{...}</function>` calls (Llama 4's custom-format example), one or several, from text[i]."""
    calls, end = [], i
    while (m := _FUNCTION_TAG.match(text, end)) is not None:
        args, stop = _object_at(text, m.end())
        if args is None:
            break
        close = _FUNCTION_END.match(text, stop)
        calls.append({"name": m.group(1), "arguments": args})
        end = close.end() if close else stop
        j = _separator_end(text, end)
        if text.startswith("<function=", j):
            end = j
    return (calls, end) if calls else None


def _calls_at(text: str, i: int) -> tuple[list[dict], int] | None:
    """Tool calls starting exactly at text[i] and the index just past them, or None."""
    if text.startswith("<function=", i):
        return _function_tag_calls(text, i)
    if text[i] == "{":                    # one or more JSON objects, separated by ';', ',' or whitespace
        decoder, calls, end = json.JSONDecoder(), [], i
        while end < len(text) and text[end] == "{":
            try:
                obj, stop = decoder.raw_decode(text, end)
            except json.JSONDecodeError:
                break
            call = _json_call(obj)
            if call is None:
                break
            calls.append(call)
            end = stop
            j = _separator_end(text, end)
            if j < len(text) and text[j] == "{":
                end = j
        return (calls, end) if calls else None
    paren = text.find("(", i) if text[i] != "[" else i
    close = _closing(text, paren) if paren >= 0 else None
    if close is None:
        return None
    src = text[i:close + 1]
    calls = _pythonic_calls(src)
    if calls is not None and text[i] == "[":      # [f(a=1)][g(b=2)]: how the reference writes several past calls
        more = _calls_at(text, j) if (j := _separator_end(text, close + 1)) < len(text) and text[j] == "[" else None
        if more is not None:
            return calls + more[0], more[1]
    if calls is None and text[i] == "[":
        try:
            obj = json.loads(src)
        except json.JSONDecodeError:
            return None
        calls = [_json_call(o) for o in obj] if isinstance(obj, list) and obj else None
        if calls is None or None in calls:
            return None
    return (calls, close + 1) if calls else None


def _call_starts(text: str, tool_names) -> list[int]:
    starts = [m.start() for m in re.finditer(r"[\[{]|<function=|(?<![\w.])\w+\.call\s*\(", text)]
    if tool_names:      # a bare call without the list brackets (get_weather(city="Oslo")), not a list's first
        names = "|".join(re.escape(n) for n in sorted(tool_names, key=len, reverse=True))
        starts += [m.start() for m in re.finditer(rf"(?<![\w.\[])(?:{names})\s*\(", text)]
    return sorted(set(starts))


_PYTHON_BLOCK = re.compile(r"<\|python_start\|>(.*?)(?:<\|python_end\|>|$)", re.S)
_END_TOKENS = ("<|eot|>", "<|eom|>")


def _builtin_arguments(call: dict) -> dict:
    """A built-in tool called in a custom form (`<function=brave_search>{"q": "x"}</function>`) gets its one
    argument under the built-in's own key, as the reference reads it: query, or code for the code interpreter."""
    key = "code" if call["name"] == CODE_INTERPRETER else "query"
    args = call["arguments"]
    if call["name"] in BUILTIN_QUERY_TOOLS + (CODE_INTERPRETER,) and key not in args and len(args) == 1:
        return {"name": call["name"], "arguments": {key: next(iter(args.values()))}}
    return call


def _find_calls(text: str, tool_names, whole: bool = False) -> tuple[str | None, list[dict]] | None:
    """The first tool calls in text (or, whole=True, calls that are all of the stripped text) with the text around
    them as content; None when there are none."""
    if whole:
        text = text.strip()
    for i in ([0] if whole else _call_starts(text, tool_names)):
        found = _calls_at(text, i) if text else None
        if found is None or (whole and found[1] != len(text)):
            continue
        calls, end = found
        calls = [_builtin_arguments(c) for c in calls]
        if tool_names is not None and any(c["name"] not in tool_names for c in calls):
            continue
        content = (text[:i] + text[end:]).strip()
        return content or None, calls
    return None


def parse_tool_calls(text: str, tool_names=None) -> tuple[str | None, list[dict]]:
    """Assistant text -> (content, calls), calls = [{"name", "arguments": dict}, ...].

    Reads every form Meta's reference (llama_models ChatFormat.decode_assistant_message_from_content) reads, and
    more: Llama 4's pythonic list (`[get_weather(city="Oslo"), f(x=[1, {"a": 2}])]`, parsed with `ast`, arguments
    literals only; every call, where the reference keeps the first; also `[f()][g()]`, the reference's way of
    writing several past calls), JSON calls (`{"name": ..., "parameters"|"arguments": {...}}`, one, several
    separated by ';' or ',', or a JSON list), `<function=NAME>{...}</function>` (nested arguments too, which the
    reference's regex cuts off), built-in `brave_search.call(query="...")`, and code between <|python_start|> and
    <|python_end|> that is not one of those forms: a `code_interpreter` call with {"code": ...}. Calls may follow
    prose (which becomes the content) and be wrapped in <tool_call> tags. tool_names: when given, calls to other
    names are not calls (so code is a code_interpreter call only when that name is in it). No calls: (text, [])."""
    for end in _END_TOKENS:
        text = text.removesuffix(end)
    block = _PYTHON_BLOCK.search(text)
    if block is not None:
        outside = (text[:block.start()] + text[block.end():]).strip()
        found = _find_calls(block.group(1), tool_names, whole=True)
        if found is not None:
            return outside or None, found[1]
        if block.group(1).strip() and (tool_names is None or CODE_INTERPRETER in tool_names):
            return outside or None, [{"name": CODE_INTERPRETER, "arguments": {"code": block.group(1)}}]
    for tag in _TAGS:
        text = text.replace(tag, "")
    found = _find_calls(text, tool_names)
    return found if found is not None else (text, [])


def tool_call_start(text: str, tool_names) -> int:
    """How much of a growing assistant text is surely prose: the index where a tool call could begin (the first
    '[' or '{', a tool name, or a trailing piece of one). Streaming sends text[:index] and holds the rest back."""
    cut = len(text)
    for m in re.finditer(r"[\[{]|<function=", text):
        cut = m.start()
        break
    for k in range(min(len("<function="), len(text)), 0, -1):       # "... <func" may become a tagged call
        if text.endswith("<function="[:k]):
            cut = min(cut, len(text) - k)
            break
    for name in tool_names or ():
        at = text.find(name)
        if at >= 0:
            cut = min(cut, at)
        for k in range(min(len(name) - 1, len(text)), 0, -1):     # "... get_wea" may become a call
            if text.endswith(name[:k]):
                cut = min(cut, len(text) - k)
                break
    return cut


def json_call_spans(text: str, key: str) -> list[tuple[str, int, int]]:
    """Where the arguments of each call lie in a growing grammar-constrained tool-call answer (constrain.py's
    tool_call_schema in compact JSON: an optional '[', then {"name": NAME, KEY: ARGS} objects joined by ', '):
    (name, start, end) per call whose name is complete, text[start:end] its argument text so far (end is len(text)
    while ARGS is still open). Anything else ends the list: text that is not of this form yields no spans."""
    head = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), ' + re.escape(json.dumps(key)) + ": ")
    spans, i = [], 1 if text.startswith("[") else 0
    while (m := head.match(text, i)) is not None:
        end = _json_value_end(text, m.end())
        spans.append((json.loads(m.group(1)), m.end(), len(text) if end is None else end))
        if end is None or not text.startswith("}, ", end):
            break
        i = end + 3
    return spans


def _json_value_end(text: str, start: int) -> int | None:
    """Index just past the JSON value that begins at text[start], or None while it is incomplete. A bare number or
    literal ends where its container goes on (',', '}' or ']')."""
    depth, in_string, i = 0, False, start
    while i < len(text):
        c = text[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            if depth == 0:
                return i
            depth -= 1
            if depth == 0:
                return i + 1
        elif c == "," and depth == 0:
            return i
        i += 1
    return None
