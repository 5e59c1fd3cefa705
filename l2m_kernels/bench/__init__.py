"""``l2m-bench`` (``python -m l2m_kernels.bench``): the benchmark suite.

    l2m-bench [--quick] [--device cpu|cuda] [--out bench_out] [--only merge,topk_read,...]
              [--merge joint|gate]

Measures the ceilings first (a float32 matmul in GFLOP/s, bfloat16 too on CUDA; a copy in GB/s),
then runs every op benchmark at the declared shapes (``--quick``: their quick shapes) and one L2M
model training step, on CUDA when available, else on the CPU. Every op benchmark is a comparison
(:func:`l2m_kernels.benchmark.compare`) of the fused backends of the device, the reference in eager
mode and under ``torch.compile``, and the peers a user would pick instead (faiss, plain PyTorch,
``scaled_dot_product_attention``; a peer that is not installed is a row that says so), all
interleaved round by round together with the ceilings. Each table is printed once, when its
benchmark is done: median fwd / bwd / fwd+bwd times with the range of the timed runs, the speedup
over the eager and the compiled reference, peak memory, and the time as a multiple of the hardware
floor (what the op must move and compute, at the ceilings measured with it). The run reports the
load average before and after and the CPU time other processes used meanwhile, with a warning when
they used more than a quarter of a core. Writes ``suite.json``, ``suite.md`` and
``suite.png`` into ``--out``. ``--only <name>`` runs one benchmark alone. The ``rows`` of
``suite.json`` are result rows (:mod:`l2m_kernels.bench.results`: date, device, versions, commit,
and per row the times with their spread, peak memory and multiple of the hardware floor), which
``python -m l2m_kernels.bench.results add OUT/suite.json`` appends to ``benchmarks/results.jsonl``,
regenerating ``benchmarks/RESULTS.md``.

Benchmarks (``--only`` takes these names, with or without the ``bench_`` prefix), derived from the
ops' declarations (:mod:`l2m_kernels.ops.registry`: each op names the benchmark that times it and
its shapes):

- ``topk_read``: topk_memory_read at read-cpu and read-heads (:mod:`l2m_kernels.bench.topk_read`)
- ``product_key``: product_key_read at pkm-cpu (:mod:`l2m_kernels.bench.product_key`)
- ``memory_write``: gated_memory_write at write-cpu and gated_dense_update at dense-cpu
  (:mod:`l2m_kernels.bench.memory_write`)
- ``merge``: merge_attention and gated_merge at merge-cpu (:mod:`l2m_kernels.bench.merge`)
- ``memory_attention``: memory_attention at attn-cpu (:mod:`l2m_kernels.bench.memory_attention`),
  with the merge mode of ``--merge`` (default ``joint``)
- ``memory_store``: MemoryStore reads (quantized_topk_read is the read of its int8 keys): int8
  against float32 keys at read-cpu, read time, bytes moved and recall against memory size (64K to
  16M entries, the cold tiers on disk and in host memory), and the cost of the usage statistics
  (:mod:`l2m_kernels.bench.memory_store`)
- ``hf_memory``: the prefill of a Hugging Face Llama with memory attached against the unpatched model
  with sdpa (:mod:`l2m_kernels.bench.hf_memory`; a row that says so without transformers)
- ``distributed``: the sharded top-k and product-key reads and the sharded gated write on 1, 2 and
  4 gloo processes against gathering the memory: time and bytes communicated per call
  (:mod:`l2m_kernels.bench.distributed`; not in
  the ``--quick`` suite unless named: ``l2m-bench --quick --only distributed``)
- ``model``: one L2MModel training step, both memory modes (:mod:`l2m_kernels.bench.model`)

``--quick`` takes about 5 minutes on a 2-core CPU; there the compiled reference of
gated_memory_write is skipped when other benchmarks run too (compiling its unrolled write steps
takes ~6 minutes); ``l2m-bench --quick --only memory_write`` measures it. A benchmark that raises is
reported as a row with the error, and the suite goes on (exit status 1 at the end).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback

import torch

from l2m_kernels import benchmark as bm
from l2m_kernels.ops import registry

from ._common import default_device, measure_ceilings, skipped_row

# The op benchmarks of the ops' declarations (l2m_kernels/ops/registry.py; memory_store times
# quantized_topk_read through the store's int8 reads), then the Hugging Face prefill and the model step.
BENCHMARKS = registry.benchmarks() + ("distributed", "hf_memory", "model")
# Run by --quick only when named with --only (it spawns processes and times several world sizes).
NOT_IN_QUICK = ("distributed",)
QUICK_WRITE_COMPILE_NOTE = ("skipped in the --quick suite: torch.compile unrolls the write steps "
                            "(~6 minutes of compilation on 2 cores); l2m-bench --quick --only memory_write "
                            "measures it")


def _names(only: str, parser: argparse.ArgumentParser, quick: bool = False) -> list:
    names = [n.strip() for n in only.split(",") if n.strip()]
    names = [n[len("bench_"):] if n.startswith("bench_") else n for n in names]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if names:
        return [n for n in BENCHMARKS if n in names]
    return [n for n in BENCHMARKS if not (quick and n in NOT_IN_QUICK)]


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # the table still prints
        tqdm = None
    if tqdm is None or not enabled:
        class Silent:
            def set_description(self, *a, **k): pass
            def update(self, *a, **k): pass
            def close(self): pass
        return Silent()
    return tqdm(total=total, desc="l2m-bench", unit="bench", file=sys.stderr)


def _busy_warning(load: bm.MachineLoad, when: str) -> str:
    return (f"WARNING: the machine was busy {when}: other processes used {load.others_cores:.2f} CPU cores on "
            f"average (more than {load.BUSY_CORES}); the variants of each comparison are interleaved, so "
            f"their ratios hold better than their times, but rerun on an idle machine to quote figures.")


def _command(args: argparse.Namespace) -> str:
    """The command line of a run, without its output folder and display options."""
    return " ".join(["l2m-bench", "--device", args.device] + (["--quick"] if args.quick else [])
                    + (["--only", args.only] if args.only else [])
                    + (["--merge", args.merge] if args.merge != "joint" else [])
                    + (["--tiny"] if args.tiny else []))


def _run_title(args: argparse.Namespace, names: list) -> str:
    size = "tiny shapes (tests)" if args.tiny else "quick shapes" if args.quick else "full shapes"
    return f"l2m-bench, {size}: {', '.join(names)}"


def run_benchmark(name: str, device: torch.device, quick: bool, ceilings: dict, tiny: bool = False, *,
                  merge: str = "joint", alone: bool = False) -> list:
    """The rows of one benchmark of :data:`BENCHMARKS`.

    ``merge``: memory_attention's merge mode (``joint`` or ``gate``). ``alone``: the only benchmark
    of the run; a quick memory_write benchmark then measures its compiled reference too.
    """
    module = importlib.import_module(f"{__name__}.{name}")
    kwargs = {}
    if name == "memory_write" and quick and not tiny and not alone:
        kwargs["skip_compile_note"] = QUICK_WRITE_COMPILE_NOTE
    if name == "memory_attention":
        kwargs["merge"] = merge
    return module.run(device, quick, ceilings, tiny=tiny, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2m-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick shapes and fewer repetitions "
                        "(about 5 minutes on a 2-core CPU)")
    parser.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default="bench_out", help="folder for suite.json, suite.md, suite.png")
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHMARKS))
    parser.add_argument("--merge", default="joint", choices=("joint", "gate"),
                        help="merge mode of the memory_attention benchmark (default joint)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny shapes, one run
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = _names(args.only, parser, args.quick)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch has no usable CUDA device")
    start = time.perf_counter()
    bm.steady_allocator()
    with bm.MachineLoad() as before:  # a second of the machine alone, before anything runs
        time.sleep(0.0 if args.tiny else 1.0)
    warnings = [_busy_warning(before, "before the run")] if before.busy else []
    for warning in warnings:
        print(warning, file=sys.stderr, flush=True)
    progress = _progress(1 + len(names), not args.no_progress)
    say = getattr(progress, "write", print)  # through tqdm, so that the bar stays below the tables
    rows, failures, seconds = [], [], {}
    with bm.MachineLoad() as load:
        progress.set_description("ceilings")
        ceilings = measure_ceilings(device, quick=args.quick, tiny=args.tiny)
        progress.update()
        for name in names:
            progress.set_description(name)
            began = time.perf_counter()
            try:
                new_rows = run_benchmark(name, device, args.quick, ceilings, tiny=args.tiny, merge=args.merge,
                                         alone=len(names) == 1)
                rows += new_rows
                # Each benchmark's table once, as soon as it is done (a run cut short keeps its figures).
                say(f"\n{name} ({time.perf_counter() - began:.0f} s):\n{bm.format_table(new_rows)}")
            except Exception as exc:  # report it in the table and go on with the others
                failures.append(name)
                say(traceback.format_exc())
                rows.append(skipped_row(name, "-", torch.float32, "-", f"FAILED: {type(exc).__name__}: {exc}"[:300]))
            seconds[name] = round(time.perf_counter() - began, 1)
            progress.update()
        progress.close()
    elapsed = time.perf_counter() - start
    if load.busy:
        warnings.append(_busy_warning(load, "during the run"))

    payload = bm.save(rows, ceilings, device, args.out, "suite")
    from . import model as model_bench
    from . import results
    model_md, model_records = model_bench.summary(rows)
    env = results.environment(device)
    conditions = load.describe() + ("; busy" if warnings else "")
    payload["meta"].update({k: v for k, v in env.items() if k != "date"},  # meta's date keeps the time
                           quick=args.quick, elapsed_s=round(elapsed, 1), seconds_per_benchmark=seconds,
                           load_average_before=load.load_before, load_average_after=load.load_after,
                           other_processes_cores=load.others_cores, warnings=warnings,
                           benchmarks=names, failed=failures)
    # The rows in the repository's record format (python -m l2m_kernels.bench.results add suite.json).
    payload["rows"] = results.bench_rows(rows, ceilings, env, run=_run_title(args, names), source=_command(args),
                                         conditions=conditions)
    payload["model_step"] = model_records
    with open(os.path.join(args.out, "suite.json"), "w") as f:
        json.dump(payload, f, indent=2)
    footer = (f"\n{'quick' if args.quick else 'full'} run in {elapsed:.0f} s ({load.describe()}); seconds per "
              f"benchmark: " + ", ".join(f"{k} {v}" for k, v in seconds.items()) + "\n"
              + "".join(f"\n{warning}\n" for warning in warnings))
    if model_records:
        footer += (f"\nModel training step (forward + backward + AdamW; target on the 2-core CPU: fused "
                   f"tokens/s >= {model_bench.TARGET_SPEEDUP}x the reference, peak memory <= 1/3):\n\n"
                   + model_md + "\n")
    with open(os.path.join(args.out, "suite.md"), "a") as f:
        f.write(footer)

    print(f"\ndevice: {bm.device_name(device)}, torch {torch.__version__}; ceilings at the start: "
          + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()))
    print(footer)
    print(f"written: {os.path.join(args.out, 'suite.json')}, suite.md (every table), suite.png")
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0
