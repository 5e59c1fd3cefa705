"""Benchmark the prefill of a Hugging Face model with memory attached
(:func:`l2m_kernels.integrations.transformers.attach_memory`) against the same model unpatched.

Model (``CONFIG``): a randomly initialised ``LlamaForCausalLM``, float32, hidden 256, 4 layers, 8
query heads of 32 and 2 key-value heads, vocabulary 1024, batch 1 (no weights can be downloaded; the
cost of attention does not depend on the weights). Memory: ``MEMORY`` (window 512, blocks of 64, 8
blocks read per chunk of 512 queries, sink 4, "fixed" positions).

One forward over T tokens (``model(ids)``, no gradient): the unpatched model with
``attn_implementation="sdpa"`` (causal attention over all T keys; on the CPU, PyTorch's
flash-attention kernel, no T x T buffer), and the same model with memory attached, which processes the
T tokens in chunks of 512 queries inside each layer. Lengths: 4K, 8K, 16K for both, and 32K for the
memory only (``--quick``: 2K and 4K, and 8K for the memory). Each length's variants run interleaved.

Rows ("HF prefill"): ``fwd ms`` (median, with the range), tokens/s in the note, ``peak MB``: the
allocator-level peak of one forward above what is live before it (weights excluded). Rows ("HF
decode"), at the same lengths: after a prefill, ``DECODE_STEPS`` greedy one-token calls per variant
through its cache (the variants alternating token by token); ``fwd ms`` is the median per token. The memory's peak grows
linearly in T (the blocks), the local and memory parts are bounded by the chunk; the unpatched
model's keys and values grow linearly too.
"""
from __future__ import annotations

import inspect
import statistics
import time

import torch

from l2m_kernels import benchmark as bm

from ._common import skipped_row

OP, DECODE_OP = "HF prefill", "HF decode"
DECODE_STEPS = 16
CONFIG = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1 << 16)
MEMORY = dict(window=512, block_size=64, topk_blocks=8, sink=4, chunk_size=512, position_mode="fixed")
LENGTHS, MEMORY_ONLY = (4096, 8192, 16384), (32768,)
QUICK_LENGTHS, QUICK_MEMORY_ONLY = (2048, 4096), (8192,)
TINY = dict(config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024),
            memory=dict(window=16, block_size=8, topk_blocks=2, sink=2, chunk_size=16, position_mode="fixed"),
            lengths=(64,), memory_only=(128,))
VARIANTS = ("attach_memory", "sdpa (unpatched)")


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None, *, tiny: bool = False) -> list:
    try:
        import transformers
        from l2m_kernels.integrations.transformers import attach_memory
    except ImportError as exc:
        return [skipped_row(OP, "-", torch.float32, v, f"skipped: {exc}") for v in VARIANTS]
    config = dict(TINY["config"] if tiny else CONFIG)
    memory = dict(TINY["memory"] if tiny else MEMORY)
    lengths = TINY["lengths"] if tiny else QUICK_LENGTHS if quick else LENGTHS
    memory_only = TINY["memory_only"] if tiny else QUICK_MEMORY_ONLY if quick else MEMORY_ONLY
    reps = 1 if tiny else 3
    torch.manual_seed(0)
    dtype = torch.float32
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, attn_implementation="sdpa"))
    plain = plain.to(device, dtype).eval()
    patched = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, attn_implementation="sdpa"))
    patched.load_state_dict(plain.state_dict())
    patched = attach_memory(patched.to(device, dtype).eval(), **memory)
    describe = (f"llama d={config['hidden_size']} layers={config['num_hidden_layers']} "
                f"H={config['num_attention_heads']} Hkv={config['num_key_value_heads']}")
    memory_text = ", ".join(f"{k}={v}" for k, v in memory.items())

    rows = []
    for length in tuple(lengths) + tuple(memory_only):
        ids = torch.randint(0, config["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))
        ids = ids.to(device)
        models = {"attach_memory": patched}
        if length in lengths:
            models["sdpa (unpatched)"] = plain

        def forward(model):
            with torch.no_grad():
                return model(ids, use_cache=False).logits[:, -1]

        for model in models.values():  # warm-up
            forward(model)
        times = {name: [] for name in models}
        order = list(models)
        for _ in range(reps):
            for name in order:
                bm.synchronize(device)
                start = time.perf_counter()
                forward(models[name])
                bm.synchronize(device)
                times[name].append(time.perf_counter() - start)
            order.reverse()
        shape = f"{describe} T={length}"
        for name in VARIANTS:
            if name not in models:
                rows.append(skipped_row(OP, shape, dtype, name, "not run: the unpatched model is timed up to "
                                        f"{max(lengths)} tokens"))
                continue
            peak = bm.peak_memory_bytes(lambda: forward(models[name]), device)
            median = statistics.median(times[name])
            note = f"{length / median:.0f} tokens/s ({len(times[name])} timed, interleaved)"
            if name == "attach_memory":
                note += f"; memory {memory_text}"
            rows.append(bm.Row(OP, shape, "float32", name, median * 1e3, None, None,
                               None if peak is None else peak / 2 ** 20, note=note, reps=len(times[name]),
                               fwd_spread_ms=[min(times[name]) * 1e3, max(times[name]) * 1e3]))
        rows += _decode_rows(models, ids, f"{describe} context={length}", 2 if tiny else DECODE_STEPS, device)
    return rows


def _decode_rows(models: dict, ids: torch.Tensor, shape: str, steps: int, device: torch.device) -> list:
    """Greedy decoding after a prefill of ``ids``: each variant's cache built by one call, then
    ``steps`` one-token calls per variant, the variants alternating token by token."""
    state = {}
    with torch.no_grad():
        for name, model in models.items():
            cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            out = model(ids, use_cache=True)
            state[name] = (cache_name, out.past_key_values, out.logits[:, -1:].argmax(-1))
        times = {name: [] for name in models}
        for _ in range(steps):
            for name, model in models.items():
                cache_name, cache, token = state[name]
                bm.synchronize(device)
                start = time.perf_counter()
                out = model(token, use_cache=True, **{cache_name: cache})
                bm.synchronize(device)
                times[name].append(time.perf_counter() - start)
                state[name] = (cache_name, cache, out.logits[:, -1:].argmax(-1))
    rows = []
    for name in VARIANTS:
        if name not in models:
            continue
        median = statistics.median(times[name])
        rows.append(bm.Row(DECODE_OP, shape, "float32", name, median * 1e3, None, None, None,
                           note=f"{1 / median:.0f} tokens/s per sequence ({steps} greedy tokens, the variants "
                                "alternating); peak memory not measured",
                           reps=steps, fwd_spread_ms=[min(times[name]) * 1e3, max(times[name]) * 1e3]))
    return rows
