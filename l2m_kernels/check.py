"""``l2m-check`` (``python -m l2m_kernels.check``): every op on every fused backend of this machine
against the float64 reference, forward and backward, at random and edge-case shapes.

Run it after installing on a new machine (GPU or CPU). For each op, each fused backend that can
serve it on ``--device`` and each dtype that backend supports, it draws inputs at a few shapes
(fixed edge cases plus random shapes seeded by ``--seed``), runs the public function with
``backend=<name>``, backpropagates random cotangents, and compares every output and every gradient
with :mod:`l2m_kernels`' reference evaluated in float64 on the same (rounded) inputs. The cases are
those the fuzz tests build and judge (:func:`l2m_kernels.fuzz.declared_case`,
:func:`l2m_kernels.fuzz.run_judged`) at the op's declared shapes. The error is the relative RMS
error ``rms(fused - ref) / rms(ref)`` (:func:`l2m_kernels.testing.rel_rms_error`), allowed the
per-dtype tolerance :data:`l2m_kernels.testing.TOLERANCE`, or more where the same computation in
PyTorch at the input dtype errs more (twice its error: :func:`l2m_kernels.fuzz.compare`).

Selections (top-k slots) may legitimately differ from the reference where scores tie up to
rounding, so the reads are judged as the test suite does: the slot ids must be a valid top-k of
the float64 scores (:func:`l2m_kernels.testing.assert_valid_topk`: in range, existing, never twice
in a row, in descending order, up to the rounding of float32 scores), the float64 scores of the
selected slots must match those of the float64 reference's own top-k ("selection"), and the
values, weights, lse and gradients are compared with the reference evaluated at the fused
selection.

Fused outputs are pre-filled with NaN (:func:`l2m_kernels.testing.poisoned_outputs`), so an
element a kernel forgets to write fails. A backend that raises is reported as FAIL with the
exception, and the check goes on. Exit status 1 when anything fails (or nothing could be checked).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
import traceback
import warnings
import zlib

import torch

from . import __version__, fuzz
from .backends import BACKENDS, OPS, triton_interpret_enabled
from .ops import registry
from .testing import TOLERANCE

FUSED_BACKENDS = ("cuda", "triton", "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in DTYPES}


# ------------------------------------------------------------------------------------------------
# Shapes: each op's declared edge cases (the first two also in --quick) and random shapes from
# --seed (l2m_kernels/ops/registry.py).
# ------------------------------------------------------------------------------------------------

def shape_label(op: str, p: dict) -> str:
    """A short description of a case's shape, for the table (the op's declared label)."""
    return (registry.OPS.get(op) or registry.SHARDED_OPS[op]).cases.label(p)


def build_cases(op: str, seed: int, quick: bool) -> list[dict]:
    """The shapes checked for ``op``: its declared edge cases (2 with --quick, else all) plus random
    shapes from its declared generator."""
    cases = (registry.OPS.get(op) or registry.SHARDED_OPS[op]).cases
    rng = random.Random(f"l2m-check/{seed}/{op}")
    edges = cases.edge[:2] if quick else cases.edge
    return [dict(edge) for edge in edges] + [cases.random(rng) for _ in range(1 if quick else 2)]


# ------------------------------------------------------------------------------------------------
# Running and reporting.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    op: str
    backend: str
    dtype: str
    shape: str
    status: str                         # "PASS", "FAIL" or "SKIP"
    max_error: float | None = None      # the error of the output or gradient nearest its limit
    worst: str | None = None            # that output or gradient
    tolerance: float | None = None      # the error it is allowed
    errors: dict = dataclasses.field(default_factory=dict)   # name -> error
    limits: dict = dataclasses.field(default_factory=dict)   # name -> allowed error
    message: str = ""                   # exception, mismatch or skip reason
    seconds: float = 0.0


def _describe_exception(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    frames = traceback.extract_tb(exc.__traceback__)
    if frames and not isinstance(exc, fuzz.FuzzFailure):
        # The innermost frame in the package (not in torch's dispatch machinery) says most.
        ours = [f for f in frames if "l2m_kernels" in f.filename
                and not f.filename.endswith(("check.py", "fuzz.py"))]
        frame = (ours or frames)[-1]
        where = os.path.relpath(frame.filename) if frame.filename.startswith(os.getcwd()) else frame.filename
        text += f" [at {where}:{frame.lineno} in {frame.name}]"
    return text


def _ratio(error: float, allowed: float) -> float:
    """How close to its limit an error is (NaN: beyond any)."""
    return math.inf if math.isnan(error) else error / allowed


def run_case(op: str, backend: str, dtype: torch.dtype, device: torch.device, params: dict,
             seed: int, case_index: int) -> Result:
    """Run one op/backend/dtype/shape as the fuzz tests judge a case (:func:`l2m_kernels.fuzz.run_judged`);
    any exception becomes a FAIL with its message."""
    dtype_name = str(dtype).replace("torch.", "")
    label = shape_label(op, params)
    # The same inputs for every backend: the data depend on op, shape and dtype only.
    data_seed = zlib.crc32(f"{seed}/{op}/{case_index}/{dtype_name}".encode())
    start = time.perf_counter()
    try:
        judged = fuzz.run_judged(fuzz.declared_case(op, backend, params, dtype, data_seed, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # a crashing backend is a failure, and the check goes on
        return Result(op, backend, dtype_name, label, "FAIL", tolerance=TOLERANCE[dtype],
                      message=_describe_exception(exc), seconds=time.perf_counter() - start)
    if not judged:
        return Result(op, backend, dtype_name, label, "FAIL", message="nothing was compared",
                      seconds=time.perf_counter() - start)
    worst = max(judged, key=lambda name: _ratio(judged[name].error, judged[name].allowed))
    failures = [f"{name}: {j.failure}" for name, j in judged.items() if j.failure is not None]
    return Result(op, backend, dtype_name, label, "FAIL" if failures else "PASS", judged[worst].error, worst,
                  judged[worst].allowed, {name: j.error for name, j in judged.items()},
                  {name: j.allowed for name, j in judged.items()}, message="; ".join(failures),
                  seconds=time.perf_counter() - start)


def plan_runs(ops, backend_names, dtypes, device, seed, quick):
    """(runs, skips): runs are (op, backend, dtype, params, case index); skips are SKIP Results."""
    runs, skips = [], []
    cases = {op: build_cases(op, seed, quick) for op in ops}
    for op in ops:
        for name in backend_names:
            backend = BACKENDS[name]
            wanted = [d for d in dtypes if d in backend.dtypes]
            if not wanted:
                skips.append(Result(op, name, "-", "-", "SKIP", message=f"{name} supports none of the "
                                    f"requested dtypes ({', '.join(str(d)[6:] for d in dtypes)})"))
                continue
            refused = {}
            for dtype in wanted:
                reasons = backend.not_supported_reasons(op, device, dtype)
                if reasons:
                    refused[dtype] = "; ".join(dict.fromkeys(reasons))
                    continue
                runs += [(op, name, dtype, params, i) for i, params in enumerate(cases[op])]
            if refused and len(set(refused.values())) == 1 and len(refused) == len(wanted):
                skips.append(Result(op, name, "all", "-", "SKIP", message=next(iter(refused.values()))))
            else:
                skips += [Result(op, name, str(d)[6:], "-", "SKIP", message=m) for d, m in refused.items()]
    return runs, skips


def _format_error(err) -> str:
    if err is None:
        return "-"
    return f"{err:.1e}" if math.isfinite(err) else str(err)


def _table(headers, rows) -> str:
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    widths[-1] = len(headers[-1])  # the last column (result and note) is left ragged
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _short(text: str, limit: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def summary_rows(results):
    """One row per (op, backend, dtype): the worst shape's error, PASS/FAIL counts, or SKIP."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r.op, r.backend, r.dtype), []).append(r)
    rows = []
    for (op, backend, dtype), group in groups.items():
        if group[0].status == "SKIP":
            rows.append([op, backend, dtype, "-", "-", "-", "-", "SKIP  " + _short(group[0].message)])
            continue
        measured = [r for r in group if r.max_error is not None]
        worst = max(measured, key=lambda r: _ratio(r.max_error, r.tolerance),
                    default=None)
        failed = [r for r in group if r.status == "FAIL"]
        crashed = [r for r in failed if r.max_error is None]
        if failed:
            verdict = f"FAIL  {len(failed)}/{len(group)} shapes"
            if crashed:
                verdict += f"; {_short(crashed[0].message, 80)}"
        else:
            verdict = "PASS"
        rows.append([op, backend, dtype, str(len(group)),
                     _format_error(worst.max_error) if worst else "-",
                     f"{worst.worst} @ {worst.shape}" if worst else "-",
                     _format_error(worst.tolerance if worst else group[0].tolerance), verdict])
    return rows


def detail_rows(results):
    rows = []
    for r in results:
        if r.status == "SKIP":
            verdict = "SKIP  " + _short(r.message)
        elif r.status == "FAIL" and r.max_error is None:
            verdict = "FAIL  " + _short(r.message, 80)
        else:
            verdict = r.status
        rows.append([r.op, r.backend, r.dtype, r.shape, _format_error(r.max_error), r.worst or "-",
                     _format_error(r.tolerance), verdict])
    return rows


def _json_number(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "inf" / "nan": strict JSON has no infinities
    return x


def _environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # pragma: no cover - depends on the installation
        triton_version = None
    return {
        "l2m_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "L2M_BACKEND": os.environ.get("L2M_BACKEND"),
    }


def _csv(kind, choices):
    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(bad) or '(none)'}; choose from "
                                             f"{', '.join(choices)}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2m-check",
        description="Check every l2m-kernels op on every fused backend of this machine against the "
                    "float64 reference (outputs and gradients, relative RMS error vs per-dtype "
                    "tolerance). Exit status 1 when anything fails.")
    parser.add_argument("--device", default=None,
                        help="device to check on (default: cuda if available, else cpu)")
    parser.add_argument("--ops", type=_csv("op", OPS + tuple(registry.SHARDED_OPS)), default=None,
                        help="comma-separated ops (default: all; with --distributed, the sharded ones): "
                             + ", ".join(OPS + tuple(registry.SHARDED_OPS)))
    parser.add_argument("--backends", type=_csv("backend", tuple(BACKENDS)), default=None,
                        help="comma-separated backends (default: the fused backends for the device; "
                             "'reference' may be named to check the reference itself)")
    parser.add_argument("--dtypes", type=_csv("dtype", tuple(DTYPE_NAMES)), default=list(DTYPE_NAMES),
                        help="comma-separated dtypes (default: all each backend supports)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random shapes and inputs")
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes per op (2 edge cases + 1 random instead of 4-5 + 2)")
    parser.add_argument("--json", metavar="PATH", help="write every result (per shape) as JSON")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="one table row per shape instead of per op/backend/dtype")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--distributed", type=int, metavar="P", default=None,
                        help="check the sharded ops of l2m_kernels.distributed instead, each on P gloo "
                             "processes of this machine against its single-device op run whole "
                             "(every dtype of --dtypes)")
    return parser


def _progress(total, enabled):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (extra "bench"): no bar then
        return None
    return tqdm(total=total, unit="case", file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=None if enabled else True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"l2m-check: --device {device} but no CUDA device is visible "
              f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})", file=sys.stderr)
        return 2
    if args.backends is None:
        backend_names = [n for n in FUSED_BACKENDS if device.type in BACKENDS[n].device_types]
    else:
        backend_names = args.backends
    dtypes = [DTYPE_NAMES[n] for n in args.dtypes]
    env = _environment(device)
    if args.distributed is not None:
        return _main_distributed(args, env)
    ops = [op for op in args.ops or OPS if op in OPS]

    print(f"l2m-check {__version__}: fused backends vs the float64 reference (relative RMS error of "
          f"every output and gradient)")
    print(f"device {device} ({env['device_name']}), torch {env['torch']}, triton {env['triton'] or 'none'}"
          + (", TRITON_INTERPRET=1" if triton_interpret_enabled() else "")
          + f"; seed {args.seed}{', quick' if args.quick else ''}")

    runs, skips = plan_runs(ops, backend_names, dtypes, device, args.seed, args.quick)
    results = list(skips)
    bar = _progress(len(runs), not args.no_progress)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # SPEC: no TF32
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fallback notices: the table says what ran
            for op, backend, dtype, params, index in runs:
                if bar is not None:
                    bar.set_description(f"{op} {backend} {str(dtype)[6:]}")
                results.append(run_case(op, backend, dtype, device, params, args.seed, index))
                if bar is not None:
                    bar.update()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if bar is not None:
            bar.close()

    # Table order: op, then backend, then dtype, as planned (skips in place).
    order = {op: i for i, op in enumerate(ops)}
    border = {b: i for i, b in enumerate(backend_names)}
    results.sort(key=lambda r: (order[r.op], border[r.backend]))
    return _report(args, env, results, bool(runs), "the float64 reference, tol = l2m_kernels.testing."
                   "TOLERANCE[dtype], or twice the error of the same computation in PyTorch at the input "
                   "dtype where that is larger")


def _main_distributed(args, env) -> int:
    """``--distributed P``: the sharded ops on P gloo processes (l2m_kernels.distributed.check)."""
    from .distributed import check as distributed_check

    ops = distributed_check.sharded_ops(args.ops)
    dtypes = [DTYPE_NAMES[n] for n in args.dtypes]
    print(f"l2m-check {__version__}: sharded ops on {args.distributed} gloo processes vs the single-device "
          f"op on the whole memory (slot ids identical; relative RMS error of every output and gradient)")
    print(f"torch {env['torch']}; seed {args.seed}{', quick' if args.quick else ''}")
    results = distributed_check.run(args.distributed, ops, dtypes, args.seed, args.quick) if ops and dtypes else []
    return _report(args, env, results, bool(results), "the single-device op run whole in the same process "
                   "(slot ids: identical), tol = l2m_kernels.testing.TOLERANCE[dtype]")


def _report(args, env, results, ran: bool, against: str) -> int:
    """Print the table and the failures, write ``--json``; the exit status."""
    headers_summary = ["op", "backend", "dtype", "shapes", "max err", "worst (output/grad @ shape)", "tol",
                       "result"]
    headers_detail = ["op", "backend", "dtype", "shape", "max err", "worst", "tol", "result"]
    print()
    if args.verbose:
        print(_table(headers_detail, detail_rows(results)))
    else:
        print(_table(headers_summary, summary_rows(results)))

    failed = [r for r in results if r.status == "FAIL"]
    passed = [r for r in results if r.status == "PASS"]
    if failed:
        print(f"\nfailures ({len(failed)}):")
        for r in failed:
            what = (f"{r.worst} error {_format_error(r.max_error)} > tol {_format_error(r.tolerance)}; all: "
                    + ", ".join(f"{n} {_format_error(e)} (tol {_format_error(r.limits[n])})"
                                for n, e in r.errors.items())
                    if r.max_error is not None else r.message)
            print(f"  {r.op} [{r.backend}, {r.dtype}] {r.shape}: {what}")
    print(f"\n{len(passed)} passed, {len(failed)} failed (op/backend/dtype/shape runs), "
          f"{len(results) - len(passed) - len(failed)} skipped; max err = relative RMS error against {against}")
    if not ran:
        print("nothing was checked: no requested backend can run on this device (see SKIP reasons)")

    if args.json:
        payload = {
            "environment": env,
            "seed": args.seed,
            "quick": args.quick,
            "tolerance": {str(d)[6:]: t for d, t in TOLERANCE.items()},
            "summary": {"passed": len(passed), "failed": len(failed),
                        "skipped": len(results) - len(passed) - len(failed), "ok": ran and not failed},
            "results": [{k: ({n: _json_number(e) for n, e in v.items()} if isinstance(v, dict) else _json_number(v))
                         for k, v in dataclasses.asdict(r).items()} for r in results],
        }
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"results written to {args.json}")
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
