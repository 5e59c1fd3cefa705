"""Standalone GPU check of the CUDA merge kernels, independent of the l2m_kernels Python layer.

Builds csrc/cuda/*.cu + bindings.cpp with torch.utils.cpp_extension.load (or imports an already
built module with --module), then checks the four low-level functions against the float64
reference (l2m_kernels/ops/merge/reference.py, loaded by path) over dtypes, odd and large D,
empty and single rows, misaligned row starts (scalar path and peeled vector path), -inf and NaN
rows, extreme gates, and outputs pre-filled with NaN. Optionally times the kernels (--bench) and
runs one launch with more than 2**31 rows (--huge, ~52 GB of GPU memory).

    python csrc/cuda/tests/gpu_selftest.py [--quick] [--bench] [--huge] [--json out.json]
    compute-sanitizer --tool memcheck python csrc/cuda/tests/gpu_selftest.py --quick

Not collected by pytest (no test_ prefix) and not compiled by setup.py (it globs csrc/cuda/*.cu).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
CUDA_DIR = REPO_ROOT / "csrc" / "cuda"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NAN = float("nan")
NEG_INF = float("-inf")


def load_reference():
    path = REPO_ROOT / "l2m_kernels" / "ops" / "merge" / "reference.py"
    spec = importlib.util.spec_from_file_location("l2m_merge_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_extension(module_name: str | None, build_dir: str | None, verbose: bool):
    if module_name:
        return importlib.import_module(module_name)
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    sources = sorted(str(p) for p in CUDA_DIR.glob("*.cu")) + [str(CUDA_DIR / "bindings.cpp")]
    started = time.perf_counter()
    module = load(
        name="l2m_merge_cuda_selftest",
        sources=sources,
        # load() writes flags into build.ninja unquoted (setup.py's BuildExtension quotes them),
        # so the string-literal macro is shell-quoted here.
        extra_cflags=["-O3", "-std=c++17", shlex.quote(f'-DL2M_CUDA_ARCHS="{major}.{minor}"')],
        # The nvcc flags setup.py uses (no --use_fast_math: the sources refuse it).
        extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"],
        build_directory=build_dir,
        verbose=verbose,
    )
    print(f"built/loaded extension in {time.perf_counter() - started:.1f}s "
          f"(CUDA_ARCHS={module.CUDA_ARCHS}, CUDART_VERSION={module.CUDART_VERSION})")
    return module


def rel_rms(actual: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> float:
    """rms(actual - expected) / max(rms(expected), scale) in float64; inf if NaN positions differ.

    `scale` floors the denominator for quantities that can cancel to near zero in a row (d_lse:
    dlse + wb * (pa - pb)); with one or two rows their relative error is that of single values.
    """
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    if a.numel() == 0:
        return 0.0
    if not torch.equal(a.isnan(), e.isnan()):
        return math.inf
    same = (a == e) | (a.isnan() & e.isnan())
    diff = torch.where(same, torch.zeros_like(a), a - e)
    if not torch.isfinite(diff).all():
        return math.inf
    finite_e = torch.where(torch.isfinite(e), e, torch.zeros_like(e))
    denom = max(finite_e.square().mean().sqrt().item(), scale)
    num = diff.square().mean().sqrt().item()
    return num / denom if denom else num


def nan_filled(shape, dtype, *, misalign=0):
    """NaN-filled output buffer; misalign > 0 shifts its start by that many elements."""
    flat = torch.full((math.prod(shape) + misalign,), NAN, dtype=dtype, device="cuda")
    return flat[misalign:].view(shape)


def placed(tensor: torch.Tensor, misalign: int) -> torch.Tensor:
    """A contiguous copy of `tensor` whose data starts `misalign` elements after an allocation."""
    flat = torch.empty(tensor.numel() + misalign, dtype=tensor.dtype, device="cuda")
    view = flat[misalign:].view(tensor.shape)
    view.copy_(tensor)
    return view


class Checker:
    def __init__(self, ext, ref):
        self.ext, self.ref = ext, ref
        self.failures: list[str] = []
        self.cases = 0
        self.worst: dict[str, float] = {}

    def check(self, label: str, actual: torch.Tensor, expected: torch.Tensor, dtype,
              baseline: torch.Tensor | None = None, baseline_factor: float = 2.0,
              scale: float = 0.0):
        """Within the dtype's tolerance, or (flash-attention's rule) within twice the error of
        the same reference computed by PyTorch at the input dtype (`baseline`): with one or two
        rows, a single rounding or float32 accumulation over D can exceed the table on its own."""
        err = rel_rms(actual, expected, scale)
        limit = TOLERANCE[dtype]
        if baseline is not None:
            baseline_err = rel_rms(baseline, expected, scale)
            if math.isfinite(baseline_err):
                limit = max(limit, baseline_factor * baseline_err)
        key = f"{str(dtype).removeprefix('torch.')}"
        self.worst[key] = max(self.worst.get(key, 0.0), err)
        if not err <= limit:
            self.failures.append(f"{label}: rel RMS {err:.3e} > {limit:.1e}")

    # ---- merge_attention -----------------------------------------------------------------
    def merge_attention(self, rows, head_dim, dtype, *, misalign=(0, 0, 0), special_rows=False):
        self.cases += 1
        label = f"merge_attention R={rows} D={head_dim} {dtype} misalign={misalign}"
        out_a = torch.randn(rows, head_dim, device="cuda").to(dtype)
        out_b = torch.randn(rows, head_dim, device="cuda").to(dtype)
        lse_a = torch.randn(rows, device="cuda") * 4
        lse_b = torch.randn(rows, device="cuda") * 4
        if special_rows and rows >= 6:
            lse_a[0] = NEG_INF                     # side a empty
            lse_b[1] = NEG_INF                     # side b empty
            lse_a[2] = NEG_INF; lse_b[2] = NEG_INF  # both empty -> out 0, lse -inf
            lse_a[3] = 80.0; lse_b[3] = -80.0      # one side dominates
            lse_a[4] = NAN                         # NaN row (this row only)
            lse_b[5] = NAN
        dout = torch.randn(rows, head_dim, device="cuda").to(dtype)
        dlse = torch.randn(rows, device="cuda")

        ma, mb, mo = misalign
        out_a_k, out_b_k = placed(out_a, ma), placed(out_b, mb)
        out_k = nan_filled((rows, head_dim), dtype, misalign=mo)
        lse_k = nan_filled((rows,), torch.float32)
        self.ext.merge_attention_fwd(out_a_k, lse_a, out_b_k, lse_b, out_k, lse_k)

        # float64 reference with autograd
        a64 = out_a.double().requires_grad_(); b64 = out_b.double().requires_grad_()
        la64 = lse_a.double().requires_grad_(); lb64 = lse_b.double().requires_grad_()
        out_ref, lse_ref = self.ref.merge_attention_ref(a64, la64, b64, lb64)
        self.check(label + " out", out_k, out_ref, dtype)
        self.check(label + " lse", lse_k, lse_ref, torch.float32)
        if special_rows and rows >= 6:
            if not (out_k[2] == 0).all() or lse_k[2].item() != NEG_INF:
                self.failures.append(f"{label}: both -inf row is not out=0, lse=-inf")
            if not (out_k[4].isnan().all() and lse_k[4].isnan() and out_k[5].isnan().all()):
                self.failures.append(f"{label}: NaN row did not give NaN")
        finite_rows = lse_ref.isfinite() | lse_ref.isneginf()
        if rows and not torch.isfinite(out_k[finite_rows.cuda()]).all():
            self.failures.append(f"{label}: non-finite output in a finite row")

        # backward (kernel gets the kernel's own forward lse, as in autograd)
        g_out_a = nan_filled((rows, head_dim), dtype, misalign=ma)
        g_out_b = nan_filled((rows, head_dim), dtype, misalign=mb)
        g_lse_a = nan_filled((rows,), torch.float32)
        g_lse_b = nan_filled((rows,), torch.float32)
        self.ext.merge_attention_bwd(placed(dout, mo), dlse, out_a_k, lse_a, out_b_k, lse_b, lse_k,
                                     g_out_a, g_lse_a, g_out_b, g_lse_b)
        if rows:
            torch.autograd.backward((out_ref, lse_ref), (dout.double(), dlse.double()))
            # the same reference run by PyTorch at the input dtype: the baseline error
            leaves = [t.clone().requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
            low = self.ref.merge_attention_ref(*leaves)
            torch.autograd.backward(low, (dout, dlse))
            grads = {"d_out_a": (g_out_a, a64.grad, dtype, leaves[0].grad),
                     "d_out_b": (g_out_b, b64.grad, dtype, leaves[2].grad),
                     "d_lse_a": (g_lse_a, la64.grad, torch.float32, leaves[1].grad),
                     "d_lse_b": (g_lse_b, lb64.grad, torch.float32, leaves[3].grad)}
            keep = torch.ones(rows, dtype=torch.bool, device="cuda")
            if special_rows and rows >= 6:
                keep[4:6] = False  # NaN rows: the reference's gradient NaN pattern is its own affair
                for name, (actual, _, _, _) in grads.items():
                    if not actual[4:6].isnan().all():
                        self.failures.append(f"{label}: {name} of a NaN row is not NaN")
                for name in ("d_out_a", "d_lse_a", "d_out_b", "d_lse_b"):
                    if not (grads[name][0][2] == 0).all():
                        self.failures.append(f"{label}: {name} of the both -inf row is not 0")
            dlse_scale = dlse[keep].double().square().mean().sqrt().item()
            for name, (actual, expected, check_dtype, baseline) in grads.items():
                # d_lse = w * (dlse + ...) can cancel to ~0 in a row: judge it on dlse's scale.
                self.check(f"{label} {name}", actual[keep], expected[keep], check_dtype,
                           baseline[keep], scale=dlse_scale if "lse" in name else 0.0)
        torch.cuda.synchronize()

    # ---- gated_merge -----------------------------------------------------------------------
    def gated_merge(self, rows, head_dim, dtype, *, misalign=(0, 0, 0), special_rows=False):
        self.cases += 1
        label = f"gated_merge R={rows} D={head_dim} {dtype} misalign={misalign}"
        local = torch.randn(rows, head_dim, device="cuda").to(dtype)
        memory = torch.randn(rows, head_dim, device="cuda").to(dtype)
        gate = (torch.randn(rows, device="cuda") * 3).to(dtype)
        if special_rows and rows >= 4:
            gate[0] = 100.0; gate[1] = -100.0; gate[2] = 0.0; gate[3] = NAN
        dout = torch.randn(rows, head_dim, device="cuda").to(dtype)

        ml, mm, mo = misalign
        local_k, memory_k = placed(local, ml), placed(memory, mm)
        out_k = nan_filled((rows, head_dim), dtype, misalign=mo)
        self.ext.gated_merge_fwd(local_k, memory_k, gate, out_k)

        l64 = local.double().requires_grad_(); m64 = memory.double().requires_grad_()
        g64 = gate.double().requires_grad_()
        out_ref = self.ref.gated_merge_ref(l64, m64, g64.unsqueeze(-1))
        self.check(label + " out", out_k, out_ref, dtype)

        d_local = nan_filled((rows, head_dim), dtype, misalign=ml)
        d_mem = nan_filled((rows, head_dim), dtype, misalign=mm)
        d_gate = nan_filled((rows,), torch.float32)
        self.ext.gated_merge_bwd(placed(dout, mo), local_k, memory_k, gate, d_local, d_mem, d_gate)
        if rows:
            out_ref.backward(dout.double())
            leaves = [t.clone().requires_grad_() for t in (local, memory, gate)]
            self.ref.gated_merge_ref(leaves[0], leaves[1], leaves[2].unsqueeze(-1)).backward(dout)
            self.check(label + " d_local", d_local, l64.grad, dtype, leaves[0].grad)
            self.check(label + " d_mem", d_mem, m64.grad, dtype, leaves[1].grad)
            # d_gate is float32 from the same (rounded) inputs the reference sees; PyTorch's own
            # d_gate comes back in the gate's dtype, so it is no baseline for half types.
            self.check(label + " d_gate", d_gate, g64.grad, torch.float32,
                       leaves[2].grad if dtype == torch.float32 else None)
        torch.cuda.synchronize()


def run_checks(ext, ref, quick: bool) -> Checker:
    checker = Checker(ext, ref)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    head_dims = (1, 2, 3, 7, 8, 16, 63, 64, 129) if quick else (
        1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 255, 256,
        257, 512, 1000, 1024, 4096)
    row_counts = (0, 1, 6, 37) if quick else (0, 1, 2, 6, 37, 300, 2049)
    # misalignment (elements) of the three (R, D) tensors of a call: all aligned; all shifted
    # alike (vector path with peeled head/tail); shifted differently (scalar path).
    misaligns = ((0, 0, 0), (1, 1, 1), (0, 1, 3), (3, 3, 3))
    for dtype in dtypes:
        for head_dim in head_dims:
            for rows in row_counts:
                for misalign in misaligns if rows in (6, 37) else ((0, 0, 0),):
                    special = rows >= 6 and misalign == (0, 0, 0)
                    checker.merge_attention(rows, head_dim, dtype, misalign=misalign,
                                            special_rows=special)
                    checker.gated_merge(rows, head_dim, dtype, misalign=misalign,
                                        special_rows=special)
    # large row count through the grid-stride loop (more rows than resident threads)
    for dtype in dtypes:
        checker.merge_attention(300_000, 5, dtype)
        checker.gated_merge(300_000, 5, dtype)
        if not quick:
            checker.merge_attention(70_000, 64, dtype, special_rows=True)
            checker.gated_merge(70_000, 64, dtype, special_rows=True)
    return checker


def check_errors(ext) -> list[str]:
    """Bad calls raise (and never launch)."""
    problems = []
    x = torch.randn(4, 8, device="cuda")
    lse = torch.randn(4, device="cuda")
    cases = {
        "cpu tensor": lambda: ext.gated_merge_fwd(x.cpu(), x.cpu(), lse.cpu(), x.cpu()),
        "float64": lambda: ext.gated_merge_fwd(x.double(), x.double(), lse.double(), x.double()),
        "shape": lambda: ext.merge_attention_fwd(x, lse, x[:3], lse, torch.empty_like(x), lse),
        "non-contiguous": lambda: ext.gated_merge_fwd(x.t(), x.t(), torch.randn(8, device="cuda"),
                                                      torch.empty(8, 4, device="cuda")),
        "lse dtype": lambda: ext.merge_attention_fwd(x.half(), lse.half(), x.half(), lse.half(),
                                                     x.half(), lse.half()),
    }
    for name, call in cases.items():
        try:
            call()
        except (RuntimeError, ValueError, TypeError) as error:
            print(f"  bad call '{name}' raised {type(error).__name__}: {str(error).splitlines()[0]}")
        else:
            problems.append(f"bad call '{name}' did not raise")
    return problems


def bench(ext, ref) -> list[dict]:
    try:
        from triton.testing import do_bench
    except ImportError:  # pragma: no cover
        do_bench = None

    def timed(fn):
        if do_bench is not None:
            return do_bench(fn, warmup=50, rep=300) * 1e-3
        for _ in range(10):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e-3 / 100

    results = []
    shapes = [("attn-gpu B8 H8 T1024 D64", 8 * 8 * 1024, 64), ("R=1M D=128", 1 << 20, 128),
              ("R=4M D=64", 1 << 22, 64), ("R=1M D=63 (peeled)", 1 << 20, 63)]
    for dtype in (torch.bfloat16, torch.float32):
        for name, rows, head_dim in shapes:
            size = dtype.itemsize
            a = torch.randn(rows, head_dim, device="cuda").to(dtype)
            b = torch.randn(rows, head_dim, device="cuda").to(dtype)
            c = torch.randn(rows, head_dim, device="cuda").to(dtype)
            la, lb = torch.randn(rows, device="cuda"), torch.randn(rows, device="cuda")
            gate = torch.randn(rows, device="cuda").to(dtype)
            out, out2 = torch.empty_like(a), torch.empty_like(a)
            lse, g1, g2 = (torch.empty(rows, device="cuda") for _ in range(3))
            row_bytes = rows * head_dim * size
            ops = {
                "merge_attention_fwd": (lambda: ext.merge_attention_fwd(a, la, b, lb, out, lse),
                                        3 * row_bytes + 3 * rows * 4,
                                        lambda: ref.merge_attention_ref(a, la, b, lb)),
                "merge_attention_bwd": (lambda: ext.merge_attention_bwd(c, la, a, la, b, lb, lse, out,
                                                                        g1, out2, g2),
                                        5 * row_bytes + 6 * rows * 4, None),
                "gated_merge_fwd": (lambda: ext.gated_merge_fwd(a, b, gate, out),
                                    3 * row_bytes + rows * size,
                                    lambda: ref.gated_merge_ref(a, b, gate.unsqueeze(-1))),
                "gated_merge_bwd": (lambda: ext.gated_merge_bwd(c, a, b, gate, out, out2, g1),
                                    5 * row_bytes + rows * (size + 4), None),
            }
            ext.merge_attention_fwd(a, la, b, lb, out, lse)  # a real lse for the backward
            copy_seconds = timed(lambda: out.copy_(a))
            for op, (fn, moved, reference_fn) in ops.items():
                seconds = timed(fn)
                entry = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "op": op,
                         "rows": rows, "head_dim": head_dim, "us": seconds * 1e6,
                         "GBps": moved / seconds / 1e9,
                         "copy_GBps": 2 * row_bytes / copy_seconds / 1e9}
                if reference_fn is not None:
                    entry["torch_eager_us"] = timed(reference_fn) * 1e6
                results.append(entry)
                print(f"  {op:22s} {entry['dtype']:8s} {name:26s} {entry['us']:9.1f} us "
                      f"{entry['GBps']:7.0f} GB/s (copy {entry['copy_GBps']:.0f} GB/s)"
                      + (f"  torch eager {entry['torch_eager_us']:.1f} us"
                         if "torch_eager_us" in entry else ""))
            del a, b, c, out, out2
            torch.cuda.empty_cache()
    return results


def huge_rows(ext) -> list[str]:
    """One merge_attention_fwd over 2**31 + 17 rows (bfloat16, D=2): int64 rows and offsets."""
    rows, head_dim = (1 << 31) + 17, 2
    problems = []
    out_a = torch.ones(rows, head_dim, dtype=torch.bfloat16, device="cuda")
    out_b = torch.full((rows, head_dim), 3.0, dtype=torch.bfloat16, device="cuda")
    lse_a = torch.zeros(rows, device="cuda")
    lse_b = torch.zeros(rows, device="cuda")
    lse_b[-5:] = NEG_INF
    out = torch.full_like(out_a, NAN)
    lse = torch.full_like(lse_a, NAN)
    torch.cuda.synchronize()
    started = time.perf_counter()
    ext.merge_attention_fwd(out_a, lse_a, out_b, lse_b, out, lse)
    torch.cuda.synchronize()
    print(f"  huge: {rows} rows in {time.perf_counter() - started:.3f}s")
    del out_a, out_b, lse_a, lse_b  # room for the comparisons' temporaries
    torch.cuda.empty_cache()
    # equal lse: out = (1 + 3) / 2 = 2, lse = log 2; last 5 rows: out = 1, lse = 0
    if not bool((out[:-5] == 2).all()):
        problems.append("huge: wrong values in the body")
    if not bool((out[-5:] == 1).all()) or not bool((lse[-5:] == 0).all()):
        problems.append("huge: wrong values in the last rows")
    if not bool(((lse[:-5] - math.log(2)).abs() < 1e-6).all()):
        problems.append("huge: wrong lse")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", help="import this built module instead of JIT-building, "
                                         "e.g. l2m_kernels._C_cuda")
    parser.add_argument("--build-dir", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--huge", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--errors-only", action="store_true", help="only the bad-call checks")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ext = load_extension(args.module, args.build_dir, args.verbose)
    ref = load_reference()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    if args.errors_only:
        problems = check_errors(ext)
        print("\n".join(problems) or "bad calls: all raised")
        return 1 if problems else 0
    started = time.perf_counter()
    checker = run_checks(ext, ref, args.quick)
    problems = checker.failures + check_errors(ext)
    print(f"correctness: {checker.cases} cases in {time.perf_counter() - started:.1f}s, "
          f"{len(problems)} problems; worst rel RMS per dtype: "
          + ", ".join(f"{k} {v:.2e}" for k, v in checker.worst.items()))
    report.update(cases=checker.cases, worst_rel_rms=checker.worst, problems=problems)
    if args.huge:
        problems += huge_rows(ext)
    if args.bench:
        report["bench"] = bench(ext, ref)
    for problem in problems[:50]:
        print("FAIL", problem)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
