"""Long-context recall demo: an L2MModel recalls key-value pairs from beyond its attention window.

    python examples/long_recall.py [--mode append|slots|both] [--steps N] [--seed S]
                                   [--threads T] [--quick] [--out bench_out/long_recall]

The task (synthetic associative recall, :class:`RecallTask`): 320 tokens, 10 segments of 32, ten
times the local attention window (32). A pair is ``k v`` (a key token, a value token), a query
``k ? v``: the ``?`` position must predict the value that followed ``k``. Sixteen "far" pairs are
spread among noise over the first 7 segments; the last segment ends with 8 queries of far pairs.
Between a far pair and its query lie at least 74 positions, more than two layers of local
attention can see (``n_layers * (window - 1) = 62``), so only the memory can answer. Every segment
also holds "local" pairs whose queries follow inside the window: they teach in-window recall
(match the key, copy the value), which the memory then reuses. Values are uniform and independent,
so without the pair the best guess is chance, ``1 / n_values`` (1/32). The loss is on the answers
only; the score is the recall of far queries on held-out sequences.

Three runs, same data stream, same initialisation, same steps (:func:`train_run`):

- ``append``: memory on the last layer in "append" mode (a ring buffer of the past keys/values,
  Memorizing Transformers style; written entries are detached, so the keys come from the
  in-window recall);
- ``slots``: memory on the last layer in "slots" mode (learned gated writes into 128 slots,
  trained end to end through the writes of a call; the writes reuse the layer's key/value
  projections, :func:`share_slot_projections`, and the read is merged by a learned gate);
- ``none``: the same model with the memory switched off (``memory_layers=()``): local attention
  only; it must stay at chance on far queries (and solves the local ones).

Results: the long_recall rows of benchmarks/RESULTS.md. Slots mode learns
far recall only with its writes addressed like the layer's keys (with independent random write
projections the slots a pair writes and the slots its query reads overlap at chance and far recall
stays at chance), with a low initial erase (sigmoid(-3): a pair's write survives the later writes)
and with the gated merge (in a joint softmax the memory gets too little mass to learn from).

Training (:class:`TrainSettings`) is a curriculum: first ``short_steps`` on one-segment
sequences of local pairs (cheap), where the model learns in-window recall, then ``steps`` on
full sequences. Recall needs an induction circuit (the first layer copies each token's
predecessor, the last layer matches keys), which a small model learns slowly from the answers
alone; a previous-token hint (:class:`PrevTokenHint`), an auxiliary loss that goes to 0 halfway
through the full-length steps, gets it going in a few hundred steps. AdamW with warmup and cosine decay.

Output: the accuracies (far and in-window), wall times and load average on stdout;
``long_recall.json`` (task, settings, configs, learning curves, results) and ``long_recall.png``
(training loss and held-out recall against the step) in ``--out``. Everything is seeded; for a
given ``--threads`` a run is deterministic. The ops run on the fused cpu backend when it is built
(automatic dispatch), else on the reference backend (slower; the script says which it uses).
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
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional

import torch
from torch.nn import functional as F

from l2m_kernels.backends import BACKENDS, select_backend
from l2m_kernels.models import L2MConfig, L2MModel

QUERY_TOKEN = 0
RUNS = {"append": dict(memory_mode="append"),
        "slots": dict(memory_mode="slots", merge="gate", memory_slots=128, write_topk=8),
        "none": dict(memory_layers=())}
RUN_NAMES = {"append": "with memory, append", "slots": "with memory, slots", "none": "without memory"}


@dataclass
class RecallTask:
    """Synthetic associative recall over ``n_segments * segment_len`` tokens.

    Vocabulary: ``?`` (0), ``n_noise`` noise tokens, ``n_keys`` keys, ``n_values`` values. A pair
    is ``k v``, a query ``k ? v`` (``labels`` = ``v`` at the ``?``, -100 elsewhere). Layout:

    - every segment but the last: ``local_pairs`` pairs, each followed later in the same segment
      by its query (in-window recall), in random order among noise tokens;
    - the first ``far_segments = n_segments - 1 - gap_segments`` segments also hold the
      ``n_far_pairs`` far pairs (each seen once), spread at random over them;
    - the last segment: noise, then ``n_queries`` queries of far pairs (the test).

    A far query is at least ``min_far_distance`` (> ``gap_segments * segment_len``) positions
    after its pair. The keys of a
    sequence are distinct (every query has one answer, and a far key occurs nowhere else), values
    are drawn independently and uniformly: nothing but the pair itself tells a value.
    """

    segment_len: int = 32
    n_segments: int = 10
    gap_segments: int = 2
    n_far_pairs: int = 16
    local_pairs: int = 4
    n_queries: int = 8
    n_keys: int = 64
    n_values: int = 32
    n_noise: int = 16

    def __post_init__(self):
        if self.far_segments < 1 or 3 * self.n_queries > self.segment_len or self.n_queries > self.n_far_pairs:
            raise ValueError(f"the far pairs or the queries do not fit: {self}")
        if self.n_far_pairs + self.local_pairs * (self.n_segments - 1) > self.n_keys:
            raise ValueError(f"more pairs than keys: {self}")
        if 5 * self.local_pairs + 2 * self.far_per_segment > self.segment_len:
            raise ValueError(f"the pairs do not fit in a segment: {self}")

    @property
    def seq_len(self) -> int:
        return self.n_segments * self.segment_len

    @property
    def far_segments(self) -> int:
        return self.n_segments - 1 - self.gap_segments

    @property
    def far_per_segment(self) -> int:
        return -(-self.n_far_pairs // self.far_segments) + 1  # room to spread them unevenly

    @property
    def min_far_distance(self) -> int:
        """The fewest positions between a far pair's value and the ``?`` of its query."""
        first_answer = self.seq_len - 3 * self.n_queries + 1
        return first_answer - (self.far_segments * self.segment_len - 1)

    @property
    def first_key(self) -> int:
        return 1 + self.n_noise

    @property
    def first_value(self) -> int:
        return self.first_key + self.n_keys

    @property
    def vocab_size(self) -> int:
        return self.first_value + self.n_values

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def sample(self, batch_size: int, rng: random.Random, short: bool = False) -> "RecallBatch":
        """``batch_size`` random sequences (``rng`` drives everything). ``short``: one segment
        of local pairs and their queries only (the first phase of the curriculum)."""
        rows = [self._sequence(rng, short) for _ in range(batch_size)]
        input_ids = torch.tensor([[token for token, _, _ in row] for row in rows])
        labels = torch.tensor([[label for _, label, _ in row] for row in rows])
        far = torch.tensor([[is_far for _, _, is_far in row] for row in rows])
        return RecallBatch(input_ids, labels, far, labels.ne(-100) & ~far)

    def _sequence(self, rng: random.Random, short: bool = False) -> list:
        """One sequence as (token, label, is far query) triples."""
        local_segments = 1 if short else self.n_segments - 1
        n_far = 0 if short else self.n_far_pairs
        keys = rng.sample(range(self.n_keys), n_far + self.local_pairs * local_segments)
        pairs = [(self.first_key + k, self.first_value + rng.randrange(self.n_values)) for k in keys]
        far_pairs, local_pairs = pairs[:n_far], pairs[n_far:]
        slots = [s for s in range(self.far_segments) for _ in range(self.far_per_segment)]
        far_segment = rng.sample(slots, n_far)

        def pair(p):
            return [(p[0], -100, False), (p[1], -100, False)]

        def query(p, is_far):
            return [(p[0], -100, False), (QUERY_TOKEN, p[1], is_far), (p[1], -100, False)]

        def noise():
            return [(1 + rng.randrange(self.n_noise), -100, False)]

        sequence = []
        for segment in range(local_segments):
            mine = local_pairs[segment * self.local_pairs:(segment + 1) * self.local_pairs]
            # (tag, tokens): tag i >= 0 for the pair of local pair i, -1 - i for its query.
            items = [(i, pair(p)) for i, p in enumerate(mine)] + [(-1 - i, query(p, False)) for i, p in enumerate(mine)]
            items += [(None, pair(p)) for p, s in zip(far_pairs, far_segment) if s == segment]
            items += [(None, noise()) for _ in range(self.segment_len - sum(len(t) for _, t in items))]
            rng.shuffle(items)
            # A local query must follow its pair: where it comes first, swap the two.
            where = {tag: i for i, (tag, _) in enumerate(items) if tag is not None}
            for i in range(len(mine)):
                if where[-1 - i] < where[i]:
                    items[where[i]], items[where[-1 - i]] = items[where[-1 - i]], items[where[i]]
            sequence += [token for _, tokens in items for token in tokens]
        if short:
            return sequence
        asked = rng.sample(far_pairs, self.n_queries)
        sequence += [token for _ in range(self.segment_len - 3 * self.n_queries) for token in noise()]
        sequence += [token for p in asked for token in query(p, True)]
        return sequence


class RecallBatch(NamedTuple):
    """``input_ids``, ``labels`` (B, L) int64; ``far``, ``near`` (B, L) bool: the answer positions
    of far queries (the test) and of in-window queries."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    far: torch.Tensor
    near: torch.Tensor


@dataclass
class TrainSettings:
    """``short_steps`` on one-segment sequences of local pairs (cheap: they teach in-window recall),
    then ``steps`` on full sequences; the schedules run over both."""

    steps: int = 200
    short_steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_sequences: int = 64     # held-out sequences for the curve
    final_eval_sequences: int = 512
    hint_weight: float = 1.0     # previous-token hint (PrevTokenHint): this weight during the
                                 # short steps, then linearly to 0 at half the full-length steps


class PrevTokenHint:
    """A training aid: an auxiliary loss that makes the first layer's attention output encode the
    previous token.

    Recall needs an induction circuit: the first layer copies the key into the value's position
    (and into the ``?``), the last layer matches them. Learned from the answers alone, the two
    halves wait for each other, and a small model plateaus for thousands of steps at "some value
    in the window". A linear probe ``(d_model -> vocab_size)`` on the first layer's attention
    output (``o_proj``, captured by a forward hook) trained to predict the previous token gives
    the first half a direct signal; its weight goes to 0 halfway through the full-length steps,
    so the final model answers without it. The probe is not part of the model; every run, with and without
    memory, gets the same hint.
    """

    def __init__(self, model: L2MModel):
        self.outputs: List[torch.Tensor] = []
        self.probe = torch.nn.Linear(model.config.d_model, model.config.vocab_size)
        self.handle = model.blocks[0].attn.o_proj.register_forward_hook(
            lambda module, inputs, output: self.outputs.append(output))

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the probe at positions 1.. against the tokens at 0..; clears the capture."""
        attended = torch.cat(self.outputs, dim=1)  # the model's pieces (segments) in order
        self.outputs.clear()
        logits = self.probe(attended[:, 1:])
        return F.cross_entropy(logits.flatten(0, 1), input_ids[:, :-1].flatten())

    @staticmethod
    def weight(step: int, s: "TrainSettings") -> float:
        if step < s.short_steps:
            return s.hint_weight
        return s.hint_weight * max(0.0, 1.0 - (step - s.short_steps) / max(1.0, s.steps / 2))


def model_config(task: RecallTask, run: str, d_model: int = 64, **overrides) -> L2MConfig:
    """The model of every run: 2 layers, memory on the last (``run`` picks the mode or none);
    window = segment_len; an "append" memory holds the whole sequence, a "slots" memory 128
    slots (``RUNS``). ``rope_base=100``: the rotary half of each 16-feature head resolves neighbouring
    positions within the window (the previous-token head needs that); the other half carries no
    position and matches memory entries at any distance."""
    config = dict(vocab_size=task.vocab_size, d_model=d_model, n_layers=2, n_heads=4,
                  segment_len=task.segment_len, window=task.segment_len,
                  memory_slots=task.seq_len if run == "append" else 64, topk=8, write_topk=4,
                  memory_mode="append", merge="joint", memory_layers=(-1,), rope_base=100.0,
                  deterministic=True)
    config.update(RUNS[run])
    config.update(overrides)
    return L2MConfig(**config)


def share_slot_projections(model: L2MModel, erase_bias: float = -3.0) -> None:
    """Slots mode: the slot memory writes what the attention of its layer would store, addressed
    by its key (``key_proj`` = ``attn.k_proj``, ``add_proj`` = ``attn.v_proj``; both see the same
    normalised input), and erases little at first (``erase_proj`` bias ``erase_bias``: sigmoid(-3)
    ~ 0.05). With independent random write projections the write addresses and the reads never
    meet: nothing links a pair's slots to its query's, and far recall stays at chance. No-op for
    the other runs (no random numbers are drawn: their initialisation is unchanged)."""
    for block in model.blocks:
        if block.slots is not None:
            block.slots.key_proj = block.attn.k_proj
            block.slots.add_proj = block.attn.v_proj
            torch.nn.init.constant_(block.slots.erase_proj.bias, erase_bias)


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.short_steps + s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: L2MModel, batches: List[RecallBatch]) -> Dict[str, float]:
    """Recall (argmax accuracy at the ``?`` positions) of far and near queries, and the loss."""
    model.eval()
    far_hits = far_total = near_hits = near_total = 0
    loss_sum = 0.0
    for batch in batches:
        out = model(batch.input_ids, labels=batch.labels)
        hits = out.logits.argmax(-1).eq(batch.labels)
        far_hits += int(hits[batch.far].sum())
        far_total += int(batch.far.sum())
        near_hits += int(hits[batch.near].sum())
        near_total += int(batch.near.sum())
        loss_sum += float(out.loss)
    model.train()
    return {"far_acc": far_hits / max(1, far_total), "near_acc": near_hits / max(1, near_total),
            "loss": loss_sum / len(batches), "far_queries": far_total, "near_queries": near_total}


def held_out(task: RecallTask, sequences: int, batch_size: int, seed: int) -> List[RecallBatch]:
    rng = random.Random(seed)
    return [task.sample(min(batch_size, sequences - start), rng)
            for start in range(0, sequences, batch_size)]


def train_run(run: str, task: RecallTask, config: L2MConfig, s: TrainSettings, seed: int,
              log=print, return_model: bool = False):
    """Train one model on freshly sampled sequences (the same stream for every run) and evaluate
    it on held-out sequences; returns the curves, the final accuracies and the wall times (and,
    with ``return_model``, ``(that dict, the trained model)``)."""
    torch.manual_seed(seed)
    model = L2MModel(config)
    share_slot_projections(model)
    hint = PrevTokenHint(model)
    parameters = list(model.named_parameters()) + [("hint." + n, p) for n, p in hint.probe.named_parameters()]
    decay = [p for n, p in parameters if p.dim() >= 2 and "slot_keys" not in n]
    no_decay = [p for n, p in parameters if not (p.dim() >= 2 and "slot_keys" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.98))
    data = random.Random(seed + 1)
    curve_eval = held_out(task, s.eval_sequences, s.batch_size, seed + 2)
    curve = {"step": [], "train_loss": [], "hint_loss": [], "eval_step": [], "eval_far_acc": [], "eval_near_acc": [],
             "eval_loss": [], "eval_time_s": []}
    train_time = eval_time = 0.0
    start = time.perf_counter()

    def run_eval(step):
        nonlocal eval_time
        t0 = time.perf_counter()
        result = evaluate(model, curve_eval)
        hint.outputs.clear()
        eval_time += time.perf_counter() - t0
        curve["eval_step"].append(step)
        curve["eval_far_acc"].append(result["far_acc"])
        curve["eval_near_acc"].append(result["near_acc"])
        curve["eval_loss"].append(result["loss"])
        curve["eval_time_s"].append(time.perf_counter() - start)
        last = (lambda name: curve[name][-1] if curve[name] else float("nan"))
        log(f"  [{run}] step {step:5d}  train loss {last('train_loss'):.3f} (hint {last('hint_loss'):.3f})"
            f"  held-out recall far {result['far_acc']:.3f} near {result['near_acc']:.3f}"
            f"  ({time.perf_counter() - start:.0f} s)")

    total_steps = s.short_steps + s.steps
    for step in range(total_steps):
        if s.eval_every and step % s.eval_every == 0:
            run_eval(step)
        t0 = time.perf_counter()
        batch = task.sample(s.batch_size, data, short=step < s.short_steps)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, s)
        loss = model(batch.input_ids, labels=batch.labels).loss
        hint_loss = hint.loss(batch.input_ids)
        weight = hint.weight(step, s)
        optimizer.zero_grad(set_to_none=True)
        (loss + weight * hint_loss if weight > 0 else loss).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in parameters], s.grad_clip)
        optimizer.step()
        train_time += time.perf_counter() - t0
        curve["step"].append(step)
        curve["train_loss"].append(float(loss.detach()))
        curve["hint_loss"].append(float(hint_loss.detach()))
    run_eval(total_steps)
    t0 = time.perf_counter()
    final = evaluate(model, held_out(task, s.final_eval_sequences, s.batch_size, seed + 3))
    hint.handle.remove()
    eval_time += time.perf_counter() - t0
    tokens = s.batch_size * (s.short_steps * task.segment_len + s.steps * task.seq_len)
    result = {"run": run, "config": dataclasses.asdict(config), "curve": curve, "final": final,
              "train_s": train_time, "eval_s": eval_time, "wall_s": time.perf_counter() - start,
              "train_tokens_per_s": tokens / max(train_time, 1e-9)}
    return (result, model) if return_model else result


def plot(results: Dict[str, dict], task: RecallTask, settings: TrainSettings, path: str) -> Optional[str]:
    """Training loss (answers, moving average) and held-out recall (far: solid, in-window: dotted)
    against the step; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(14, 4.8))
    for run, result in results.items():
        curve = result["curve"]
        losses = curve["train_loss"]
        span = max(1, len(losses) // 60)
        smooth = [sum(losses[max(0, i - span + 1):i + 1]) / len(losses[max(0, i - span + 1):i + 1])
                  for i in range(len(losses))]
        line, = ax_loss.plot(curve["step"], smooth, label=RUN_NAMES[run])
        ax_acc.plot(curve["eval_step"], curve["eval_far_acc"], marker=".", color=line.get_color(),
                    label=f"{RUN_NAMES[run]}: far")
        ax_acc.plot(curve["eval_step"], curve["eval_near_acc"], linestyle=":", color=line.get_color(),
                    label=f"{RUN_NAMES[run]}: in-window")
    for ax in (ax_loss, ax_acc):
        ax.axvline(settings.short_steps, color="gray", linewidth=0.8)
        ax.set_xlabel(f"step (one-segment sequences before {settings.short_steps}, full length after)")
    ax_loss.axhline(math.log(task.n_values), color="gray", linestyle=":", label=f"ln {task.n_values} (chance)")
    ax_loss.set_ylabel("training loss on the answers")
    ax_loss.legend(fontsize=8)
    ax_acc.axhline(task.chance, color="gray", linestyle="--", label=f"chance 1/{task.n_values}")
    ax_acc.axhline(0.9, color="green", linestyle=":", linewidth=0.8, label="target 0.9")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.set_ylabel("held-out recall")
    ax_acc.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Long-context recall: {task.seq_len} tokens, window {task.segment_len}, far pairs "
                 f">= {task.min_far_distance} positions back")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def backends_used(config: L2MConfig) -> Dict[str, str]:
    ops = ["memory_attention"] + (["topk_memory_read", "gated_memory_write"] if config.memory_layers else [])
    return {op: select_backend(op, torch.device("cpu"), torch.float32, config.backend) for op in ops}


def load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["append", "slots", "both"], default="both",
                        help="memory mode(s) to train; the no-memory baseline always runs")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps on full-length sequences per run (default {TrainSettings.steps}, "
                             f"after {TrainSettings.short_steps} one-segment steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; 1 is steadier on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke version (target not expected)")
    parser.add_argument("--backend", default=None, help="op backend (default: automatic, fused cpu when built)")
    parser.add_argument("--out", default=os.path.join("bench_out", "long_recall"))
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: seconds
    return parser.parse_args(argv)


def at_chance(accuracy: float, queries: int, chance: float) -> bool:
    """Not above chance by more than 3 standard errors of ``queries`` Bernoulli(chance) guesses."""
    return accuracy <= chance + 3 * math.sqrt(chance * (1 - chance) / max(1, queries))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    task, settings, d_model = RecallTask(), TrainSettings(), 64
    if args.quick:
        settings = dataclasses.replace(settings, short_steps=300, steps=80, eval_every=50,
                                       final_eval_sequences=128)
    if args.tiny:
        task = RecallTask(segment_len=10, n_segments=8, gap_segments=2, n_far_pairs=4, local_pairs=1,
                          n_queries=2, n_keys=16, n_values=4, n_noise=2)
        settings = dataclasses.replace(settings, short_steps=2, steps=2, batch_size=2, warmup=1, eval_every=2,
                                       eval_sequences=2, final_eval_sequences=2)
        d_model = 16
    if args.steps is not None:
        settings = dataclasses.replace(settings, steps=args.steps)
    runs = (["append", "slots"] if args.mode == "both" else [args.mode]) + ["none"]
    configs = {run: model_config(task, run, d_model=d_model, backend=args.backend) for run in runs}
    window = configs["none"].window

    print(f"long-context recall: {task.seq_len} tokens = {task.n_segments} segments of {task.segment_len} = "
          f"{task.seq_len / window:g} x the attention window ({window}); {task.n_far_pairs} far pairs in the first "
          f"{task.far_segments * task.segment_len} tokens, {task.n_queries} queries of them at the end, "
          f"each >= {task.min_far_distance} positions after its pair (two layers of local attention reach "
          f"{2 * (window - 1)})")
    print(f"chance level: 1 / {task.n_values} values = {task.chance:.4f}")
    print(f"model: d_model {d_model}, 2 layers, 4 heads, memory on the last; per run {settings.short_steps} "
          f"one-segment + {settings.steps} full-length steps of {settings.batch_size} sequences; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for run in runs:
        print(f"  backends ({run}): " + ", ".join(f"{op} -> {b}" for op, b in backends_used(configs[run]).items()))
    if args.backend is None and any(b == "reference" for run in runs for b in backends_used(configs[run]).values()):
        reasons = BACKENDS["cpu"].not_supported_reasons("memory_attention", torch.device("cpu"), torch.float32)
        print("  note: ops on the reference backend" + (f" (cpu backend: {'; '.join(reasons)})" if reasons else "")
              + ": slower than the fused cpu backend the step counts are sized for (about 2x for append)")
    print(f"start: {load()}", flush=True)

    results, total_start = {}, time.perf_counter()
    for run in runs:
        results[run] = train_run(run, task, configs[run], settings, args.seed,
                                 log=lambda line: print(line, flush=True))
        r = results[run]
        print(f"{run}: far recall {r['final']['far_acc']:.4f}, in-window {r['final']['near_acc']:.4f}; "
              f"train {r['train_s']:.0f} s ({r['train_tokens_per_s']:.0f} tokens/s), eval {r['eval_s']:.0f} s; "
              f"{load()}", flush=True)
    total = time.perf_counter() - total_start

    os.makedirs(args.out, exist_ok=True)
    png = plot(results, task, settings, os.path.join(args.out, "long_recall.png"))
    far_queries = results["none"]["final"]["far_queries"]
    best = max(results[run]["final"]["far_acc"] for run in runs if run != "none")
    baseline_at_chance = at_chance(results["none"]["final"]["far_acc"], far_queries, task.chance)
    summary = {
        "accuracy": {run: results[run]["final"]["far_acc"] for run in runs},
        "in_window_accuracy": {run: results[run]["final"]["near_acc"] for run in runs},
        "chance": task.chance, "far_queries": far_queries,
        "target_met": best >= 0.9 and baseline_at_chance, "baseline_at_chance": baseline_at_chance,
        "wall_s": total, "train_s": {run: results[run]["train_s"] for run in runs},
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
        "seed": args.seed, "seq_len": task.seq_len, "window": window,
        "task": dataclasses.asdict(task), "settings": dataclasses.asdict(settings),
        "backends": {run: backends_used(configs[run]) for run in runs},
        "runs": results,
    }
    json_path = os.path.join(args.out, "long_recall.json")
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1)

    print()
    print(f"held-out recall of far queries ({far_queries} queries, all beyond the window; "
          f"chance 1/{task.n_values} = {task.chance:.4f}):")
    for run in runs:
        r = results[run]
        print(f"  {RUN_NAMES[run]:20s} {r['final']['far_acc']:.4f}   (in-window {r['final']['near_acc']:.4f}; "
              f"train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s)")
    print(f"target (>= 0.90 with memory in one mode, chance without): {'met' if summary['target_met'] else 'NOT met'}")
    print(f"total wall time {total:.0f} s; {load()}")
    print(f"wrote {json_path}" + (f" and {png}" if png else " (matplotlib missing: no PNG)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
