"""What the `herd` commands share, whichever module holds their handler (herd/cli.py, herd/eval/cli.py,
herd/agent/cli.py): the model argument read as a path, a model loaded as every command loads one (GGUF kept packed,
prepared for the CPU, with its tokenizer), and the flags that choose how. Parses no command line itself and knows no
command."""
from __future__ import annotations

import argparse
import sys


def model_path(model_arg):
    """A CLI model argument as a path: 'default' (or none) is the default model; a path that does not exist is an
    error naming it, never taken for something else."""
    from pathlib import Path
    from .textgen import default_model_path

    if model_arg in (None, "default"):
        return default_model_path()
    path = Path(model_arg)
    if not path.exists():
        raise FileNotFoundError(f"{model_arg}: no such file or folder (a GGUF file, an HF checkpoint folder or "
                                "'default')")
    return path


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


def add_threads_flag(p):
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for the matmuls (0 = the cores this process may use: affinity and cgroup quota)")


def add_weight_flags(p):
    p.add_argument("--dequantize", action="store_true",
                   help="load GGUF files' weights as fp32 (default: Q4_0/Q4_1/Q8_0 stay packed for herd's int4/int8 "
                        "CPU kernels, ~2x faster decode in ~1/5 of the memory)")
    p.add_argument("--mmap-experts", action=argparse.BooleanOptionalAction, default=None,
                   help="GGUF: read the routed experts in place from the file's memory map (no copy; the OS can drop "
                        "their pages, so a model larger than memory runs) instead of copying them into memory "
                        "(default: mapped only when they would not fit)")
