"""Training under ``torch.compile(fullgraph=True)`` (inductor) with inputs as models produce them.

Each case builds its tensors the way a model does: queries, keys and values come out of a
projection followed by ``.view(B, T, H, D).transpose(1, 2)`` (non-contiguous), memories are sliced
out of larger banks, shared memories are expanded over the batch with stride 0, gates broadcast.
The number of tokens ``T`` is marked dynamic, so a second length reuses the compiled graphs
(checked); forward and backward run compiled and every gradient must equal eager. The same runs
under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

Inductor compiles are slow on a 2-core machine, so the cases are few and each covers several ops
and layouts at once: one step through all eight ops and one through the four modules (each in float32
and under autocast), and two AdamW steps of ``L2MModel`` per memory mode.
"""
import copy

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import l2m_kernels as l2m
from l2m_kernels.backends import BACKENDS
from l2m_kernels.models import L2MConfig, L2MModel
from l2m_kernels.modules import MemoryAttention, MemoryWriter, ProductKeyMemory, TopKMemory
from l2m_kernels.testing import TOLERANCE, assert_close, rel_rms_error

CPU = torch.device("cpu")
CPU_REASONS = BACKENDS["cpu"].not_supported_reasons("memory_attention", CPU, torch.float32)
needs_cpu_ext = pytest.mark.skipif(bool(CPU_REASONS), reason="cpu backend: " + "; ".join(CPU_REASONS))

B, H, Hm, D, N, DIM = 2, 4, 2, 8, 24, 32
LENGTHS = (9, 13)  # the second length must reuse the graphs compiled for the first (dynamic T)
PRECISIONS = ["float32", "autocast-bfloat16"]


def _precision(name):
    if name == "float32":
        return torch.autocast("cpu", enabled=False), torch.float32
    return torch.autocast("cpu", dtype=torch.bfloat16), torch.bfloat16


def _heads(x, heads, dim):
    """(B, T, heads * dim) -> (B, heads, T, dim): a transposed view, as attention layers make."""
    return x.view(x.shape[0], x.shape[1], heads, dim).transpose(1, 2)


class AllOps(nn.Module):
    """One step through every op, each fed by projections of ``x`` (B, T, DIM)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(DIM, 6 * H * D)
        self.bank_keys = nn.Parameter(torch.randn(Hm, 2 * N, D))        # sliced to N slots
        self.bank_values = nn.Parameter(torch.randn(2 * N, Hm, D))      # sliced and transposed
        self.subkeys = nn.Parameter(torch.randn(H, 2, 5, D // 2))
        self.pk_values = nn.Parameter(torch.randn(25, D))
        self.gate = nn.Parameter(torch.randn(H, 1, 1))
        self.memory = nn.Parameter(torch.randn(B, Hm, N, D))
        self.forget = nn.Parameter(torch.randn(1, 1, D))
        # An int8 memory as a MemoryStore holds it (state, not parameters), sliced to N slots.
        self.register_buffer("int8_keys", torch.randint(-127, 128, (Hm, 2 * N, D), dtype=torch.int8))
        self.register_buffer("key_scale", torch.rand(Hm, D) * 0.05 + 0.01)
        self.register_buffer("int8_values", torch.randint(-127, 128, (Hm, N, D), dtype=torch.int8))
        self.register_buffer("value_scale", torch.rand(Hm, N) * 0.01 + 1e-3)

    def forward(self, x):
        T = x.shape[1]
        q, k, v, add, erase, upd = self.proj(x).chunk(6, dim=-1)
        q, k, v, upd = (_heads(t, H, D) for t in (q, k, v, upd))                  # (B, H, T, D) views
        add = _heads(add, H, D)[:, :Hm]                                           # sliced heads
        erase = torch.sigmoid(_heads(erase, H, D)[:, Hm:])
        keys = self.bank_keys[:, :N].unsqueeze(0).expand(B, -1, -1, -1)          # stride-0 batch
        values = self.bank_values[:N].transpose(0, 1).unsqueeze(0).expand(B, -1, -1, -1)
        read = l2m.topk_memory_read(q, keys, values, 5, valid_len=torch.tensor([N, N - 7]))
        shared = l2m.topk_memory_read(k, self.bank_keys[:, 1::2], values[0], 3)   # strided slots
        pk = l2m.product_key_read(q, self.subkeys, self.pk_values, 4)
        merged, lse = l2m.merge_attention(read.out, read.lse, pk.out, pk.lse)
        blended = l2m.gated_merge(merged, shared.out, self.gate)
        attn = l2m.memory_attention(q, k[:, :Hm], v[:, :Hm], keys, values, 4, window=5,
                                    valid_len=torch.tensor([N - 2, N]))
        gated = l2m.memory_attention(q, k, v, self.bank_keys[:, :N], values[0], 2, merge="gate",
                                     gate=self.gate.expand(H, T, 1))
        slots = read.indices[:, ::2, :, :2]                                       # (B, Hm, T, 2)
        new_memory = l2m.gated_memory_write(self.memory, slots, read.weights[:, ::2, :, :2].to(add.dtype),
                                            add, erase)
        dense = l2m.gated_dense_update(new_memory, upd[:, :Hm, :1], erase.mean(2, keepdim=True),
                                       self.forget)
        quantized = l2m.quantized_topk_read(k, self.int8_keys[:, :N], self.key_scale, self.int8_values, 4,
                                            value_scale=self.value_scale)
        return (blended.float().square().mean() + lse.mean() + attn.out.float().mean()
                + attn.lse_mem.mean() + gated.out.float().square().mean()
                + dense.float().square().mean() + read.weights.mean()
                + quantized.out.float().square().mean() + quantized.lse.mean())


class AllModules(nn.Module):
    """A step through TopKMemory (learned), MemoryWriter into a TopKMemory (state),
    ProductKeyMemory and MemoryAttention reading a TopKMemory."""

    def __init__(self):
        super().__init__()
        self.learned = TopKMemory(N, D, D, num_heads=Hm)
        self.attention = MemoryAttention(DIM, H, n_kv_heads=Hm, head_dim=D, topk=4, window=6,
                                         memory=TopKMemory(N, D, D, num_heads=Hm))
        self.pkm = ProductKeyMemory(DIM, n_sub=5, key_dim=D, heads=2, k=4, gated=True)
        self.writer = MemoryWriter(DIM, D, D, num_heads=Hm, k=2)
        self.q_proj = nn.Linear(DIM, H * D)
        self.state = TopKMemory(N, D, D, num_heads=Hm, trainable=False)

    def forward(self, x):
        q = _heads(self.q_proj(x), H, D)
        read = self.learned(q, k=3)
        h = self.attention(x) + self.pkm(x)
        self.state.load_(self.state_keys, self.state_values)
        self.writer(h, self.state)                                    # gated write, differentiable
        written = self.state.read(q, 3)
        return h.square().mean() + read.out.square().mean() + written.out.square().mean()


def _grads(module, loss):
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {name: g for (name, p), g in zip(
        ((n, p) for n, p in module.named_parameters() if p.requires_grad), grads)}


def _check(tag, got, want, exact, dtype):
    """``got`` (compiled) against ``want`` (eager, same precision) within the dtype's tolerance.

    Under autocast, eager and inductor round bfloat16 intermediates at different places, so the
    rule is flash-attention's: against the float32 result ``exact``, the compiled error is at most
    twice the eager one (plus the float32 tolerance for results that autocast leaves exact).
    """
    if exact is None:
        assert_close(tag, got, want, dtype=dtype)
        return
    eager_error = rel_rms_error(want, exact)
    compiled_error = rel_rms_error(got, exact)
    limit = 2 * eager_error + TOLERANCE[torch.float32]
    assert compiled_error <= limit, (f"{tag}: compiled error {compiled_error:.3e} against float32 exceeds "
                                     f"twice the eager error {eager_error:.3e}")


def _compare(tag, got, want, exact, dtype):
    """Losses and gradient dicts: ``(loss, {name: grad})`` each; ``exact`` likewise or None."""
    _check(f"{tag} loss", got[0].detach(), want[0].detach(), None if exact is None else exact[0].detach(), dtype)
    assert set(got[1]) == set(want[1])
    for name, w in want[1].items():
        g = got[1][name]
        assert (g is None) == (w is None), name
        if w is not None:
            _check(f"{tag} d{name}", g, w, None if exact is None else exact[1][name], dtype)


def _step_and_compare(module, make_input, precision, tag):
    """Compiled (dynamic T) vs eager, loss and every parameter gradient, at two lengths; the second
    length must not recompile."""
    context, dtype = _precision(precision)
    torch._dynamo.reset()
    frames = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(module, fullgraph=True, backend=frames)

    def run(fn, x, ctx):
        with ctx:
            loss = fn(x)
        return loss, _grads(module, loss)

    for T in LENGTHS:
        x = make_input(T)
        torch._dynamo.mark_dynamic(x, 1)
        want = run(module, x, context)
        got = run(compiled, x, context)
        exact = None if dtype == torch.float32 else run(module, x, torch.autocast("cpu", enabled=False))
        _compare(f"{tag} T={T}", got, want, exact, dtype)
    assert frames.frame_count == 1, f"{tag}: recompiled for a new length ({frames.frame_count} frames)"


@needs_cpu_ext
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_op_trains_compiled(precision):
    torch.manual_seed(0)
    module = AllOps()
    _step_and_compare(module, lambda T: torch.randn(B, T, DIM), precision, "ops")


def _adamw_steps(models, losses, contexts, batches):
    """One AdamW step per batch for each model, its loss run under its context; returns, per model,
    the list of ``(loss, {name: grad})`` per step and the final ``{name: parameter}``."""
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    history = [[] for _ in models]
    for batch in batches:
        for model, loss_fn, context, optimizer, record in zip(models, losses, contexts, optimizers, history):
            with context:
                loss = loss_fn(batch)
            loss.backward()
            record.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
            optimizer.step()
            optimizer.zero_grad()
    return history, [{n: p.detach() for n, p in m.named_parameters()} for m in models]


def _train_and_compare(model, loss_of, batches, precision, tag):
    """AdamW steps of ``model``: compiled forward/backward against eager (and, under autocast, against
    float32 eager too); same losses and gradients at every step, same parameters at the end."""
    context, dtype = _precision(precision)
    copies = [model, copy.deepcopy(model)] + ([] if dtype == torch.float32 else [copy.deepcopy(model)])
    torch._dynamo.reset()
    compiled = torch.compile(lambda batch: loss_of(copies[1], batch), fullgraph=True)
    losses = [lambda batch: loss_of(copies[0], batch), compiled]
    losses += [lambda batch: loss_of(copies[2], batch)] if len(copies) == 3 else []
    contexts = [context, context, torch.autocast("cpu", enabled=False)]
    history, final = _adamw_steps(copies, losses, contexts, batches)
    exact_history = history[2] if len(copies) == 3 else [None] * len(batches)
    for step, (want, got, exact) in enumerate(zip(history[0], history[1], exact_history)):
        _compare(f"{tag} step {step}", got, want, exact, dtype)
    for name, want in final[0].items():
        _check(f"{tag} {name} after {len(batches)} AdamW steps", final[1][name], want,
               final[2][name] if len(copies) == 3 else None, dtype)


@needs_cpu_ext
@pytest.mark.parametrize("precision", PRECISIONS)
def test_modules_train_compiled(precision):
    torch.manual_seed(0)
    module = AllModules()
    module.state_keys = torch.randn(Hm, N, D)
    module.state_values = torch.randn(Hm, N, D)
    _step_and_compare(module, lambda T: torch.randn(B, T, DIM), precision, "modules")


@needs_cpu_ext
# Each mode once, one of them under autocast (the ops and modules run under both precisions above).
@pytest.mark.parametrize("mode,precision", [("append", "float32"), ("slots", "autocast-bfloat16")])
def test_model_training_step_compiled(mode, precision):
    """Two AdamW steps of L2MModel (two segments each, memory written between them)."""
    torch.manual_seed(0)
    model = L2MModel(L2MConfig(vocab_size=32, d_model=DIM, n_layers=1, n_heads=H, n_kv_heads=Hm,
                               segment_len=8, window=6, memory_slots=N, topk=4, write_topk=2,
                               memory_mode=mode))
    batches = [torch.randint(0, 32, (B, 16)) for _ in range(2)]
    _train_and_compare(model, lambda m, ids: m(ids, labels=ids).loss, batches, precision, mode)
