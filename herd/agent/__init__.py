"""herd agent: a model (or a planner and an actor) completing a task with tools: user tools from Python functions or a
JSON file, and Llama 4's built-in code interpreter on herd.sandbox.

- tools.py   Tool, run_tool; tools from functions / JSON schemas with shell-free handlers; the code interpreter
- brains.py  the model: a local one through herd's chat format and tool-call parser, or a served one over HTTP
- loop.py    run_agent (the loop, step limit, guard hook for tool results), plan_and_act, the JSONL transcript
- cli.py     `herd agent`

Nothing on herd's run / serve path imports this package.
"""
from .brains import BrainError, LocalBrain, ServedBrain, Turn, engine_completer
from .loop import AgentResult, Transcript, plan_and_act, plan_steps, read_context, run_agent
from .tools import Tool, ToolError, ToolResult, code_interpreter_tool, run_tool, tool_from_function, \
    tools_from_json, tools_from_python_file

__all__ = ["AgentResult", "BrainError", "LocalBrain", "ServedBrain", "Tool", "ToolError", "ToolResult",
           "Transcript", "Turn", "code_interpreter_tool", "engine_completer", "plan_and_act", "plan_steps",
           "read_context", "run_agent", "run_tool", "tool_from_function", "tools_from_json",
           "tools_from_python_file"]
