"""An agent's tools: a name, a JSON-Schema description the model reads, and a handler that runs a call. Tools come
from Python functions (their signature and docstring), from a JSON file of tool schemas with shell-free handlers,
and the built-in code interpreter (herd.sandbox). Knows nothing of models, prompts or the agent loop."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import subprocess
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..chat import CODE_INTERPRETER


class ToolError(ValueError):
    """A tool definition herd cannot use, naming the file or function and what was expected."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict                              # JSON Schema of the arguments object
    handler: Callable[..., object]                # called with the arguments as keyword arguments
    source: str = ""                              # where it came from, for messages

    def spec(self) -> dict:
        """The OpenAI-style tool entry the prompt and the server take."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass
class ToolResult:
    text: str                  # what goes back to the model (the tool turn's content)
    ok: bool
    seconds: float
    detail: dict = field(default_factory=dict)    # for the transcript (the sandbox's result, an error's type)


MAX_RESULT_CHARS = 8000         # what one tool result may put into the conversation


def run_tool(tools: dict[str, Tool], name: str, arguments) -> ToolResult:
    """Run one call. Every failure (an unknown tool, arguments that do not fit, the handler raising) becomes a
    result that says so: the model reads it and the loop goes on."""
    t0 = time.perf_counter()
    if name not in tools:
        return ToolResult(f"error: there is no tool named {name!r}; the tools are: {', '.join(sorted(tools))}",
                          False, 0.0, {"error": "unknown tool"})
    tool = tools[name]
    problem = _argument_problem(tool, arguments)
    if problem:
        return ToolResult(f"error: {name}: {problem}", False, 0.0, {"error": "bad arguments"})
    try:
        out = tool.handler(**arguments)
    except Exception as e:     # a tool's own failure is the model's information, not the loop's end
        return ToolResult(f"error: {name} raised {type(e).__name__}: {e}", False, time.perf_counter() - t0,
                          {"error": type(e).__name__})
    if isinstance(out, ToolResult):
        out.seconds = time.perf_counter() - t0
        return out
    text = out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str)
    return ToolResult(_clip(text), True, time.perf_counter() - t0)


def _argument_problem(tool: Tool, arguments) -> str | None:
    if not isinstance(arguments, dict):
        return f"arguments must be an object, got {type(arguments).__name__}"
    props = tool.parameters.get("properties", {})
    missing = [k for k in tool.parameters.get("required", []) if k not in arguments]
    unknown = [k for k in arguments if props and k not in props]
    if missing or unknown:
        return (f"missing {missing} " if missing else "") + (f"unknown {unknown} " if unknown else "") + \
            f"(expected arguments: {', '.join(props) or 'none'})"
    for key, value in arguments.items():
        want = props.get(key, {}).get("type")
        if want and not _is_type(value, want):
            return f"argument {key!r} must be of type {want}, got {type(value).__name__}"
    return None


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
               "null": type(None)}


def _is_type(value, want) -> bool:
    wants = want if isinstance(want, list) else [want]
    return any(isinstance(value, _JSON_TYPES.get(w, object)) and not (w in ("integer", "number") and
                                                                       isinstance(value, bool)) for w in wants)


def _clip(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} more characters cut]"


# ---- from Python functions ----------------------------------------------------------------------------------------
_PY_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def tool_from_function(fn: Callable, name: str | None = None) -> Tool:
    """A tool from a Python function: its name, its docstring's first paragraph as the description, and its
    parameters (annotated str / int / float / bool / list / dict, or unannotated = string) as the schema;
    parameters without a default are required."""
    if not callable(fn):
        raise ToolError(f"{fn!r} is not a function")
    hints = typing.get_type_hints(fn)
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ToolError(f"{fn.__name__}: parameter {p.name!r} must be an ordinary keyword parameter")
        hint = typing.get_origin(hints.get(p.name, str)) or hints.get(p.name, str)
        if hint not in _PY_TYPES:
            raise ToolError(f"{fn.__name__}: parameter {p.name!r} has type {hint!r}; tools take "
                            "str, int, float, bool, list or dict")
        props[p.name] = {"type": _PY_TYPES[hint]}
        if p.default is p.empty:
            required.append(p.name)
    doc = inspect.getdoc(fn) or ""
    return Tool(name or fn.__name__, doc.split("\n\n")[0].replace("\n", " ").strip(),
                {"type": "object", "properties": props, "required": required}, fn,
                source=f"{fn.__module__}.{fn.__qualname__}")


def tools_from_python_file(path: str | Path) -> list[Tool]:
    """Every public function defined in a Python file (the user's own tool code, run as it is imported)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"herd_agent_tools_{path.stem}", path)
    if spec is None:
        raise ToolError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:           # the user's file, not herd: where and what, without herd's traceback
        raise ToolError(f"{path}:{e.lineno}: not valid Python ({e.msg})") from None
    fns = [f for n, f in vars(module).items() if isinstance(f, types.FunctionType) and not n.startswith("_")
           and f.__module__ == module.__name__]
    if not fns:
        raise ToolError(f"{path}: defines no public function to use as a tool")
    return [tool_from_function(f) for f in fns]


# ---- from a JSON file of schemas ----------------------------------------------------------------------------------
def tools_from_json(path: str | Path) -> list[Tool]:
    """Tools from a JSON file: a list of {"name", "description", "parameters": JSON Schema, "handler": H}. H is
    {"python": "module:function"} (called with the arguments) or {"argv": ["program", "--flag", "{arg}"],
    "timeout_s": 30}: run without a shell, each "{name}" item replaced by that argument's text as one whole argv
    item; a value starting with '-' is refused, so a model cannot smuggle options in. Its stdout is the result."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ToolError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(entries, list):
        raise ToolError(f"{path}: expected a JSON list of tools, got {type(entries).__name__}")
    return [_json_tool(entry, f"{path}[{i}]") for i, entry in enumerate(entries)]


def _json_tool(entry, where: str) -> Tool:
    if not isinstance(entry, dict):
        raise ToolError(f"{where}: a tool must be an object")
    spec = entry.get("function", entry)      # the OpenAI shape {"type": "function", "function": {...}} too
    name, handler = spec.get("name"), entry.get("handler", spec.get("handler"))
    if not isinstance(name, str) or not name.isidentifier():
        raise ToolError(f"{where}: 'name' must be an identifier, got {name!r}")
    params = spec.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise ToolError(f"{where}: 'parameters' must be a JSON Schema of type object")
    if not isinstance(handler, dict) or len({"python", "argv"} & set(handler)) != 1:
        raise ToolError(f"{where}: 'handler' must be {{\"python\": \"module:function\"}} or "
                        "{\"argv\": [...]} (no shell commands)")
    if "python" in handler:
        fn = _import_function(handler["python"], where)
    else:
        fn = _argv_handler(handler["argv"], float(handler.get("timeout_s", 30)), where)
    return Tool(name, str(spec.get("description", "")), params, fn, source=where)


def _import_function(target, where: str) -> Callable:
    if not isinstance(target, str) or ":" not in target:
        raise ToolError(f"{where}: 'python' handler must be 'module:function', got {target!r}")
    module, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ToolError(f"{where}: cannot import {target} ({e})") from None
    if not callable(fn):
        raise ToolError(f"{where}: {target} is not callable")
    return fn


def _argv_handler(argv, timeout_s: float, where: str) -> Callable:
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ToolError(f"{where}: 'argv' must be a non-empty list of strings")

    def run(**arguments) -> ToolResult:
        cmd = []
        for item in argv:
            if item.startswith("{") and item.endswith("}") and item[1:-1] in arguments:
                value = arguments[item[1:-1]]
                text = value if isinstance(value, str) else json.dumps(value)
                if text.startswith("-"):
                    return ToolResult(f"error: argument {item[1:-1]!r} may not start with '-'", False, 0.0)
                cmd.append(text)
            else:
                cmd.append(item)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, shell=False)
        except subprocess.TimeoutExpired:
            return ToolResult(f"error: {argv[0]} ran past {timeout_s} s", False, timeout_s)
        text = done.stdout + (f"\n[stderr]\n{done.stderr}" if done.stderr.strip() else "")
        ok = done.returncode == 0
        return ToolResult(_clip(text if ok else f"{text}\n[exit {done.returncode}]"), ok, 0.0,
                          {"exit_code": done.returncode})
    return run


# ---- the built-in code interpreter --------------------------------------------------------------------------------
def code_interpreter_tool(timeout_s: float = 10, memory_mb: int = 512) -> Tool:
    """Llama 4's built-in code interpreter on herd.sandbox: the model's code runs isolated, and what it printed plus
    how it ended (sandbox.SandboxResult.summary) is the result. A stopped or failing run is a result too."""
    from ..sandbox import run_python

    def run(code: str) -> ToolResult:
        r = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb)
        parts = [r.stdout.rstrip("\n")] if r.stdout.strip() else []
        if r.stderr.strip():
            parts.append("[stderr]\n" + r.stderr.rstrip("\n")[-3000:])
        parts.append(f"[{r.summary()}]")
        detail = {"exit_code": r.exit_code, "killed": r.killed, "timed_out": r.timed_out,
                  "duration_s": round(r.duration_s, 3)}
        return ToolResult(_clip("\n".join(parts)), r.ok, r.duration_s, detail)

    return Tool(CODE_INTERPRETER, "Run Python 3 code in an isolated sandbox (no network, no files kept) and get "
                "back what it prints. Use print() to see values.",
                {"type": "object", "properties": {"code": {"type": "string", "description": "Python source"}},
                 "required": ["code"]}, run, source="herd.sandbox")
