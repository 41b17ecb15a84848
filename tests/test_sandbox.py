"""herd.sandbox: code runs isolated and every escape attempt ends with a clear result: an infinite loop, a memory
bomb, writes outside the temp dir, network access, a fork bomb, an output flood, a full disk. Skipped (with the
reason) only where bubblewrap cannot run; the refusal itself is tested everywhere."""
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from herd import sandbox
from herd.sandbox import SandboxUnavailable, run_python, sandbox_available

needs_bwrap = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap (bwrap) cannot run here")


@needs_bwrap
def test_normal_code_returns_its_output():
    r = run_python("import sys\nprint('hello', 6 * 7)\nprint(sys.stdin.read().upper(), file=sys.stderr)",
                   stdin="from stdin")
    assert r.ok and r.exit_code == 0 and not r.timed_out and r.killed is None
    assert r.stdout == "hello 42\n" and r.stderr == "FROM STDIN\n"
    assert r.summary().startswith("exit 0 in ")


@needs_bwrap
def test_an_error_is_reported_not_hidden():
    r = run_python("print('before')\n1 / 0")
    assert r.exit_code == 1 and r.killed is None and r.stdout == "before\n"
    assert "ZeroDivisionError: division by zero" in r.summary()


@needs_bwrap
def test_infinite_loop_is_stopped_at_the_time_limit():
    r = run_python("print('start', flush=True)\nwhile True:\n    pass", timeout_s=2)
    assert r.timed_out and r.killed == "timeout" and r.exit_code is None
    assert r.stdout == "start\n"            # what it printed before it was stopped still comes back
    assert 2 <= r.duration_s < 6
    assert "time limit" in r.summary()


@needs_bwrap
@pytest.mark.parametrize("code", ["x = bytearray(4 * 1024**3)",
                                  "chunks = []\nwhile True:\n    chunks.append(bytearray(20 * 2**20))"])
def test_memory_bomb_is_stopped(code):
    r = run_python(code, memory_mb=256)
    assert r.killed == "memory" and not r.ok and "MemoryError" in r.stderr
    assert "memory limit" in r.summary()


@needs_bwrap
def test_no_writes_outside_the_temp_dir(tmp_path):
    target = tmp_path / "escaped.txt"
    code = f"""
import os
for path in [{str(target)!r}, "/etc/herd_escape", "/work/herd_escape", "/usr/lib/escape"]:
    try:
        open(path, "w").write("x")
        print("WROTE", path)
    except OSError as e:
        print("refused", path, type(e).__name__)
open("inside.txt", "w").write("fine")
print(sorted(os.listdir(".")), os.getcwd())
"""
    r = run_python(code)
    assert r.ok and "WROTE" not in r.stdout and r.stdout.count("refused") == 4, r.stdout + r.stderr
    assert "['inside.txt', 'main.py'] /tmp/work" in r.stdout
    assert not target.exists() and not Path("/etc/herd_escape").exists() and not Path("/work/herd_escape").exists()
    # the next run starts from a fresh, empty temp dir
    assert run_python("import os\nprint(sorted(os.listdir('.')))").stdout == "['main.py']\n"


@needs_bwrap
def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        deadline = time.time() + 15
        while time.time() < deadline and not accepted:
            try:
                accepted.append(server.accept())
            except OSError:
                pass

    watcher = threading.Thread(target=accept)
    watcher.start()
    code = f"""
import socket
for host, port in [("127.0.0.1", {port}), ("1.1.1.1", 80), ("8.8.8.8", 53)]:
    try:
        socket.create_connection((host, port), timeout=3)
        print("CONNECTED", host)
    except OSError as e:
        print("blocked", host, type(e).__name__)
try:
    socket.getaddrinfo("pypi.org", 443)
    print("RESOLVED")
except OSError as e:
    print("no dns", type(e).__name__)
"""
    r = run_python(code, timeout_s=15)
    accepted.append(None)      # stop the watcher
    watcher.join()
    server.close()
    assert r.ok, r.stderr
    assert "CONNECTED" not in r.stdout and "RESOLVED" not in r.stdout and r.stdout.count("blocked") == 3
    assert accepted == [None]  # the host's listening socket never saw a connection


@needs_bwrap
def test_fork_bomb_is_stopped():
    t0 = time.time()
    r = run_python("import os\nwhile True:\n    os.fork()", timeout_s=10, max_processes=32)
    assert r.killed == "processes" and not r.ok, r.summary()
    assert "more processes than allowed" in r.summary()
    assert time.time() - t0 < 10
    time.sleep(0.5)
    assert _sandbox_processes() == []      # nothing of it survives the run


@needs_bwrap
def test_process_limit_is_real():
    """The limit counts the run's own processes (a fresh uid), even though herd runs as root here."""
    code = """
import os, time
started = 0
for _ in range(100):
    try:
        if os.fork() == 0:
            time.sleep(5)
            os._exit(0)
        started += 1
    except OSError:
        break
print(started)
"""
    r = run_python(code, max_processes=20)
    assert r.ok and 10 <= int(r.stdout) < 20, r.stdout + r.stderr
    time.sleep(0.5)
    assert _sandbox_processes() == []      # the sleeping children went with the run


@needs_bwrap
def test_output_flood_is_cut_at_the_limit():
    r = run_python("while True:\n    print('x' * 1000)", max_output_bytes=10_000)
    assert r.killed == "output limit" and len(r.stdout) <= 10_000 and not r.timed_out
    assert r.duration_s < 5


@needs_bwrap
def test_disk_is_limited():
    r = run_python("open('big', 'wb').write(b'x' * (40 * 2**20))", disk_mb=16)
    assert r.killed == "disk" and not r.ok


def test_refuses_without_isolation(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox, "_probe", None)
    with pytest.raises(SandboxUnavailable, match="bubblewrap .* not installed.*never run without isolation"):
        run_python("print('never runs')")
    assert not sandbox_available()


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        run_python("print(1)", timeout_s=0)
    with pytest.raises(TypeError, match="code must be a str"):
        run_python(b"print(1)")


def _sandbox_processes() -> list[int]:
    """Processes running as a sandbox uid (herd picks them from 1e9 up when it runs as root)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                uid = entry.stat().st_uid
            except FileNotFoundError:
                continue
            if uid >= 1_000_000_000 and os.geteuid() == 0:
                pids.append(int(entry.name))
    return pids
