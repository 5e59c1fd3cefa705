"""Kernel designs of the GPU backends, and the GPU run that last executed each.

One entry per design of every Triton and CUDA kernel family. A family with alternatives (the Triton
top-k read's selection: ``threshold``, ``threshold-strided``, ``stream``) has exactly one default,
and its launcher reads the default from here; the others are opt-in.

The rule (``tests/test_gpu_status.py``): no default is a design that never ran on a GPU. A new
design stays opt-in until a GPU run has passed the tests with it and timed it
(``tools/gpu_suite.sh``; for the top-k read also ``python -m tools.gpu_probe topk-tiles``, which
times every threshold design); then its entry records that run and it may become the default. A
fix to the kernels of a design after its GPU run is listed in the entry's ``changed`` until the
next GPU run: those kernels, in their current form, have not run on a GPU either.
``python -m l2m_kernels.info`` prints this table. The runs themselves are rows of
``benchmarks/results.jsonl``, shown in ``benchmarks/RESULTS.md`` under each run's card and date.

Each design that ran records the fingerprint of its kernels' code as it ran (:func:`fingerprint`:
the Triton kernels with the jit functions they call, or the CUDA sources with the headers they
include, comments and layout left out). ``tests/test_gpu_status.py`` recomputes it: a kernel whose
code differs from what ran must say why in ``changed``, so no change to a measured kernel goes
unlisted. ``python -m l2m_kernels._gpu_status [--at COMMIT]`` prints the fingerprints, to record
after a GPU run.

Plain data and the standard library: importing this module needs neither torch nor triton.
"""
from __future__ import annotations

import ast
import hashlib
import posixpath
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GpuRun:
    """A GPU run that executed a design: the card, the date, the commit that recorded the run,
    and what ran there."""

    device: str
    date: str
    commit: str
    checks: str

    def __str__(self) -> str:
        return f"{self.device}, {self.date}, commit {self.commit}"


@dataclass(frozen=True)
class Design:
    family: str                # what the designs of one family are alternatives for
    backend: str               # "triton" or "cuda"
    name: str
    ops: tuple[str, ...]       # the ops whose calls run it
    kernels: tuple[str, ...]   # Triton kernel names, or the csrc/cuda sources
    gpu_run: GpuRun | None     # None: never ran on a GPU
    default: bool = True
    opt_in: str = ""           # how a design that is not the default is selected
    note: str = ""
    changed: tuple[str, ...] = ()   # commits that changed its kernels after gpu_run: what changed
    ran: str = ""              # fingerprint() of its kernels at gpu_run.commit ("" if none)
    # Fingerprints of later code shown to compile to the machine code that ran (the note says how).
    equivalent: tuple[str, ...] = ()

    def code_as_run(self, tree: "SourceTree | None" = None) -> bool | None:
        """Whether its kernel code in ``tree`` is the code that ran on its GPU run (None: no run, or
        no sources to fingerprint)."""
        now = fingerprint(self, tree) if self.gpu_run is not None else None
        return None if now is None else now == self.ran or now in self.equivalent


# Families with more than one design, looked up by name by their launchers.
TOPK_SELECTION = "top-k read selection"


def _h200(checks: str) -> GpuRun:
    # The last GPU run (benchmarks/RESULTS.md, NVIDIA H200, 2026-11-26: the runs at commit 44f93db;
    # the H200 runs before it that day have no commit recorded): gpu_suite.sh with the CUDA
    # self-test of every family, the test suite, l2m-check --quick and l2m-bench at the -gpu
    # shapes, then gpu_probe.py.
    return GpuRun("NVIDIA H200", "2026-11-26", "44f93db", checks)


_TOPK_TRITON_OPS = ("topk_memory_read", "memory_attention")   # memory_attention selects through it

# _TRITON_EQUIVALENT: the Triton designs with an `equivalent` fingerprint, after the row-block,
# float32-accumulator, dw-sum and write-chain helpers of _triton_lib and the op modules were written
# once: every production configuration (tools.triton_check, 924 of them, sm_80 and sm_90, Triton
# 3.9) compiled before and after has the same SASS (tools.triton_check --same-code-as).

# The CUDA designs with an `equivalent` fingerprint: d1444d2 changed merged_lse in merge_common.cuh, which their
# sources include but do not call. Compiled at 44f93db and at d1444d2 (nvcc 13.0, the extension's
# flags, sm_80 and sm_90), every kernel's SASS is identical (cuobjdump -sass, anonymous-namespace
# hashes aside): their code is the code that ran. The second fingerprint of each: the params structs
# moved to csrc/common/params.h (shared with the CPU kernels; the same fields in the same order,
# the float pointers of lse and weights typed void* and cast where the kernels read them) and the
# launchers' dtype switches became L2M_CUDA_DISPATCH (merge_common.cuh). Compiled before and after
# the same way, all 138 kernels (sm_80 and sm_90) have identical SASS. The third: the shared
# element conversions (Convert<T>) and 16-byte vector loads of merge_common.cuh, the sort-key
# helpers of warp_list.cuh, and launch and staging helpers written once per source; compiled before
# and after the same way, every kernel's SASS is identical again.

DESIGNS: tuple[Design, ...] = (
    # ---- Triton ------------------------------------------------------------------------------
    Design("merge", "triton", "merge", ("merge_attention", "gated_merge"),
           ("merge_attention_fwd_kernel", "merge_attention_bwd_kernel", "gated_merge_fwd_kernel",
            "gated_merge_bwd_kernel"),
           _h200("test suite and l2m-check; timed on an H100 on 2026-11-25"),
           changed=("d1444d2: merge_attention's lse is +inf when a side is +inf (was NaN for two +inf)",),
           ran="13e4799ecd0b"),
    Design(TOPK_SELECTION, "triton", "threshold", _TOPK_TRITON_OPS,
           ("topk_read_fwd_chunkmax_kernel", "topk_read_fwd_collect_kernel", "topk_read_fwd_finish_kernel"),
           _h200("gpu_probe.py topk-tiles and l2m-bench timed it with the [128, 64, 8] scan tile; the test "
                 "suite and l2m-check ran it with the [64, 64, 8] tile, whose selected indices the "
                 "[128, 64, 8] tile matched"),
           note="contiguous one-tile chunks, int64 chunk maxima, tau by torch.topk, cumulative-sum "
                "collect; rows over the candidate capacity finish in the stream kernel",
           ran="eff9a64c9b14"),
    Design(TOPK_SELECTION, "triton", "threshold-strided", _TOPK_TRITON_OPS,
           ("topk_read_fwd_strided_chunkmax_kernel", "topk_read_fwd_kth_kernel",
            "topk_read_fwd_strided_collect_kernel", "topk_read_fwd_finish_kernel"),
           None, default=False, opt_in="L2M_TOPK_TRITON_PATH=threshold-strided",
           note="strided chunks, float chunk maxima, tau by a Triton k-th-largest kernel, collect by "
                "extraction rounds with batched stores; keys written in sequence stay under the "
                "candidate capacity"),
    Design(TOPK_SELECTION, "triton", "stream", _TOPK_TRITON_OPS, ("topk_read_fwd_select_kernel",),
           _h200("test suite and l2m-check, alone (small N) and as the overflow fallback of the "
                 "threshold path"),
           default=False, opt_in="L2M_TOPK_TRITON_PATH=stream",
           note="running top-k merges; the exact fallback of both threshold designs",
           ran="5578c1095eed"),
    Design("top-k read output and backward", "triton", "gather", _TOPK_TRITON_OPS,
           ("topk_read_fwd_out_kernel", "topk_read_bwd_dweights_kernel", "topk_read_bwd_dq_kernel",
            "topk_read_bwd_slot_kernel"),
           _h200("test suite, l2m-check and l2m-bench"),
           ran="db90d5dc7c37",
           equivalent=("93286d9f6139",)),  # same SASS as ran (_TRITON_EQUIVALENT)
    Design("product-key read", "triton", "product-key", ("product_key_read",),
           ("product_key_fwd_select_kernel", "product_key_fwd_topk_kernel", "product_key_fwd_out_kernel",
            "product_key_bwd_dweights_kernel", "product_key_bwd_dq_kernel", "product_key_bwd_segment_kernel"),
           _h200("l2m-check; the test suite and l2m-bench in the H200 run before it, the same day"),
           note="e1318b2 made the top-k kernel encode its sort keys through the shared _encode_key "
                "instead of inline: the same SASS as at 44f93db for every compile-checked configuration "
                "(sm_80 and sm_90, Triton 3.9)",
           changed=("4379701: the select and top-k kernels keep NaN apart from +inf for lse",),
           ran="27b27703d66f"),
    Design("memory write", "triton", "memory-write", ("gated_memory_write", "gated_dense_update"),
           ("gated_memory_write_fwd_kernel", "gated_memory_write_bwd_kernel", "gated_dense_update_fwd_kernel",
            "gated_dense_update_bwd_kernel"),
           _h200("test suite, l2m-check and l2m-bench"),
           ran="e9a51b2a4438",
           equivalent=("29cfba24ae9d",)),  # same SASS as ran (_TRITON_EQUIVALENT)
    Design("memory attention", "triton", "fused", ("memory_attention",),
           ("memory_attention_fwd_kernel", "memory_attention_fwd_nonfinite_kernel",
            "memory_attention_bwd_mem_kernel", "memory_attention_bwd_dkdv_kernel",
            "memory_attention_bwd_dq_kernel"),
           _h200("test suite and l2m-bench; l2m-check found an illegal-address fault in the forward at "
                 "float16 D = 33 (Triton 3.6)"),
           note="16-bit heads with D % 8 != 0 now run zero-padded to the tile width (host-side: a padded "
                "call runs the kernels of an unpadded call at that width); the padded path has not run "
                "on a GPU",
           changed=("8b7b317: merge='gate' backward recomputes out_local with the forward kernel; "
                    "memory_attention_bwd_mem_kernel reads it",),
           ran="164ef0696f02"),
    # ---- CUDA (csrc/cuda) ----------------------------------------------------------------------
    Design("merge", "cuda", "merge", ("merge_attention", "gated_merge"),
           ("merge_attention.cu", "gated_merge.cu"),
           _h200("CUDA self-test, test suite and l2m-check; timed on an H100 on 2026-11-25"),
           changed=("d1444d2: merge_attention's lse is +inf when a side is +inf (merge_common.cuh)",),
           ran="34722480a8ed"),
    Design("top-k read", "cuda", "threshold+warpselect", ("topk_memory_read", "memory_attention"),
           ("topk_read.cu",),
           _h200("CUDA self-test (the threshold and plain WarpSelect paths bitwise equal), test suite, "
                 "l2m-check and l2m-bench"),
           ran="a366246d9f26",
           equivalent=("187d424d4428", "8b318a2890cc", "891de83d112c")),  # same SASS as ran (above)
    Design("product-key read", "cuda", "product-key", ("product_key_read",), ("product_key.cu",),
           _h200("CUDA self-test and l2m-check; l2m-bench in the H200 run before it, the same day"),
           ran="18a17453a586",
           equivalent=("5a7d0ce7ca26", "616c6c702e29", "c005d6503c7f")),  # same SASS as ran (above)
    Design("memory write", "cuda", "memory-write", ("gated_memory_write", "gated_dense_update"),
           ("memory_write.cu", "dense_update.cu"),
           _h200("CUDA self-test, test suite, l2m-check and l2m-bench"),
           ran="aa3d7af12010",
           equivalent=("198220bc00b7", "612877171396", "7b6ea3285c88")),  # same SASS as ran (above)
    Design("memory attention", "cuda", "composed", ("memory_attention",),
           ("memory_attention.cu", "local_attention.cu"),
           _h200("CUDA self-test, test suite, l2m-check and l2m-bench"),
           note="the cuda top-k read, a local attention with its log-sum-exp and the cuda merge",
           ran="fc006ec6ee91",
           equivalent=("4384b7d8226b", "3eb145689d25", "6bb65bafe94c")),  # same SASS as ran (above)
)


@dataclass(frozen=True)
class HostChange:
    """A change to a GPU backend's host code (its bindings or Python launchers) since the last GPU
    run, which the kernels' fingerprints do not cover."""

    backend: str
    commit: str
    what: str


# Host code changed since the last GPU run (commit 44f93db): the backend has not run in this form,
# even where its kernels have. A GPU run of tools/gpu_suite.sh that passes empties the list.
HOST_CHANGES = (
    HostChange("cuda", "d30994e", "one binding layer for both extensions (csrc/common/binding.h); "
               "the cuda extension compiles with the host compiler here but has not been built with nvcc since"),
    HostChange("cuda", "7e6a149", "the Python launchers make the plans and scratch (topk_read/plan.py, "
               "product_key/plan.py, the float32 accumulators) and pass them to the bindings; "
               "topk_read_chunk_max and product_key_segment_sum are entry points of their own"),
    HostChange("triton", "5a65d2f", "the deterministic backwards' groupings and the top-k threshold from "
               "topk_read/plan.py and product_key/plan.py (the same tensors as before on valid indices)"),
)


def families() -> list[tuple[str, str]]:
    """(family, backend) pairs, in table order."""
    seen = []
    for design in DESIGNS:
        if (design.family, design.backend) not in seen:
            seen.append((design.family, design.backend))
    return seen


def designs_of(family: str, backend: str) -> list[Design]:
    return [d for d in DESIGNS if d.family == family and d.backend == backend]


def default_design(family: str, backend: str) -> Design:
    """The default design of a family; ValueError unless there is exactly one."""
    defaults = [d for d in designs_of(family, backend) if d.default]
    if len(defaults) != 1:
        raise ValueError(f"{backend} {family!r}: expected one default design, found "
                         f"{[d.name for d in defaults] or 'none'}")
    return defaults[0]


def unmeasured() -> list[Design]:
    """Designs that never ran on a GPU."""
    return [d for d in DESIGNS if d.gpu_run is None]


def changed_since_run() -> list[Design]:
    """Designs that ran on a GPU whose kernels changed after that run."""
    return [d for d in DESIGNS if d.gpu_run is not None and d.changed]


def report_lines() -> list[str]:
    """The section of ``python -m l2m_kernels.info``: each family's designs with their GPU runs, the
    default marked, then the designs that have not run on a GPU."""
    lines = ["kernel designs by backend and family (* = default; runs in benchmarks/RESULTS.md):"]
    for family, backend in families():
        designs = designs_of(family, backend)
        lines.append(f"  {backend} {family} ({', '.join(designs[0].ops)}):")
        width = max(len(d.name) for d in designs)
        for d in designs:
            run = str(d.gpu_run) if d.gpu_run else "never ran on a GPU"
            lines.append(f"    {'*' if d.default else ' '} {d.name:<{width}}  {run}"
                         + (f"; changed since: {', '.join(c.split(':')[0] for c in d.changed)}" if d.changed else "")
                         + (f"; opt-in: {d.opt_in}" if d.opt_in else ""))
    lines.append("kernel designs not yet run on a GPU:")
    lines += [f"  {d.backend} {d.family}: {d.name}" + (" (the default)" if d.default else f" (opt-in: {d.opt_in})")
              for d in unmeasured()] or ["  none"]
    lines.append("kernel designs changed since their GPU run (not yet run on a GPU in this form):")
    lines += [f"  {d.backend} {d.family}: {d.name} ({change})" for d in changed_since_run() for change in d.changed]
    if not changed_since_run():
        lines.append("  none")
    lines.append("host code (bindings, launchers) changed since the last GPU run:")
    lines += [f"  {c.backend}: {c.commit}: {c.what}" for c in HOST_CHANGES] or ["  none"]
    return lines


# ---- Fingerprints: is a design's code the code that ran? ------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent   # a source checkout: l2m_kernels/ and csrc/
TRITON_SOURCES = "l2m_kernels/ops"                   # every *.py below it is searched for jit functions
# The jit helpers the ops share, under public names; each had its name with a leading underscore in
# an op module before it moved there, and is fingerprinted under that name (see _jit_functions).
TRITON_LIBRARY = "l2m_kernels/ops/_triton_lib.py"
CUDA_SOURCES = "csrc/cuda"


class SourceTree:
    """The files of the repository in the working tree, or at ``commit`` (read with git)."""

    def __init__(self, commit: str | None = None, root: Path = REPO_ROOT):
        self.commit, self.root = commit, Path(root)

    def paths(self, folder: str, suffixes: tuple[str, ...]) -> list[str]:
        if self.commit is None:
            base = self.root / folder
            found = [str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()] if base.is_dir() else []
        else:
            found = self._git("ls-tree", "-r", "--name-only", self.commit, "--", folder).split()
        return sorted(p for p in found if p.endswith(suffixes))

    def read(self, path: str) -> str | None:
        if self.commit is None:
            file = self.root / path
            return file.read_text() if file.is_file() else None
        try:
            return self._git("show", f"{self.commit}:{path}")
        except subprocess.CalledProcessError:
            return None

    def _git(self, *args: str) -> str:
        return subprocess.run(["git", "-C", str(self.root), *args], check=True, capture_output=True,
                              text=True).stdout


def _is_jit(node: ast.FunctionDef) -> bool:
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


def _jit_functions(tree: SourceTree) -> dict[str, list[tuple[str, ast.FunctionDef]]]:
    """Every module-level Triton jit function under TRITON_SOURCES: name -> [(module path, node)].

    Names are canonical: a public jit function of TRITON_LIBRARY, and every call to one, is named
    with a leading underscore, the name it had in the op module it moved from; so moving a helper
    into the library leaves the fingerprint of unchanged code unchanged. Nodes are canonical
    copies (see :func:`_canonical`).
    """
    library = set()
    text = tree.read(TRITON_LIBRARY)
    if text is not None:
        library = {node.name for node in ast.parse(text).body
                   if isinstance(node, ast.FunctionDef) and _is_jit(node) and not node.name.startswith("_")}
    found: dict[str, list[tuple[str, ast.FunctionDef]]] = {}
    for path in tree.paths(TRITON_SOURCES, (".py",)):
        text = tree.read(path)
        if text is None or "jit" not in text:
            continue
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef) and _is_jit(node):
                node = _canonical(node, library)
                found.setdefault(node.name, []).append((path, node))
    return found


def _canonical(node: ast.FunctionDef, library: set[str]) -> ast.FunctionDef:
    """``node`` with the library's public jit names (its own, and those it calls) underscored."""
    if not library:
        return node

    class Underscore(ast.NodeTransformer):
        def visit_Call(self, call):
            self.generic_visit(call)
            if isinstance(call.func, ast.Name) and call.func.id in library:
                call.func = ast.copy_location(ast.Name("_" + call.func.id, call.func.ctx), call.func)
            return call

    node = Underscore().visit(node)
    if node.name in library:
        node.name = "_" + node.name
    return node


def _code_of(node: ast.FunctionDef) -> str:
    """The function's syntax tree without its docstring: comments, layout and line numbers left out."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return ast.dump(ast.FunctionDef(node.name, node.args, body, node.decorator_list, node.returns,
                                    getattr(node, "type_comment", None), **({"type_params": node.type_params}
                                                                           if hasattr(node, "type_params") else {})))


def _triton_code(kernels: tuple[str, ...], tree: SourceTree) -> str | None:
    """The kernels and every jit function they call (transitively, by name; a name defined in several
    modules resolves to the caller's module first, then to the first module in path order, which
    is TRITON_LIBRARY where it defines the name), or None when a kernel is missing."""
    functions = _jit_functions(tree)
    parts, seen = [], set()
    todo = [(name, None) for name in kernels]
    while todo:
        name, caller = todo.pop(0)
        if name in seen:
            continue
        candidates = functions.get(name)
        if not candidates:
            if caller is None:
                return None
            continue
        path, node = next(((p, n) for p, n in candidates if p == caller), candidates[0])
        seen.add(name)
        parts.append(_code_of(node))
        called = {c.func.id if isinstance(c.func, ast.Name) else c.func.attr
                  for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, (ast.Name, ast.Attribute))}
        todo += [(callee, path) for callee in sorted(called) if callee in functions]
    return "\n".join(parts)


_C_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def _cuda_code(sources: tuple[str, ...], tree: SourceTree) -> str | None:
    """The sources and the csrc/cuda headers they include (transitively), comments and layout left out."""
    parts, seen, todo = [], set(), [f"{CUDA_SOURCES}/{name}" for name in sources]
    while todo:
        path = todo.pop(0)
        if path in seen:
            continue
        seen.add(path)
        text = tree.read(path)
        if text is None:
            if path.endswith(".cu"):
                return None
            continue  # a system or torch header
        code = " ".join(_C_COMMENT.sub(" ", text).split())
        parts.append(f"{path.rsplit('/', 1)[-1]}: {code}")
        # A quoted include is found next to the file that includes it (csrc/common/params.h from
        # csrc/cuda/merge.h as "../common/params.h").
        todo += [posixpath.normpath(f"{posixpath.dirname(path)}/{name}")
                 for name in re.findall(r'#include\s+"([^"]+)"', text)]
    return "\n".join(parts)


def fingerprint(design: Design, tree: SourceTree | None = None) -> str | None:
    """12 hex digits of a hash over the design's kernel code in ``tree`` (default: the working tree);
    None when its sources are not there (an installed package has no csrc/)."""
    tree = tree or SourceTree()
    code = (_triton_code if design.backend == "triton" else _cuda_code)(design.kernels, tree)
    return None if code is None else hashlib.sha256(code.encode()).hexdigest()[:12]


def main(argv: list[str]) -> int:
    """Print each design's fingerprint in the working tree (or ``--at COMMIT``) beside the one recorded."""
    commit = argv[argv.index("--at") + 1] if "--at" in argv else None
    tree = SourceTree(commit)
    for d in DESIGNS:
        print(f"{d.backend:<7} {d.family:<32} {d.name:<20} {fingerprint(d, tree) or 'missing':<13} "
              f"ran {d.ran or '-':<13}" + (f" equivalent {', '.join(d.equivalent)}" if d.equivalent else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
