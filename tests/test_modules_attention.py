"""MemoryAttention module: the op behind projections, a drop-in for a Transformer's self-attention."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import l2m_kernels as l2m
from l2m_kernels.backends import BACKENDS
from l2m_kernels.modules import MemoryAttention, TopKMemory
from l2m_kernels.modules.memory_attention import apply_rotary
from l2m_kernels.ops.memory_attention.reference import local_attention_ref
from l2m_kernels.ops.merge.reference import gated_merge_ref, merge_attention_ref
from l2m_kernels.ops.topk_read.reference import topk_memory_read_ref
from l2m_kernels.testing import assert_close, rand

CPU_CANNOT_ATTEND = BACKENDS["cpu"].not_supported_reasons("memory_attention", torch.device("cpu"), torch.float32)


def _module(merge="joint", n_kv_heads=2, rotary_dims=4, window=5, **kwargs):
    module = MemoryAttention(d_model=24, n_heads=4, n_kv_heads=n_kv_heads, head_dim=8, topk=3, window=window,
                             merge=merge, rotary_dims=rotary_dims, backend="reference", **kwargs)
    if module.gate is not None:
        with torch.no_grad():
            module.gate.copy_(rand(4, 1, 1))  # distinct per-head gates
    return module


@pytest.mark.parametrize("merge", ["joint", "gate"])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_shapes_and_gradients_to_every_parameter(merge, n_kv_heads):
    module = _module(merge, n_kv_heads)
    x = rand(2, 6, 24, requires_grad=True)
    mem_keys, mem_values = rand(2, 2, 11, 8, requires_grad=True), rand(2, 2, 11, 8, requires_grad=True)
    past = rand(2, n_kv_heads, 4, 8), rand(2, n_kv_heads, 4, 8)
    result = module.attend(x, mem_keys, mem_values, valid_len=torch.tensor([11, 7]), past_kv=past)
    assert result.out.shape == (2, 6, 24)
    assert result.context_keys.shape == result.context_values.shape == (2, n_kv_heads, 10, 8)
    assert torch.equal(result.context_keys[:, :, :4], past[0])
    assert result.attention.indices.shape == (2, 4, 6, 3)
    assert (result.attention.indices[1] < 7).all()
    result.out.square().sum().backward()
    names = {name for name, _ in module.named_parameters()}
    assert ("gate" in names) == (merge == "gate")
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for t in (x, mem_keys, mem_values):
        assert t.grad is not None and t.grad.abs().sum() > 0


@pytest.mark.parametrize("merge", ["joint", "gate"])
def test_equals_the_hand_composed_reference_ops(merge):
    module = _module(merge, n_kv_heads=2, rotary_dims=4, window=5)
    B, T, P = 2, 6, 3
    x = rand(B, T, 24)
    mem_keys, mem_values = rand(2, 13, 8), rand(2, 13, 8)   # shared by the batch
    past_k, past_v = rand(B, 2, P, 8), rand(B, 2, P, 8)
    valid_len = torch.tensor([13, 5])
    got = module(x, mem_keys, mem_values, valid_len=valid_len, past_kv=(past_k, past_v), start_pos=40)

    def heads(t, n):
        return t.view(B, T, n, 8).transpose(1, 2)

    positions = torch.arange(40, 40 + T)
    q = apply_rotary(heads(x @ module.q_proj.weight.T, 4), positions, 4, 10000.0)
    k = torch.cat([past_k, apply_rotary(heads(x @ module.k_proj.weight.T, 2), positions, 4, 10000.0)], 2)
    v = torch.cat([past_v, heads(x @ module.v_proj.weight.T, 2)], 2)
    local, lse_local = local_attention_ref(q, k, v, window=5, scale=8 ** -0.5)
    read_out, _, _, read_lse = topk_memory_read_ref(q, mem_keys, mem_values, 3, scale=8 ** -0.5, valid_len=valid_len)
    if merge == "joint":
        merged = merge_attention_ref(local, lse_local, read_out, read_lse)[0]
    else:
        merged = gated_merge_ref(local, read_out, module.gate)
    want = merged.transpose(1, 2).reshape(B, T, 32) @ module.o_proj.weight.T
    assert_close("out", got, want)


def test_rotary_matches_complex_rotation_and_is_relative():
    x = rand(2, 3, 5, 8)
    positions = torch.tensor([0, 3, 7, 100, 12345])
    got = apply_rotary(x, positions, 6, 10000.0)
    freqs = 10000.0 ** (-torch.arange(3, dtype=torch.float64) / 3)
    rotation = torch.polar(torch.ones(5, 3, dtype=torch.float64), positions[:, None].double() * freqs)
    pairs = torch.complex(x[..., :3].double(), x[..., 3:6].double()) * rotation
    want = torch.cat([pairs.real, pairs.imag, x[..., 6:].double()], -1)
    assert_close("rotary", got, want.float())
    # Scores depend only on the distance between positions.
    q, k = rand(1, 1, 1, 8), rand(1, 1, 1, 8)
    scores = [(apply_rotary(q, torch.tensor([p + 9]), 8, 10000.0)
               * apply_rotary(k, torch.tensor([p]), 8, 10000.0)).sum() for p in (0, 50, 1000)]
    assert_close("relative", torch.stack(scores), scores[0].expand(3), tol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_without_memory_is_causal_attention(window):
    module = _module(n_kv_heads=2, rotary_dims=0, window=window)
    x = rand(2, 7, 24)
    q, k, v = module.project(x)
    visible = torch.ones(7, 7, dtype=torch.bool).tril()
    if window is not None:
        visible &= ~torch.ones(7, 7, dtype=torch.bool).tril(-window)
    attended = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              attn_mask=visible)
    assert_close("out", module(x), module.o_proj(attended.transpose(1, 2).reshape(2, 7, 32)))


@pytest.mark.parametrize("merge", ["joint", "gate"])
def test_kv_cache_gives_the_same_result(merge):
    module = _module(merge, rotary_dims=8)
    x, mem_keys, mem_values = rand(2, 9, 24), rand(2, 2, 6, 8), rand(2, 2, 6, 8)
    whole = module.attend(x, mem_keys, mem_values)
    first = module.attend(x[:, :4], mem_keys, mem_values)
    second = module.attend(x[:, 4:], mem_keys, mem_values, past_kv=(first.context_keys, first.context_values))
    assert_close("out", torch.cat([first.out, second.out], 1), whole.out)
    assert_close("keys", second.context_keys, whole.context_keys)


def test_owned_memory_is_read_and_a_passed_memory_overrides_it():
    bank = TopKMemory(num_slots=17, key_dim=8, value_dim=8, num_heads=2)
    module = _module(memory=bank)
    x = rand(2, 5, 24)
    assert_close("owned", module(x), module(x, bank.keys, bank.values))
    other = rand(2, 17, 8), rand(2, 17, 8)
    assert not torch.allclose(module(x), module(x, *other))
    assert {"memory.keys", "memory.values", "q_proj.weight"} <= set(module.state_dict())


class CausalSelfAttention(nn.Module):
    """An existing model's attention: hidden states in, hidden states out (Llama-style API)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@pytest.mark.parametrize("merge", ["joint", "gate"])
def test_drop_in_replacement_of_a_blocks_attention(merge):
    block = Block()
    x, target = rand(2, 7, 32), rand(2, 7, 32)
    before = block(x)
    replacement = MemoryAttention(d_model=32, n_heads=4, topk=4, merge=merge, backend="reference")
    replacement.load_state_dict(block.attn.state_dict(), strict=False)   # same q/k/v/o weights
    block.attn = replacement
    assert_close("no memory: same block", block(x), before)
    # Give it a learned memory: the block now reads it, and trains.
    replacement.memory = TopKMemory(num_slots=20, key_dim=8, value_dim=8, num_heads=2)
    assert not torch.allclose(block(x), before)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        loss = (block(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        assert replacement.memory.keys.grad.abs().sum() > 0 and replacement.memory.values.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert {"attn.memory.keys", "attn.q_proj.weight"} <= set(block.state_dict())
    assert ("attn.gate" in block.state_dict()) == (merge == "gate")


@pytest.mark.skipif(bool(CPU_CANNOT_ATTEND), reason="cpu backend cannot serve memory_attention: "
                    + "; ".join(CPU_CANNOT_ATTEND))
@pytest.mark.parametrize("merge", ["joint", "gate"])
def test_cpu_backend_matches_reference(merge):
    module = _module(merge)
    x, mem_keys, mem_values = rand(2, 6, 24), rand(2, 2, 9, 8), rand(2, 2, 9, 8)
    grads = {}
    for backend in ("reference", "cpu"):
        module.zero_grad()
        out = module.attend(x, mem_keys, mem_values, valid_len=torch.tensor([9, 4]), backend=backend).out
        out.square().sum().backward()
        grads[backend] = (out.detach(), [p.grad.clone() for p in module.parameters()])
    assert_close("out", grads["cpu"][0], grads["reference"][0])
    for got, want in zip(grads["cpu"][1], grads["reference"][1]):
        assert_close("grad", got, want)


def test_backend_is_passed_through():
    module = MemoryAttention(d_model=8, n_heads=2, topk=1, backend="cuda")
    with pytest.raises(NotImplementedError, match="cuda"):
        module(rand(1, 3, 8))
    with pytest.raises(NotImplementedError, match="cuda"):
        _module().attend(rand(1, 3, 24), backend="cuda")


def test_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError, match="n_kv_heads"):
        MemoryAttention(d_model=16, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="merge"):
        MemoryAttention(d_model=16, n_heads=4, merge="sum")
    with pytest.raises(ValueError, match="rotary_dims"):
        MemoryAttention(d_model=16, n_heads=4, rotary_dims=3)
    with pytest.raises(ValueError, match="window"):
        MemoryAttention(d_model=16, n_heads=4, window=0)
    with pytest.raises(ValueError, match="memory"):
        MemoryAttention(d_model=16, n_heads=4, memory=TopKMemory(num_slots=4, key_dim=8, value_dim=4))
    module = _module()
    with pytest.raises(ValueError, match="x"):
        module(rand(2, 5, 23))
    with pytest.raises(ValueError, match="mem_keys"):
        module(rand(2, 5, 24), rand(2, 4, 8))
    assert isinstance(l2m.modules.MemoryAttention, type)
