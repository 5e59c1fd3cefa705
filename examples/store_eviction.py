"""What a memory smaller than the context should forget: MemoryStore eviction policies on the
long-context recall task.

    python examples/store_eviction.py [--seed S] [--threads T] [--sequences N] [--quick]
                                      [--out bench_out/store_eviction]

The task and the model are those of ``examples/long_recall.py``: 320 tokens, 10 segments of 32,
16 far key-value pairs spread over the first 7 segments among noise and in-window pairs, 8 queries
of far pairs in the last segment. One model is trained there with an "append" memory that holds
every segment (``train_run``, the same recipe and seed). Its weights are then evaluated with a
``memory_mode="store"`` memory of the same entries (:class:`l2m_kernels.memory.MemoryStore`,
blocks of 16) at two capacities:

- the whole context (320 entries): nothing is evicted; it equals the append memory;
- half of what the last segment needs (144 of the 288 entries written before it): each policy
  decides which half of the past stays:
  - ``fifo``: the newest entries, as a ring buffer does;
  - ``lru``: the entries read or written most recently;
  - ``usage``: the entries that received the most read weight (decayed by ``usage_decay`` per
    read) from the memory reads of the tokens that followed them.

Every held-out sequence is evaluated alone (batch 1), so each has a store of its own. The far
recall (argmax accuracy at the far queries' ``?``) of each setting is printed and written to
``store_eviction.json`` in ``--out``, with the settings, versions and wall times.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import long_recall as lr  # noqa: E402

from l2m_kernels.models import L2MModel  # noqa: E402

POLICIES = ("fifo", "lru", "usage")
BLOCK = 16


def store_model(trained: L2MModel, task: lr.RecallTask, capacity: int, eviction: str,
                usage_decay: float) -> L2MModel:
    """The trained weights with a MemoryStore of ``capacity`` entries evicting by ``eviction``."""
    config = dataclasses.replace(trained.config, memory_mode="store", memory_slots=capacity,
                                 store_options=dict(block_size=BLOCK, eviction=eviction,
                                                    usage_decay=usage_decay))
    model = L2MModel(config)
    model.load_state_dict(trained.state_dict())
    return model.eval()


@torch.no_grad()
def far_recall(model: L2MModel, sequences: list) -> float:
    """Far recall over ``sequences`` (RecallBatch of one sequence each)."""
    hits = total = 0
    for batch in sequences:
        out = model(batch.input_ids)
        right = out.logits.argmax(-1).eq(batch.labels)
        hits += int(right[batch.far].sum())
        total += int(batch.far.sum())
    return hits / max(1, total)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sequences", type=int, default=256, help="held-out sequences")
    parser.add_argument("--usage-decay", type=float, default=0.99)
    parser.add_argument("--quick", action="store_true", help="a short training (recall lower)")
    parser.add_argument("--out", default=os.path.join("bench_out", "store_eviction"))
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: seconds
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    task, settings, d_model = lr.RecallTask(), lr.TrainSettings(), 64
    if args.quick:
        settings = dataclasses.replace(settings, short_steps=300, steps=80, eval_every=0,
                                       final_eval_sequences=64)
    if args.tiny:
        task = lr.RecallTask(segment_len=16, n_segments=8, gap_segments=2, n_far_pairs=4,
                             local_pairs=1, n_queries=2, n_keys=16, n_values=4, n_noise=2)
        settings = dataclasses.replace(settings, short_steps=2, steps=2, batch_size=2, warmup=1,
                                       eval_every=0, eval_sequences=2, final_eval_sequences=2)
        d_model = 16
    config = lr.model_config(task, "append", d_model=d_model)
    began = time.perf_counter()
    result, trained = lr.train_run("append", task, config, settings, args.seed,
                                   log=lambda line: print(line, flush=True), return_model=True)
    train_s = time.perf_counter() - began
    needed = (task.n_segments - 1) * task.segment_len      # entries written before the queries
    half = max(BLOCK, (needed // 2) // BLOCK * BLOCK)
    full = -(-task.seq_len // BLOCK) * BLOCK
    rng = random.Random(args.seed + 5)
    sequences = [task.sample(1, rng) for _ in range(args.sequences)]
    print(f"trained the append model in {train_s:.0f} s: far recall {result['final']['far_acc']:.4f} "
          f"(its own evaluation); evaluating {len(sequences)} held-out sequences one by one")
    rows = {}
    began = time.perf_counter()
    rows["whole context (no eviction)"] = far_recall(
        store_model(trained, task, full, "fifo", args.usage_decay), sequences)
    for policy in POLICIES:
        rows[f"half ({half} of {needed}), {policy}"] = far_recall(
            store_model(trained, task, half, policy, args.usage_decay), sequences)
    eval_s = time.perf_counter() - began
    print(f"\nfar recall ({len(sequences)} sequences x {task.n_queries} far queries; chance "
          f"{task.chance:.4f}):")
    for name, value in rows.items():
        print(f"  {name:36s} {value:.4f}")
    fifo, usage = rows[f"half ({half} of {needed}), fifo"], rows[f"half ({half} of {needed}), usage"]
    ratio = usage / fifo if fifo > 0 else float("inf")
    print(f"usage / fifo at half capacity: {ratio:.2f}x")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "store_eviction.json")
    with open(path, "w") as handle:
        json.dump({"far_recall": rows, "usage_over_fifo": ratio, "capacity_half": half,
                   "entries_needed": needed, "sequences": len(sequences), "seed": args.seed,
                   "usage_decay": args.usage_decay, "train_s": train_s, "eval_s": eval_s,
                   "trained_far_recall": result["final"]["far_acc"],
                   "task": dataclasses.asdict(task), "settings": dataclasses.asdict(settings),
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "python": platform.python_version(), "processor": platform.processor()},
                  handle, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
