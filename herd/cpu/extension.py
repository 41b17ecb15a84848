"""herd's C++ extension (bindings.cpp: kernels.cpp + decode.cpp on simd.h): which compiled variant this CPU runs,
loaded, and why none runs where none can.

It knows nothing of models or modules: kernels.py and decode.py call the functions it returns. The extension is
compiled at install time (setup.py, one module per instruction set: herd/cpu/_kernels_avx512 for AVX512-VNNI,
herd/cpu/_kernels_avx2 for AVX2 + FMA + F16C); nothing is compiled, locked or cached at run time. Where it cannot run
(a CPU with neither, not built at install, built from older sources, HERD_KERNELS=0) `ext()` is None and `status()`
says why; torch's kernels run instead. HERD_KERNELS=avx2 picks the AVX2 variant on an AVX-512 CPU (to compare them).
"""
from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = ("simd.h", "kernels.cpp", "decode.cpp", "bindings.cpp")      # setup.py hashes the same files
# variant (the module _kernels_<variant>, a HERD_KERNELS value) -> (its instruction set as status() names it, the
# /proc/cpuinfo flags it needs), preferred first
VARIANTS = {"avx512": ("AVX512-VNNI", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c")),
            "avx2": ("AVX2+FMA", ("avx2", "fma", "f16c"))}
REBUILD = "pip install --no-build-isolation -e . (or ./install.sh)"

_ext = None
_status: str | None = None


def ext():
    """The extension module (its functions: int4_mm, int8_mm, int8_rows, fp32_mm, int4_dequantize, quantize_x,
    rms_norm, decode_qkv, attend_one, silu_mul, decode_layer, decode_layer_rows, layer_stack, decode_step), or None
    with `status()` saying why not."""
    global _ext, _status
    if _status is None:
        _ext, _status = _load()
    return _ext


def _load():
    choice = os.environ.get("HERD_KERNELS", "1").lower()
    if choice == "0":
        return None, "off: HERD_KERNELS=0 (torch's kernels are used)"
    if choice != "1" and choice not in VARIANTS:
        return None, f"off: HERD_KERNELS={choice} is none of 0, 1, {', '.join(VARIANTS)} (torch's kernels are used)"
    flags = cpu_flags()
    if flags is None:
        return None, "off: no readable /proc/cpuinfo (Linux x86 only; torch's kernels are used)"
    wanted = VARIANTS if choice == "1" else {choice: VARIANTS[choice]}
    runnable = [name for name, (_, needs) in wanted.items() if set(needs) <= flags]
    if not runnable:
        lacks = " or ".join(f"{isa} ({', '.join(f for f in needs if f not in flags)} missing)"
                            for isa, needs in wanted.values())
        return None, f"off: this CPU cannot run {lacks} (torch's kernels are used)"
    module, isa = f"_kernels_{runnable[0]}", VARIANTS[runnable[0]][0]
    import torch  # noqa: F401  (the extension links against libtorch: it must be loaded first)
    try:
        mod = importlib.import_module(f"{__package__}.{module}")
    except ImportError as e:
        return None, (f"off: herd's {isa} kernels were not built when herd was installed ({str(e).splitlines()[0]}; "
                      f"a C++ compiler and torch in the build environment are needed: {REBUILD}); torch's kernels "
                      "are used")
    if mod.sources_sha != sources_sha():
        return None, (f"off: the built {isa} kernels are older than herd/cpu/*.cpp beside them; rebuild: {REBUILD} "
                      "(torch's kernels are used)")
    return mod, f"on: {isa} int4/int8 decode kernels and decode steps ({module})"


def sources_sha() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    return h.hexdigest()


def cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def available() -> bool:
    return ext() is not None


def status() -> str:
    """One line: whether herd's C++ kernels run here, which variant, and if none, why."""
    ext()
    return _status
