"""Every bad input raises a clear exception, of the right type, naming the argument, before any
kernel runs; a refused write leaves the memory untouched.

Every invalid argument each op's fuzz strategy draws (``l2m_kernels.fuzz.MUTATIONS``) is checked
here on the reference and cpu backends, so a new op is covered by its strategy; the cases listed
below add the ones written by hand.
"""
import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels import fuzz
from l2m_kernels.testing import rand, rand_lse, rand_unit

B, H, Hm, T, N, D = 2, 4, 2, 5, 11, 8


def topk_args(**over):
    args = dict(q=rand(B, H, T, D), keys=rand(B, Hm, N, D), values=rand(B, Hm, N, 6), k=3)
    args.update(over)
    return args


def pkm_args(**over):
    args = dict(q=rand(B, H, T, D), subkeys=rand(H, 2, 5, D // 2), values=rand(25, 6), k=4)
    args.update(over)
    return args


def write_args(**over):
    args = dict(memory=rand(B, Hm, N, D), indices=torch.randint(-1, N, (B, Hm, T, 2)),
                weights=rand_unit(B, Hm, T, 2), add=rand(B, Hm, T, D), erase=rand_unit(B, Hm, T, D))
    args.update(over)
    return args


def attn_args(**over):
    args = dict(q=rand(B, H, T, D), k=rand(B, 2, 9, D), v=rand(B, 2, 9, 6), mem_keys=rand(B, Hm, N, D),
                mem_values=rand(B, Hm, N, 6), topk=3)
    args.update(over)
    return args


def merge_args(**over):
    args = dict(out_a=rand(B, H, T, D), lse_a=rand_lse(B, H, T), out_b=rand(B, H, T, D), lse_b=rand_lse(B, H, T))
    args.update(over)
    return args


def gmerge_args(**over):
    args = dict(out_local=rand(B, H, T, D), out_mem=rand(B, H, T, D), gate=rand(H, 1, 1))
    args.update(over)
    return args


def call(fn, args):
    args = dict(args)
    positional = {
        l2m.topk_memory_read: ("q", "keys", "values", "k"),
        l2m.product_key_read: ("q", "subkeys", "values", "k"),
        l2m.gated_memory_write: ("memory", "indices", "weights", "add", "erase"),
        l2m.memory_attention: ("q", "k", "v", "mem_keys", "mem_values", "topk"),
        l2m.merge_attention: ("out_a", "lse_a", "out_b", "lse_b"),
        l2m.gated_merge: ("out_local", "out_mem", "gate"),
        l2m.gated_dense_update: ("memory", "update", "input_gate", "forget_gate"),
    }[fn]
    pos = [args.pop(name) for name in positional]
    return fn(*pos, **args)


CASES = [
    # (id, fn, args, exception, the argument the message must name)
    ("topk-q-rank", l2m.topk_memory_read, topk_args(q=rand(H, T, D)), ValueError, "q"),
    ("topk-keys-dk", l2m.topk_memory_read, topk_args(keys=rand(B, Hm, N, D + 1)), ValueError, "keys"),
    ("topk-keys-batch", l2m.topk_memory_read, topk_args(keys=rand(B + 1, Hm, N, D)), ValueError, "keys"),
    ("topk-grouped-heads", l2m.topk_memory_read, topk_args(keys=rand(B, 3, N, D), values=rand(B, 3, N, 6)),
     ValueError, "keys"),
    ("topk-values-n", l2m.topk_memory_read, topk_args(values=rand(B, Hm, N + 1, 6)), ValueError, "values"),
    ("topk-values-rank", l2m.topk_memory_read, topk_args(values=rand(Hm, N, 6)), ValueError, "values"),
    ("topk-dtype", l2m.topk_memory_read, topk_args(keys=rand(B, Hm, N, D, dtype=torch.float64)), TypeError, "keys"),
    ("topk-int-q", l2m.topk_memory_read, topk_args(q=torch.ones(B, H, T, D, dtype=torch.int64)), TypeError, "q"),
    ("topk-k-zero", l2m.topk_memory_read, topk_args(k=0), ValueError, "k"),
    ("topk-k-over-n", l2m.topk_memory_read, topk_args(k=N + 1), ValueError, "k"),
    ("topk-k-over-256", l2m.topk_memory_read,
     topk_args(keys=rand(Hm, 300, D), values=rand(Hm, 300, 6), k=257), ValueError, "k"),
    ("topk-k-float", l2m.topk_memory_read, topk_args(k=2.0), TypeError, "k"),
    ("topk-valid-len-range", l2m.topk_memory_read, topk_args(valid_len=torch.tensor([3, N + 1])), ValueError,
     "valid_len"),
    ("topk-valid-len-negative", l2m.topk_memory_read, topk_args(valid_len=torch.tensor([-1, 2])), ValueError,
     "valid_len"),
    ("topk-valid-len-shape", l2m.topk_memory_read, topk_args(valid_len=torch.tensor([3])), ValueError, "valid_len"),
    ("topk-valid-len-dtype", l2m.topk_memory_read, topk_args(valid_len=torch.tensor([3.0, 2.0])), TypeError,
     "valid_len"),
    ("topk-backend-name", l2m.topk_memory_read, topk_args(backend="fast"), ValueError, "backend"),
    ("pkm-odd-dk", l2m.product_key_read, pkm_args(q=rand(B, H, T, 7), subkeys=rand(H, 2, 5, 3)), ValueError, "q"),
    ("pkm-subkeys-shape", l2m.product_key_read, pkm_args(subkeys=rand(H, 3, 5, D // 2)), ValueError, "subkeys"),
    ("pkm-values-rows", l2m.product_key_read, pkm_args(values=rand(24, 6)), ValueError, "values"),
    ("pkm-k-over-ksub2", l2m.product_key_read, pkm_args(k=10, k_sub=3), ValueError, "k"),
    ("pkm-ksub-over-nsub", l2m.product_key_read, pkm_args(k_sub=6), ValueError, "k_sub"),
    ("pkm-dtype", l2m.product_key_read, pkm_args(values=rand(25, 6, dtype=torch.float16)), TypeError, "values"),
    ("write-memory-rank", l2m.gated_memory_write, write_args(memory=rand(N, D)), ValueError, "memory"),
    ("write-indices-shape", l2m.gated_memory_write, write_args(indices=torch.zeros(B + 1, Hm, T, 2, dtype=torch.long)),
     ValueError, "indices"),
    ("write-indices-dtype", l2m.gated_memory_write, write_args(indices=torch.zeros(B, Hm, T, 2)), TypeError,
     "indices"),
    ("write-weights-shape", l2m.gated_memory_write, write_args(weights=rand_unit(B, Hm, T, 3)), ValueError, "weights"),
    ("write-add-shape", l2m.gated_memory_write, write_args(add=rand(B, Hm, T, D + 1)), ValueError, "add"),
    ("write-erase-shape", l2m.gated_memory_write, write_args(erase=rand_unit(B, Hm, T, 2)), ValueError, "erase"),
    ("write-dtype", l2m.gated_memory_write, write_args(add=rand(B, Hm, T, D, dtype=torch.bfloat16)), TypeError, "add"),
    ("write-index-high", l2m.gated_memory_write,
     write_args(indices=torch.full((B, Hm, T, 2), N, dtype=torch.long)), IndexError, "indices"),
    ("write-index-low", l2m.gated_memory_write,
     write_args(indices=torch.full((B, Hm, T, 2), -2, dtype=torch.int32)), IndexError, "indices"),
    ("dense-broadcast", l2m.gated_dense_update,
     dict(memory=rand(B, N, D), update=rand(B, N, D + 1), input_gate=rand(B, 1, D), forget_gate=rand(B, 1, D)),
     ValueError, "update"),
    ("dense-dtype", l2m.gated_dense_update,
     dict(memory=rand(B, N, D), update=rand(B, N, D), input_gate=rand(B, 1, D, dtype=torch.float64),
          forget_gate=rand(B, 1, D)), TypeError, "input_gate"),
    ("attn-s-less-t", l2m.memory_attention, attn_args(k=rand(B, 2, T - 1, D), v=rand(B, 2, T - 1, 6)), ValueError, "k"),
    ("attn-kv-heads", l2m.memory_attention, attn_args(k=rand(B, 3, 9, D), v=rand(B, 3, 9, 6)), ValueError, "k"),
    ("attn-v-shape", l2m.memory_attention, attn_args(v=rand(B, 2, 8, 6)), ValueError, "v"),
    ("attn-window-zero", l2m.memory_attention, attn_args(window=0), ValueError, "window"),
    ("attn-merge-name", l2m.memory_attention, attn_args(merge="sum"), ValueError, "merge"),
    ("attn-gate-missing", l2m.memory_attention, attn_args(merge="gate"), ValueError, "gate"),
    ("attn-gate-shape", l2m.memory_attention, attn_args(merge="gate", gate=rand(H, 1, 2)), ValueError, "gate"),
    ("attn-gate-with-joint", l2m.memory_attention, attn_args(gate=rand(H, 1, 1)), ValueError, "gate"),
    ("attn-mem-dv", l2m.memory_attention, attn_args(mem_values=rand(B, Hm, N, 7)), ValueError, "mem_values"),
    ("attn-topk", l2m.memory_attention, attn_args(topk=N + 1), ValueError, "topk"),
    ("attn-mem-keys-dtype", l2m.memory_attention, attn_args(mem_keys=rand(B, Hm, N, D, dtype=torch.float16)),
     TypeError, "mem_keys"),
    ("merge-shape", l2m.merge_attention, merge_args(out_b=rand(B, H, T, D + 1)), ValueError, "out_b"),
    ("merge-lse-shape", l2m.merge_attention, merge_args(lse_a=rand_lse(B, H, T + 1)), ValueError, "lse_a"),
    ("merge-lse-dtype", l2m.merge_attention, merge_args(lse_b=rand(B, H, T, dtype=torch.float16)), TypeError, "lse_b"),
    ("merge-rank", l2m.merge_attention, merge_args(out_a=rand(H, T, D)), ValueError, "out_a"),
    ("merge-dtype", l2m.merge_attention, merge_args(out_b=rand(B, H, T, D, dtype=torch.bfloat16)), TypeError, "out_b"),
    ("gmerge-gate-shape", l2m.gated_merge, gmerge_args(gate=rand(H, 1, D)), ValueError, "gate"),
    ("gmerge-gate-rank", l2m.gated_merge, gmerge_args(gate=rand(1, B, H, T, 1)), ValueError, "gate"),
    ("gmerge-mem-shape", l2m.gated_merge, gmerge_args(out_mem=rand(B, H, T + 1, D)), ValueError, "out_mem"),
    ("gmerge-gate-dtype", l2m.gated_merge, gmerge_args(gate=rand(H, 1, 1, dtype=torch.float64)), TypeError, "gate"),
    ("gmerge-not-tensor", l2m.gated_merge, gmerge_args(gate=0.5), TypeError, "gate"),
]


MUTATED = [(op, backend, mutation) for op in fuzz.OPS for mutation in fuzz.MUTATIONS[op]
           for backend in ("reference", "cpu")]


def _rejected(case):
    assert case.must_raise is not None, "the mutation made no invalid argument"
    assert fuzz.run_built(case) == "rejected"   # the documented exception, inputs untouched


@pytest.mark.parametrize("op,backend,mutation", MUTATED, ids=["-".join(m) for m in MUTATED])
def test_every_drawn_invalid_argument_is_rejected_naming_it(op, backend, mutation):
    why = fuzz.backend_unavailable(op, backend)
    if why:
        pytest.skip(why)
    fuzz.each_case(op, backend, _rejected, examples=3, mutation=mutation, device=torch.device("cpu"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(case):
    _, fn, args, exc, argname = case
    with pytest.raises(exc) as info:
        call(fn, args)
    assert argname in str(info.value), f"message does not name {argname!r}: {info.value}"


def test_bad_shape_message_gives_expected_and_given_shape():
    with pytest.raises(ValueError) as info:
        l2m.topk_memory_read(rand(B, H, T, D), rand(B, Hm, N, D + 1), rand(B, Hm, N, 6), 3)
    msg = str(info.value)
    assert "(B, Hm, N, Dk)" in msg and str((B, Hm, N, D + 1)) in msg


def test_refused_write_leaves_memory_untouched():
    args = write_args()
    args["indices"][1, 0, 3, 1] = N  # one bad index late in the sequence
    before = args["memory"].clone()
    with pytest.raises(IndexError):
        l2m.gated_memory_write(**args, inplace=True)
    assert torch.equal(args["memory"], before)


def test_inplace_write_refused_when_grad_required():
    args = write_args(add=rand(B, Hm, T, D, requires_grad=True))
    before = args["memory"].clone()
    with pytest.raises(RuntimeError, match="inplace"):
        l2m.gated_memory_write(**args, inplace=True)
    assert torch.equal(args["memory"], before)


def test_devices_must_match():
    meta = torch.empty(B, Hm, N, 6, device="meta")
    with pytest.raises(ValueError, match="values"):
        l2m.topk_memory_read(rand(B, H, T, D), rand(B, Hm, N, D), meta, 3)
    with pytest.raises(ValueError, match="lse_b"):
        l2m.merge_attention(**merge_args(lse_b=torch.empty(B, H, T, device="meta")))


@pytest.mark.parametrize("fn,args", [
    (l2m.topk_memory_read, topk_args()), (l2m.product_key_read, pkm_args()),
    (l2m.merge_attention, merge_args()), (l2m.gated_merge, gmerge_args()),
    (l2m.memory_attention, attn_args()), (l2m.gated_memory_write, write_args()),
], ids=["topk", "pkm", "merge", "gmerge", "attn", "write"])
def test_explicit_backend_that_cannot_serve_lists_why(fn, args):
    with pytest.raises(NotImplementedError) as info:
        call(fn, dict(args, backend="cuda"))
    assert "cuda" in str(info.value)
