"""The herd command on a tiny Llama 4 checkpoint with Llama 4's tokenizer format, and `herd info`."""
import subprocess
import sys

import pytest

from tiny_chat import write_tiny_llama4


def herd_cli(*args):
    return subprocess.run([sys.executable, "-m", "herd.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_llama4(tmp_path_factory):
    return write_tiny_llama4(tmp_path_factory.mktemp("tiny_l4"))


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


# ---- the dead ends a newcomer hit (issue 19): each now ends in an answer or a clear one-line error ----------------
def herd_cli_input(text, *args):
    return subprocess.run([sys.executable, "-m", "herd.cli", *args], input=text, capture_output=True, text=True,
                          timeout=300)


def test_chat_that_fills_the_context_drops_the_oldest_turn(tiny_llama4):
    """Each answer fills most of a 64-token context: later turns drop the oldest with a notice, and the session
    answers every line instead of exiting."""
    r = herd_cli_input("first question here\nsecond one\nthird one\n", "run", str(tiny_llama4), "--max-seq-len", "64",
                       "--max-tokens", "24", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("dropped the oldest turn") >= 1, r.stderr
    assert r.stdout.count(">>> ") == 4 and "Traceback" not in r.stderr     # three answers, then the EOF prompt


def test_missing_model_path_is_an_error_not_a_prompt():
    for cmd in (["run", "./typo.gguf"], ["run", "./typo.gguf", "hello"], ["generate", "typo.gguf", "hi"],
                ["info", "typo.gguf"], ["quantize", "typo.gguf", "out", "--scheme", "int8"]):
        r = herd_cli(*cmd)
        assert r.returncode == 2 and "typo.gguf: no such file" in r.stderr and "Traceback" not in r.stderr, cmd


def test_default_and_gguf_everywhere():
    r = herd_cli("info", "default")                                       # a GGUF: config from its metadata
    assert r.returncode == 0 and "dim 576, heads 9 q / 3 kv" in r.stdout, r.stderr
    r = herd_cli("plan", "default", "--device", "cpu-64g", "--context", "2048")
    assert r.returncode == 0 and "fits" in r.stdout, r.stderr
    r = herd_cli("quantize", "default", "unused-out", "--scheme", "int4")  # dense: --only experts would do nothing
    assert r.returncode == 2 and "nothing to quantize" in r.stderr and "--only all" in r.stderr


def test_quantize_copies_the_tokenizer_so_the_output_runs(tiny_llama4, tmp_path):
    r = herd_cli("quantize", str(tiny_llama4), str(tmp_path / "q"), "--scheme", "int8", "--only", "all")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "q" / "tokenizer.model").exists() and "tokenizer.model" in r.stdout
    r = herd_cli("generate", str(tmp_path / "q"), "Once upon", "--max-tokens", "4", "--ignore-eos")
    assert r.returncode == 0 and r.stdout.startswith("Once upon"), r.stderr


def test_version_and_bench_serve_without_a_server():
    import herd
    r = herd_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"herd {herd.__version__}"
    r = herd_cli("bench-serve", "http://127.0.0.1:9", "--requests", "1")      # port 9: nothing listens
    assert r.returncode == 2 and "cannot reach http://127.0.0.1:9" in r.stderr and "Traceback" not in r.stderr


def test_plan_multi_gpu_node_and_context_past_the_limit():
    r = herd_cli("plan", "maverick", "--device", "8xh100", "--quant", "fp8", "--context", "65536")
    assert r.returncode == 0 and "fits" in r.stdout and "does NOT fit" not in r.stdout, r.stdout
    assert "8 devices" in r.stdout and "the KV cache by kv head" in r.stdout
    r = herd_cli("plan", "scout", "--device", "8xh200", "--context", "20000000")
    assert "past the model's limit of 10,485,760 tokens" in r.stdout


def test_length_generalization_writes_only_where_out_says():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "scripts" / "length_generalization.py"
    spec = importlib.util.spec_from_file_location("length_generalization", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_args(["--quick"]).out is None


@pytest.mark.parametrize("argv, says", [
    (["serve", "--max-batch", "0"], "argument --max-batch: 0 is out of range: expected at least 1"),
    (["serve", "--port", "99999"], "argument --port: 99999 is out of range: expected from 1 to 65535"),
    (["serve", "--max-queue", "-1"], "argument --max-queue: -1 is out of range: expected at least 0"),
    (["serve", "--max-seq-len", "-1"], "argument --max-seq-len: -1 is out of range"),
    (["serve", "--max-seq-len", "4k8"], "argument --max-seq-len: '4k8' is not a whole number"),
    (["serve", "--max-body-mb", "nan"], "argument --max-body-mb: nan is out of range"),
    (["serve", "--prefix-cache-mib", "-5"], "argument --prefix-cache-mib: -5 is out of range"),
    (["run", "--max-tokens", "0", "hi"], "argument --max-tokens: 0 is out of range: expected at least 1"),
    (["run", "--temperature", "inf", "hi"], "argument --temperature: inf is out of range"),
    (["generate", "default", "hi", "--top-p", "0"], "expected a number above 0 and at most 1"),
    (["generate", "default", "hi", "--top-k", "-1"], "argument --top-k: -1 is out of range"),
    (["bench-serve", "http://127.0.0.1:9", "--timeout", "0"], "argument --timeout: 0 is out of range"),
    # train ran --grad-accum 0 to the end with loss 0.0 and no gradient; --seq-len 0 was a ZeroDivisionError
    (["train", "--config", "debug", "--steps", "2", "--grad-accum", "0"], "argument --grad-accum: 0 is out of range"),
    (["train", "--config", "debug", "--steps", "2", "--seq-len", "0"], "argument --seq-len: 0 is out of range"),
    (["distill", "--teacher", "default", "--steps", "2", "--kd-weight", "1.5"],
     "expected a number at least 0 and at most 1"),
    # humaneval --limit 0 ran all 164 problems, and -1 all but the last
    (["eval", "humaneval", "default", "--limit", "0"], "argument --limit: 0 is out of range: expected at least 1"),
    (["eval", "perplexity", "default", "f.txt", "--window", "1"], "argument --window: 1 is out of range"),
    (["agent", "hi", "--code-timeout", "-1"], "argument --code-timeout: -1 is out of range"),
])
def test_numbers_out_of_range_are_refused_before_anything_loads(argv, says, capsys):
    """`herd serve --max-batch 0` used to start a server that queued every request for ever, `--max-seq-len -1` and
    `--port 99999` to end in a traceback after the model had loaded: each is now refused as the command line is read,
    naming the flag and the range (a model load can take minutes; this fails at once)."""
    from herd.cli import main as cli_main
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_empty_prompt_is_refused_not_answered():
    """`herd run ""` took the current folder for a model (Path("") is "."), and `herd run default "  "` sent an
    empty user message and printed whatever the model made of it: both are refused before anything loads."""
    for words in (["default", "  "], [""]):               # "" alone is no model either (Path("") is the cwd)
        r = herd_cli("run", *words)
        assert r.returncode == 1 and "the prompt is empty" in r.stderr and not r.stdout, words
    r = herd_cli("generate", "", "Once upon")
    assert r.returncode == 2 and "the model path is empty" in r.stderr


def test_context_lengths_take_k_and_m():
    """128k and 10M, as context lengths are written (x1024: Scout's 10M window is 10,485,760 tokens)."""
    from herd.cli import build_parser
    args = build_parser(["serve"]).parse_args(["serve", "--max-seq-len", "128k", "--max-batch", "4"])
    assert (args.max_seq_len, args.max_batch) == (131072, 4)
    args = build_parser(["plan"]).parse_args(["plan", "scout", "--device", "h100", "--context", "10M"])
    assert args.context == 10 * 2**20


def test_outputs_never_overwrite_a_checkpoint_or_the_prompts(tiny_llama4, tmp_path):
    """`herd quantize SRC SRC` quantized the source in place (its float weights gone) and then failed on copying the
    tokenizer onto itself: a folder holding a checkpoint, the source's above all, is refused before the load, and
    so is `herd synth --out` naming its own prompt file; nothing in either is touched."""
    before = {p.name: p.read_bytes() for p in tiny_llama4.iterdir()}
    for argv in (["quantize", str(tiny_llama4), str(tiny_llama4), "--scheme", "int8"],
                 ["upcycle", str(tiny_llama4), str(tiny_llama4), "--experts", "2"]):
        r = herd_cli(*argv)
        assert r.returncode == 2 and "is the source checkpoint; writing there would overwrite it" in r.stderr, argv
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model.safetensors").write_bytes(b"someone's weights")
    r = herd_cli("quantize", str(tiny_llama4), str(tmp_path / "taken"), "--scheme", "int8")
    assert r.returncode == 2 and "already holds a checkpoint (model.safetensors)" in r.stderr
    assert (tmp_path / "taken" / "model.safetensors").read_bytes() == b"someone's weights"
    r = herd_cli("quantize", str(tiny_llama4), str(tmp_path / "taken" / "model.safetensors"), "--scheme", "int8")
    assert r.returncode == 2 and "is a file; the output is a folder" in r.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\n")
    r = herd_cli("synth", str(tiny_llama4), "--prompts", str(prompts), "--out", str(prompts))
    assert r.returncode == 2 and "is the prompt file" in r.stderr and prompts.read_text() == "Say hi.\n"
    assert {p.name: p.read_bytes() for p in tiny_llama4.iterdir()} == before


def test_serve_on_a_taken_port_says_so_before_loading():
    """A port another server holds was uvicorn's error after every model had loaded (minutes for a large one), under
    a '[serving ...]' line that said otherwise: now an error naming the address, before anything loads."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = herd_cli("serve", "default", "--port", str(port))
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "[loaded" not in r.stderr and "[serving" not in r.stderr
    r = herd_cli("serve", "default", "--host", "no-such-host.invalid")
    assert r.returncode == 2 and "--host no-such-host.invalid: not an address of this machine" in r.stderr
