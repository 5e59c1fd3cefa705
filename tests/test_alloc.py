"""The cache of large CPU output buffers (``l2m_kernels._alloc``): a buffer is handed out again only
when nothing outside the cache references it, every fused op's results are bitwise those of plain
``torch.empty`` outputs, whatever the caller keeps alive, and the cache stays out of the way where it
cannot tell (dispatch modes) or is turned off."""
import threading

import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels import _alloc

pytestmark = pytest.mark.skipif(not hasattr(torch._C, "_storage_Use_Count"),
                                reason="this torch lacks torch._C._storage_Use_Count: the cache stays off")


@pytest.fixture
def every_output_cached(monkeypatch):
    """The package's cache serving every fused output, however small (CACHED_MIN_BYTES otherwise)."""
    monkeypatch.setattr(_alloc.CACHE, "min_bytes", 1)
    _alloc.empty_cache()
    yield _alloc.CACHE
    _alloc.empty_cache()


def test_a_buffer_is_handed_out_again_only_once_unreferenced():
    cache = _alloc.BufferCache(min_bytes=1)
    a = cache.empty((300, 7), torch.float32)
    assert a.shape == (300, 7) and a.dtype == torch.float32 and a.is_contiguous() and a._base is None
    b = cache.empty((300, 7), torch.float32)
    assert b.data_ptr() != a.data_ptr()  # a is alive
    a_ptr = a.data_ptr()
    del a
    c = cache.empty((300, 7), torch.float32)
    assert c.data_ptr() == a_ptr  # a's buffer came back
    view = c[5:]
    del c
    d = cache.empty((300, 7), torch.float32)
    assert d.data_ptr() not in (a_ptr, b.data_ptr())  # a view keeps the buffer referenced
    storage = b.untyped_storage()
    del b
    e = cache.empty((300, 7), torch.float32)
    assert e.untyped_storage().data_ptr() != storage.data_ptr()  # so does a storage object
    assert view.untyped_storage().data_ptr() == a_ptr
    assert cache.info()["hits"] == 1 and cache.info()["misses"] == 4


def test_sizes_that_vary_a_little_share_a_buffer_and_other_dtypes_reuse_it():
    cache = _alloc.BufferCache(min_bytes=1)
    a = cache.empty((4096, 256), torch.float32)  # 4 MiB
    ptr = a.data_ptr()
    del a
    b = cache.empty((4250, 256), torch.float32)  # +4%: within the 1/8 slack
    assert b.data_ptr() == ptr
    del b
    c = cache.empty((4096, 512), torch.bfloat16)
    assert c.data_ptr() == ptr and c.dtype == torch.bfloat16
    del c
    d = cache.empty((256, 256), torch.float32)  # far smaller: a buffer of its own, not 16x the size
    assert d.data_ptr() != ptr


def test_the_limit_bounds_what_is_held_and_never_reclaims_a_buffer_in_use():
    granule = _alloc._GRANULE
    cache = _alloc.BufferCache(limit=3 * granule, min_bytes=1)
    shape = (granule // 8,)  # float64: one granule's bytes, held as two granules (the 1/8 slack)
    kept = cache.empty(shape, torch.float64).fill_(1.5)
    others = [cache.empty(shape, torch.float64).fill_(i) for i in range(4)]
    assert cache.info()["held_bytes"] <= 3 * granule
    del others
    for _ in range(3):
        cache.empty(shape, torch.float64).fill_(-7.0)
    assert (kept == 1.5).all()
    assert cache.info()["held_bytes"] <= 3 * granule


def test_limit_zero_turns_the_cache_off_and_bad_limits_raise(every_output_cached):
    previous = l2m.set_cache_limit(0)
    try:
        before = l2m.cache_info()
        _alloc.empty((64,), dtype=torch.float32, device="cpu")
        assert l2m.cache_info()["misses"] == before["misses"] and l2m.cache_info()["buffers"] == 0
    finally:
        l2m.set_cache_limit(previous)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        l2m.set_cache_limit(-1)


def test_poisoning_fills_cached_buffers(every_output_cached):
    with _alloc.poisoned_outputs():
        first = _alloc.empty((64,), dtype=torch.float32, device="cpu").fill_(3.0)
        del first
        again = _alloc.empty((64,), dtype=torch.float32, device="cpu")
    assert torch.isnan(again).all()


def test_dispatch_modes_get_plain_tensors(every_output_cached):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    before = l2m.cache_info()
    with FakeTensorMode():
        t = _alloc.empty((64,), dtype=torch.float32, device="cpu")
    assert isinstance(t, FakeTensor)
    assert l2m.cache_info()["misses"] == before["misses"] and l2m.cache_info()["hits"] == before["hits"]


def test_a_buffer_first_used_in_inference_mode_serves_autograd_later(every_output_cached):
    with torch.inference_mode():
        t = _alloc.empty((64,), dtype=torch.float32, device="cpu")
        assert t.is_inference()
    del t
    u = _alloc.empty((64,), dtype=torch.float32, device="cpu").normal_()
    assert not u.is_inference()
    w = torch.randn(64, requires_grad=True)
    (u * w).sum().backward()
    torch.testing.assert_close(w.grad, u)


def test_threads_never_share_a_live_buffer():
    cache = _alloc.BufferCache(min_bytes=1)
    failures = []

    def work(tid):
        for _ in range(200):
            t = cache.empty((257,), torch.int64).fill_(tid)
            if not bool((t == tid).all()):
                failures.append(tid)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures


def _training_steps(step, params, steps=3):
    """Run ``step()`` (a loss) several times, keeping every output and accumulating the gradients
    (the parameters' .grad stays alive across steps), then once more after clearing them."""
    for p in params:
        p.grad = None
    kept = []
    for _ in range(steps):
        loss, outs = step()
        loss.backward()
        kept.append([o.detach() for o in outs])
    grads = [p.grad.to_dense().clone() for p in params]
    for p in params:
        p.grad = None
    loss, outs = step()
    loss.backward()
    return kept, grads, [p.grad.to_dense().clone() for p in params], [o.detach() for o in outs]


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_product_key_training_is_bitwise_the_same_with_every_output_cached(sparse_grad, every_output_cached):
    if "cpu" not in l2m.available_backends():
        pytest.skip("the cpu backend is not built: its outputs are what the cache serves")
    gen = torch.Generator().manual_seed(0)
    H, T, Dk, n_sub, Dv, k = 2, 9, 16, 12, 8, 5
    q = torch.randn(1, H, T, Dk, generator=gen, requires_grad=True)
    subkeys = torch.randn(H, 2, n_sub, Dk // 2, generator=gen, requires_grad=True)
    values = torch.randn(n_sub * n_sub, Dv, generator=gen, requires_grad=True)
    cot = torch.randn(1, H, T, Dv, generator=gen)

    def step():
        read = l2m.product_key_read(q, subkeys, values, k, sparse_grad=sparse_grad, backend="cpu")
        return (read.out * cot).sum() + read.weights.sum(), [read.out, read.weights, read.indices]

    cached = _training_steps(step, (q, subkeys, values))
    assert l2m.cache_info()["hits"] > 0
    with _alloc.cache_limit(0):
        plain = _training_steps(step, (q, subkeys, values))
    torch.testing.assert_close(cached, plain, rtol=0, atol=0)


def test_dense_update_training_is_bitwise_the_same_with_every_output_cached(every_output_cached):
    if "cpu" not in l2m.available_backends():
        pytest.skip("the cpu backend is not built: its outputs are what the cache serves")
    gen = torch.Generator().manual_seed(1)
    memory = torch.randn(2, 3, 17, 20, generator=gen, requires_grad=True)
    update = torch.randn(2, 3, 17, 20, generator=gen, requires_grad=True)
    gates = [torch.randn(2, 3, 17, 1, generator=gen, requires_grad=True) for _ in range(2)]
    cot = torch.randn(2, 3, 17, 20, generator=gen)

    def step():
        out = l2m.gated_dense_update(memory, update, *gates, backend="cpu")
        return (out * cot).sum(), [out]

    cached = _training_steps(step, (memory, update, *gates))
    assert l2m.cache_info()["hits"] > 0
    with _alloc.cache_limit(0):
        plain = _training_steps(step, (memory, update, *gates))
    torch.testing.assert_close(cached, plain, rtol=0, atol=0)


@pytest.mark.parametrize("value,expect", [("0", "limit=0"), ("123456789", "limit=123456789"),
                                          ("lots", "L2M_CPU_CACHE_LIMIT must be a number of bytes")])
def test_the_limit_from_the_environment(value, expect):
    import os
    import subprocess
    import sys

    env = dict(os.environ, L2M_CPU_CACHE_LIMIT=value)
    run = subprocess.run([sys.executable, "-c", "import l2m_kernels as l; print(f\"limit={l.cache_info()['limit']}\")"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert expect in run.stdout + run.stderr


def test_streaming_stores_only_while_the_cache_keeps_outputs_warm():
    from l2m_kernels import _ext

    ext = _ext.cpu_extension()
    if ext is None:
        pytest.skip(f"the cpu extension is not loaded: {_ext.cpu_extension_error()}")
    assert ext._stream_stores() == _alloc.stream_stores_wanted() and _alloc.stream_stores_wanted()
    with _alloc.cache_limit(0):
        assert not ext._stream_stores()
    assert ext._stream_stores()
