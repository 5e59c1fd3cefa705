"""Compile the CUDA kernels with nvcc (no GPU needed) and read ptxas's resource report.

Every ``csrc/cuda/*.cu`` is compiled once per target architecture with

    nvcc -c -O3 -std=c++17 -arch=sm_XX -Xptxas -v <torch's half/bfloat16 defines> SOURCE

into a temporary directory, and ptxas's ``-v`` output is parsed into one record per kernel and
architecture: registers, spill stores/loads (bytes), stack frame (bytes) and static shared memory
(bytes). The defines are the ones ``torch.utils.cpp_extension`` passes to nvcc, so a source that
compiles here also compiles inside the extension build.

Command line (prints a table; exit status 1 on a compile error, on a kernel without a register
count, or on any spill in a kernel that must not spill (see NO_SPILL_KERNEL_PATTERNS); 2 when nvcc
is missing):

    python -m tools.nvcc_check [--arch 80 --arch 90] [--json report.json]
                               [--cache PATH [--update-cache]] [SOURCE.cu ...]

Results cache (``--cache PATH``, or ``cache=`` of :func:`compile_cuda_sources`): nvcc's log of a
(source, arch) is stored under a key hashing the nvcc release, the flags, the source and every
header next to it; a key found there is not compiled again (its stored log is parsed as if nvcc
had just printed it). Any change to a source, a header, the flags or nvcc makes a new key. The test
suite reads ``tests/nvcc_check_cache.json``; ``--update-cache`` rewrites it.

Equivalent shell, for one source and one architecture:

    nvcc -c -O3 -std=c++17 -arch=sm_90 -Xptxas -v csrc/cuda/merge_attention.cu -o /tmp/x.o
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

CUDA_SOURCE_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
DEFAULT_ARCHS = ("80", "90")

# What torch.utils.cpp_extension adds to every nvcc command line: the kernels must not rely on the
# implicit half/bfloat16 conversions and operators these switch off.
TORCH_NVCC_DEFINES = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)

# Headers whose inclusion marks a file as torch-facing; only bindings.cpp may include them.
TORCH_INCLUDE_PATTERN = re.compile(r"^\s*#\s*include\s*[<\"](torch|ATen|c10)/", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class KernelRecord:
    """ptxas's report for one kernel (entry function) compiled for one architecture."""

    kernel: str  # demangled name when c++filt is available
    arch: str  # "80", "90", ...
    registers: int | None  # None: ptxas printed no "Used N registers" line for it
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame
    smem: int  # bytes of static shared memory
    source: str  # file name, e.g. "merge_attention.cu"
    mangled: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """One nvcc invocation: a source for an architecture."""

    source: str
    arch: str
    returncode: int
    seconds: float
    command: tuple[str, ...]
    log: str  # nvcc's stdout + stderr (ptxas -v report, warnings, errors)
    key: str = ""  # see the results cache in the module docstring
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclasses.dataclass
class CompileReport:
    results: list[CompileResult]
    kernels: list[KernelRecord]
    seconds: float  # wall-clock time of the whole check
    nvcc: str
    nvcc_version: str

    @property
    def failures(self) -> list[CompileResult]:
        return [result for result in self.results if not result.ok]

    @property
    def kernels_without_registers(self) -> list[KernelRecord]:
        return [record for record in self.kernels if record.registers is None]

    @property
    def forbidden_spills(self) -> list[KernelRecord]:
        """Kernels that must not spill (is_no_spill_kernel) and do."""
        return [
            record
            for record in self.kernels
            if is_no_spill_kernel(record.kernel) and (record.spill_stores or record.spill_loads)
        ]

    @property
    def ok(self) -> bool:
        return not (self.failures or self.kernels_without_registers or self.forbidden_spills)

    def as_dict(self) -> dict:
        return {
            "nvcc": self.nvcc,
            "nvcc_version": self.nvcc_version,
            "seconds": self.seconds,
            "compiles": [
                {k: v for k, v in dataclasses.asdict(result).items() if k != "log"}
                | {"ok": result.ok}
                for result in self.results
            ],
            "kernels": [record.as_dict() for record in self.kernels],
            "ok": self.ok,
        }


def is_merge_kernel(kernel_name: str) -> bool:
    """The merge ops' kernels (merge_attention_*_kernel, gated_merge_*_kernel)."""
    return "merge" in kernel_name


# Kernels whose spills fail the check: the merge ops' row kernels and the gated memory write /
# dense update kernels (register-resident row chunks and elementwise loops: a spill there is a
# regression, not a trade-off).
NO_SPILL_KERNEL_PATTERNS = ("merge", "gated_memory_write", "gated_dense_update")


def is_no_spill_kernel(kernel_name: str) -> bool:
    """Whether a spill in this kernel fails the check (see NO_SPILL_KERNEL_PATTERNS)."""
    return any(pattern in kernel_name for pattern in NO_SPILL_KERNEL_PATTERNS)


def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH / /usr/local/cuda; None when absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def cuda_include_dir(nvcc: str | None = None) -> Path | None:
    """The toolkit's include directory (holding cuda_runtime_api.h) that nvcc uses; None if unknown.

    Asked from nvcc itself (``--dryrun`` prints its INCLUDES), since nvcc on PATH may be a wrapper
    script outside the toolkit; falls back to the usual locations.
    """
    nvcc = nvcc or find_nvcc()
    candidates: list[Path] = []
    if nvcc is not None:
        completed = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        for match in re.finditer(r'INCLUDES="-I([^"]+)"', completed.stdout + completed.stderr):
            candidates.append(Path(match.group(1).strip()))
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(Path(root) / "include")
    for candidate in candidates:
        if (candidate / "cuda_runtime_api.h").is_file():
            return candidate.resolve()
    return None


def cuda_sources(source_dir: Path = CUDA_SOURCE_DIR) -> list[Path]:
    """Every .cu file directly under csrc/cuda (what the extension build compiles)."""
    return sorted(source_dir.glob("*.cu"))


def files_including_torch(source_dir: Path = CUDA_SOURCE_DIR) -> list[Path]:
    """Files under csrc/cuda (recursively) that include torch/ATen/c10 headers."""
    return sorted(
        path
        for path in source_dir.rglob("*")
        if path.suffix in {".cu", ".cuh", ".h", ".hpp", ".cpp", ".cc"}
        and TORCH_INCLUDE_PATTERN.search(path.read_text(errors="replace"))
    )


def nvcc_command(nvcc: str, source: Path, arch: str, output: Path,
                 extra_flags: Sequence[str] = ()) -> list[str]:
    return [
        nvcc, "-c", "-O3", "-std=c++17", f"-arch=sm_{arch}", "-Xptxas", "-v",
        *TORCH_NVCC_DEFINES, f"-I{source.parent}", *extra_flags, str(source), "-o", str(output),
    ]  # fmt: skip


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str, source: str = "", default_arch: str = "") -> list[KernelRecord]:
    """Per-kernel records from ``nvcc -Xptxas -v`` output (names left mangled).

    ptxas reports, per entry function: "Compiling entry function 'NAME' for 'sm_XX'", then
    "Function properties for NAME" followed by the stack/spill line, then "Used N registers, ...
    [M bytes smem, ...]". Properties of non-entry functions (calls that were not inlined) are
    reported too and are ignored here.
    """
    frames: dict[str, tuple[int, int, int]] = {}
    entries: dict[tuple[str, str], dict] = {}
    current: tuple[str, str] | None = None
    pending_properties: str | None = None
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            current = (match.group(1), match.group(2))
            entries.setdefault(current, {"registers": None, "smem": 0})
            continue
        if match := _PROPERTIES.search(line):
            pending_properties = match.group(1)
            continue
        if (match := _FRAME.search(line)) and pending_properties is not None:
            frames[pending_properties] = tuple(int(group) for group in match.groups())
            pending_properties = None
            continue
        if (match := _USED.search(line)) and current is not None:
            entries[current]["registers"] = int(match.group(1))
            if smem := _SMEM.search(line):
                entries[current]["smem"] = int(smem.group(1))
            current = None
    records = []
    for (name, arch), info in entries.items():
        stack, spill_stores, spill_loads = frames.get(name, (0, 0, 0))
        records.append(
            KernelRecord(
                kernel=name, arch=arch or default_arch, registers=info["registers"],
                spill_stores=spill_stores, spill_loads=spill_loads, stack=stack,
                smem=info["smem"], source=source, mangled=name,
            )  # fmt: skip
        )
    return records


def demangle(names: Iterable[str]) -> dict[str, str]:
    """mangled -> demangled via one c++filt call; names map to themselves without c++filt."""
    names = list(dict.fromkeys(names))
    cxxfilt = shutil.which("c++filt")
    if not names or cxxfilt is None:
        return {name: name for name in names}
    completed = subprocess.run(
        [cxxfilt], input="\n".join(names) + "\n", capture_output=True, text=True, check=False
    )
    lines = completed.stdout.splitlines()
    if completed.returncode != 0 or len(lines) != len(names):
        return {name: name for name in names}
    return dict(zip(names, lines))


def _nvcc_version(nvcc: str) -> str:
    completed = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
    release = re.search(r"release [^\n]*", completed.stdout)
    return release.group(0) if release else "unknown version"


def cache_key(nvcc_version: str, source: Path, arch: str, extra_flags: Sequence[str] = ()) -> str:
    """Hash of what a (source, arch) compile depends on: nvcc's release, the flags, the source and
    every header in its directory and the torch-free headers of ``../common`` (the params structs
    both backends use); a header change invalidates every source, conservatively."""
    command = nvcc_command("nvcc", Path(source.name), arch, Path("out.o"), extra_flags)
    digest = hashlib.sha256(json.dumps([nvcc_version, command]).encode())
    headers = sorted(p for pattern in ("*.h", "*.cuh") for p in source.parent.glob(pattern))
    headers += sorted(p for p in (source.parent.parent / "common").glob("*.h")
                      if not TORCH_INCLUDE_PATTERN.search(p.read_text(errors="replace")))
    for path in [source] + headers:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_entries(report: CompileReport) -> dict:
    """{key: stored result} of the report's successful compiles, for a results cache file."""
    return {r.key: {"source": r.source, "arch": r.arch, "returncode": r.returncode, "seconds": r.seconds,
                    "log": r.log} for r in report.results if r.ok and r.key}


def compile_cuda_sources(
    arch_list: Sequence[str] = DEFAULT_ARCHS,
    sources: Sequence[str | Path] | None = None,
    *,
    nvcc: str | None = None,
    extra_flags: Sequence[str] = (),
    jobs: int | None = None,
    cache: dict | None = None,
) -> CompileReport:
    """Compile every source for every architecture; parse ptxas's per-kernel resource report.

    Args:
        arch_list: compute capabilities without the dot, e.g. ("80", "90") for sm_80 and sm_90.
        sources: .cu files; default every csrc/cuda/*.cu.
        nvcc: the compiler; default find_nvcc().
        extra_flags: appended to each nvcc command line.
        jobs: nvcc processes at a time; default the CPU count.
        cache: {key: stored result} (see :func:`cache_key`); found keys are not compiled again.

    Returns:
        CompileReport with one CompileResult per (source, arch) and one KernelRecord per kernel
        and arch (kernel names demangled).

    Raises:
        FileNotFoundError: nvcc not found.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (not on PATH, nor under $CUDA_HOME/bin)")
    source_paths = [Path(source).resolve() for source in sources] if sources else cuda_sources()
    archs = [str(arch).replace("sm_", "").replace(".", "") for arch in arch_list]
    work = [(source, arch) for source in source_paths for arch in archs]
    version = _nvcc_version(nvcc)
    cache = cache or {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="l2m_nvcc_check_") as build_dir:

        def compile_one(item: tuple[Path, str]) -> CompileResult:
            source, arch = item
            output = Path(build_dir) / f"{source.stem}.sm_{arch}.o"
            command = nvcc_command(nvcc, source, arch, output, extra_flags)
            key = cache_key(version, source, arch, extra_flags)
            if key in cache:
                stored = cache[key]
                return CompileResult(source=source.name, arch=arch, returncode=stored["returncode"],
                                     seconds=stored["seconds"], command=tuple(command), log=stored["log"],
                                     key=key, cached=True)
            begin = time.perf_counter()
            completed = subprocess.run(command, capture_output=True, text=True, check=False)
            return CompileResult(
                source=source.name, arch=arch, returncode=completed.returncode,
                seconds=time.perf_counter() - begin, command=tuple(command),
                log=completed.stdout + completed.stderr, key=key,
            )  # fmt: skip

        workers = max(1, min(len(work), jobs or os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(compile_one, work))
    records = [
        record
        for result in results
        for record in parse_ptxas(result.log, source=result.source, default_arch=result.arch)
    ]
    names = demangle(record.mangled for record in records)
    records = [dataclasses.replace(record, kernel=names[record.mangled]) for record in records]
    records.sort(key=lambda record: (record.source, record.kernel, record.arch))
    return CompileReport(
        results=results, kernels=records, seconds=time.perf_counter() - started, nvcc=nvcc,
        nvcc_version=version,
    )  # fmt: skip


def _short_kernel_name(name: str) -> str:
    """'void l2m::cuda::(anonymous namespace)::k<float>(Params, int, bool)' -> 'k<float>'."""
    name = name.removeprefix("void ")
    depth, cut = 0, len(name)
    for index, char in enumerate(name):  # drop the parameter list: first '(' outside <...>
        if char == "<":
            depth += 1
        elif char == ">":
            depth -= 1
        elif char == "(" and depth == 0 and not name.startswith("(anonymous", index):
            cut = index
            break
    return name[:cut].split("::")[-1]


def format_report(report: CompileReport) -> str:
    rows = [("source", "kernel", "arch", "regs", "spill st", "spill ld", "stack", "smem")]
    for record in report.kernels:
        rows.append((
            record.source, _short_kernel_name(record.kernel), f"sm_{record.arch}",
            "?" if record.registers is None else str(record.registers),
            str(record.spill_stores), str(record.spill_loads), str(record.stack), str(record.smem),
        ))  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    compile_seconds = ", ".join(
        f"{result.source} sm_{result.arch} {result.seconds:.1f}s{' (cached)' if result.cached else ''}"
        for result in report.results
    )
    lines.append("")
    lines.append(f"{report.nvcc} ({report.nvcc_version}); {report.seconds:.1f}s wall: "
                 f"{compile_seconds}")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.nvcc_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sources", nargs="*", help="default: every csrc/cuda/*.cu")
    parser.add_argument("--arch", action="append", dest="archs",
                        help="compute capability without the dot (repeatable; default 80 and 90)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes")
    parser.add_argument("--verbose", action="store_true", help="print every nvcc log")
    parser.add_argument("--cache", type=Path, help="results cache (see the module docstring)")
    parser.add_argument("--update-cache", action="store_true", help="rewrite --cache with this run's results")
    args = parser.parse_args(argv)
    if args.update_cache and not args.cache:
        parser.error("--update-cache needs --cache PATH")
    cache = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
    try:
        report = compile_cuda_sources(
            tuple(args.archs or DEFAULT_ARCHS), args.sources or None, jobs=args.jobs, cache=cache
        )
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for result in report.results:
        warnings = [line for line in result.log.splitlines() if "warning" in line.lower()]
        if args.verbose or not result.ok or warnings:
            print(f"--- {result.source} sm_{result.arch} (exit {result.returncode}):")
            print(result.log if (args.verbose or not result.ok) else "\n".join(warnings))
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
    if args.update_cache:
        args.cache.write_text(json.dumps(dict(sorted(cache_entries(report).items())), indent=0) + "\n")
    problems = [f"compile failed: {r.source} sm_{r.arch}" for r in report.failures]
    problems += [
        f"no register count: {r.kernel} sm_{r.arch}" for r in report.kernels_without_registers
    ]
    problems += [
        f"spills: {r.kernel} sm_{r.arch} ({r.spill_stores} B stored, {r.spill_loads} B loaded)"
        for r in report.forbidden_spills
    ]
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
