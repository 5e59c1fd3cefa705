"""L2MModel with memory_mode="store": the same model as "append" while the store holds what the ring
buffer holds (exact reads, FIFO eviction), and training steps with two-level reads, int8 keys and
usage eviction."""
import pytest
import torch

from l2m_kernels.models import L2MConfig, L2MModel

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=16, topk=4)


@pytest.mark.parametrize("slots", [128, 48], ids=["room", "evicting"])
def test_store_mode_equals_the_ring_buffer(slots):
    torch.manual_seed(0)
    ring = L2MModel(L2MConfig(**BASE, memory_slots=slots, memory_mode="append"))
    store = L2MModel(L2MConfig(**BASE, memory_slots=slots, memory_mode="store"))
    store.load_state_dict(ring.state_dict())
    ids = torch.randint(0, 64, (3, 100))
    a, b = ring(ids, labels=ids), store(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(ring.named_parameters(), store.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # A second call continues from the returned state (the store evicts past capacity).
    torch.testing.assert_close(store(ids, b.state).logits, ring(ids, a.state).logits,
                               rtol=1e-5, atol=1e-5)


def test_store_mode_trains_with_two_level_int8_and_usage_eviction():
    torch.manual_seed(1)
    config = L2MConfig(**BASE, memory_slots=64, memory_mode="store", store_blocks=2,
                       store_options=dict(block_size=16, key_format="int8", value_format="int8",
                                          eviction="usage", consolidate=4))
    model = L2MModel(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 64, (2, 160))
    out = None
    for _ in range(2):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert torch.isfinite(out.loss)
    stores = [layer.store for layer in out.state.layers if layer.store is not None]
    assert len(stores) == 2 and all(len(s) == 64 for s in stores)
    assert all(float(s.usage.sum()) > 0 for s in stores)


def test_store_mode_refuses_a_capacity_off_the_blocks():
    with pytest.raises(ValueError, match="block_size"):
        L2MConfig(**BASE, memory_slots=40, memory_mode="store")
