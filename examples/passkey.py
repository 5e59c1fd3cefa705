"""Passkey retrieval far past the trained length: a tiny Llama trained at L tokens, evaluated at 16x
and 64x L with ``attach_memory(..., position_mode="fixed")`` and without memory.

    python examples/passkey.py [--length 256] [--steps 600] [--examples 40] [--seed 0] [--threads T]
                               [--factors 16,64] [--block-repr max|mean] [--out bench_out/passkey] [--smoke]

The task (:class:`PasskeyTask`): a haystack of random filler tokens holds one needle, the marker
token followed by the passkey (one of ``N_KEYS`` key tokens, uniform); the last token is the
question token, at which the model must predict the passkey. Chance is ``1 / N_KEYS``. The needle
sits uniformly in the first ``1 - 1/16`` of the context, so at 16x L and beyond it is always
farther back than L tokens.

Training: a randomly initialised ``LlamaForCausalLM`` (2 layers, hidden 128, 4 query and 2 key-value
heads, rotary positions, ``max_position_embeddings = L``), on contexts of exactly L tokens, with the
loss on the answer only (AdamW, warmup and cosine decay). No weights are downloaded.

Evaluation, on held-out haystacks of ``factor * L`` tokens: the context is prefilled in one call
and the question token is fed alone (one query: the block selection is that query's), then the
prediction is the most likely token. Two settings:

- ``memory``: ``attach_memory(model, position_mode="fixed", window=L/4, block_size=L/8,
  topk_blocks=4, sink=4, chunk_size=L/4, block_repr="max")``: every distance the model sees stays
  below L (local segment at most window + block_size + chunk_size, memory at ``fixed_distance`` =
  window);
- ``no memory``: the same attachment with ``topk_blocks=0`` and ``sink=0``: the model attends to its
  local segment only (a window of about L / 2 to L tokens), so the needle is out of reach.

Output: accuracy per context length and setting, wall times, and ``passkey.json`` in ``--out``.
Everything is seeded; for a given ``--threads`` a run is deterministic.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

N_FILLER, N_KEYS = 48, 32
PAD, MARKER, QUESTION = 0, 1, 2
FILLER = range(3, 3 + N_FILLER)
KEYS = range(3 + N_FILLER, 3 + N_FILLER + N_KEYS)
VOCAB = 3 + N_FILLER + N_KEYS


@dataclass
class PasskeyTask:
    length: int

    def batch(self, size: int, generator: torch.Generator):
        """(ids (size, length), answers (size,)): filler, the needle [MARKER, key] in the first
        15/16 of the context, the QUESTION token last."""
        ids = torch.randint(FILLER.start, FILLER.stop, (size, self.length), generator=generator)
        answers = torch.randint(KEYS.start, KEYS.stop, (size,), generator=generator)
        room = max(1, (self.length * 15) // 16 - 2)
        where = torch.randint(0, room, (size,), generator=generator)
        rows = torch.arange(size)
        ids[rows, where] = MARKER
        ids[rows, where + 1] = answers
        ids[:, -1] = QUESTION
        return ids, answers


@dataclass
class Settings:
    length: int = 256
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 50
    examples: int = 40
    eval_batch: int = 8
    factors: tuple = (16, 64)
    seed: int = 0
    block_repr: str = "max"


def make_model(length: int, seed: int):
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length,
                                      attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


def train(model, settings: Settings, log=print) -> list:
    task = PasskeyTask(settings.length)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)

    def rate(step):  # linear warmup, then cosine decay to 0
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    model.train()
    curve = []
    for step in range(settings.steps):
        ids, answers = task.batch(settings.batch, generator)
        logits = model(ids, use_cache=False).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        accuracy = (logits.argmax(-1) == answers).float().mean().item()
        curve.append((step, loss.item(), accuracy))
        if step % 100 == 0 or step == settings.steps - 1:
            log(f"step {step:5d}  loss {loss.item():.3f}  train accuracy {accuracy:.2f}")
    model.eval()
    return curve


def memory_config(length: int, memory: bool, block_repr: str = "max") -> dict:
    quarter = max(1, length // 4)
    return dict(position_mode="fixed", window=quarter, block_size=max(1, length // 8), chunk_size=quarter,
                block_repr=block_repr, topk_blocks=4 if memory else 0, sink=4 if memory else 0)


def evaluate(model, settings: Settings, context: int, memory: bool) -> dict:
    from l2m_kernels.integrations.transformers import MemoryCache, attach_memory, detach_memory
    task = PasskeyTask(context)
    generator = torch.Generator().manual_seed(10_000 + settings.seed + context)
    attach_memory(model, **memory_config(settings.length, memory, settings.block_repr))
    correct, started = 0, time.perf_counter()
    try:
        with torch.no_grad():
            for first in range(0, settings.examples, settings.eval_batch):
                size = min(settings.eval_batch, settings.examples - first)
                ids, answers = task.batch(size, generator)
                cache = MemoryCache.for_model(model)
                model(ids[:, :-1], cache=cache, use_cache=True)
                logits = model(ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
                correct += (logits.argmax(-1) == answers).sum().item()
    finally:
        detach_memory(model)
    seconds = time.perf_counter() - started
    return dict(context=context, memory=memory, accuracy=correct / settings.examples, examples=settings.examples,
                seconds=round(seconds, 1), tokens_per_second=round(settings.examples * context / seconds))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=Settings.length, help="training context L")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--examples", type=int, default=Settings.examples, help="held-out examples per setting")
    parser.add_argument("--factors", default="16,64", help="evaluation contexts, as multiples of L")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-repr", default="max", choices=("max", "mean"), help="MemoryConfig.block_repr")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench_out/passkey")
    parser.add_argument("--smoke", action="store_true", help="a few steps at tiny sizes (tests)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    factors = tuple(int(f) for f in args.factors.split(","))
    settings = Settings(length=args.length, steps=args.steps, examples=args.examples, factors=factors, seed=args.seed,
                        block_repr=args.block_repr)
    if args.smoke:
        settings = Settings(length=32, steps=3, batch=4, warmup=1, examples=2, eval_batch=2, factors=(1, 4),
                            seed=args.seed, block_repr=args.block_repr)
    print(f"passkey: L={settings.length}, {settings.steps} steps, {settings.examples} examples per setting, "
          f"chance {1 / N_KEYS:.3f}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    started = time.perf_counter()
    model = make_model(settings.length, settings.seed)
    curve = train(model, settings)
    train_seconds = time.perf_counter() - started
    results = []
    for factor in (1,) + tuple(f for f in settings.factors if f != 1):
        for memory in (True, False):
            result = evaluate(model, settings, factor * settings.length, memory)
            result["factor"] = factor
            results.append(result)
            print(f"context {factor:3d}x L = {result['context']:6d}  {'memory   ' if memory else 'no memory'}  "
                  f"accuracy {result['accuracy']:.2f}  ({result['seconds']} s, {result['tokens_per_second']} tokens/s)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "passkey.json"), "w") as f:
        json.dump(dict(settings=asdict(settings), vocab=VOCAB, chance=1 / N_KEYS,
                       memory={"memory": memory_config(settings.length, True, settings.block_repr),
                               "no memory": memory_config(settings.length, False, settings.block_repr)},
                       train_seconds=round(train_seconds, 1), curve=curve, results=results,
                       torch=torch.__version__, threads=torch.get_num_threads()), f, indent=1)
    print(f"training {train_seconds:.0f} s; written {os.path.join(args.out, 'passkey.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
