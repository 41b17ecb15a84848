"""herd agent's guard hook (herd/agent/loop.py) with herd.guard's real default guard: an injection in a tool result
is withheld before the model reads it, a clean result passes, and `herd agent --guard` with a guard that cannot be loaded is a clear error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from herd.agent import LocalBrain, Transcript, run_agent, tool_from_function
from herd.guard import DEFAULT_GUARD, load_guard
from test_agent import Script, llama4_tok  # noqa: F401  (the fixture)
from test_serve_guard import INJECTION

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (DEFAULT_GUARD / "config.json").exists(), reason="default guard not built")
PAGES = {"evil": INJECTION, "good": "Oslo today: 4 C and a clear sky, light wind from the north."}


def fetch(url: str) -> str:
    """Fetch a page."""
    return PAGES[url]


def test_default_guard_in_the_agent_loop(llama4_tok, tmp_path):
    script = Script('[fetch(url="evil")]', '[fetch(url="good")]', "Done.")
    transcript = Transcript(tmp_path / "t.jsonl", echo=False)
    result = run_agent(LocalBrain(llama4_tok, script), "weather in Oslo?", [tool_from_function(fetch)],
                       guard=load_guard("default"), transcript=transcript)
    transcript.close()
    evil, good = [m["content"] for m in result.messages if m["role"] == "tool"]
    assert evil.startswith("[tool result withheld: the input guard flagged it")
    assert good == PAGES["good"]
    assert "PWNED" not in llama4_tok.decode(script.prompts[-1])          # the model never read the injection
    events = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    guard_events = [e for e in events if e["event"] == "guard"]
    assert [e["flagged"] for e in guard_events] == [True, False]
    assert guard_events[0]["categories"] == ["S1"] and guard_events[0]["score"] > 0.5


def test_agent_guard_that_cannot_load(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "herd.cli", "agent", "--guard", str(tmp_path / "missing"), "--no-code",
                        "hello"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0 and "no such guard folder" in p.stderr and "Traceback" not in p.stderr
