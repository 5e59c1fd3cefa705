"""nn.Module wrappers: usable inside an existing model, state in state_dict, gradients flow."""
import pytest
import torch
from torch import nn

import l2m_kernels as l2m
from l2m_kernels.modules import TopKMemory
from l2m_kernels.ops.topk_read.reference import topk_memory_read_ref
from l2m_kernels.testing import assert_close, rand


class TinyMemoryModel(nn.Module):
    """An existing-model stand-in: project to heads, read memory, project back, residual."""

    def __init__(self, dim=16, heads=4, mem_heads=2, slots=37):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.memory = TopKMemory(num_slots=slots, key_dim=dim // heads, value_dim=dim // heads, num_heads=mem_heads)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        read = self.memory(q, k=5)
        return x + self.o_proj(read.out.transpose(1, 2).reshape(B, T, C))


def test_topk_memory_inside_a_model_trains():
    torch.manual_seed(0)
    model = TinyMemoryModel()
    x = rand(2, 9, 16)
    loss = model(x).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.memory.keys.grad.abs().sum() > 0 and model.memory.values.grad.abs().sum() > 0
    assert {"memory.keys", "memory.values"} <= set(model.state_dict())


def test_topk_memory_read_matches_the_op():
    memory = TopKMemory(num_slots=29, key_dim=8, value_dim=6, num_heads=2)
    q = rand(3, 4, 5, 8)
    got = memory.read(q, 7)
    want = topk_memory_read_ref(q, memory.keys, memory.values, 7)
    assert torch.equal(got.indices, want[1])
    assert_close("out", got.out, want[0])


def test_loaded_state_with_valid_len():
    memory = TopKMemory(num_slots=1, key_dim=8, value_dim=8, trainable=False)
    keys, values = rand(2, 3, 20, 8), rand(2, 3, 20, 8)
    memory.load_(keys, values, valid_len=torch.tensor([20, 4]))
    read = memory(rand(2, 3, 6, 8), k=6)
    assert (read.indices[1, ..., 4:] == -1).all() and (read.indices[1, ..., :4] >= 0).all()
    assert memory.num_slots == 20 and "valid_len" in memory.state_dict()


def test_load_refused_for_trainable_bank():
    with pytest.raises(RuntimeError, match="trainable"):
        TopKMemory(num_slots=4, key_dim=2, value_dim=2).load_(rand(1, 4, 2), rand(1, 4, 2))


def test_module_backend_is_used():
    memory = TopKMemory(num_slots=8, key_dim=4, value_dim=4, backend="cuda")
    with pytest.raises(NotImplementedError, match="cuda"):
        memory(rand(1, 1, 2, 4), k=2)
    assert isinstance(l2m.modules.TopKMemory, type)
