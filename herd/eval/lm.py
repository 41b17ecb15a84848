"""`herd eval lm`: lm-evaluation-harness tasks on a herd model, in process (harness.HerdLM) or through lm-eval's own
`local-completions` client against an OpenAI-compatible server (a `herd serve` started here, or any URL). Offline:
tasks come from local YAML + JSONL (herd/eval/tasks, --include folders); HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set
unless the caller set them. Knows no model code: it is handed a loaded model, or a server.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
SERVER_START_TIMEOUT_S = 300


def offline():
    """Keep datasets and the hub from the network (before either is imported)."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(name, "1")


def task_manager(tasks: list[str], include: list[str] = ()):
    """An lm_eval TaskManager over herd's task folder and `include`; lm-eval's own 14k task YAMLs are indexed
    (~30 s) only when a task is not found there, and their datasets must then already be in the local cache."""
    offline()
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include)]
    tm = TaskManager(include_path=paths, include_defaults=False)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        tm = TaskManager(include_path=paths)
        unknown = [t for t in missing if t not in tm.all_tasks]
        if unknown:
            raise ValueError(f"unknown lm-eval task(s) {unknown}: not in {paths} nor among lm-eval's own tasks")
    return tm


@contextlib.contextmanager
def datasets_on_this_machine(tasks: list[str]):
    """A task whose dataset is on the Hub and not in the local cache fails, offline, deep inside `datasets` with
    "Couldn't reach ... on the Hub": said instead as what to do about it."""
    try:
        yield
    except ConnectionError as e:            # builtin ConnectionError: what `datasets` raises; HTTP clients' differ
        if "on the Hub" not in str(e):
            raise
        raise ValueError(f"{e}: herd runs lm-eval offline (HF_DATASETS_OFFLINE=1), so a task's dataset must already "
                         f"be in the local datasets cache. Tasks asked for: {', '.join(tasks)}. Run herd's own "
                         "tasks (herd_smoke, herd_smoke_ci), --include a folder of task YAMLs over local files, or "
                         "download the dataset once on a machine with the Hub (HF_DATASETS_OFFLINE=0) into "
                         "this cache") from None


def evaluate_in_process(model, tok, tasks: list[str], *, limit: int | None = None, batch_size: int = 16,
                        max_seq_len: int = 2048, include: list[str] = ()) -> dict:
    """lm-eval's simple_evaluate with harness.HerdLM over `model`."""
    tm = task_manager(tasks, include)
    from lm_eval import simple_evaluate
    from .harness import HerdLM

    lm = HerdLM(model, tok, batch_size=batch_size, max_seq_len=max_seq_len)
    with datasets_on_this_machine(tasks):
        return simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=tm, log_samples=False,
                               bootstrap_iters=0)


def evaluate_server(base_url: str, model_name: str, tasks: list[str], *, limit: int | None = None,
                    batch_size: int = 16, max_length: int = 2048, include: list[str] = (),
                    tokenizer_backend: str = "remote", tokenizer: str | None = None, tokenized_requests: bool = True,
                    api_key: str | None = None) -> dict:
    """lm-eval's own `local-completions` client against base_url (http://host:port/v1/completions). The tokenizer
    is the server's (/tokenize, /detokenize, /tokenizer_info) unless tokenizer_backend="huggingface" with a local
    `tokenizer` folder (for servers without those endpoints). tokenized_requests=False sends text prompts (for
    servers that take no token-id arrays). api_key: the bearer token, for the completions and the tokenizer."""
    tm = task_manager(tasks, include)
    from lm_eval import simple_evaluate

    args = {"base_url": base_url, "model": model_name, "tokenizer_backend": tokenizer_backend,
            "tokenized_requests": tokenized_requests, "batch_size": batch_size, "max_length": max_length,
            "timeout": 600}
    if tokenizer:
        args["tokenizer"] = tokenizer
    if api_key:
        args["auth_token"], args["header"] = api_key, {"Authorization": f"Bearer {api_key}"}
    with datasets_on_this_machine(tasks):
        return simple_evaluate(model="local-completions", model_args=args, tasks=tasks, limit=limit,
                               task_manager=tm, log_samples=False, bootstrap_iters=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def herd_server(model_arg: str, *, max_batch: int, max_seq_len: int, extra: list[str] = (), log_path=None):
    """A `herd serve MODEL` child process on a free local port, for as long as the block runs; yields its base URL.
    Its log goes to log_path (default: a temporary file), shown when it fails to start."""
    import tempfile

    port = _free_port()
    log = open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")
    cmd = [sys.executable, "-m", "herd.cli", "serve", model_arg, "--port", str(port), "--max-batch",
           str(max_batch), "--max-seq-len", str(max_seq_len), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"`{' '.join(cmd)}` did not start (exit code {proc.poll()}):\n{log.read()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def served_model_id(base: str) -> str:
    """The first model id a server lists at /v1/models."""
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as r:
        models = json.load(r)["data"]
    if not models:
        raise RuntimeError(f"{base}/v1/models lists no model")
    return models[0]["id"]


def format_results(results: dict) -> str:
    """lm-eval's own tables: every task, then the groups."""
    from lm_eval.utils import make_table

    out = make_table(results)
    if results.get("groups"):
        out += "\n" + make_table(results, "groups")
    return out


def write_json(results: dict, path, settings: dict):
    """results (lm-eval's dict, without its samples) and the run's settings, as JSON."""
    from lm_eval.utils import handle_non_serializable

    keep = {k: results[k] for k in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                                     "higher_is_better", "n-samples") if k in results}
    Path(path).write_text(json.dumps({"herd": settings, **keep}, indent=2, default=handle_non_serializable))
