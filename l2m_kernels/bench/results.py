"""Benchmark results as data: one row per measurement, and the table generated from the rows.

The repository keeps every measured row in ``benchmarks/results.jsonl`` (one JSON object per line,
oldest first) and ``benchmarks/RESULTS.md`` is generated from it. ``l2m-bench`` writes its rows in
this format (``suite.json``, ``rows``); to record a run:

    python -m l2m_kernels.bench.results add OUT/suite.json [--check-json OUT/check.json]
                                            [--step NAME=SUMMARY ...] [--results FILE] [--markdown FILE]
    python -m l2m_kernels.bench.results render [--results FILE] [--markdown FILE]
    python -m l2m_kernels.bench.results check  [--results FILE] [--markdown FILE]
    python -m l2m_kernels.bench.results compare A/suite.json B/suite.json [--tolerance 0.15]

``add`` appends the run's rows (and, with ``--check-json``, one row per op, backend and dtype of an
``l2m-check --json`` file; with ``--step``, one row per named step of a run, e.g. the test suite's
summary) to the results file and regenerates the Markdown; ``render`` regenerates it; ``check``
exits 1 when a row lacks a field or the Markdown is not what the rows generate; ``compare`` puts
the speedups of two runs of the same suite side by side (over the eager and the compiled
reference, per op, shape and variant) and exits 1 when one differs by more than ``--tolerance``
(15%): how far a run's ratios can be trusted.

A row (:data:`FIELDS`, every key present, ``None`` where not measured):

- ``date`` (``YYYY-MM-DD``, UTC), ``device`` (the card, or the processor with its thread count),
  ``torch``, ``triton``, ``cuda``, ``l2m_kernels`` (versions), ``commit`` (of the measured code);
- ``run`` (what the run was), ``source`` (the command), ``conditions`` (machine load and the like);
- ``op``, ``shape``, ``dtype``, ``variant`` (the benchmark's name for what ran: a fused backend,
  ``reference``, ``reference+compile``, a peer such as ``bare matmul (scores)``), ``kind``
  (:data:`KINDS`: ``fused``, ``reference eager``, ``reference compiled``, ``peer``; ``check`` for a
  correctness run and ``metric`` for a measurement that is not a time, both in ``metrics``);
- ``fwd_ms``, ``bwd_ms``, ``both_ms`` (medians; ``both`` is forward + backward timed together) and
  ``fwd_spread_ms``, ``bwd_spread_ms``, ``both_spread_ms`` ([fastest, slowest] of the timed runs);
- ``peak_mb`` (peak memory the call added, MiB), ``fwd_gbps``, ``fwd_gflops``, ``ceilings`` (copy
  GB/s and matmul GFLOP/s measured in the same run, interleaved with the row's comparison where
  ``l2m-bench`` measured them so), ``floor_multiple`` (the forward's time over its hardware floor:
  the larger of its bytes at the copy ceiling and its flops at the matmul ceiling of its dtype),
  ``both_floor_multiple`` (forward + backward over the floor of both);
- ``metrics`` (named values of ``check`` and ``metric`` rows), ``notes``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_FILE = REPO_ROOT / "benchmarks" / "results.jsonl"
MARKDOWN_FILE = REPO_ROOT / "benchmarks" / "RESULTS.md"
COMMAND = "python -m l2m_kernels.bench.results"

FIELDS = ("date", "device", "torch", "triton", "cuda", "l2m_kernels", "commit", "run", "source", "conditions",
          "op", "shape", "dtype", "variant", "kind", "fwd_ms", "bwd_ms", "both_ms", "fwd_spread_ms",
          "bwd_spread_ms", "both_spread_ms", "peak_mb", "fwd_gbps", "fwd_gflops", "ceilings", "floor_multiple",
          "both_floor_multiple", "metrics", "notes")
KINDS = ("fused", "reference eager", "reference compiled", "peer", "check", "metric")
TIMED_KINDS = KINDS[:4]
_TIMES = ("fwd_ms", "bwd_ms", "both_ms")
_NUMBERS = _TIMES + ("peak_mb", "fwd_gbps", "fwd_gflops", "floor_multiple", "both_floor_multiple")
_BACKENDS = ("cpu", "triton", "cuda")


# ---- making rows -----------------------------------------------------------------------------

def variant_kind(variant: str) -> str:
    """``fused`` for a variant named after fused backends (``cuda``, ``triton sparse_grad``,
    ``cpu inplace (fwd)``, ``cpu+triton``), the two reference kinds, else ``peer``."""
    if variant.startswith("reference+compile"):
        return "reference compiled"
    if variant.startswith("reference"):
        return "reference eager"
    if all(part in _BACKENDS for part in variant.split()[0].split("+")):
        return "fused"
    return "peer"


def floor_multiple(fwd_gbps, fwd_gflops, dtype: str, ceilings: dict):
    """The forward's time over its hardware floor, from its bandwidth and flop rate and the ceilings
    of the same run (the matmul ceiling of ``dtype`` where measured, else float32's); None when the
    benchmark counts neither bytes nor flops."""
    ratios = []
    if fwd_gbps and ceilings.get("copy_gbps"):
        ratios.append(ceilings["copy_gbps"] / fwd_gbps)
    matmul = ceilings.get(f"matmul_gflops_{dtype}") or ceilings.get("matmul_gflops_float32")
    if fwd_gflops and matmul:
        ratios.append(matmul / fwd_gflops)
    return min(ratios) if ratios else None


def _git_commit() -> str | None:
    """The checkout's commit, ``-dirty`` when its package or kernel sources differ from it; None
    outside a git checkout (an installed package, a copied tree)."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(REPO_ROOT), *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", "l2m_kernels", "csrc")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def environment(device) -> dict:
    """Date (UTC), device name, versions and commit of a run on ``device`` (a torch.device)."""
    import torch

    import l2m_kernels
    from l2m_kernels import benchmark as bm

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"date": time.strftime("%Y-%m-%d", time.gmtime()), "device": bm.device_name(device),
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "l2m_kernels": l2m_kernels.__version__, "commit": os.environ.get("L2M_COMMIT") or _git_commit()}


def _number(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def make_row(env: dict, **fields) -> dict:
    """A row with every field of :data:`FIELDS` in order: ``env`` (:func:`environment`), then
    ``fields``; ``kind`` from the variant, ``floor_multiple`` from the rates and ceilings unless given."""
    row = dict.fromkeys(FIELDS)
    row.update({k: env.get(k) for k in FIELDS[:7]})
    row.update(ceilings={}, metrics={}, notes="", conditions="")
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"not row fields: {sorted(unknown)}")
    row.update(fields)
    if row["kind"] is None:
        row["kind"] = variant_kind(row["variant"])
    for name in _NUMBERS:
        row[name] = _number(row[name])
    if row["floor_multiple"] is None:
        row["floor_multiple"] = floor_multiple(row["fwd_gbps"], row["fwd_gflops"], row["dtype"] or "", row["ceilings"])
    return row


def bench_rows(rows: list, ceilings: dict, env: dict, *, run: str, source: str, conditions: str = "") -> list:
    """The rows of :class:`l2m_kernels.benchmark.Row` objects measured in one run."""
    return [make_row(env, run=run, source=source, conditions=conditions, op=r.op, shape=r.shape, dtype=r.dtype,
                     variant=r.variant, fwd_ms=r.fwd_ms, bwd_ms=r.bwd_ms, both_ms=r.both_ms,
                     fwd_spread_ms=r.fwd_spread_ms, bwd_spread_ms=r.bwd_spread_ms, both_spread_ms=r.both_spread_ms,
                     peak_mb=r.peak_mb, fwd_gbps=r.fwd_gbps, fwd_gflops=r.fwd_gflops,
                     ceilings=dict(r.ceilings or ceilings), floor_multiple=r.floor_multiple,
                     both_floor_multiple=r.both_floor_multiple, notes=r.note or "")
            for r in rows]


def check_rows(payload: dict, env: dict, *, run: str, source: str) -> list:
    """One ``check`` row per op, backend and dtype of an ``l2m-check --json`` payload: shapes
    checked, failed and skipped, and the largest relative RMS error against the float64 reference."""
    groups: dict = {}
    for result in payload.get("results", []):
        groups.setdefault((result["op"], result["backend"], result["dtype"]), []).append(result)
    rows = []
    for (op, backend, dtype), group in groups.items():
        errors = [r["max_error"] for r in group if isinstance(r.get("max_error"), (int, float))]
        failed = [r for r in group if r["status"] == "FAIL"]
        skipped = [r for r in group if r["status"] == "SKIP"]
        metrics = {"shapes": len(group), "failed": len(failed), "skipped": len(skipped)}
        if errors:
            metrics["max_rel_rms"] = max(errors)
        notes = "; ".join(dict.fromkeys((r.get("message") or "")[:160] for r in failed + skipped if r.get("message")))
        rows.append(make_row(env, run=run, source=source, op=op, shape="l2m-check cases", dtype=dtype,
                             variant=backend, kind="check", metrics=metrics, notes=notes))
    return rows


def step_rows(steps: list, env: dict, *, run: str, source: str) -> list:
    """One ``check`` row per ``NAME=SUMMARY`` of a run's steps (build, self-test, tests)."""
    rows = []
    for step in steps:
        name, _, summary = step.partition("=")
        rows.append(make_row(env, run=run, source=source, op=name.strip(), shape="-", dtype="-", variant="-",
                             kind="check", notes=summary.strip()))
    return rows


# ---- comparing runs ---------------------------------------------------------------------------

def speedups(rows: list) -> dict:
    """``{(op, shape, dtype, variant, baseline): speedup}`` of a run's rows over its eager
    (``reference``) and compiled (``reference+compile``) reference, forward + backward where both
    were timed so, else forward."""
    refs = {(r["op"], r["shape"], r["dtype"], r["variant"]): r for r in rows
            if r["variant"] in ("reference", "reference+compile")}
    out = {}
    for row in rows:
        if row["kind"] not in TIMED_KINDS or row["variant"] == "reference":
            continue
        for baseline in ("reference", "reference+compile"):
            ref = refs.get((row["op"], row["shape"], row["dtype"], baseline))
            if ref is None or ref is row:
                continue
            ratio = _time_ratio(ref, row)
            if ratio is not None:
                out[(row["op"], row["shape"], row["dtype"], row["variant"], baseline)] = ratio[0]
    return out


def _time_ratio(base: dict, row: dict):
    """``(base's time / row's time, forward_only)``, forward + backward where both have it, else
    forward; None where they do not compare."""
    for name in ("both_ms", "fwd_ms"):
        if base[name] and row[name]:
            return base[name] / row[name], name == "fwd_ms"
    return None


def compare_runs(first: list, second: list, tolerance: float = 0.15) -> tuple:
    """``(markdown table, differing)``: the speedups of two runs side by side, and the keys whose
    speedups differ by more than ``tolerance`` (relative to the smaller)."""
    a, b = speedups(first), speedups(second)
    lines = ["| op | shape | variant | over | first | second | difference |", "|---|---|---|---|---|---|---|"]
    differing = []
    for key in [k for k in a if k in b]:
        op, shape, _, variant, baseline = key
        diff = max(a[key], b[key]) / min(a[key], b[key]) - 1
        if diff > tolerance:
            differing.append(key)
        lines.append(f"| {op} | {_cell(shape)} | {variant} | {'eager' if baseline == 'reference' else 'compiled'} | "
                     f"{a[key]:.2f}x | {b[key]:.2f}x | {100 * diff:.0f}%{' **over**' if diff > tolerance else ''} |")
    return "\n".join(lines), differing


# ---- checking rows ----------------------------------------------------------------------------

def problems(row: dict) -> list:
    """What is wrong with a row: missing or unknown fields, values of the wrong type."""
    found = [f"missing field {name!r}" for name in FIELDS if name not in row]
    found += [f"unknown field {name!r}" for name in row if name not in FIELDS]
    if found:
        return found
    if not (isinstance(row["date"], str) and re.fullmatch(r"\d{4}-\d\d-\d\d", row["date"])):
        found.append(f"date {row['date']!r} is not YYYY-MM-DD")
    for name in ("device", "run", "source", "op", "shape", "dtype", "variant"):
        if not (isinstance(row[name], str) and row[name]):
            found.append(f"{name} must be a non-empty string")
    for name in ("torch", "triton", "cuda", "l2m_kernels", "commit"):
        if row[name] is not None and not isinstance(row[name], str):
            found.append(f"{name} must be a string or null")
    if row["kind"] not in KINDS:
        found.append(f"kind {row['kind']!r} is not one of {KINDS}")
    for name in _NUMBERS:
        value = row[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            found.append(f"{name} must be a non-negative number or null")
    for name in ("fwd_spread_ms", "bwd_spread_ms", "both_spread_ms"):
        spread = row[name]
        if spread is not None and not (isinstance(spread, list) and len(spread) == 2
                                       and all(isinstance(x, (int, float)) for x in spread) and spread[0] <= spread[1]):
            found.append(f"{name} must be [fastest, slowest] or null")
    for name in ("ceilings", "metrics"):
        if not isinstance(row[name], dict):
            found.append(f"{name} must be an object")
    for name in ("conditions", "notes"):
        if not isinstance(row[name], str):
            found.append(f"{name} must be a string")
    if not found:
        measured = any(row[name] is not None for name in _NUMBERS) or row["metrics"]
        if not measured and not row["notes"]:
            found.append("no measurement and no note saying why")
    return found


def load(path=RESULTS_FILE) -> list:
    """The rows of a results file (empty lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append(rows: list, path=RESULTS_FILE) -> None:
    bad = {i: p for i, row in enumerate(rows) if (p := problems(row))}
    if bad:
        raise ValueError(f"rows with problems, none appended: {bad}")
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---- the table ---------------------------------------------------------------------------------

_CEILING_LABELS = {"copy_gbps": "copy {} GB/s", "matmul_gflops_float32": "float32 matmul {} GFLOP/s",
                   "matmul_gflops_bfloat16": "bfloat16 matmul {} GFLOP/s"}
_RUN_KEYS = ("run", "source", "conditions", "torch", "triton", "cuda", "l2m_kernels", "commit")


def _fmt(x, digits=3) -> str:
    """``digits`` decimals at most (significant digits below 1), trailing zeros dropped."""
    if x is None:
        return "-"
    if isinstance(x, float) and abs(x) < 1:
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}".rstrip("0").rstrip(".") if isinstance(x, float) else str(x)


def _spread(row: dict, name: str) -> str:
    spread = row[f"{name}_spread_ms"]
    return "-" if spread is None else f"{_fmt(spread[0])}–{_fmt(spread[1])}"


def _speedup(row: dict, rows: list) -> str:
    """Against the eager reference (variant ``reference``) of the same run, op, shape and dtype."""
    if row["kind"] not in TIMED_KINDS or row["variant"] == "reference":
        return "-"
    base = next((r for r in rows if r["variant"] == "reference" and
                 all(r[k] == row[k] for k in ("op", "shape", "dtype"))), None)
    if base is None:
        return "-"
    ratio = _time_ratio(base, row)
    return "-" if ratio is None else f"{ratio[0]:.2f}x" + (" (fwd)" if ratio[1] else "")


def _metrics(row: dict) -> str:
    return ", ".join(f"{k} {_fmt(v, 4) if isinstance(v, float) else v}" for k, v in row["metrics"].items()) or "-"


_COLUMNS = (  # (header, cell), a column shown only when some row of the table has a value in it
    ("op", lambda r, rows: r["op"]),
    ("shape", lambda r, rows: r["shape"]),
    ("dtype", lambda r, rows: r["dtype"]),
    ("variant", lambda r, rows: r["variant"]),
    ("fwd ms", lambda r, rows: _fmt(r["fwd_ms"])),
    ("bwd ms", lambda r, rows: _fmt(r["bwd_ms"])),
    ("fwd+bwd ms", lambda r, rows: _fmt(r["both_ms"])),
    ("fwd+bwd spread ms", lambda r, rows: _spread(r, "both") if r["both_spread_ms"] else _spread(r, "fwd")),
    ("speedup vs eager", _speedup),
    ("peak MB", lambda r, rows: _fmt(r["peak_mb"], 1)),
    ("fwd GB/s", lambda r, rows: _fmt(r["fwd_gbps"], 1)),
    ("fwd GFLOP/s", lambda r, rows: _fmt(r["fwd_gflops"], 1)),
    ("x floor", lambda r, rows: _fmt(r["floor_multiple"], 2)),
    ("x floor fwd+bwd", lambda r, rows: _fmt(r["both_floor_multiple"], 2)),
    ("result", lambda r, rows: _metrics(r)),
    ("notes", lambda r, rows: r["notes"] or "-"),
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list, with_op: bool) -> list:
    cells = [[_cell(cell(r, rows)) for _, cell in _COLUMNS] for r in rows]
    keep = [i for i, (header, _) in enumerate(_COLUMNS)
            if (with_op or header != "op") and any(line[i] != "-" for line in cells)]
    lines = ["| " + " | ".join(_COLUMNS[i][0] for i in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(line[i] for i in keep) + " |" for line in cells]
    return lines


def _groups(rows: list, key) -> dict:
    groups: dict = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def render(rows: list) -> str:
    """The Markdown of :data:`MARKDOWN_FILE`: per device, date and run (with its command, versions,
    commit and ceilings), one table per op, rows in file order."""
    out = ["# Benchmark results", "",
           "Generated from the rows of `benchmarks/results.jsonl` (fields described in",
           "`l2m_kernels/bench/results.py`): do not edit by hand. To record a run and regenerate this file:", "",
           "    l2m-bench --out OUT",
           f"    {COMMAND} add OUT/suite.json", "",
           f"(`tools/gpu_suite.sh` does both on a GPU machine; `{COMMAND} render` regenerates",
           "the file alone.)", "",
           "Per device, date and run, one table per op. Times are medians in milliseconds (fwd+bwd: forward",
           "and backward timed together); the spread is the fastest and slowest timed run; speedups are",
           "against the eager reference (`reference`) of the same run, op, shape and dtype; `x floor` is the",
           "forward's time over its hardware floor (its bytes at the copy ceiling or its flops at the matmul",
           "ceiling of its dtype, measured in the same run), `x floor fwd+bwd` the same for forward and",
           "backward together; peak MB is the memory the call added. Correctness",
           "runs and measurements other than times give their values under `result`."]
    for device, by_device in _groups(rows, lambda r: r["device"]).items():
        out += ["", f"## {device}"]
        for date, by_date in _groups(by_device, lambda r: r["date"]).items():
            for run_key, run_rows in _groups(by_date, lambda r: tuple(r[k] for k in _RUN_KEYS)).items():
                info = dict(zip(_RUN_KEYS, run_key))
                out += ["", f"### {date}: {info['run']}", ""]
                versions = ", ".join(f"{label} {info[key]}" for key, label in
                                     (("torch", "torch"), ("triton", "Triton"), ("cuda", "CUDA"),
                                      ("l2m_kernels", "l2m-kernels"), ("commit", "commit")) if info[key])
                out.append(f"`{info['source']}`; {versions or 'versions not recorded'}.")
                ceilings = list(dict.fromkeys(json.dumps(r["ceilings"]) for r in run_rows if r["ceilings"]))
                if len(ceilings) == 1:
                    labels = (_CEILING_LABELS.get(k, k + " {}").format(_fmt(v, 1))
                              for k, v in json.loads(ceilings[0]).items())
                    out.append(f"Ceilings in the same run: {', '.join(labels)}.")
                if info["conditions"]:
                    out.append(f"Conditions: {info['conditions']}.")
                timed = [r for r in run_rows if r["kind"] in TIMED_KINDS]
                for op, op_rows in _groups(timed, lambda r: r["op"]).items():
                    out += ["", f"**{op}**", ""] + _table(op_rows, with_op=False)
                others = [r for r in run_rows if r["kind"] not in TIMED_KINDS]
                if others:
                    out += ["", "**checks and other measurements**", ""] + _table(others, with_op=True)
    return "\n".join(out) + "\n"


# ---- command line --------------------------------------------------------------------------------

def _write_markdown(rows: list, path) -> None:
    with open(path, "w") as f:
        f.write(render(rows))


def _out_of_date(results, markdown) -> list:
    rows = load(results)
    found = [f"row {i + 1} ({row.get('op')}, {row.get('variant')}): {p}" for i, row in enumerate(rows)
             for p in problems(row)]
    if not os.path.exists(markdown) or Path(markdown).read_text() != render(rows):
        found.append(f"{markdown} is not what the rows generate: run `{COMMAND} render`")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("add", "render", "check", "compare"))
    parser.add_argument("suite_json", nargs="?", help="add: an l2m-bench suite.json (or a per-op script's JSON); "
                        "compare: the first run's")
    parser.add_argument("other_json", nargs="?", help="compare: the second run's suite.json")
    parser.add_argument("--tolerance", type=float, default=0.15,
                        help="compare: the largest relative difference of a speedup (default %(default)s)")
    parser.add_argument("--check-json", help="add: an l2m-check --json file of the same run")
    parser.add_argument("--step", action="append", default=[], metavar="NAME=SUMMARY",
                        help="add: a step of the run and its outcome (repeatable)")
    parser.add_argument("--run", help="add: what the run was (default: the suite's)")
    parser.add_argument("--source", help="add: the command of the run (default: the suite's)")
    parser.add_argument("--device", help="add, without suite.json: the device the run used (default: this "
                        "machine's GPU when there is one, else its CPU)")
    parser.add_argument("--results", default=str(RESULTS_FILE), help="the rows (default: %(default)s)")
    parser.add_argument("--markdown", default=str(MARKDOWN_FILE), help="the table (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.action == "compare":
        if not (args.suite_json and args.other_json):
            parser.error("compare: give two suite.json files")
        runs = []
        for path in (args.suite_json, args.other_json):
            with open(path) as f:
                runs.append(json.load(f)["rows"])
        table, differing = compare_runs(*runs, tolerance=args.tolerance)
        print(table)
        print(f"\n{len(differing)} speedups differ by more than {100 * args.tolerance:.0f}%" if differing else
              f"\nevery speedup within {100 * args.tolerance:.0f}% of the other run")
        return 1 if differing else 0
    if args.action == "check":
        found = _out_of_date(args.results, args.markdown)
        print("\n".join(found) or f"{args.results}: every row complete; {args.markdown} up to date")
        return 1 if found else 0
    if args.action == "add":
        new = []
        if args.suite_json:
            with open(args.suite_json) as f:
                new += json.load(f)["rows"]
        if new:
            base = dict(new[0])
        elif args.check_json or args.step:
            import torch
            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            base = dict(environment(torch.device(device)), run="checks", source="checks", conditions="")
        else:
            parser.error("add: nothing to add (give suite.json, --check-json or --step)")
        base["run"] = args.run or base["run"]
        base["source"] = args.source or base["source"]
        run = {k: base[k] for k in ("run", "source")}
        if args.check_json:
            with open(args.check_json) as f:
                new += check_rows(json.load(f), base, **run)
        new += step_rows(args.step, base, **run)
        for row in new:  # one run: its checks and steps under the benchmarks' conditions
            row.update(run, conditions=base["conditions"])
        append(new, args.results)
        print(f"{len(new)} rows appended to {args.results}")
    _write_markdown(load(args.results) if os.path.exists(args.results) else [], args.markdown)
    print(f"{args.markdown} regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
