"""The README's Python API snippet runs as written (on the default model) and says what it claims."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_api_snippet_runs():
    from herd.textgen import default_model_path
    try:
        default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout.splitlines()[0], r.stdout
