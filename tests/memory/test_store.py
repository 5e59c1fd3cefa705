"""MemoryStore: reads against topk_memory_read on the stored entries, tiers, formats, usage
statistics, eviction, consolidation, gated writes, state, and refusals."""
import math

import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels.memory import MemoryStore, key_score_error_bound
from l2m_kernels.memory import formats
from l2m_kernels.ops.topk_read.reference import topk_read_gather

TIERS = {
    "device": "device",
    "device+disk": (("device", 256), ("disk", None)),
    "host+device+disk": (("host", 128), ("device", 128), ("disk", None)),
}


def _entries(Hm, n, D, Dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(Hm, n, D, generator=gen), torch.randn(Hm, n, Dv, generator=gen)


def _store(tiers="device", n=700, Hm=2, D=16, Dv=12, capacity=1024, block=64, **kw):
    store = MemoryStore(Hm, D, Dv, capacity, block_size=block, tiers=tiers, **kw)
    keys, values = _entries(Hm, n, D, Dv)
    # Two appends, the first ending inside a block.
    store.append(keys[:, :n // 3], values[:, :n // 3])
    store.append(keys[:, n // 3:], values[:, n // 3:])
    return store, keys, values


def _q(B=2, H=4, T=5, D=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, D, generator=gen).transpose(1, 2)  # as a projection makes it


@pytest.mark.parametrize("k", [1, 7, 64])
def test_exact_read_is_topk_memory_read_on_the_stored_entries(k):
    store, keys, values = _store()
    q = _q()
    got = store.read(q, k)
    ref = l2m.topk_memory_read(q, keys, values, k)
    assert torch.equal(got.indices, ref.indices)
    assert torch.equal(got.out, ref.out) and torch.equal(got.weights, ref.weights)


def _brute_force(q, keys, k):
    """(B, H, T, k) slots by descending float64 score, ties to the smaller slot, -1 past N."""
    keys_h = keys.double().repeat_interleave(q.shape[1] // keys.shape[0], 0)
    scores = torch.einsum("bhtd,hnd->bhtn", q.double(), keys_h)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    pad = k - order.shape[-1]
    return torch.cat([order, order.new_full((*order.shape[:-1], pad), -1)], -1) if pad > 0 else order


@pytest.mark.parametrize("tiers", list(TIERS))
@pytest.mark.parametrize("k", [1, 9, 300, 800])
def test_exact_read_over_tiers_equals_one_tier(tiers, k):
    store, keys, values = _store(TIERS[tiers])
    q = _q()
    got = store.read(q, k)
    assert torch.equal(got.indices, _brute_force(q, keys[:, :len(store)], k))
    if k <= 256:
        ref = l2m.topk_memory_read(q.double(), keys.double(), values.double(), k)
        torch.testing.assert_close(got.out.double(), ref.out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.lse.double(), ref.lse, rtol=1e-5, atol=1e-5)
    else:
        assert (got.weights[got.indices < 0] == 0).all()
        torch.testing.assert_close(got.weights.sum(-1), torch.ones(2, 4, 5))


@pytest.mark.parametrize("tiers", list(TIERS))
@pytest.mark.parametrize("key_format", ["float32", "int8"])
def test_two_level_read_with_every_block_is_the_exact_read(tiers, key_format):
    store, _, _ = _store(TIERS[tiers], key_format=key_format)
    q = _q()
    exact = store.read(q, 10)
    every = store.read(q, 10, blocks=store.num_blocks)
    assert torch.equal(exact.indices, every.indices)
    torch.testing.assert_close(every.out, exact.out, rtol=1e-5, atol=1e-6)


def test_two_level_read_is_exact_within_the_selected_blocks():
    store, keys, values = _store(block=32)
    q = _q(B=1, H=2, T=3)
    got = store.read(q, 6, blocks=4)
    # The blocks each query picks: its 4 best summaries (mean keys).
    summaries = torch.stack([keys[:, b * 32:(b + 1) * 32].mean(1) for b in range(math.ceil(700 / 32))], 1)
    for h in range(2):
        for t in range(3):
            scores = summaries[h] @ q[0, h, t] * 16 ** -0.5
            chosen = torch.sort(torch.sort(scores, descending=True, stable=True).indices[:4]).values
            slots = torch.cat([torch.arange(b * 32, min(700, (b + 1) * 32)) for b in chosen.tolist()])
            s = keys[h, slots].double() @ q[0, h, t].double() * 16 ** -0.5
            best = slots[torch.sort(s, descending=True, stable=True).indices[:6]]
            assert torch.equal(got.indices[0, h, t], best)


@pytest.mark.parametrize("value_format", ["float32", "int8", "float8", "bfloat16"])
def test_int8_keys_read_the_stored_keys_exactly(value_format):
    store, keys, _ = _store(key_format="int8", value_format=value_format)
    q = _q()
    got = store.read(q, 12)
    stored_keys, stored_values = store.keys().double(), store.values().double()
    ref = l2m.topk_memory_read(q.double(), stored_keys, stored_values, 12)
    assert torch.equal(got.indices, ref.indices)
    torch.testing.assert_close(got.out.double(), ref.out, rtol=1e-5, atol=1e-5)
    # Every score on a stored int8 key is within the documented bound of the float key's score.
    scale = 16 ** -0.5
    bound = key_score_error_bound(q, store.key_scales, scale)
    float_scores = torch.einsum("bhtd,bhtkd->bhtk", q.double(),
                                keys.repeat_interleave(2, 0)[None].expand(2, -1, -1, -1)
                                .double()[:, :, None].expand(-1, -1, 5, -1, -1)
                                .gather(3, got.indices[..., None].expand(-1, -1, -1, -1, 16))) * scale
    int8_scores = got.weights.double().log() + got.lse.double()[..., None]
    assert ((float_scores - int8_scores).abs() <= bound[..., None].double() + 1e-5).all()


def test_quantised_values_are_within_their_step():
    store, _, values = _store(value_format="int8")
    stored = store.values()
    step = values.abs().amax(-1, keepdim=True) / 127
    assert ((stored - values[:, :len(store)]).abs() <= step / 2 + 1e-6).all()


def test_read_gradient_in_q_matches_the_gather_reference():
    for blocks in (None, 3):
        store, keys, values = _store(key_format="int8")
        q = _q().double().requires_grad_()
        got = store.read(q, 5, blocks=blocks)
        q_ref = q.detach().clone().requires_grad_()
        ref = topk_read_gather(q_ref, store.keys().double(), store.values().double(), got.indices)
        grad = torch.randn_like(got.out)
        (got.out * grad).sum().backward()
        (ref[0] * grad).sum().backward()
        torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-5, atol=1e-6)


def test_usage_is_the_sum_of_read_weights_with_decay():
    store, _, _ = _store(usage_decay=0.5)
    q = _q()
    first = store.read(q, 4)
    expected = torch.zeros(store.capacity, dtype=torch.float64)
    expected.index_add_(0, first.indices.reshape(-1), first.weights.reshape(-1).double())
    torch.testing.assert_close(store.usage, expected)
    second = store.read(q, 4)
    expected = expected * 0.5
    expected.index_add_(0, second.indices.reshape(-1), second.weights.reshape(-1).double())
    used = store.last_used == 2
    torch.testing.assert_close(store.usage[used], expected[used])
    # Not read in the second read: decayed lazily.
    stale = (store.last_used == 1).nonzero().squeeze(1)
    torch.testing.assert_close(store.decayed_usage()[stale], expected[stale])
    store.read(q, 4, track=False)
    assert store.step == 2


@pytest.mark.parametrize("policy", ["fifo", "lru", "usage", "callable"])
def test_eviction_policies_free_the_expected_slots(policy):
    eviction = (lambda s: -torch.arange(len(s), dtype=torch.float64)) if policy == "callable" \
        else policy
    store = MemoryStore(1, 8, 8, 256, block_size=64, eviction=eviction)
    keys, values = _entries(1, 300, 8, 8)
    store.append(keys[:, :256], values[:, :256])
    q = keys[:, 200:203].unsqueeze(0) * 8
    read = store.read(q, 1).indices.flatten()
    slots = store.append(keys[:, 256:], values[:, 256:])
    unread = torch.tensor([s for s in range(256) if s not in read.tolist()])
    if policy == "fifo":
        expected = torch.arange(44)
    elif policy in ("lru", "usage"):  # the read slots are kept; the others go oldest first
        expected = unread[:44]
    else:  # keep score -slot: the largest slots first
        expected = torch.arange(212, 256)
    assert torch.equal(torch.sort(slots).values, expected)
    torch.testing.assert_close(store.keys()[:, slots], keys[:, 256:])
    if policy in ("lru", "usage"):
        # Keep reading; append almost a whole store again: the read entries survive.
        for _ in range(3):
            store.read(q, 1)
        store.append(keys[:, :250], values[:, :250])
        survivors = store.keys()[0]
        for s in read.tolist():
            assert (survivors == keys[0, s]).all(-1).any()


def test_full_store_without_policy_refuses_and_is_untouched():
    store, _, _ = _store(n=1024)
    before = store.state_dict()
    with pytest.raises(RuntimeError, match="full"):
        store.append(*_entries(2, 3, 16, 12))
    after = store.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before if torch.is_tensor(before[key]))


def test_consolidation_merges_evicted_entries_by_usage():
    store = MemoryStore(1, 4, 3, 128, block_size=64, eviction="fifo", consolidate=4)
    keys, values = _entries(1, 140, 4, 3)
    store.append(keys[:, :128], values[:, :128])
    store.usage[:8] = torch.tensor([1.0, 3.0, 0, 0, 2.0, 2.0, 0, 0], dtype=torch.float64)
    slots = store.append(keys[:, 128:134], values[:, 128:134])  # 6 new: 8 victims, 2 merged
    assert slots.numel() == 6 and len(store) == 128
    w = torch.tensor([1.0, 3.0, 0, 0])
    torch.testing.assert_close(store.keys()[0, 0], (keys[0, :4] * w[:, None]).sum(0) / 4)
    torch.testing.assert_close(store.values()[0, 1], values[0, 4:8].T @ torch.tensor([.5, .5, 0, 0]))
    assert store.usage[0].item() == 4.0
    torch.testing.assert_close(store.keys()[0, torch.sort(slots).values], keys[0, 128:134])


@pytest.mark.parametrize("key_format", ["float32", "int8"])
def test_write_is_gated_memory_write_at_slot_ids(key_format):
    store, _, _ = _store(key_format=key_format, value_format="float32")
    values_before, keys_before = store.values(), store.keys()
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(-1, len(store), (2, 6, 3), generator=gen)
    idx[0, 1, 2] = idx[0, 0, 0]  # a slot written twice
    w = torch.rand(2, 6, 3, generator=gen)
    add, erase = torch.randn(2, 6, 12, generator=gen), torch.rand(2, 6, 1, generator=gen)
    kadd, kerase = torch.randn(2, 6, 16, generator=gen) * 0.1, torch.rand(2, 6, 16, generator=gen)
    store.write(idx, w, add, erase, key_add=kadd, key_erase=kerase)
    ref_v = l2m.gated_memory_write(values_before[None], idx[None], w[None], add[None], erase[None])[0]
    ref_k = l2m.gated_memory_write(keys_before[None], idx[None], w[None], kadd[None], kerase[None])[0]
    torch.testing.assert_close(store.values(), ref_v)
    if key_format == "int8":  # re-quantised
        assert ((store.keys() - ref_k).abs() <= store.key_scales[:, None] / 2 + 1e-6).all()
    else:
        torch.testing.assert_close(store.keys(), ref_k)
    # The summaries follow the keys.
    torch.testing.assert_close(store.summaries[:, 0], store.keys()[:, :64].mean(1))


def test_write_out_of_range_raises_before_writing():
    store, _, _ = _store()
    before = store.values().clone()
    idx = torch.tensor([[[0, len(store)]], [[1, 2]]])
    with pytest.raises(IndexError):
        store.write(idx, torch.ones(2, 1, 2), torch.ones(2, 1, 12), torch.ones(2, 1, 1))
    assert torch.equal(store.values(), before)


@pytest.mark.parametrize("tiers", ["device", "device+disk"])
@pytest.mark.parametrize("key_format,value_format", [("float32", "float32"), ("int8", "float8")])
def test_state_dict_reloads_bitwise(tiers, key_format, value_format, tmp_path):
    store, _, _ = _store(TIERS[tiers], key_format=key_format, value_format=value_format,
                         eviction="usage")
    q = _q()
    store.read(q, 5)
    state = store.state_dict()
    torch.save(state, tmp_path / "store.pt")
    fresh = MemoryStore(2, 16, 12, 1024, block_size=64, tiers=TIERS[tiers], key_format=key_format,
                        value_format=value_format, eviction="usage", directory=str(tmp_path))
    fresh.load_state_dict(torch.load(tmp_path / "store.pt"))
    a, b = store.read(q, 7, blocks=3), fresh.read(q, 7, blocks=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(store.usage, fresh.usage) and len(fresh) == len(store)
    other = MemoryStore(2, 16, 12, 2048, block_size=64)
    with pytest.raises(ValueError, match="configured"):
        other.load_state_dict(state)


def test_rebalance_moves_read_blocks_to_the_fast_tier_and_keeps_reads():
    store, keys, _ = _store(TIERS["device+disk"], n=1024)
    q = keys[:, 900:904].unsqueeze(0) * 4  # reads blocks in the disk tier
    before = store.read(q, 3)
    assert (store.block_tier[900 // 64] == 1)
    moved = store.rebalance()
    assert moved >= 1 and store.block_tier[900 // 64] == 0
    after = store.read(q, 3)
    assert torch.equal(before.indices, after.indices) and torch.equal(before.out, after.out)
    torch.testing.assert_close(store.keys(), keys)


def test_append_with_a_batch_dimension_and_empty_cases():
    store = MemoryStore(2, 8, 8, 128, block_size=32)
    q = _q(D=8)
    empty = store.read(q, 3)
    assert (empty.indices == -1).all() and (empty.out == 0).all() and torch.isneginf(empty.lse).all()
    keys, values = _entries(2, 10, 8, 8)
    store.append(torch.stack([keys[:, :5], keys[:, 5:]]), torch.stack([values[:, :5], values[:, 5:]]))
    torch.testing.assert_close(store.keys(), keys)
    assert store.read(q[:0], 3).out.shape == (0, 4, 5, 8)


def test_bad_input_is_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="capacity"):
        MemoryStore(1, 8, 8, 100, block_size=64)
    with pytest.raises(ValueError, match="tiers"):
        MemoryStore(1, 8, 8, 128, block_size=64, tiers=(("device", 100), ("disk", None)))
    with pytest.raises(ValueError, match="key_format"):
        MemoryStore(1, 8, 8, 128, block_size=64, key_format="int4")
    store = MemoryStore(2, 8, 8, 128, block_size=64)
    with pytest.raises(ValueError, match="keys"):
        store.append(torch.randn(3, 4, 8), torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="q"):
        store.read(torch.randn(1, 3, 2, 8), 2)
    with pytest.raises(ValueError, match="blocks"):
        store.read(torch.randn(1, 2, 2, 8), 2, blocks=0)


def test_formats_round_trip_and_bound():
    keys = torch.randn(2, 50, 8)
    scales = formats.channel_scales(keys, 1.0)
    k8, key_abs, key_sum = formats.quantize_keys(keys, scales)
    assert k8.dtype == torch.int8 and (k8.abs() <= 127).all()
    assert torch.equal(key_abs, k8.int().abs().sum(-1)) and torch.equal(key_sum, k8.int().sum(-1))
    back = formats.dequantize_keys(k8, scales[:, None])
    assert ((back - keys).abs() <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("refine", ["device", "disk"])
@pytest.mark.parametrize("tiers", ["device", "device+disk"])
def test_int8_keys_refined_by_float_keys_read_the_float_keys_exactly(refine, tiers):
    store, keys, values = _store(TIERS[tiers], key_format="int8", key_refine=refine, key_margin=1.0)
    # Later keys beyond the first append's range saturate their int8 codes: still exact.
    extra_k, extra_v = _entries(2, 40, 16, 12, seed=7)
    store.append(extra_k * 3, extra_v)
    keys, values = torch.cat([keys, extra_k * 3], 1), torch.cat([values, extra_v], 1)
    q = _q()
    for k in (1, 8, 64):
        got = store.read(q, k)
        ref = l2m.topk_memory_read(q.double(), keys.double(), values.double(), k)
        assert torch.equal(got.indices, ref.indices)
        torch.testing.assert_close(got.out.double(), ref.out, rtol=1e-4, atol=1e-4)
    every = store.read(q, 8, blocks=store.num_blocks)
    assert torch.equal(every.indices, store.read(q, 8).indices)
    torch.testing.assert_close(store.keys(), keys)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the host and disk "
                    "tiers' blocks reach it through pinned memory on the store's side stream")
@pytest.mark.parametrize("key_format", ["float32", "int8"])
def test_cuda_store_reads_its_host_and_disk_tiers_like_the_cpu_store(key_format):
    tiers = TIERS["host+device+disk"]
    cpu, _, _ = _store(tiers, key_format=key_format, value_format="int8")
    cuda, _, _ = _store(tiers, key_format=key_format, value_format="int8", device="cuda")
    q = _q()
    for blocks in (None, 3):
        got = cuda.read(q.cuda(), 9, blocks=blocks)
        want = cpu.read(q, 9, blocks=blocks)
        assert torch.equal(got.indices.cpu(), want.indices)
        torch.testing.assert_close(got.out.cpu(), want.out, rtol=1e-5, atol=1e-5)
