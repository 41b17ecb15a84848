"""What the `herd` commands share, whichever module holds their handler (herd/cli.py, herd/eval/cli.py,
herd/agent/cli.py): the model argument read as a path, a model loaded as every command loads one (GGUF kept packed,
prepared for the CPU, with its tokenizer), the flags that choose how, and the argparse types of numbers (ranges
checked as the command line is read). Parses no command line itself and knows no command."""
from __future__ import annotations

import argparse
import math
import sys


def model_path(model_arg):
    """A CLI model argument as a path: 'default' (or none) is the default model; a path that does not exist is an
    error naming it, never taken for something else."""
    from pathlib import Path
    from .textgen import default_model_path

    if model_arg in (None, "default"):
        return default_model_path()
    if not str(model_arg).strip():                          # Path("") would be ".", the current folder
        raise FileNotFoundError("the model path is empty (a GGUF file, an HF checkpoint folder or 'default')")
    path = Path(model_arg)
    if not path.exists():
        raise FileNotFoundError(f"{model_arg}: no such file or folder (a GGUF file, an HF checkpoint folder or "
                                "'default')")
    return path


def new_checkpoint_folder(dst, src) -> None:
    """A folder a command writes a new checkpoint into (quantize, upcycle): refused while it holds one already
    (config.json or safetensors), above all the source's own, which its derivative would overwrite (the float
    weights gone, then a traceback). Checked before the model loads."""
    from pathlib import Path

    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst}: is a file; the output is a folder (config.json + model.safetensors)")
    held = sorted(p.name for p in [dst / "config.json", *dst.glob("*.safetensors")] if p.is_file()) if dst.is_dir() \
        else []
    if held:
        same = dst.samefile(src)
        raise ValueError(f"{dst}: " + ("is the source checkpoint; writing there would overwrite it" if same else
                                       f"already holds a checkpoint ({', '.join(held[:3])})")
                         + ": give a new or empty folder")


def load_model(model_arg, verbose=False, dequantize=False, threads=None, mmap_experts=None):
    """(model path, model, tokenizer) for a CLI model argument; None means the default model. A GGUF file's Q4_0 /
    Q4_1 / Q8_0 weights stay packed for the int4 / int8 CPU kernels (herd/gguf.py: ~2x the fp32 decode speed on
    SmolLM2 in ~1/5 of the memory, +0.06% perplexity, bench/speed.py and bench/perplexity.py) unless `dequantize`,
    which loads every weight as fp32. Every model is then prepared for the CPU (herd.cpu.prepare). `threads`: CPU
    threads (None / 0: herd.cpu.threads.available_cores()). `mmap_experts`: herd.load's (None: mapped from the file
    only where the routed experts would not fit in memory)."""
    import time
    import herd
    from .cpu.threads import set_threads
    from .gguf import is_gguf
    from .tokenizer import load_tokenizer

    path = model_path(model_arg)
    n_threads = set_threads(threads)
    t0 = time.perf_counter()
    packed = is_gguf(path) and not dequantize
    if mmap_experts and not packed:
        raise ValueError(f"--mmap-experts maps a GGUF file's packed expert blocks: {path} is not a GGUF file"
                         if not is_gguf(path) else "--mmap-experts and --dequantize do not go together")
    model = herd.load(path, progress=True, quant="packed" if packed else None, prepare=True,
                      mmap_experts=mmap_experts if packed else False)
    tok = load_tokenizer(path, eos_ids=model.config.eos_token_ids)
    if verbose:
        from .cpu import status
        from .sizes import resident_bytes
        mapped = sum(b.nbytes for m in model.modules() if type(m).__name__ in ("GGUFExperts", "HerdGGUFExperts")
                     for b in m.buffers(recurse=False))
        how = (f"GGUF Q4_0/Q4_1/Q8_0 kept packed, {mapped / 2**20:,.1f} MiB of them routed experts mapped from the "
               "file (in the page cache, not copied)" if mapped else
               "GGUF Q4_0/Q4_1/Q8_0 kept packed" if packed else
               "GGUF dequantized to fp32 (--dequantize)" if is_gguf(path) else "as stored")
        print(f"[loaded {path} in {time.perf_counter() - t0:.1f}s: weights {resident_bytes(model) / 2**20:,.1f} MiB, "
              f"{how}]", file=sys.stderr)
        print(f"[{status(model)}; {n_threads} threads]", file=sys.stderr)
    return path, model, tok


def count(low: int, high: int | None = None):
    """An argparse type: a whole number from low to high, plain or with a k / M suffix counted as context lengths
    are (x1024, x1024^2: 128k = 131072; 10M = 10485760, Scout's window). A value out of range is refused while the
    command line is read, before a model is loaded (`--max-batch 0` would start a server that admits nothing)."""
    def parse(text: str) -> int:
        t = text.strip()
        scale = {"k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20}.get(t[-1:], 1)
        try:
            n = int(t[:-1] if scale > 1 else t) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (e.g. 4096, 128k, 10M)") from None
        if n < low or (high is not None and n > high):
            want = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{n} is out of range: expected {want}")
        return n
    return parse


def number(low: float, high: float | None = None, above: bool = False):
    """An argparse type: a finite number from low (or above it, if `above`) to high."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(x) or x < low or (above and x == low) or (high is not None and x > high):
            want = (f"above {low}" if above else f"at least {low}") + (f" and at most {high}" if high is not None
                                                                       else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected a number {want}")
        return x
    return parse


def add_threads_flag(p):
    p.add_argument("--threads", type=count(0), default=0,
                   help="CPU threads for the matmuls (0 = the cores this process may use: affinity and cgroup quota)")


def add_weight_flags(p):
    p.add_argument("--dequantize", action="store_true",
                   help="load GGUF files' weights as fp32 (default: Q4_0/Q4_1/Q8_0 stay packed for herd's int4/int8 "
                        "CPU kernels, ~2x faster decode in ~1/5 of the memory)")
    p.add_argument("--mmap-experts", action=argparse.BooleanOptionalAction, default=None,
                   help="GGUF: read the routed experts in place from the file's memory map (no copy; the OS can drop "
                        "their pages, so a model larger than memory runs) instead of copying them into memory "
                        "(default: mapped only when they would not fit)")
