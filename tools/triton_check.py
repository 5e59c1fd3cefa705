"""Compile every production Triton configuration for NVIDIA targets without a GPU.

Each module named in :data:`TRITON_MODULES` exposes ``COMPILE_CONFIGS``, a list of dicts:

    kernel           the @triton.jit function
    signature        {runtime argument name: Triton type string}, e.g. {"x": "*fp16", "n": "i32"}
    constexprs       {constexpr argument name: value}
    num_warps        int
    options          optional dict of extra compile options (e.g. {"enable_fp_fusion": True})
    divisible_by_16  optional names the JIT would specialize as 16-divisible (aligned pointers,
                     sizes that are multiples of 16), so the check sees the vectorised code
    label            optional short text for the table
    allow_spills     optional bool, default False

The op modules build these entries with :func:`l2m_kernels.ops._triton_lib.compile_entry`.

For every entry and every requested compute capability this compiles the kernel with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, writes the cubin to a
temporary file and reads the per-kernel resource usage (REG, STACK, SHARED, LOCAL) with the
``cuobjdump`` shipped inside Triton's package.

Spills: ptxas places spilled registers in the per-thread ABI stack frame, which cuobjdump reports
as STACK (checked against ``ptxas -v``: a kernel forced to 40 registers reports "864 bytes stack
frame, 1096 bytes spill stores" and cuobjdump shows STACK:864 LOCAL:0). LOCAL is non-ABI local
memory, which current ptxas does not use for spills. A kernel therefore counts as spilling when
STACK > 0 or LOCAL > 0 (a genuine local array would also trip this; our kernels have none).

Results cache (``--cache PATH``): a JSON file of earlier results, each under a key that hashes
everything the compile depends on: the Triton version and its cache-invalidating environment
variables, the kernel's ``cache_key`` (its source and the sources of every function it calls), the
signature, constexprs, divisibility hints, options, warps and arch. A configuration whose key is in
the file is not compiled again: its recorded result is reported (marked "cached"). Any change to a
kernel, its helpers, its configuration or Triton makes a new key, which is compiled. ``--update-cache``
rewrites the file with this run's results (only the current keys). The test suite uses
``tests/triton_check_cache.json``, so a fresh machine compiles only what changed since the file was
written; ``python -m tools.triton_check --cache tests/triton_check_cache.json --update-cache``
refreshes it.

Machine code: each compiled configuration also records ``sass``, a digest of its SASS
(``cuobjdump -sass``, addresses left out). ``--json`` writes it; ``--same-code-as EARLIER.json``
compares this run with such a file, configuration by configuration (kernel, label, arch), and fails
on any difference: run it without ``--cache`` (a cached result has no digest) at two commits to show
that a refactoring of the kernels compiles to the same machine code.

Usage:
    python -m tools.triton_check [--arch 80 90] [--jobs N] [--module MOD ...] [--json PATH]
                                 [--cache PATH [--update-cache]] [--same-code-as EARLIER.json]

Exit status: 0 when everything compiled and nothing spilled that may not; 1 otherwise; 2 when it
cannot run at all (TRITON_INTERPRET set, triton or cuobjdump missing).

Triton compatibility (see :func:`make_ast_source`): tested with 3.9 here; 3.3 .. 3.8 by their
``ASTSource`` code. Triton <= 3.2 (``AttrsDescriptor``) is refused with a clear message.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from l2m_kernels.ops.registry import triton_modules

# Modules whose COMPILE_CONFIGS are checked: those of the ops that the triton backend serves, from
# the ops' declarations (l2m_kernels/ops/registry.py).
TRITON_MODULES = triton_modules()
DEFAULT_ARCHS = (80, 90)

# Triton 3.9 warns that the default of TRITON_DEFAULT_FP_FUSION is to change. The check compiles with
# fused multiply-adds (the default so far, "1"), and the variable is part of every result's cache key:
# set here, so that every run (the tests', a refresh of the cache, a comparison of SASS) uses the same.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

_INTERPRET_MESSAGE = (
    "TRITON_INTERPRET is set: Triton decorated the kernels for its CPU interpreter, and they cannot "
    "be compiled for a GPU target. Run the check in a clean environment, e.g.\n"
    "    env -u TRITON_INTERPRET python -m tools.triton_check")


class CheckUnavailable(RuntimeError):
    """The check cannot run in this environment (interpreter mode, no triton, no cuobjdump)."""


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter (Triton reads it as a boolean)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@dataclasses.dataclass
class CompileResult:
    module: str
    kernel: str
    label: str
    arch: int
    num_warps: int
    ok: bool = False
    error: str = ""
    reg: int | None = None
    stack: int | None = None
    shared: int | None = None
    local: int | None = None
    allow_spills: bool = False
    key: str = ""
    cached: bool = False
    sass: str = ""          # sass_digest() of its cubin ("" when taken from the cache)

    @property
    def spills(self) -> bool:
        return bool(self.stack) or bool(self.local)

    @property
    def passed(self) -> bool:
        return self.ok and self.reg is not None and (self.allow_spills or not self.spills)


# ---------------------------------------------------------------------------------------------
# Triton version shim
# ---------------------------------------------------------------------------------------------

def triton_version() -> tuple[int, int]:
    import triton
    major, minor = (int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    return major, minor


def make_ast_source(fn, signature: dict, constexprs: dict, divisible_by_16=()):
    """Build ``triton.compiler.ASTSource`` for Triton 3.3 .. 3.9.

    What moved across versions, and what this passes so that every one accepts it:
    - signature: 3.3 builds the argument types positionally from ``signature.values()``, so the
      dict must hold *every* argument in ``fn.arg_names`` order, constexpr ones typed
      ``"constexpr"``; 3.4+ maps by name and accepts (the JIT itself passes) the same full dict.
    - constexprs: keyed by an index path tuple ``(i,)`` internally from 3.3 on; 3.3+ also converts
      names, but the tuple form is what the JIT passes in every one of these versions.
    - attrs: 3.3+ take ``{(i,): [["tt.divisibility", 16]]}``; 3.2 and older took an
      ``AttrsDescriptor`` (and ``constants=``) instead and are refused here.
    """
    from triton.compiler import ASTSource

    if triton_version() < (3, 3):
        raise CheckUnavailable(f"Triton {'.'.join(map(str, triton_version()))} is too old for this "
                               "check (needs >= 3.3: ASTSource with attrs dicts)")
    arg_names = list(fn.arg_names)
    unknown = (set(signature) | set(constexprs) | set(divisible_by_16)) - set(arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__}: no such arguments {sorted(unknown)}")
    missing = [name for name in arg_names if name not in signature and name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: arguments without a type or constexpr value: {missing}")
    full_signature = {name: ("constexpr" if name in constexprs else signature[name]) for name in arg_names}
    constants = {(arg_names.index(name),): value for name, value in constexprs.items()}
    attrs = {(arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    return ASTSource(fn, full_signature, constants, attrs)


def find_cuobjdump() -> str:
    """cuobjdump: $TRITON_CUOBJDUMP_PATH, then the one in Triton's package, then $PATH."""
    import triton
    candidates = [os.environ.get("TRITON_CUOBJDUMP_PATH", ""),
                  os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"),
                  shutil.which("cuobjdump") or ""]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise CheckUnavailable("cuobjdump not found (looked at $TRITON_CUOBJDUMP_PATH, "
                           "<triton>/backends/nvidia/bin/cuobjdump and $PATH)")


_FUNCTION_RE = re.compile(r"^\s*Function\s+(\S+):\s*$")
_FIELD_RE = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


def _dump(cubin: bytes, cuobjdump: str, option: str) -> str:
    """cuobjdump's ``option`` listing of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
        path = handle.name
    try:
        return subprocess.run([cuobjdump, option, path], check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(path)


def resource_usage(cubin: bytes, cuobjdump: str) -> dict[str, dict[str, int]]:
    """{function name: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}} of a cubin."""
    text = _dump(cubin, cuobjdump, "--dump-resource-usage")
    usage, current = {}, None
    for line in text.splitlines():
        match = _FUNCTION_RE.match(line)
        if match:
            current = usage.setdefault(match.group(1), {})
        elif current is not None:
            current.update({key: int(value) for key, value in _FIELD_RE.findall(line)})
    return usage


_SASS_ADDRESS_RE = re.compile(r"/\*[0-9a-f]{4,}\*/")


def sass_digest(cubin: bytes, cuobjdump: str) -> str:
    """A digest of the cubin's SASS instructions and their encodings (addresses left out)."""
    text = _dump(cubin, cuobjdump, "-sass")
    code = [_SASS_ADDRESS_RE.sub("", line).strip() for line in text.splitlines() if "/*" in line]
    return hashlib.sha256("\n".join(code).encode()).hexdigest()[:16]


def same_code(results: list[CompileResult], earlier: list[dict]) -> list[str]:
    """The configurations whose SASS differs from (or is missing in) ``earlier`` (a --json list)."""
    before = {(e["kernel"], e["label"], e["arch"]): e.get("sass", "") for e in earlier}
    problems = []
    for r in results:
        where = f"{r.kernel} [{r.label}] sm_{r.arch}"
        if not r.sass:
            problems.append(f"{where}: no SASS digest (taken from the cache, or not compiled)")
        elif (r.kernel, r.label, r.arch) not in before:
            problems.append(f"{where}: not in the earlier run")
        elif before[(r.kernel, r.label, r.arch)] != r.sass:
            problems.append(f"{where}: SASS differs")
    return problems


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------

def load_configs(module_name: str) -> list[dict]:
    module = importlib.import_module(module_name)
    configs = list(getattr(module, "COMPILE_CONFIGS"))
    from triton.runtime.jit import JITFunction
    for config in configs:
        if not isinstance(config["kernel"], JITFunction):
            raise CheckUnavailable(f"{module_name}.{config['kernel'].__name__} is not a compilable "
                                   f"JITFunction ({type(config['kernel']).__name__}). " + _INTERPRET_MESSAGE)
    return configs


def compile_one(module_name: str, index: int, arch: int, cuobjdump: str) -> CompileResult:
    """Compile ``COMPILE_CONFIGS[index]`` of ``module_name`` for sm_<arch> and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    config = load_configs(module_name)[index]
    fn = config["kernel"]
    result = CompileResult(module=module_name, kernel=fn.__name__, label=config.get("label", str(index)),
                           arch=arch, num_warps=config["num_warps"],
                           allow_spills=bool(config.get("allow_spills", False)))
    try:
        source = make_ast_source(fn, config["signature"], config["constexprs"],
                                 config.get("divisible_by_16", ()))
        options = dict(config.get("options", {}), num_warps=config["num_warps"])
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        usage = resource_usage(compiled.asm["cubin"], cuobjdump)
        result.sass = sass_digest(compiled.asm["cubin"], cuobjdump)
    except CheckUnavailable:
        raise
    except Exception as error:  # a compile failure is a result, reported in the table
        result.error = f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]
        return result
    if len(usage) != 1:
        result.error = f"expected one kernel in the cubin, cuobjdump listed {sorted(usage)}"
        return result
    (fields,) = usage.values()
    result.ok = True
    result.reg, result.stack = fields.get("REG"), fields.get("STACK", 0)
    result.shared, result.local = fields.get("SHARED", 0), fields.get("LOCAL", 0)
    return result


def config_key(config: dict, arch: int) -> str:
    """Hash of everything the compile of ``config`` for sm_<arch> depends on (see the cache above)."""
    import triton
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
        env = get_cache_invalidating_env_vars()
    except ImportError:  # older Triton: the variables that change code generation
        env = {name: os.environ.get(name, "") for name in ("TRITON_DEFAULT_FP_FUSION",)}
    fn = config["kernel"]
    facts = [triton.__version__, sorted(env.items()), fn.cache_key, sorted(config["signature"].items()),
             sorted((name, repr(value)) for name, value in config["constexprs"].items()),
             sorted(config.get("divisible_by_16", ())), sorted((k, repr(v)) for k, v in config.get("options", {}).items()),
             config["num_warps"], int(arch)]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()


def _compile_job(job):
    return compile_one(*job)


def _from_cache(entry: dict, key: str) -> CompileResult:
    fields = {f.name for f in dataclasses.fields(CompileResult)}
    return dataclasses.replace(CompileResult(**{k: v for k, v in entry.items() if k in fields}), key=key, cached=True)


def check(modules=TRITON_MODULES, archs=DEFAULT_ARCHS, jobs: int | None = None,
          cache: dict | None = None) -> list[CompileResult]:
    """Compile every config of every module for every arch; results in a stable order.

    ``cache`` ({key: result dict}, see :func:`config_key`): configurations found there are not
    compiled; their recorded result is returned, marked ``cached``.
    Raises :class:`CheckUnavailable` when the check cannot run here.
    """
    if interpreter_enabled():
        raise CheckUnavailable(_INTERPRET_MESSAGE)
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise CheckUnavailable(f"triton is not importable: {error}") from error
    cuobjdump = find_cuobjdump()
    cache = cache or {}
    results, work = [], []
    for module_name in modules:
        for index, config in enumerate(load_configs(module_name)):
            for arch in archs:
                key = config_key(config, arch)
                if key in cache:
                    results.append(_from_cache(cache[key], key))
                else:
                    results.append(key)
                    work.append((module_name, index, int(arch), cuobjdump))
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work) or 1))
    if jobs == 1 or len(work) <= 1:
        compiled = [_compile_job(job) for job in work]
    else:
        # Compiles are CPU bound and independent; worker processes import the modules themselves.
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
            compiled = list(pool.map(_compile_job, work))
    compiled = iter(compiled)
    return [dataclasses.replace(next(compiled), key=r) if isinstance(r, str) else r for r in results]


def format_table(results: list[CompileResult]) -> str:
    header = ("kernel", "config", "arch", "warps", "REG", "STACK", "SHARED", "LOCAL", "status")
    rows = []
    for r in results:
        status = ("ok" if not r.spills else ("spills (allowed)" if r.allow_spills else "SPILLS")) \
            if r.ok else f"FAILED: {r.error}"
        status += " (cached)" if r.cached else ""
        cell = lambda value: "-" if value is None else str(value)  # noqa: E731
        rows.append((r.kernel, r.label, f"sm_{r.arch}", str(r.num_warps), cell(r.reg), cell(r.stack),
                     cell(r.shared), cell(r.local), status))
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header) - 1)]
    lines = []
    for row in [header] + rows:
        lines.append("  ".join(text.ljust(width) for text, width in zip(row, widths)) + "  " + row[-1])
        if row is header:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.triton_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS),
                        help="compute capabilities, e.g. 80 90 (default: %(default)s)")
    parser.add_argument("--module", nargs="+", default=list(TRITON_MODULES),
                        help="modules exposing COMPILE_CONFIGS (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as a JSON list")
    parser.add_argument("--cache", metavar="PATH", help="results cache (see the module docstring)")
    parser.add_argument("--update-cache", action="store_true", help="rewrite --cache with this run's results")
    parser.add_argument("--same-code-as", metavar="EARLIER_JSON",
                        help="fail unless every configuration's SASS equals that of an earlier --json run")
    args = parser.parse_args(argv)
    if args.update_cache and not args.cache:
        parser.error("--update-cache needs --cache PATH")
    cache = {}
    if args.cache and os.path.exists(args.cache):
        with open(args.cache) as handle:
            cache = json.load(handle)
    try:
        results = check(args.module, args.arch, args.jobs, cache=cache)
    except CheckUnavailable as error:
        print(f"tools.triton_check: {error}", file=sys.stderr)
        return 2
    import triton
    cached = sum(r.cached for r in results)
    print(f"Triton {triton.__version__}; {len(results)} configurations "
          f"({', '.join(f'sm_{arch}' for arch in args.arch)}), {len(results) - cached} compiled, {cached} from "
          "the cache (same kernel sources, configuration, arch and Triton); "
          "spills = STACK or LOCAL > 0 (ptxas puts spilled registers in the stack frame)")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([dict(dataclasses.asdict(r), spills=r.spills, passed=r.passed) for r in results],
                      handle, indent=1)
    if args.update_cache:
        # Only this run's keys of the checked modules and archs: entries for other modules stay.
        kept = {key: entry for key, entry in cache.items()
                if entry.get("module") not in args.module or entry.get("arch") not in args.arch}
        kept.update({r.key: {k: v for k, v in dataclasses.asdict(r).items() if k not in ("key", "cached", "sass")}
                     for r in results if r.ok})
        with open(args.cache, "w") as handle:
            json.dump(dict(sorted(kept.items())), handle, indent=0, sort_keys=True)
            handle.write("\n")
    if args.same_code_as:
        with open(args.same_code_as) as handle:
            differing = same_code(results, json.load(handle))
        if differing:
            print(f"\n{len(differing)} of {len(results)} configurations do not have the SASS of "
                  f"{args.same_code_as}:\n  " + "\n  ".join(differing), file=sys.stderr)
            return 1
        print(f"\nall {len(results)} configurations have the SASS of {args.same_code_as}")
    failed = [r for r in results if not r.passed]
    if failed:
        print(f"\n{len(failed)} of {len(results)} failed "
              f"({sum(not r.ok for r in failed)} compile errors, {sum(r.ok for r in failed)} spilling)",
              file=sys.stderr)
        return 1
    allowed = sum(r.spills for r in results)
    print(f"\nall {len(results)} compile; " + (f"{allowed} spill where allowed (marked above)" if allowed
                                               else "none spills"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
