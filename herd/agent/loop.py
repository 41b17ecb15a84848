"""The agent loop: the model answers, its tool calls run, their results go back as tool (Llama 4: `ipython`) turns,
until it answers without a call or the step limit is reached; and the plan/act split, where a planner (long
context: the task and the files given) writes a plan and an actor carries it out step by step with tools. Every
event is printed as it happens and written to a JSONL transcript. Knows nothing of how a model is run (brains.py)
or what a tool does (tools.py).

Tool results are untrusted input (a web page, a file, a program's output can carry instructions). They pass
through `guard` before the model reads them: any object with `check(text)` returning a verdict with `.flagged`
(herd.guard's input guard, issue 16, has that interface). A flagged result is withheld and the model is told so.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .brains import BrainError, Turn
from .tools import Tool, ToolResult, run_tool

AGENT_SYSTEM = ("You are an agent that completes the user's task. Use the tools when they help: call one, read its "
                "result, and continue. When the task is done, answer with the final result in plain text, without "
                "a tool call.")
PLANNER_SYSTEM = ("You are the planner. Read the task and the files given, then write a short numbered plan (at "
                  "most {max_steps} steps, one line each) that another assistant with tools will carry out step by "
                  "step. Write only the plan.")
ACTOR_SYSTEM = ("You are the actor. You carry out a plan step by step. For each step, use the tools when they help; "
                "when the step is done, say what you found or did, in plain text.")


class Transcript:
    """Events, printed as they happen (echo) and appended to a JSONL file (path), one object per line."""

    def __init__(self, path: str | Path | None = None, echo: bool = True, stream=None):
        self.path = Path(path) if path else None
        self.echo, self.stream = echo, stream or sys.stdout
        self.events: list[dict] = []
        self._file = open(self.path, "w", encoding="utf-8") if self.path else None
        self.t0 = time.perf_counter()

    def record(self, kind: str, **data) -> dict:
        event = {"t": round(time.perf_counter() - self.t0, 3), "event": kind, **data}
        self.events.append(event)
        if self._file:
            self._file.write(json.dumps(event, ensure_ascii=False, default=str) + "\n")
            self._file.flush()
        if self.echo:
            print(_line(event), file=self.stream, flush=True)
        return event

    def close(self):
        if self._file:
            self._file.close()
            self._file = None


def _line(e: dict) -> str:
    who = f"[{e.get('role', 'agent')}{' step ' + str(e['step']) if 'step' in e else ''}]"
    kind = e["event"]
    if kind == "call":
        return f"{who} call {e['name']}({json.dumps(e['arguments'], ensure_ascii=False)})"
    if kind == "result":
        return f"{who} result of {e['name']} ({'ok' if e['ok'] else 'failed'}, {e['seconds']:.2f} s):\n" + \
            _indent(e["content"])
    if kind in ("assistant", "plan", "user", "system"):
        return f"{who} {kind}:\n" + _indent(e.get("content") or "")
    return f"{who} {kind}: " + ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("t", "event", "role"))


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in str(text).splitlines()) or "    (empty)"


@dataclass
class AgentResult:
    answer: str | None           # the last answer without a tool call (None: stopped first)
    stopped: str                 # "answer", "step limit", "error"
    steps: int                   # model replies used
    messages: list[dict] = field(default_factory=list)
    plan: str | None = None
    error: str | None = None


@dataclass
class _Budget:
    max_steps: int
    used: int = 0


def run_agent(brain, task: str, tools: list[Tool], *, system: str | None = AGENT_SYSTEM, max_steps: int = 8,
              transcript: Transcript | None = None, guard=None) -> AgentResult:
    """One model with tools on one task. max_steps: model replies at most. guard: see the module docstring."""
    transcript = transcript or Transcript(echo=False)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": task}]
    for m in messages:
        transcript.record(m["role"], role="agent", content=m["content"])
    budget = _Budget(max_steps)
    answer, stopped, error = _act(brain, messages, tools, budget, transcript, guard, "agent")
    transcript.record("end", role="agent", stopped=stopped, steps=budget.used, answer=answer, error=error)
    return AgentResult(answer, stopped, budget.used, messages, error=error)


def _act(brain, messages: list[dict], tools: list[Tool], budget: _Budget, transcript: Transcript, guard,
         role: str) -> tuple[str | None, str, str | None]:
    """Replies and tool calls until an answer without a call: (answer, how it stopped, error)."""
    by_name = {t.name: t for t in tools}
    specs = [t.spec() for t in tools]
    while budget.used < budget.max_steps:
        budget.used += 1
        step = budget.used
        try:
            turn: Turn = brain.reply(messages, specs)
        except BrainError as e:
            transcript.record("error", role=role, step=step, error=str(e))
            return None, "error", str(e)
        transcript.record("assistant", role=role, step=step, content=turn.content, raw=turn.raw,
                          calls=turn.calls, prompt_tokens=turn.prompt_tokens)
        if not turn.calls:
            messages.append({"role": "assistant", "content": turn.content or ""})
            return turn.content or "", "answer", None
        ids = [f"call_{step}_{k}" for k in range(len(turn.calls))]
        messages.append({"role": "assistant", "content": turn.content, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
            for i, c in zip(ids, turn.calls)]})
        for call_id, call in zip(ids, turn.calls):
            transcript.record("call", role=role, step=step, id=call_id, name=call["name"],
                              arguments=call["arguments"])
            result = run_tool(by_name, call["name"], call["arguments"])
            text = _guarded(result, guard, transcript, role, step)
            transcript.record("result", role=role, step=step, id=call_id, name=call["name"], ok=result.ok,
                              seconds=round(result.seconds, 3), content=text, detail=result.detail)
            messages.append({"role": "tool", "tool_call_id": call_id, "name": call["name"], "content": text})
    return None, "step limit", None


def _guarded(result: ToolResult, guard, transcript: Transcript, role: str, step: int) -> str:
    """The text the model will read: the tool's result, or a notice when the input guard flags it. This is the one
    place tool output enters the conversation, so the guard sees all of it."""
    if guard is None or not result.text.strip():
        return result.text
    verdict = guard.check(result.text)
    transcript.record("guard", role=role, step=step, flagged=bool(verdict.flagged),
                      categories=list(getattr(verdict, "categories", []) or []),
                      score=getattr(verdict, "score", None))
    if not verdict.flagged:
        return result.text
    return ("[tool result withheld: the input guard flagged it as a possible prompt injection or unsafe content; "
            "do not retry the same call]")


# ---- plan / act ---------------------------------------------------------------------------------------------------
def read_context(paths) -> list[tuple[str, str]]:
    """(path, text) of each context file; a folder gives its files (not hidden ones), sorted. Binary or unreadable
    files are refused by name."""
    out = []
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(x.startswith(".") for x in f.parts)) \
            if p.is_dir() else [p]
        for f in files:
            try:
                out.append((str(f), f.read_text(encoding="utf-8")))
            except FileNotFoundError:
                raise FileNotFoundError(f"--context {f}: no such file") from None
            except UnicodeDecodeError:
                raise ValueError(f"--context {f}: not UTF-8 text (the planner reads text files only)") from None
    return out


def plan_steps(plan: str, max_steps: int) -> list[str]:
    """The steps of a plan: its numbered ('1.', '2)') or bulleted lines; the whole text as one step if it has none;
    at most max_steps (the rest joined into the last)."""
    steps = [m.group(1).strip() for m in re.finditer(r"^\s*(?:\d+[.)]|[-*•])\s+(.+)$", plan, re.M)]
    steps = steps or ([plan.strip()] if plan.strip() else [])
    if len(steps) > max_steps:
        steps = steps[:max_steps - 1] + ["; ".join(steps[max_steps - 1:])]
    return steps


def plan_and_act(planner, actor, task: str, tools: list[Tool], *, context: list[tuple[str, str]] = (),
                 max_steps: int = 16, max_plan_steps: int = 6, transcript: Transcript | None = None,
                 guard=None) -> AgentResult:
    """The planner reads the task and the context files and writes a plan (no tools); the actor gets the task and
    the plan (not the files) and carries out one plan step per user turn, with tools, in one conversation. The
    answer is the actor's reply to the last step. max_steps: actor replies at most, over all plan steps."""
    transcript = transcript or Transcript(echo=False)
    files = "".join(f"\n\n### {path}\n```\n{text}\n```" for path, text in context)
    plan_messages = [{"role": "system", "content": PLANNER_SYSTEM.format(max_steps=max_plan_steps)},
                     {"role": "user", "content": f"Task: {task}" + (f"\n\nFiles:{files}" if files else "")}]
    transcript.record("user", role="planner", content=plan_messages[1]["content"],
                      context=[path for path, _ in context])
    try:
        plan_turn = planner.reply(plan_messages, None)
    except BrainError as e:
        transcript.record("error", role="planner", error=str(e))
        return AgentResult(None, "error", 0, plan_messages, error=str(e))
    plan = (plan_turn.content or "").strip()
    steps = plan_steps(plan, max_plan_steps) or [task]
    transcript.record("plan", role="planner", content=plan, steps=steps, prompt_tokens=plan_turn.prompt_tokens)
    messages = [{"role": "system", "content": ACTOR_SYSTEM},
                {"role": "user", "content": f"Task: {task}\n\nPlan:\n{plan}"}]
    budget, answer, stopped, error = _Budget(max_steps), None, "answer", None
    for k, step in enumerate(steps, 1):
        ask = f"Step {k} of {len(steps)}: {step}" + ("\nThen give the final answer to the task." if k == len(steps)
                                                     else "")
        messages.append({"role": "user", "content": ask})
        transcript.record("user", role="actor", content=ask, plan_step=k)
        answer, stopped, error = _act(actor, messages, tools, budget, transcript, guard, "actor")
        if stopped != "answer":
            break
    transcript.record("end", role="actor", stopped=stopped, steps=budget.used, answer=answer, error=error)
    return AgentResult(answer, stopped, budget.used, messages, plan=plan, error=error)
