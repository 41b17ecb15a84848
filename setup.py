"""herd's C++ kernels, compiled at install time: herd/cpu/bindings.cpp (kernels.cpp + decode.cpp + simd.h) built
once per instruction set into herd/cpu/_kernels_avx512 and herd/cpu/_kernels_avx2 (torch's CppExtension), so that
nothing compiles at run time; herd/cpu/extension.py imports the variant the CPU runs. Everything else about the
package is in pyproject.toml.

The build needs torch importable (the extension links against the installed torch), so install with
`pip install --no-build-isolation` (./install.sh does): in an isolated build environment there is no torch, and
pip would otherwise fetch a second, multi-GB one just to compile against. Where the kernels cannot be built (no
torch in the build environment, no C++ compiler, a compiler too old for an instruction set) the install still
succeeds without them, says why here, and at run time `herd run --verbose` says torch's kernels run instead.
"""
import hashlib
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
CPU = HERE / "herd" / "cpu"
SOURCES = ("simd.h", "kernels.cpp", "decode.cpp", "bindings.cpp")
# module name -> the compiler flags of its instruction set (simd.h picks its branch from them)
VARIANTS = {
    # (-Wno-*uninitialized: GCC 12's own AVX-512 headers warn on their _mm512_undefined_* placeholders)
    "_kernels_avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c",
                        "-Wno-uninitialized", "-Wno-maybe-uninitialized"],
    "_kernels_avx2": ["-mavx2", "-mfma", "-mf16c"],
}
# -ffp-contract=off: no implicit FMA; the int4 dequantization rounds a multiply and an add separately, as its twin
COMMON_FLAGS = ["-O3", "-g0", "-ffp-contract=off", "-fopenmp"]   # -g0: no debug info (13 MB -> ~0.5 MB each)


def sources_sha() -> str:
    """sha256 of the C++ sources, compiled into the module; extension.py compares it with the files beside it."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((CPU / name).read_bytes())
    return h.hexdigest()


def extensions():
    """(ext_modules, cmdclass), both empty with a message where the kernels cannot be built here."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:
        print(f"herd: not building the C++ kernels: torch is not importable in this build environment ({e}); "
              "install with `pip install --no-build-isolation` (./install.sh does)")
        return [], {}

    class BuildKernels(BuildExtension):
        """One object folder per variant (the variants compile the same source file), and a failed variant skipped
        with a message instead of failing the install."""

        def build_extensions(self):
            self.base_temp = self.build_temp
            try:
                super().build_extensions()
            except Exception as e:          # the compiler check itself failed (no C++ compiler, ...)
                print(f"herd: not building the C++ kernels ({type(e).__name__}: {e}); torch's kernels will run")

        def build_extension(self, ext):
            self.build_temp = os.path.join(self.base_temp, ext.name)
            try:
                super().build_extension(ext)
            except Exception as e:
                print(f"herd: could not build {ext.name} ({type(e).__name__}: {str(e).strip()[-300:]}); "
                      "herd runs without it (torch's kernels on CPUs of that instruction set)")

    sha = sources_sha()
    modules = [CppExtension(f"herd.cpu.{name}", ["herd/cpu/bindings.cpp"],
                            extra_compile_args=COMMON_FLAGS + flags + [f'-DHERD_SOURCES_SHA="{sha}"'],
                            extra_link_args=["-fopenmp"])
               for name, flags in VARIANTS.items()]
    return modules, {"build_ext": BuildKernels}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
