"""The real default model (SmolLM2-135M-Instruct Q4_1 GGUF): logits and tokens against transformers, chat, CLI."""
import os
import signal
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

import herd
from herd.chat import format_chat
from herd.textgen import TextStream, default_model_path
from herd.tokenizer import StreamDecoder, load_tokenizer

transformers = pytest.importorskip("transformers")
PATH = default_model_path()
TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog; it's 1,234.56 miles away!",
    "french": "Ça va très bien, merci. L'élève a répondu : « Où est la bibliothèque ? »",
    "chinese": "法国的首都是巴黎。我喜欢学习中文，你呢？",
    "emoji": "I ❤️ llamas 🦙🐑 and families 👩‍👩‍👧‍👦 with flags 🇳🇴!",
    "code": "def add(a, b):\n    return {'sum': a + b}  # TODO\n\tif x != 0: print(f\"{x:>4}\")\n",
}


@pytest.fixture(scope="module")
def model():
    return herd.load(PATH)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(PATH)


@pytest.fixture(scope="module")
def hf_tok():
    return transformers.AutoTokenizer.from_pretrained(PATH.parent, gguf_file=PATH.name)


def test_logits_match_transformers(model, hf_tok):
    hf = transformers.AutoModelForCausalLM.from_pretrained(PATH.parent, gguf_file=PATH.name,
                                                           dtype=torch.float32).eval()
    text = "The capital of France is Paris. La capitale de la France est Paris. 法国的首都是巴黎。 def f(): pass"
    ids = torch.tensor([hf_tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-3, diff


@pytest.mark.parametrize("name", list(TEXTS))
def test_token_ids_match_transformers(tok, hf_tok, name):
    text = TEXTS[name]
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text


def test_chat_template_matches_transformers(tok, hf_tok):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is 2+2?"}]
    ref = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    ids = format_chat(tok, messages)
    assert ids == list(ref)
    assert ids.count(tok.bos_id) == messages.__len__() + 2   # one <|im_start|> per message, system, generation


def test_stream_never_splits_utf8(tok):
    text = TEXTS["emoji"] + TEXTS["chinese"]
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # at least one emoji spans several tokens: the decoder held bytes back rather than emitting garbage
    assert sum(1 for p in pieces if p == "") > 0


def test_stop_strings(tok):
    ids = tok.encode("Answer: Paris.\nQuestion: next")
    stream = TextStream(tok, stop=["\nQuestion:"])
    out = "".join(stream.push(i) for i in ids) + stream.finish()
    assert out == "Answer: Paris." and stream.stopped


def run_cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "herd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_cli_run_answers_paris():
    r = run_cli("run", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_cli_loads_gguf_packed_unless_asked_to_dequantize():
    packed = run_cli("generate", "default", "The capital of France is", "--max-tokens", "4", "--verbose")
    fp32 = run_cli("generate", "default", "The capital of France is", "--max-tokens", "4", "--verbose",
                   "--dequantize")
    assert packed.returncode == 0 and fp32.returncode == 0, packed.stderr + fp32.stderr
    sizes = []
    for r, how in ((packed, "GGUF Q4_0/Q4_1/Q8_0 kept packed"), (fp32, "GGUF dequantized to fp32")):
        m = re.search(r"weights ([\d,.]+) MiB, (.*?)\]", r.stderr)
        assert m and m.group(2).startswith(how), r.stderr
        sizes.append(float(m.group(1).replace(",", "")))
    # SmolLM2's 98.4 MB file: packed ~95 MB (tests/test_gguf_packed.py), +81 MiB where torch's kernels run (herd.load
    # keeps the Q8_0 embedding / tied head in fp32 there); fp32 ~135M parameters x 4 bytes
    from herd.cpu import extension
    assert sizes[0] < (100 if extension.available() else 180) and sizes[1] > 400, sizes


def test_cli_generate_and_bad_input(tmp_path):
    r = run_cli("generate", "default", "The capital of France is", "--max-tokens", "5", "--verbose")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is") and "decode" in r.stderr
    r = run_cli("generate", str(tmp_path / "missing.gguf"), "hi")
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(PATH.read_bytes()[:5000])
    r = run_cli("generate", str(bad), "hi")
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "default", "word " * 200, "--max-seq-len", "64")
    assert r.returncode == 2 and "context here is 64 tokens" in r.stderr and "Traceback" not in r.stderr


def test_cli_chat_reset_and_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "run", "--max-tokens", "8"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines = []
    reader = threading.Thread(target=lambda: err_lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    proc.stdin.write("Say hello.\n/reset\n")
    proc.stdin.flush()
    deadline = time.time() + 240
    while time.time() < deadline and not any("conversation cleared" in l for l in err_lines):
        time.sleep(0.2)
    assert any("conversation cleared" in l for l in err_lines), err_lines
    proc.send_signal(signal.SIGINT)       # Ctrl-C at the prompt: exit cleanly
    proc.wait(timeout=60)
    reader.join(timeout=10)
    assert proc.returncode == 130
    assert "Traceback" not in "".join(err_lines)
