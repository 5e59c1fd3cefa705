"""L2MModel with its memories sharded across 2 gloo processes (``L2MConfig.memory_group``): a
training step gives the loss and the gradients of the single-process model ("slots" mode: the
learned slot memory, read and written across the ranks; "append" mode: the ring buffer written with
global slot ids and read with ``valid_len``), the state carried over to a second call.

Each process group is spawned once per world size and runs every case (``CASES``) in order
(:mod:`harness`).
"""
from __future__ import annotations

import pytest
import torch

from . import harness

WORLD_SIZES = (2,)
SHARDED_PARAMETERS = ("slots.slot_keys", "slots.initial_values")  # (heads, N, head_dim), slots on dim -2


def _training_steps(rank, world_size, *, mode, merge, memory_slots, seed):
    """Two calls of 12 tokens (3 segments of 4 each), the loss of each backpropagated."""
    import torch.distributed as dist

    from l2m_kernels.distributed import shard_of
    from l2m_kernels.models import L2MConfig, L2MModel
    from l2m_kernels.testing import assert_close

    config = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=4,
                  window=3, memory_slots=memory_slots, topk=3, write_topk=2, memory_mode=mode, merge=merge,
                  mlp_hidden=24)
    torch.manual_seed(seed)
    reference = L2MModel(L2MConfig(**config))
    if merge == "gate":  # a gate away from 0.5
        for block in reference.blocks:
            block.attn.gate.data.uniform_(-1.0, 1.0)
    sharded = L2MModel(L2MConfig(**config, memory_group=dist.group.WORLD))
    sharded.load_state_dict({name: shard_of(tensor) if name.endswith(SHARDED_PARAMETERS) else tensor
                             for name, tensor in reference.state_dict().items()})
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32, (2, 25), generator=gen)

    states, losses = [None, None], [[], []]
    for model_index, model in enumerate((reference, sharded)):
        for start in (0, 12):
            out = model(tokens[:, start:start + 12], states[model_index], labels=tokens[:, start + 1:start + 13])
            out.loss.backward()
            states[model_index] = out.state
            losses[model_index].append(out.loss.detach())

    from l2m_kernels.distributed import shard_sizes
    assert states[1].layers[0].mem_values.shape[2] == shard_sizes(memory_slots, world_size)[rank]
    for ref_loss, loss in zip(*losses):
        assert_close("loss", loss, ref_loss)
    sharded_params = dict(sharded.named_parameters())
    for name, param in reference.named_parameters():
        expected = shard_of(param.grad) if name.endswith(SHARDED_PARAMETERS) else param.grad
        assert_close(name, sharded_params[name].grad, expected)


CASES = {
    "slots_joint": lambda r, p: _training_steps(r, p, mode="slots", merge="joint", memory_slots=11, seed=0),
    "slots_gate": lambda r, p: _training_steps(r, p, mode="slots", merge="gate", memory_slots=8, seed=1),
    "append_joint": lambda r, p: _training_steps(r, p, mode="append", merge="joint", memory_slots=10, seed=2),
    "append_gate_ring_wraps": lambda r, p: _training_steps(r, p, mode="append", merge="gate", memory_slots=7,
                                                           seed=3),
}


group_results, test_sharded_l2m_training_step = harness.case_tests(__name__, WORLD_SIZES)


def test_sharded_memory_refused_in_store_mode():
    from l2m_kernels.models import L2MConfig

    with pytest.raises(ValueError, match="memory_group: a sharded memory"):
        L2MConfig(memory_mode="store", memory_slots=64, segment_len=64, memory_group=object())
