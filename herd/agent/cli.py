"""`herd agent`: its flags (add_agent_parser, called by herd.cli.main) and its handler. Loads the models (local
paths or server URLs) and the tools, then runs herd.agent's loop; no loop logic here."""
from __future__ import annotations

import argparse
import sys

from ..cli_common import count, number


def add_agent_parser(sub):
    p = sub.add_parser("agent", help="run a task with tools: a model (or a planner and an actor), user tools, the "
                                     "sandboxed code interpreter; transcript printed and saved as JSONL",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Give the task first: herd agent TASK [options]. MODEL (for --model, --planner, "
                                   "--actor): 'default', a GGUF file or HF folder, "
                                   "or the URL of an OpenAI-compatible server (http://host:port).")
    p.add_argument("task", help="what the agent should do")
    # Models
    p.add_argument("--model", default="default", help="the model that acts alone (default: the default model)")
    p.add_argument("--planner", help="plan/act: the model that reads the task and --context and writes a plan")
    p.add_argument("--actor", help="plan/act: the model that carries the plan out with tools (default: --model)")
    p.add_argument("--context", nargs="+", action="extend", default=[], metavar="PATH",
                   help="files or folders the planner reads with the task (needs --planner)")
    p.add_argument("--served-model", help="the `model` field sent to a server URL (default: the server's own)")
    p.add_argument("--api-key", help="bearer token for a server URL")
    # Tools
    p.add_argument("--tools", nargs="+", action="extend", default=[], metavar="FILE",
                   help="tool definitions: a .json list of schemas with handlers, or a .py file whose public "
                        "functions are tools")
    p.add_argument("--no-code", action="store_true", help="leave out the code interpreter")
    p.add_argument("--code-timeout", type=number(0, above=True), default=10, help="seconds per code-interpreter run")
    p.add_argument("--code-memory-mb", type=count(1), default=512, help="memory per code-interpreter process")
    p.add_argument("--tool-format", choices=["python_list", "json", "function_tag"], default="python_list",
                   help="Llama 4 models: the tool-call form asked for and written back into the prompt")
    p.add_argument("--guard", help="an input guard for tool results (herd.guard, issue 16: a guard folder or "
                                   "'default')")
    # Loop
    p.add_argument("--max-steps", type=count(1), default=8, help="model replies at most (the actor's, in plan/act)")
    p.add_argument("--max-plan-steps", type=count(1), default=6, help="plan/act: steps the planner may write")
    p.add_argument("--transcript", default="agent_transcript.jsonl", help="JSONL file of every event")
    p.add_argument("--quiet", action="store_true", help="print only the final answer")
    p.add_argument("--system", help="system message for a lone agent (default: herd's agent instructions)")
    # Sampling (local models)
    p.add_argument("--max-tokens", type=count(1), default=512, help="tokens per model reply")
    p.add_argument("--temperature", type=number(0), default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-seq-len", type=count(1), default=8192, help="local models: context (prompt + reply)")
    p.set_defaults(func=cmd_agent)
    return p


def _brain(spec: str, args, loaded: dict):
    """A brain for a MODEL argument; local models are loaded once even when planner and actor are the same."""
    from .brains import LocalBrain, ServedBrain, engine_completer

    if spec.startswith(("http://", "https://")):
        return ServedBrain(spec, args.served_model, args.api_key, args.max_tokens, args.temperature, args.seed)
    if spec not in loaded:
        from ..chat import stop_token_ids
        from ..cli_common import load_model
        from ..engine import Engine, SamplingParams
        # as `herd run` loads it: GGUF weights kept packed, the model prepared for the CPU (herd.cpu.prepare)
        path, model, tok = load_model(spec)
        engine = Engine(model, max_batch=1, max_seq_len=args.max_seq_len)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                                stop_token_ids=tuple(stop_token_ids(tok)))
        loaded[spec] = LocalBrain(tok, engine_completer(engine, tok, params), name=str(path),
                                  tool_format=args.tool_format)
    return loaded[spec]


def _tools(args):
    from .tools import code_interpreter_tool, tools_from_json, tools_from_python_file

    tools = []
    for f in args.tools:
        tools += tools_from_json(f) if f.endswith(".json") else tools_from_python_file(f) if f.endswith(".py") \
            else _refuse(f"--tools {f}: expected a .json or .py file")
    if not args.no_code:
        from ..sandbox import _bwrap
        _bwrap()                      # refuse now, clearly, rather than at the model's first code call
        tools.append(code_interpreter_tool(args.code_timeout, args.code_memory_mb))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        _refuse(f"tool names must be unique, got {names}")
    return tools


def _refuse(message: str):
    raise SystemExit(f"herd agent: error: {message}")


def _guard(spec: str | None):
    if spec is None:
        return None
    try:
        from ..guard import load_guard
    except ImportError:
        _refuse("--guard needs herd.guard (issue 16), which this installation does not have yet")
    return load_guard(spec)


def cmd_agent(args):
    from .loop import AGENT_SYSTEM, Transcript, plan_and_act, read_context, run_agent
    from ..sandbox import SandboxUnavailable

    if args.context and not args.planner:
        _refuse("--context is read by the planner: give --planner MODEL (and --actor MODEL)")
    try:
        tools = _tools(args)
    except SandboxUnavailable as e:
        _refuse(f"{e} (or run with --no-code)")
    guard = _guard(args.guard)
    loaded = {}
    if args.planner:
        context = read_context(args.context)
        planner, actor = _brain(args.planner, args, loaded), _brain(args.actor or args.model, args, loaded)
    else:
        brain = _brain(args.model, args, loaded)
    # opened (and truncated) only once the models are loaded: a run that fails before that, on a mistyped model path
    # say, leaves the last run's transcript as it was
    transcript = Transcript(args.transcript, echo=not args.quiet)
    try:
        if args.planner:
            print(f"[herd agent: planner {planner.name}, actor {actor.name}, tools "
                  f"{', '.join(t.name for t in tools) or 'none'}, {len(context)} context files]", file=sys.stderr)
            result = plan_and_act(planner, actor, args.task, tools, context=context, max_steps=args.max_steps,
                                  max_plan_steps=args.max_plan_steps, transcript=transcript, guard=guard)
        else:
            print(f"[herd agent: model {brain.name}, tools {', '.join(t.name for t in tools) or 'none'}]",
                  file=sys.stderr)
            result = run_agent(brain, args.task, tools, system=args.system or AGENT_SYSTEM,
                               max_steps=args.max_steps, transcript=transcript, guard=guard)
    finally:
        transcript.close()
    print(f"[{result.stopped} after {result.steps} model replies; transcript: {args.transcript}]", file=sys.stderr)
    if result.answer is not None:
        print(result.answer)
    if result.stopped == "error":
        raise SystemExit(f"herd agent: error: {result.error}")
    if result.stopped != "answer":
        raise SystemExit(2)
