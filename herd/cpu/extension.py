"""herd's C++ extension (kernels.cpp + decode.cpp): built, loaded, and why it does not run where it cannot.

It knows nothing of models or modules: kernels.py and decode.py call the functions it returns. The extension is
compiled at first use with torch.utils.cpp_extension (a C++ compiler and ninja are needed; ~40 s, cached under
~/.cache/torch_extensions). Where it cannot run (no AVX512-VNNI, no compiler, HERD_KERNELS=0) `ext()` is None and
`status()` says why; torch's kernels run instead.
"""
from __future__ import annotations

import os
from pathlib import Path

CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-fopenmp"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma")
FUNCTIONS = ["int4_mm", "int8_mm", "fp32_mm", "int4_dequantize", "quantize_x", "rms_norm", "decode_qkv",
             "attend_one", "silu_mul", "decode_layer"]

_ext = None
_status: str | None = None


def ext():
    """The built extension module (its functions: FUNCTIONS), or None with `status()` saying why not."""
    global _ext, _status
    if _status is not None:
        return _ext
    if os.environ.get("HERD_KERNELS", "1") == "0":
        _status = "off: HERD_KERNELS=0"
        return None
    missing = missing_cpu_flags()
    if missing:
        _status = f"off: this CPU lacks {', '.join(missing)} (torch's kernels are used)"
        return None
    try:
        from torch.utils.cpp_extension import load_inline
        sources = [Path(__file__).with_name(name).read_text() for name in ("kernels.cpp", "decode.cpp")]
        _ext = load_inline("herd_kernels", cpp_sources=sources, functions=FUNCTIONS, extra_cflags=CFLAGS,
                           extra_ldflags=["-fopenmp"], verbose=False)
        _status = "on: AVX512-VNNI int4/int8 decode kernels and decode steps"
    except Exception as e:   # no compiler, no ninja, ...: keep torch's kernels, say why
        _status = f"off: building kernels.cpp failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})"
    return _ext


def missing_cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ["a readable /proc/cpuinfo (Linux x86)"]
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in CPU_FLAGS if f not in flags]


def available() -> bool:
    return ext() is not None


def status() -> str:
    """One line: whether herd's C++ kernels run here, and if not, why."""
    ext()
    return _status
