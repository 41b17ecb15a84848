"""The package's shape: imports point one way (no cycle, counting imports inside functions too), every module
imports in a fresh interpreter, and nothing under herd/train is imported by `herd run`'s or `herd serve`'s path."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "herd"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> list[str]:
    return sorted(module_name(p) for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def herd_imports(path: Path) -> set[str]:
    """Every herd module `path` imports, anywhere in the file (module level or inside functions)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    known, out = set(all_modules()), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:        # `from . import x` names a module; `from .m import f` names m
                target = f"{base}.{alias.name}"
                out.add(target if target in known else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known and m != mod}


def test_no_import_cycle():
    graph = {module_name(p): herd_imports(p) for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}
    # a package's __init__ is imported before its modules: importing it from them is not a step back up
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n == "herd" or m.startswith(n + "."):
                continue
            if state.get(n) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_module_imports_in_a_fresh_interpreter():
    code = ("import importlib, json, sys\nbad = {}\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        bad[m] = repr(e)\nprint(json.dumps(bad))")
    modules = [m for m in all_modules() if not m.endswith("__main__")]     # those run a command when imported
    r = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {}


def test_run_and_serve_paths_import_nothing_of_train(tmp_path):
    """`herd run` (one answer from a tiny checkpoint) and the server's app built over it: no herd.train module is
    ever imported."""
    from tiny_chat import write_tiny_llama4
    folder = write_tiny_llama4(tmp_path / "m")
    code = f"""
import sys
from herd.cli import main
main(["run", {str(folder)!r}, "hi", "--max-tokens", "2"])
import herd.serve.app, herd.serve.worker
print("TRAIN:", sorted(m for m in sys.modules if m.startswith("herd.train")))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "TRAIN: []" in r.stdout, r.stdout
