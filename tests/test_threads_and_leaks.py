"""Concurrent calls from several Python threads, and memory that stays flat over many calls.

Every op on the cpu backend (which releases the GIL and runs its own OpenMP loops) and on the
reference is called from several threads at once, each thread on its own inputs; each result and
gradient must be bitwise the result of the same call made alone. Then 1,000 forward+backward calls
(the ops in turn) must leave the process's resident memory where it was after a warm-up.
"""
import gc
import os
import threading

import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels.backends import BACKENDS
from l2m_kernels.testing import rand, rand_lse, rand_unit

CPU = torch.device("cpu")
CPU_REASONS = [r for op in ("topk_memory_read", "memory_attention", "gated_memory_write", "quantized_topk_read")
               for r in BACKENDS["cpu"].not_supported_reasons(op, CPU, torch.float32)]
B, H, Hm, T, N, D = 2, 4, 2, 6, 40, 8


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: rand(*shape, generator=g, requires_grad=True)  # noqa: E731
    unit = lambda *shape: torch.rand(shape, generator=g).clamp_min(1e-3).requires_grad_()  # noqa: E731
    return dict(q=r(B, H, T, D), keys=r(B, Hm, N, D), values=r(B, Hm, N, D), subkeys=r(H, 2, 5, D // 2),
                pk_values=r(25, D), memory=r(B, Hm, N, D), slots=torch.randint(-1, N, (B, Hm, T, 3), generator=g),
                weights=unit(B, Hm, T, 3), add=r(B, Hm, T, D), erase=unit(B, Hm, T, 1), ctx=r(B, Hm, 9, D),
                lse=(torch.randn(B, H, T, generator=g) * 3).requires_grad_(), gate=r(H, 1, 1),
                int8_keys=torch.randint(-127, 128, (Hm, N, D), generator=g).to(torch.int8),
                key_scale=torch.rand(Hm, D, generator=g) * 0.05 + 0.01,
                float8_values=torch.randn(Hm, N, D, generator=g).to(torch.float8_e4m3fn),
                value_scale=torch.rand(Hm, N, generator=g) + 0.1)


def _op_calls(x, backend):
    """One closure per op (the eight ops), each returning that op's outputs."""
    return [
        lambda: l2m.topk_memory_read(x["q"], x["keys"], x["values"], 5, backend=backend),
        lambda: l2m.product_key_read(x["q"], x["subkeys"], x["pk_values"], 4, backend=backend),
        lambda: l2m.merge_attention(x["add"], x["lse"][:, :Hm], x["ctx"][:, :, :T], x["lse"][:, Hm:],
                                    backend=backend),
        lambda: (l2m.gated_merge(x["add"], x["ctx"][:, :, :T], x["gate"][:Hm], backend=backend),),
        lambda: (l2m.gated_memory_write(x["memory"], x["slots"], x["weights"], x["add"], x["erase"],
                                        backend=backend),),
        lambda: (l2m.gated_dense_update(x["memory"], x["add"][:, :, :1], x["erase"].mean(2, keepdim=True),
                                        x["gate"][:Hm], backend=backend),),
        lambda: l2m.memory_attention(x["q"], x["ctx"], x["ctx"], x["keys"], x["values"], 3, window=4,
                                     backend=backend),
        lambda: l2m.quantized_topk_read(x["q"], x["int8_keys"], x["key_scale"], x["float8_values"], 6,
                                        value_scale=x["value_scale"], backend=backend),
    ]


def _forward_backward(call, leaves):
    """Outputs of ``call()`` and the gradients of their sum with respect to ``leaves``."""
    outputs = call()
    loss = sum(o.float().sum() for o in outputs if o.is_floating_point() and o.requires_grad)
    return [o.detach() for o in outputs] + list(torch.autograd.grad(loss, leaves, allow_unused=True))


def _every_op(x, backend):
    """One forward and backward through every op; returns every output and gradient."""
    leaves = [t for t in x.values() if t.requires_grad]
    return [r for call in _op_calls(x, backend) for r in _forward_backward(call, leaves)]


@pytest.mark.parametrize("backend", [
    pytest.param("cpu", marks=pytest.mark.skipif(bool(CPU_REASONS), reason="cpu backend: " + "; ".join(CPU_REASONS))),
    "reference"])
def test_threads_give_the_results_of_sequential_calls(backend):
    seeds = list(range(6))
    alone = {seed: _every_op(_inputs(seed), backend) for seed in seeds}
    results, errors = {}, []

    def worker(seed):
        try:
            for _ in range(3):
                results.setdefault(seed, []).append(_every_op(_inputs(seed), backend))
        except Exception as exc:  # surfaced below with the seed
            errors.append((seed, exc))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for seed in seeds:
        for repeat in results[seed]:
            for i, (got, want) in enumerate(zip(repeat, alone[seed])):
                same = got is None and want is None or got is not None and want is not None and torch.equal(got, want)
                assert same, f"seed {seed}: result {i} differs from the call made alone"


def _resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
@pytest.mark.skipif(bool(CPU_REASONS), reason="cpu backend: " + "; ".join(CPU_REASONS))
def test_a_thousand_calls_leave_memory_flat():
    """1,000 forward+backward calls, the eight ops in turn (125 each), on the cpu backend."""
    x = _inputs(0)
    leaves = [t for t in x.values() if t.requires_grad]
    calls = _op_calls(x, "cpu")
    for i in range(140):  # warm-up: allocator pools, OpenMP thread stacks, autograd caches
        _forward_backward(calls[i % len(calls)], leaves)
    gc.collect()
    before = _resident_bytes()
    for i in range(1000):
        _forward_backward(calls[i % len(calls)], leaves)
    gc.collect()
    grown = _resident_bytes() - before
    # A call allocates up to about 20 KB of outputs and gradients: keeping one of them per call would
    # add several MB over 1,000 calls.
    assert grown < 2 * 2**20, f"resident memory grew by {grown / 2**20:.2f} MiB over 1,000 calls"
