"""Run untrusted Python (a model's code-interpreter call, a generated HumanEval solution) in an isolated subprocess;
knows nothing of models, prompts or tools.

Isolation is bubblewrap's (`bwrap`, Debian/Ubuntu package `bubblewrap`): new mount, network, PID, IPC and UTS
namespaces; the host's file system read-only; a fresh size-limited tmpfs at /tmp holding the working directory
(gone when the run ends); only a loopback interface, so no connection leaves the sandbox; every process in it is
killed when the run ends or is stopped. Inside, before the code starts, a launcher sets resource limits (address space,
CPU time, file size, open files, processes) and sets no_new_privs, so no setuid program can regain privileges.
Run as root (as here and in CI) the launcher also drops to a fresh unprivileged uid: root ignores RLIMIT_NPROC, so
a fork bomb is only stopped once the code runs as a uid of its own. Without bwrap, or where it cannot create its
namespaces, `run_python` raises SandboxUnavailable: code is never run unconfined.
"""
from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path


class SandboxUnavailable(RuntimeError):
    """No isolation mechanism works on this machine, so code is not run."""


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None       # None when the sandbox was killed before the code exited
    timed_out: bool
    killed: str | None          # why it was stopped: "timeout", "memory", "output limit", "processes", "disk", "cpu"
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed is None

    def summary(self) -> str:
        """One line on how the run ended, for a person or a model: 'exit 0 in 0.04 s', 'stopped: timeout ...'."""
        took = f"{self.duration_s:.2f} s"
        if self.killed is not None:
            why = {"timeout": "it ran past its time limit", "memory": "it ran out of its memory limit",
                   "output limit": "it printed more than the output limit",
                   "processes": "it tried to start more processes than allowed",
                   "disk": "it wrote more than the sandbox's disk space", "cpu": "it used up its CPU-time limit"}
            return f"stopped after {took}: {why.get(self.killed, self.killed)} ({self.killed})"
        last = next((line for line in reversed(self.stderr.strip().splitlines()) if line.strip()), "")
        if self.exit_code == 0:
            return f"exit 0 in {took}"
        return f"exit {self.exit_code} in {took}" + (f": {last.strip()}" if last else "")


# In the sandbox: limits, then (as root) a fresh uid, then no_new_privs, then the code in a new interpreter.
_LAUNCHER = """
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:   # PR_SET_NO_NEW_PRIVS
    sys.exit("sandbox: prctl(PR_SET_NO_NEW_PRIVS) failed")
os.execv(sys.executable, [sys.executable, "-I", "-u", "-X", "utf8", "main.py"])
"""

SANDBOX_DIR = "/tmp/work"      # in the run's tmpfs (the host's file system has no mount point to spare)
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": SANDBOX_DIR, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_probe: str | None = None      # None: not probed yet; "": bwrap works; else why not


def _bwrap() -> str:
    """Path of a working bwrap, probed once; raises SandboxUnavailable naming what is missing."""
    global _probe
    path = shutil.which("bwrap")
    if path is None:
        _probe = ("bubblewrap (bwrap) is not installed; install it (Debian/Ubuntu: apt-get install bubblewrap). "
                  "Code is never run without isolation")
    elif _probe is None:
        probe = subprocess.run([path, "--ro-bind", "/", "/", "--unshare-net", "--unshare-pid", "--die-with-parent",
                                *([] if os.geteuid() == 0 else ["--unshare-user"]), "--", "/bin/true"],
                               capture_output=True, text=True, timeout=30)
        _probe = "" if probe.returncode == 0 else (
            f"bwrap cannot create its namespaces here ({probe.stderr.strip() or f'exit {probe.returncode}'}); "
            "a container may need --privileged or user namespaces enabled. Code is never run without isolation")
    if _probe:
        raise SandboxUnavailable(f"herd.sandbox: {_probe}")
    return path


def sandbox_available() -> bool:
    try:
        _bwrap()
        return True
    except SandboxUnavailable:
        return False


def _python_mounts() -> list[str]:
    """bwrap arguments that make this Python visible to an unprivileged uid: a directory on the way to it that
    others cannot enter (e.g. /root, mode 700, holding pyenv) is covered by an empty tmpfs, and the interpreter's
    own folders are bound into it read-only. Nothing else of that directory is visible."""
    wanted = {Path(p).resolve() for p in (sys.base_prefix, sys.prefix, *site.getsitepackages(),
                                          Path(sys.executable).resolve().parent) if Path(p).exists()}
    wanted = sorted(p for p in wanted if not any(q in p.parents for q in wanted))    # outermost folders only
    args, hidden, made = [], [], set()
    for path in wanted:
        closed = next((d for d in reversed(path.parents) if d != Path("/") and not os.stat(d).st_mode & 0o001), None)
        if closed is None:
            continue
        if closed not in hidden:
            args += ["--perms", "0755", "--tmpfs", str(closed)]
            hidden.append(closed)
        for d in reversed(path.parents):      # bwrap would make the folders between as mode 700
            if closed in d.parents and d not in made:
                args += ["--perms", "0755", "--dir", str(d)]
                made.add(d)
        args += ["--ro-bind", str(path), str(path)]
    return args


def _command(code_file: Path, *, timeout_s: float, memory_mb: int, max_processes: int, disk_mb: int) -> list[str]:
    root = os.geteuid() == 0
    limits = {"RLIMIT_AS": memory_mb * 2**20, "RLIMIT_CPU": int(timeout_s) + 2, "RLIMIT_FSIZE": disk_mb * 2**20,
              "RLIMIT_NOFILE": 256, "RLIMIT_NPROC": max_processes, "RLIMIT_CORE": 0}
    # a uid no one else has, so that RLIMIT_NPROC counts this run's processes only
    uid = random.randrange(1_000_000_000, 2_000_000_000) if root else None
    size = str(disk_mb * 2**20)
    args = [_bwrap(), "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--perms", "01777", "--size", size, "--tmpfs", "/tmp", "--perms", "0777", "--dir", SANDBOX_DIR]
    args += _python_mounts() if root else []
    args += ["--ro-bind", str(code_file), f"{SANDBOX_DIR}/main.py", "--chdir", SANDBOX_DIR,
             "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--die-with-parent", "--new-session"]
    args += [] if root else ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    return args + ["--", sys.executable, "-I", "-c", _LAUNCHER, json.dumps({"limits": limits, "uid": uid})]


def run_python(code: str, *, timeout_s: float = 10, memory_mb: int = 512, max_output_bytes: int = 65536,
               stdin: str | None = None, max_processes: int = 64, disk_mb: int = 64) -> SandboxResult:
    """Run `code` as a Python program in the sandbox and return what it printed and how it ended.

    timeout_s: wall-clock limit; memory_mb: address-space limit per process; max_output_bytes: stdout + stderr
    together (the run is stopped when it prints more); stdin: text fed to the program; max_processes: processes and
    threads of the run's uid; disk_mb: size of the run's tmpfs (/tmp, with the working directory /tmp/work) and
    of any one file written."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_output_bytes", max_output_bytes),
                        ("max_processes", max_processes), ("disk_mb", disk_mb)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    with tempfile.TemporaryDirectory(prefix="herd-sandbox-") as tmp:
        code_file = Path(tmp) / "main.py"
        code_file.write_text(code, encoding="utf-8")
        code_file.chmod(0o644)
        cmd = _command(code_file, timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes,
                       disk_mb=disk_mb)
        return _run(cmd, stdin, timeout_s, max_output_bytes)


def _run(cmd: list[str], stdin: str | None, timeout_s: float, max_output_bytes: int) -> SandboxResult:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_ENV, start_new_session=True)
    feeder = threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True)
    feeder.start()
    out = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    killed = None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        while sel.get_map():
            left = timeout_s - (time.monotonic() - t0)
            if left <= 0:
                killed = "timeout"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                out[key.fd] += chunk
            if sum(len(b) for b in out.values()) > max_output_bytes:
                killed = "output limit"
                break
    if killed is not None:
        _kill(proc)
    try:
        proc.wait(timeout=max(0.1, timeout_s - (time.monotonic() - t0)) if killed is None else 10)
    except subprocess.TimeoutExpired:         # output closed but the process lingers
        killed = "timeout"
        _kill(proc)
        proc.wait(timeout=10)
    duration = time.monotonic() - t0
    for f in (proc.stdout, proc.stderr):
        f.close()
    stdout, stderr = (_text(buf, max_output_bytes) for buf in out.values())     # in that order
    exit_code = None if killed is not None else proc.returncode
    return SandboxResult(stdout, stderr, exit_code, killed == "timeout", killed or _limit_hit(exit_code, stderr),
                         duration)


def _feed(pipe, text: str | None):
    try:
        if text:
            pipe.write(text.encode("utf-8"))
        pipe.close()
    except (BrokenPipeError, OSError):     # the program ended (or closed stdin) before reading it all
        pass


def _kill(proc: subprocess.Popen):
    """bwrap and so the whole sandbox: --die-with-parent kills its PID namespace's init, and with it every process
    of the run."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _text(raw: bytearray, limit: int) -> str:
    return bytes(raw[:limit]).decode("utf-8", errors="replace")


def _limit_hit(exit_code: int | None, stderr: str) -> str | None:
    """Which resource limit ended a run that exited by itself, read from how it failed; None for other failures."""
    if exit_code in (None, 0):
        return None
    if exit_code == -signal.SIGXCPU:
        return "cpu"
    tail = stderr[-2000:]
    if "MemoryError" in tail or "Cannot allocate memory" in tail:
        return "memory"
    if "Resource temporarily unavailable" in tail or "can't start new thread" in tail:
        return "processes"
    if "No space left on device" in tail or "File too large" in tail:
        return "disk"
    return None
