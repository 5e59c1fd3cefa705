"""Kernel designs of the GPU backends, and the GPU run that last executed each.

One entry per design of every Triton and CUDA kernel family. A family with alternatives (the Triton
top-k read's selection: ``threshold``, ``threshold-strided``, ``stream``) has exactly one default,
and its launcher reads the default from here; the others are opt-in.

The rule (``tests/test_gpu_status.py``): no default is a design that never ran on a GPU. A new
design stays opt-in until a GPU run has passed the tests with it and timed it
(``benchmarks/gpu_suite.sh``; for the top-k read also ``benchmarks/gpu_probe.py topk-tiles``, which
times every threshold design); then its entry records that run and it may become the default. A
fix to the kernels of a design after its GPU run is listed in the entry's ``changed`` until the
next GPU run: those kernels, in their current form, have not run on a GPU either.
``python -m l2m_kernels.info`` prints this table. The runs themselves are in
``benchmarks/RESULTS.md``.

Plain data: importing this module needs neither torch nor triton.
"""
from __future__ import annotations

from dataclasses import dataclass


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


# Families with more than one design, looked up by name by their launchers.
TOPK_SELECTION = "top-k read selection"


def _h200(checks: str) -> GpuRun:
    # The last GPU run (benchmarks/RESULTS.md, the H200 entries of 2026-11-26): gpu_suite.sh with
    # the CUDA self-test of every family, the test suite (cut at its time limit: 771 passed, the 8
    # failures were test bugs, fixed since), l2m-check --quick and l2m-bench at the -gpu shapes,
    # then gpu_probe.py; recorded by commit 44f93db.
    return GpuRun("NVIDIA H200", "2026-11-26", "44f93db", checks)


_TOPK_TRITON_OPS = ("topk_memory_read", "memory_attention")   # memory_attention selects through it

DESIGNS: tuple[Design, ...] = (
    # ---- Triton ------------------------------------------------------------------------------
    Design("merge", "triton", "merge", ("merge_attention", "gated_merge"),
           ("merge_attention_fwd_kernel", "merge_attention_bwd_kernel", "gated_merge_fwd_kernel",
            "gated_merge_bwd_kernel"),
           _h200("test suite and l2m-check; timed on an H100 on 2026-11-25"),
           changed=("d1444d2: merge_attention's lse is +inf when a side is +inf (was NaN for two +inf)",)),
    Design(TOPK_SELECTION, "triton", "threshold", _TOPK_TRITON_OPS,
           ("topk_read_fwd_chunkmax_kernel", "topk_read_fwd_collect_kernel", "topk_read_fwd_finish_kernel"),
           _h200("gpu_probe.py topk-tiles and l2m-bench timed it with the [128, 64, 8] scan tile; the test "
                 "suite and l2m-check ran it with the [64, 64, 8] tile, whose selected indices the "
                 "[128, 64, 8] tile matched"),
           note="contiguous one-tile chunks, int64 chunk maxima, tau by torch.topk, cumulative-sum "
                "collect; rows over the candidate capacity finish in the stream kernel"),
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
           note="running top-k merges; the exact fallback of both threshold designs"),
    Design("top-k read output and backward", "triton", "gather", _TOPK_TRITON_OPS,
           ("topk_read_fwd_out_kernel", "topk_read_bwd_dweights_kernel", "topk_read_bwd_dq_kernel",
            "topk_read_bwd_slot_kernel"),
           _h200("test suite, l2m-check and l2m-bench")),
    Design("product-key read", "triton", "product-key", ("product_key_read",),
           ("product_key_fwd_select_kernel", "product_key_fwd_topk_kernel", "product_key_fwd_out_kernel",
            "product_key_bwd_dweights_kernel", "product_key_bwd_dq_kernel", "product_key_bwd_segment_kernel"),
           _h200("l2m-check; the test suite and l2m-bench in the H200 run before it, the same day"),
           note="e1318b2 made the top-k kernel encode its sort keys through the shared _encode_key "
                "instead of inline: the same SASS as at 44f93db for every compile-checked configuration "
                "(sm_80 and sm_90, Triton 3.9)",
           changed=("4379701: the select and top-k kernels keep NaN apart from +inf for lse",)),
    Design("memory write", "triton", "memory-write", ("gated_memory_write", "gated_dense_update"),
           ("gated_memory_write_fwd_kernel", "gated_memory_write_bwd_kernel", "gated_dense_update_fwd_kernel",
            "gated_dense_update_bwd_kernel"),
           _h200("test suite, l2m-check and l2m-bench")),
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
                    "memory_attention_bwd_mem_kernel reads it",)),
    # ---- CUDA (csrc/cuda) ----------------------------------------------------------------------
    Design("merge", "cuda", "merge", ("merge_attention", "gated_merge"),
           ("merge_attention.cu", "gated_merge.cu"),
           _h200("CUDA self-test, test suite and l2m-check; timed on an H100 on 2026-11-25"),
           changed=("d1444d2: merge_attention's lse is +inf when a side is +inf (merge_common.cuh)",)),
    Design("top-k read", "cuda", "threshold+warpselect", ("topk_memory_read", "memory_attention"),
           ("topk_read.cu",),
           _h200("CUDA self-test (the threshold and plain WarpSelect paths bitwise equal), test suite, "
                 "l2m-check and l2m-bench")),
    Design("product-key read", "cuda", "product-key", ("product_key_read",), ("product_key.cu",),
           _h200("CUDA self-test and l2m-check; l2m-bench in the H200 run before it, the same day")),
    Design("memory write", "cuda", "memory-write", ("gated_memory_write", "gated_dense_update"),
           ("memory_write.cu", "dense_update.cu"),
           _h200("CUDA self-test, test suite, l2m-check and l2m-bench")),
    Design("memory attention", "cuda", "composed", ("memory_attention",),
           ("memory_attention.cu", "local_attention.cu"),
           _h200("CUDA self-test, test suite, l2m-check and l2m-bench"),
           note="the cuda top-k read, a local attention with its log-sum-exp and the cuda merge"),
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
    return lines
