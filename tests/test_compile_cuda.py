"""The CUDA kernels compile for sm_80 and sm_90 without spilling (nvcc only, no GPU needed).

Every ``csrc/cuda/*.cu`` is compiled by :func:`tools.nvcc_check.compile_cuda_sources`
(``nvcc -c -O3 -std=c++17 -arch=sm_XX -Xptxas -v`` plus torch's half/bfloat16 defines) and ptxas's
per-kernel report is checked. Also checked without nvcc: only ``csrc/cuda/bindings.cpp`` includes
torch headers, so the kernels build on machines whose torch has no CUDA headers.

nvcc's report of a (source, arch) whose source, headers, flags and nvcc release are unchanged comes
from ``tests/nvcc_check_cache.json`` (the results cache of ``tools/nvcc_check.py``); the rest
compile. Refresh it after changing CUDA sources with
``python -m tools.nvcc_check --cache tests/nvcc_check_cache.json --update-cache``.
"""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tools import nvcc_check

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
ARCHS = ("80", "90")
CACHE = Path(__file__).resolve().parent / "nvcc_check_cache.json"


@pytest.fixture(scope="module")
def report():
    if nvcc_check.find_nvcc() is None:
        pytest.skip("nvcc not found")
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    return nvcc_check.compile_cuda_sources(ARCHS, sources=None, cache=cache)


def _logs(report):
    return "\n".join(f"--- {r.source} sm_{r.arch}:\n{r.log}" for r in report.results)


def test_every_source_compiles_for_each_arch(report):
    sources = nvcc_check.cuda_sources(CUDA_DIR)
    assert sources, f"no .cu files under {CUDA_DIR}"
    compiled = {(result.source, result.arch) for result in report.results if result.ok}
    expected = {(source.name, arch) for source in sources for arch in ARCHS}
    assert compiled == expected, f"failed: {sorted(expected - compiled)}\n{_logs(report)}"
    with_kernels = {(record.source, record.arch) for record in report.kernels}
    assert with_kernels == expected, f"no kernel reported for {sorted(expected - with_kernels)}"


def test_every_kernel_reports_registers(report):
    assert report.kernels
    missing = report.kernels_without_registers
    assert not missing, f"no register count: {missing}\n{_logs(report)}"
    for record in report.kernels:
        assert 0 < record.registers <= 255, record


def test_merge_kernels_do_not_spill(report):
    merge_kernels = [record for record in report.kernels
                     if nvcc_check.is_merge_kernel(record.kernel)]
    # fwd + bwd of both ops, for float, half and bfloat16, on every arch.
    assert len(merge_kernels) == 4 * 3 * len(ARCHS), [r.kernel for r in merge_kernels]
    for record in merge_kernels:
        assert record.spill_stores == 0 and record.spill_loads == 0, record
        assert record.stack == 0, f"stack frame (local memory) in a row kernel: {record}"


def test_attention_kernels_do_not_spill(report):
    """The local attention (fwd, delta, dq, dk/dv) and read-weight kernels of the memory_attention
    backend: register-resident tiles; a spill there is a regression."""
    attention = [record for record in report.kernels
                 if record.source in ("local_attention.cu", "memory_attention.cu")]
    names = {record.kernel.split("<")[0].split("::")[-1] for record in attention}
    assert names == {"local_attention_fwd_kernel", "local_attention_bwd_delta_kernel",
                     "local_attention_bwd_dq_kernel", "local_attention_bwd_dkdv_kernel",
                     "memory_read_weights_kernel"}, names
    # fwd, dq, dk/dv: 2 slice widths x 3 dtypes + float64; delta, read weights: 4 dtypes.
    assert len(attention) == (3 * 7 + 2 * 4) * len(ARCHS), [r.kernel for r in attention]
    for record in attention:
        assert record.spill_stores == 0 and record.spill_loads == 0, record


def test_only_bindings_include_torch():
    torch_facing = [path.relative_to(CUDA_DIR).as_posix()
                    for path in nvcc_check.files_including_torch(CUDA_DIR)]
    assert torch_facing == ["bindings.cpp"], torch_facing
    kernel_side = [path for pattern in ("*.cu", "*.cuh", "*.h") for path in CUDA_DIR.glob(pattern)]
    assert any(path.name == "merge.h" for path in kernel_side)
    for path in kernel_side:
        text = path.read_text()
        assert not re.search(r"#\s*include\s*[<\"](torch|ATen|c10)/", text), path.name


def _host_compiler():
    """The host C++ compiler and the CUDA toolkit's include directory, or a skip saying which is
    missing."""
    nvcc = nvcc_check.find_nvcc()
    compiler = shutil.which("c++") or shutil.which("g++")
    if nvcc is None or compiler is None:
        pytest.skip("nvcc not found" if nvcc is None else "no host C++ compiler")
    cuda_include = nvcc_check.cuda_include_dir(nvcc)
    if cuda_include is None:
        pytest.skip("the CUDA toolkit's include directory (cuda_runtime_api.h) was not found")
    return compiler, cuda_include


def test_merge_header_is_plain_cpp(tmp_path):
    """merge.h (what bindings.cpp sees of the kernels) compiles with the host compiler alone."""
    compiler, cuda_include = _host_compiler()
    unit = tmp_path / "uses_merge_h.cpp"
    unit.write_text('#include "merge.h"\n'
                    "static_assert(sizeof(l2m::cuda::MergeAttentionFwdParams) > 0, \"\");\n"
                    "int main() { return static_cast<int>(l2m::cuda::MergeDtype::kFloat32); }\n")
    completed = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror",
                                f"-I{CUDA_DIR}", f"-I{cuda_include}", str(unit)],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_cuda_bindings_compile_with_the_host_compiler(tmp_path):
    """csrc/cuda/bindings.cpp (with csrc/common/binding.h under L2M_BINDING_CUDA) passes the host
    compiler's syntax and type checks, warnings as errors: the CUDA extension is not built here,
    and this is what catches a binding that would not compile. torch's CPU wheels lack one
    generated header of c10/cuda (the build's macros), written here as the CUDA builds have it."""
    compiler, cuda_include = _host_compiler()
    import sysconfig

    import torch.utils.cpp_extension as cpp_extension

    if not any((Path(d) / "c10" / "cuda" / "CUDAGuard.h").exists() for d in cpp_extension.include_paths()):
        pytest.skip("this torch has no c10/cuda headers")
    macros = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(cuda_include),
                str(tmp_path)]
    completed = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                                "-DTORCH_EXTENSION_NAME=_C_cuda", *(f"-isystem{d}" for d in includes),
                                f"-I{CUDA_DIR}", str(CUDA_DIR / "bindings.cpp")],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-4000:]


def test_cache_key_follows_the_sources_and_headers(tmp_path):
    """A cached report is used only for the same source, headers, flags, arch and nvcc release."""
    for name in ("merge_attention.cu", "merge.h"):
        (tmp_path / name).write_bytes((CUDA_DIR / name).read_bytes())
    source = tmp_path / "merge_attention.cu"
    key = nvcc_check.cache_key("release 13.0", source, "90")
    assert key == nvcc_check.cache_key("release 13.0", source, "90")
    assert key != nvcc_check.cache_key("release 13.0", source, "80")
    assert key != nvcc_check.cache_key("release 12.8", source, "90")
    assert key != nvcc_check.cache_key("release 13.0", source, "90", ("-DX",))
    (tmp_path / "merge.h").write_text((tmp_path / "merge.h").read_text() + "\n// changed\n")
    assert key != nvcc_check.cache_key("release 13.0", source, "90")
