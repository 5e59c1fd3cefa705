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
    memory = TopKMemory(num_slots=20, key_dim=8, value_dim=8, num_heads=3, trainable=False)
    keys, values = rand(2, 3, 20, 8), rand(2, 3, 20, 8)
    memory.load_(keys, values, valid_len=torch.tensor([20, 4]))
    read = memory(rand(2, 3, 6, 8), k=6)
    assert (read.indices[1, ..., 4:] == -1).all() and (read.indices[1, ..., :4] >= 0).all()
    assert memory.num_slots == 20 and "valid_len" in memory.state_dict()


def test_load_checks_the_bank_sizes():
    memory = TopKMemory(num_slots=20, key_dim=8, value_dim=6, num_heads=3, trainable=False)
    with pytest.raises(ValueError, match="num_slots=20, got N=12"):
        memory.load_(rand(3, 12, 8), rand(3, 12, 6))
    assert memory.num_slots == 20 and memory.keys.shape == (3, 20, 8)          # untouched
    for keys, values in ((rand(2, 20, 8), rand(2, 20, 6)), (rand(3, 20, 4), rand(3, 20, 6)),
                         (rand(3, 20, 8), rand(3, 20, 5))):
        with pytest.raises(ValueError, match="num_heads=3, key_dim=8, value_dim=6"):
            memory.load_(keys, values)
    with pytest.raises(ValueError, match="valid_len"):
        memory.load_(rand(2, 3, 20, 8), rand(2, 3, 20, 6), valid_len=torch.tensor([1, 2, 3]))
    memory.load_(rand(3, 12, 8), rand(3, 12, 6), resize=True)
    assert memory.num_slots == 12 and memory(rand(1, 3, 2, 8), k=12).indices.max() == 11


def test_load_refused_for_trainable_bank():
    with pytest.raises(RuntimeError, match="trainable"):
        TopKMemory(num_slots=4, key_dim=2, value_dim=2).load_(rand(1, 4, 2), rand(1, 4, 2))


def test_module_backend_is_used():
    memory = TopKMemory(num_slots=8, key_dim=4, value_dim=4, backend="cuda")
    with pytest.raises(NotImplementedError, match="cuda"):
        memory(rand(1, 1, 2, 4), k=2)
    assert isinstance(l2m.modules.TopKMemory, type)


# ---- ProductKeyMemory ----

class Block(nn.Module):
    """A pre-norm Transformer block as an existing model has it: attention, then an MLP."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "sparse"])
def test_product_key_memory_replaces_an_mlp(gated, sparse_grad):
    torch.manual_seed(0)
    block = Block()
    layer = l2m.modules.ProductKeyMemory(dim=32, n_sub=16, key_dim=16, heads=2, k=5, k_sub=4,
                                         gated=gated, sparse_grad=sparse_grad)
    block.mlp = layer  # the drop-in replacement
    x = rand(2, 7, 32)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # The layer computes exactly the op on its own queries.
    q = layer.queries(block.norm2(x))
    want = l2m.product_key_read(q, layer.subkeys, layer.values, 5, k_sub=4, scale=8 ** -0.5, sum_heads=True,
                                backend="reference").out
    if gated:
        want = want * nn.functional.silu(layer.gate_proj(block.norm2(x)))
    assert_close("out", layer(block.norm2(x)), layer.out_proj(want))
    # One training step moves the loss down; values get a sparse gradient when asked for.
    sparse = [layer.values]
    dense = [p for p in block.parameters() if p is not layer.values]
    opts = [torch.optim.SGD(sparse, lr=0.5), torch.optim.SGD(dense, lr=0.05)]
    target = rand(2, 7, 32)
    losses = []
    seen = {}
    layer.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0].detach()))
    for _ in range(3):
        loss = (block(x) - target).square().mean()
        read_rows = layer.read(seen["x"]).indices.unique()
        losses.append(loss.item())
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        assert layer.values.grad.is_sparse == sparse_grad
        assert layer.subkeys.grad is not None and layer.subkeys.grad.abs().sum() > 0
        if sparse_grad:  # exactly the rows this step read (at most 2*7*2*5 = 140 of 256)
            assert torch.equal(layer.values.grad.coalesce().indices()[0], read_rows)
        for opt in opts:
            opt.step()
    assert losses[-1] < losses[0]
    assert {"mlp.subkeys", "mlp.values", "mlp.query_proj.weight"} <= set(block.state_dict())


def test_product_key_memory_rejects_bad_config():
    with pytest.raises(ValueError, match="key_dim"):
        l2m.modules.ProductKeyMemory(dim=8, n_sub=4, key_dim=5)
    with pytest.raises(ValueError, match="k_sub"):
        l2m.modules.ProductKeyMemory(dim=8, n_sub=4, key_dim=4, k=20, k_sub=4)
    with pytest.raises(ValueError, match="x"):
        l2m.modules.ProductKeyMemory(dim=8, n_sub=4, key_dim=4, k=2)(rand(2, 3, 9))


# ---- writing into a TopKMemory ----

def _loaded_bank(B=2, Hm=2, N=8, D=8):
    bank = TopKMemory(num_slots=N, key_dim=N, value_dim=D, num_heads=Hm, trainable=False)
    keys = torch.eye(N).expand(Hm, N, N).contiguous()          # slot n has the one-hot key e_n
    return bank.load_(keys, torch.zeros(Hm, N, D))


def test_write_then_read_recalls_exactly():
    bank = _loaded_bank()
    slots = torch.tensor([[3, 5], [6, 0]])                    # (B, Hm): one write per head
    write_keys = 10.0 * torch.nn.functional.one_hot(slots, 8).float()[:, :, None, :]  # (B, Hm, 1, N)
    v = rand(2, 2, 1, 8)
    bank.write(write_keys, torch.ones(2, 2, 1, 1), v, k=1)
    assert bank.values.shape == (2, 2, 8, 8)                  # shared bank -> per batch element
    read = bank(write_keys, k=1)
    assert torch.equal(read.indices[..., 0], slots[:, :, None]) and torch.equal(read.out, v)
    untouched = torch.ones(2, 2, 8, dtype=torch.bool)
    untouched[torch.arange(2)[:, None], torch.arange(2)[None, :], slots] = False
    assert (bank.values[untouched] == 0).all()


def test_write_is_sequential_and_state_carries_over():
    bank = _loaded_bank(B=1, Hm=1)
    key = 10.0 * torch.nn.functional.one_hot(torch.tensor(2), 8).float()
    write_keys = key.expand(1, 1, 2, 8)                       # two steps, same slot
    a, b = rand(1, 1, 1, 8), rand(1, 1, 1, 8)
    erase = torch.tensor([1.0, 0.5]).view(1, 1, 2, 1)
    bank.write(write_keys, erase, torch.cat([a, b], 2), k=1)
    assert_close("slot", bank.values[0, 0, 2], a[0, 0, 0] * 0.5 + b[0, 0, 0])
    c = rand(1, 1, 1, 8)
    bank.write(write_keys[:, :, :1], torch.zeros(1, 1, 1, 1), c, k=1)   # next call adds on top
    assert_close("slot", bank.values[0, 0, 2], a[0, 0, 0] * 0.5 + b[0, 0, 0] + c[0, 0, 0])


def test_memory_writer_learns_through_the_write():
    torch.manual_seed(0)
    bank = _loaded_bank(B=2, Hm=2, N=16, D=4)
    writer = l2m.modules.MemoryWriter(dim=12, key_dim=16, value_dim=4, num_heads=2, k=2)
    x = rand(2, 5, 12)
    writer(x, bank)
    assert bank.values.requires_grad
    read = bank(rand(2, 2, 3, 16), k=4)
    read.out.square().sum().backward()
    for name, p in writer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    bank.detach_()
    assert not bank.values.requires_grad and not bank.keys.requires_grad


def test_write_refusals():
    with pytest.raises(RuntimeError, match="trainable"):
        TopKMemory(num_slots=4, key_dim=2, value_dim=2).write(rand(1, 1, 1, 2), rand(1, 1, 1, 1), rand(1, 1, 1, 2), 1)
    bank = _loaded_bank()
    with pytest.raises(ValueError, match="write_keys"):
        bank.write(rand(2, 3, 1, 8), rand(2, 3, 1, 1), rand(2, 3, 1, 8), 1)
    with pytest.raises(ValueError, match="heads"):
        l2m.modules.MemoryWriter(dim=4, key_dim=8, value_dim=8, num_heads=3)(rand(2, 1, 4), bank)
