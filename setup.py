"""Build of l2m-kernels: the Python package plus its compiled extensions.

    pip install --no-build-isolation -e .      # uses the torch already installed; never pulls one

Extensions:
- ``l2m_kernels._C`` (always): C++17/OpenMP CPU kernels from ``csrc/cpu/*.cpp``. The kernel sources
  (every file but ``bindings.cpp``) are compiled once per instruction-set variant: ``default`` (no
  ``-march``) everywhere, plus ``avx2`` (``-march=x86-64-v3``) and ``avx512`` (``-march=x86-64-v4``)
  on x86-64, each into its own namespace (``csrc/cpu/isa.h``), all linked into the one extension;
  ``bindings.cpp`` is compiled once, without ``-march``, and at import picks the variant that
  serves every call: ``L2M_CPU_ISA`` when set, else the best one the CPU runs (at most torch's CPU
  capability).
- ``l2m_kernels._C_cuda``: CUDA kernels from ``csrc/cuda/*.cu`` and ``csrc/cuda/*.cpp``, built when
  those sources exist and torch has CUDA and nvcc is found, or when ``L2M_FORCE_CUDA=1``.

Environment:
- ``L2M_CPU_ARCH`` (expert override): build a single variant instead, the whole CPU extension
  compiled with ``-march=$L2M_CPU_ARCH`` (e.g. ``native``: fastest on the build machine, runs on no
  older CPU; empty: no ``-march``, one portable variant, the quickest build). Unset by default.
- ``L2M_SANITIZE``: e.g. ``address,undefined``: the CPU extension is built with those sanitizers
  (``-fsanitize=... -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g``, ``-O1``);
  loading it needs the sanitizer runtime preloaded. ``scripts/sanitize.sh`` builds such a copy
  under ``build/sanitize`` and runs the CPU tests with it.
- ``L2M_SKIP_CUDA=1``: never build the CUDA extension. ``L2M_FORCE_CUDA=1``: build it even when
  torch has no CUDA or nvcc was not found by torch (for instance a CPU-only build machine).
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures (default ``8.0;9.0``).
- ``MAX_JOBS``: parallel compile jobs (ninja), as for any torch extension.

What was built is recorded in the binaries, not in a generated Python file: setup.py passes the
facts as macros and ``l2m_kernels._C.BUILD_INFO`` returns them as a dict (torch, cpu_ext, cpu_arch,
cpu_isas, openmp, cuda_ext, cuda_archs; ``l2m_kernels._C.isa_info()`` adds each variant's ``-march``
and which one is in use), and each extension exposes ``TORCH_VERSION``, the torch it was
compiled against. A generated ``_build_info.py`` could go stale under editable installs and
disagree with the binary actually loaded; macros cannot.
"""
from __future__ import annotations

import glob
import os
import platform
import re

from setuptools import find_namespace_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def sources(pattern: str) -> list[str]:
    # setuptools wants source paths relative to the project root.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def string_macro(name: str, value: str) -> str:
    """``-DNAME="value"`` for the C++ compiler.

    torch's build passes each flag as one argument (quoted for the shell when ninja runs it), so
    the double quotes reach the compiler and make a string literal. Values are restricted to
    characters that need no escaping inside one.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.+;:/ -]*", value):
        value = "unknown"
    return f'-D{name}="{value}"'


TORCH_VERSION = torch.__version__.split()[0]

# ---- CPU extension ----
# Instruction-set variants of the kernels beyond the default one: name -> -march (csrc/cpu/isa.h).
# Lowest first: the link order (see BuildExtension below).
CPU_ISA_MARCH = {"avx2": "x86-64-v3", "avx512": "x86-64-v4"}
IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")

cpu_arch_override = os.environ.get("L2M_CPU_ARCH")
if cpu_arch_override is not None:
    # Expert override: one variant, the whole extension compiled with this -march.
    cpu_arch = cpu_arch_override.strip()
    cpu_isas = {}
else:
    cpu_arch = ""
    cpu_isas = CPU_ISA_MARCH if IS_X86_64 else {}

# The code is C++17; the -std flag is left to torch, whose headers set the minimum (c++17 for
# torch 2.6, c++20 for recent releases). -fno-trapping-math: the kernels never read floating-point
# exception flags, and without it GCC keeps a clamp or a select of floats out of vector code on
# AVX2 (it may not evaluate both sides of a comparison), so elementwise loops with exp or tanh
# (csrc/cpu/vmath.h) run one element at a time. It changes no result.
cpu_cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wall"]
cpu_link_flags = ["-fopenmp"]
if cpu_arch:
    cpu_cxx_flags.append(f"-march={cpu_arch}")

sanitize = os.environ.get("L2M_SANITIZE", "").strip()
if sanitize:
    if not re.fullmatch(r"[a-z]+(,[a-z]+)*", sanitize):
        raise RuntimeError(f"L2M_SANITIZE={sanitize!r}: expected a comma-separated list such as "
                           "address,undefined")
    # -O1, as the sanitizers recommend: under half the build time of -O3 with them, and reports
    # whose stacks follow the source.
    cpu_cxx_flags[0] = "-O1"
    sanitizer_flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
    if "undefined" in sanitize.split(","):
        sanitizer_flags.append("-fno-sanitize-recover=undefined")  # a UB report fails the run
    cpu_cxx_flags += sanitizer_flags
    cpu_link_flags += [f"-fsanitize={sanitize}"]

# ---- CUDA extension (decided before the CPU one: its BUILD_INFO records the decision) ----
cuda_sources = sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp")
has_cuda_sources = bool(sources("csrc/cuda/*.cu")) and os.path.exists(
    os.path.join(ROOT, "csrc", "cuda", "bindings.cpp"))
if env_flag("L2M_SKIP_CUDA"):
    build_cuda = False
elif env_flag("L2M_FORCE_CUDA"):
    if not has_cuda_sources:
        raise RuntimeError("L2M_FORCE_CUDA=1 but csrc/cuda/ has no *.cu sources and bindings.cpp")
    build_cuda = True
else:
    build_cuda = (has_cuda_sources and torch.version.cuda is not None
                  and cpp_extension.CUDA_HOME is not None)

cuda_archs = ""
if build_cuda:
    # torch.utils.cpp_extension reads TORCH_CUDA_ARCH_LIST when it compiles: set the default here.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    cuda_archs = os.environ["TORCH_CUDA_ARCH_LIST"]

build_macros = [
    string_macro("L2M_TORCH_VERSION", TORCH_VERSION),
    string_macro("L2M_CPU_ARCH", cpu_arch),
    f"-DL2M_CUDA_EXT={int(build_cuda)}",
    string_macro("L2M_CUDA_ARCHS", cuda_archs),
] + [string_macro(f"L2M_CPU_ISA_{name.upper()}_ARCH", march) for name, march in cpu_isas.items()]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja), plus the per-variant compiles of the CPU kernels.

    setuptools gives every source of an extension the same flags, and torch's ninja build keeps it
    so (one ``cflags`` per ``build.ninja``). The kernel sources of each further variant are
    therefore compiled by one more call of the same compiler (torch's ninja wrapper) with that
    variant's flags, into ``<build_temp>/isa_<name>`` (its own ``build.ninja`` and objects, so each
    variant rebuilds incrementally), before the extension's own sources (``bindings.cpp`` and the
    default variant), and linked after them, lowest variant first. The order matters: the variants
    share the inline functions of the C++ library and c10 headers, whose out-of-line copies the
    linker merges keeping the first it meets, so a shared copy always comes from the lowest
    variant that uses it and never carries instructions the calling variant's CPU may lack.
    (``#pragma GCC target`` in per-variant wrapper files was the alternative: GCC-only, and it
    would still need the same link order.)

    The CPU extension is always handed to ninja, which rebuilds what changed (sources, headers,
    flags), then relinked: setuptools' own up-to-date check compares the sources' dates only, so
    it missed a changed header, a changed variant object or a changed build variable.
    """

    def build_extension(self, ext):
        variants = getattr(ext, "isa_variants", None)
        if variants is None:
            super().build_extension(ext)
            return
        objects = []
        for name, march in variants.items():
            objects += self.compiler.compile(
                ext.isa_sources,
                output_dir=os.path.join(self.build_temp, f"isa_{name}"),
                macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs={"cxx": ext.extra_compile_args["cxx"] + [
                    f"-march={march}", f"-DL2M_CPU_ISA=isa_{name}"]},
                depends=ext.depends)
        ext.extra_objects = objects
        force, self.force = self.force, True
        try:
            super().build_extension(ext)
        finally:
            self.force = force


def largest_first(paths: list[str]) -> list[str]:
    # ninja starts the jobs in this order: the longest compiles first keep both cores busy to
    # the end (file size is a fair proxy for compile time here).
    return sorted(paths, key=lambda path: os.path.getsize(os.path.join(ROOT, path)), reverse=True)


cpu_kernel_sources = largest_first(
    [path for path in sources("csrc/cpu/*.cpp") if os.path.basename(path) != "bindings.cpp"])
cpu_headers = sources("csrc/cpu/*.h")

cpu_extension = cpp_extension.CppExtension(
    name="l2m_kernels._C",
    # bindings.cpp (the longest compile) first, then the default variant of the kernels.
    sources=["csrc/cpu/bindings.cpp"] + cpu_kernel_sources,
    extra_compile_args={"cxx": cpu_cxx_flags + build_macros},
    extra_link_args=cpu_link_flags,
    depends=cpu_headers,
)
cpu_extension.isa_variants = cpu_isas
cpu_extension.isa_sources = cpu_kernel_sources
ext_modules = [cpu_extension]

if build_cuda:
    ext_modules.append(
        cpp_extension.CUDAExtension(
            name="l2m_kernels._C_cuda",
            sources=cuda_sources,
            # The build macros go to the C++ compiler only (bindings.cpp exposes them): nvcc splits
            # option values at commas, and torch skips its own -gencode flags when any nvcc flag
            # contains "arch".
            extra_compile_args={
                "cxx": ["-O3"] + build_macros,
                # No --use_fast_math: results must match the reference (exp, log1p, division).
                "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
            },
        )
    )

setup(
    name="l2m-kernels",
    version="0.1.0",
    description="PyTorch kernels for Large Memory Models: sparse memory reads, gated writes, "
                "memory attention (reference, C++/OpenMP, Triton and CUDA backends)",
    packages=find_namespace_packages(include=["l2m_kernels", "l2m_kernels.*"],
                                     exclude=["*.__pycache__"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.3"],
        "test": ["pytest", "hypothesis", "transformers>=5"],
        "bench": ["matplotlib", "tqdm"],
        # l2m_kernels.integrations.transformers (attach_memory).
        "transformers": ["transformers>=5"],
        # The peers l2m-bench compares with where installed (scripts/install.sh --peers).
        "peers": ["faiss-cpu", "product-key-memory"],
    },
    ext_modules=ext_modules,
    entry_points={"console_scripts": ["l2m-check = l2m_kernels.check:main",
                                    "l2m-bench = l2m_kernels.bench:main"]},
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
