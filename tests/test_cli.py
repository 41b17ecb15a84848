"""The herd command on a tiny Llama 4 checkpoint with Llama 4's tokenizer format, and `herd info`."""
import base64
import subprocess
import sys

import pytest

from herd.checkpoint import save_hf
from herd.config import preset
from herd.model import Transformer


def herd_cli(*args):
    return subprocess.run([sys.executable, "-m", "herd.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_llama4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_l4")
    ranks = [bytes([b]) for b in range(256)]
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n"
                                                    for i, t in enumerate(ranks)))
    cfg = preset("debug")
    cfg.vocab_size = 256 + 2048
    cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id = 256, [257, 263, 264], 274
    cfg.__post_init__()
    save_hf(Transformer(cfg).init_weights(seed=0), folder)
    return folder


def test_run_and_generate_llama4_folder(tiny_llama4):
    r = herd_cli("run", str(tiny_llama4), "Hello there", "--max-tokens", "12", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "decode" in r.stderr
    r = herd_cli("generate", str(tiny_llama4), "Once upon", "--max-tokens", "12", "--ignore-eos",
                 "--temperature", "0.8", "--seed", "1")
    assert r.returncode == 0 and r.stdout.startswith("Once upon")
    again = herd_cli("generate", str(tiny_llama4), "Once upon", "--max-tokens", "12", "--ignore-eos",
                     "--temperature", "0.8", "--seed", "1")
    assert again.stdout == r.stdout                       # seeded sampling is reproducible


def test_kv_dtype(tiny_llama4):
    """--kv-dtype f16: the cache is allocated in f16 (the verbose line says so) and a greedy completion runs; a bad
    choice is refused by name."""
    r = herd_cli("generate", str(tiny_llama4), "Once upon", "--max-tokens", "8", "--ignore-eos", "--temperature", "0",
                 "--kv-dtype", "f16", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "(float16)" in r.stderr and r.stdout.startswith("Once upon")
    r = herd_cli("generate", str(tiny_llama4), "Once upon", "--kv-dtype", "int3")
    assert r.returncode != 0 and "invalid choice: 'int3'" in r.stderr


def test_info():
    r = herd_cli("info", "scout")
    assert r.returncode == 0
    assert "total params 108.6B" in r.stdout and "active       17.2B" in r.stdout
    r = herd_cli("info", "nonexistent-preset")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_image_to_text_only_model(tiny_llama4, tmp_path):
    from PIL import Image
    Image.new("RGB", (20, 30), "red").save(tmp_path / "red.png")
    r = herd_cli("run", str(tiny_llama4), "--image", str(tmp_path / "red.png"), "What is this?")
    assert r.returncode == 2 and "text-only" in r.stderr and "Traceback" not in r.stderr
