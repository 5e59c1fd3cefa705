"""The thin reference L2M model: segments, state across calls, memory writes, backends, generation."""
import dataclasses

import pytest
import torch

from l2m_kernels.backends import BACKENDS
from l2m_kernels.models import L2MConfig, L2MModel
from l2m_kernels.testing import assert_close

CPU = torch.device("cpu")
CPU_CANNOT_ATTEND = BACKENDS["cpu"].not_supported_reasons("memory_attention", CPU, torch.float32)
CPU_CANNOT_WRITE = (BACKENDS["cpu"].not_supported_reasons("topk_memory_read", CPU, torch.float32)
                    + BACKENDS["cpu"].not_supported_reasons("gated_memory_write", CPU, torch.float32))
MODES = ["append", "slots"]


def _model(**overrides):
    config = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=8, window=6,
                  memory_slots=16, topk=4, write_topk=2, backend="reference")
    config.update(overrides)
    return L2MModel(L2MConfig(**config))


def _tokens(B=2, L=20):
    return torch.randint(0, 32, (B, L))


@pytest.mark.parametrize("merge", ["joint", "gate"])
@pytest.mark.parametrize("mode", MODES)
def test_shapes_loss_and_state(mode, merge):
    model = _model(memory_mode=mode, merge=merge)
    ids = _tokens(2, 20)
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 20, 32) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    state = out.state
    assert state.position == 20 and state.batch_size == 2
    for layer in state.layers:
        assert layer.cache_keys.shape == (2, 2, 5 + 4, 8)      # window - 1 earlier positions + 4 pending
        assert layer.mem_values.shape == (2, 2, 16, 8) and not layer.mem_values.requires_grad
        if mode == "append":
            assert torch.equal(layer.valid_len, torch.tensor([16, 16])) and layer.pending is None
        else:
            assert layer.mem_keys is None and layer.valid_len is None and layer.pending.shape == (2, 4, 32)
    assert state.write_pos == (16 % 16 if mode == "append" else 0)


@pytest.mark.parametrize("mode", MODES)
def test_several_calls_equal_one_call(mode):
    model = _model(memory_mode=mode, merge="gate")
    ids = _tokens(2, 37)
    whole = model(ids)
    state, logits = None, []
    for chunk in ids.split([5, 11, 1, 8, 12], dim=1):        # boundaries inside and at segments
        out = model(chunk, state)
        state = out.state
        logits.append(out.logits)
    assert_close("logits", torch.cat(logits, 1), whole.logits)
    assert state.position == whole.state.position and state.write_pos == whole.state.write_pos
    for got, want in zip(state.layers, whole.state.layers):
        assert_close("memory", got.mem_values, want.mem_values)
        assert_close("cache", got.cache_keys, want.cache_keys)


@pytest.mark.parametrize("mode", MODES)
def test_memory_is_used(mode):
    model = _model(memory_mode=mode)
    ids = _tokens(2, 40)
    state = model(ids[:, :32]).state
    with_memory = model(ids[:, 32:], state).logits
    cleared = model.clear_memory(state)
    assert cleared.position == state.position and torch.equal(cleared.layers[0].cache_keys, state.layers[0].cache_keys)
    without_memory = model(ids[:, 32:], cleared).logits
    assert (with_memory - without_memory).abs().max() > 1e-3
    # A model without memory layers: clearing changes nothing.
    local_only = _model(memory_mode=mode, memory_layers=())
    state = local_only(ids[:, :32]).state
    assert all(layer.mem_values is None for layer in state.layers)
    assert torch.equal(local_only(ids[:, 32:], state).logits,
                       local_only(ids[:, 32:], local_only.clear_memory(state)).logits)


def test_append_ring_buffer_holds_the_latest_keys_and_values():
    model = _model(memory_mode="append", n_layers=1)
    ids = _tokens(2, 40)
    state = model(ids).state
    layer, attn = state.layers[0], model.blocks[0].attn
    _, keys, values = attn.project(model.blocks[0].attn_norm(model.embed(ids)), start_pos=0)  # rotary at 0..39
    # 40 tokens into 16 slots, token p in slot p % 16: slots 0..7 hold tokens 32..39, 8..15 hold 24..31.
    latest = torch.tensor([32 + s if s < 8 else 16 + s for s in range(16)])
    assert_close("keys", layer.mem_keys, keys[:, :, latest])
    assert_close("values", layer.mem_values, values[:, :, latest])
    assert torch.equal(layer.valid_len, torch.tensor([16, 16])) and state.write_pos == 40 % 16


@pytest.mark.parametrize("mode", MODES)
def test_slots_writes_are_differentiable_within_a_call(mode):
    # Tokens 0..5 reach the third segment (16..23) only through memory: two layers of window 6 see
    # 10 positions back. Untied embeddings: their rows get a gradient only along that path.
    model = _model(memory_mode=mode, tie_embeddings=False)
    ids = torch.randint(8, 32, (2, 24))
    ids[:, :6] = torch.arange(6)
    labels = torch.full_like(ids, -100)
    labels[:, 16:] = ids[:, 16:]
    model(ids, labels=labels).loss.backward()
    early_rows = model.embed.weight.grad[:6].abs().sum()
    if mode == "slots":
        assert early_rows > 0
        for block in model.blocks:
            for name, p in block.slots.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
    else:  # written keys and values are detached, as in Memorizing Transformers
        assert early_rows == 0


def _grads(model, ids, backend):
    model.zero_grad()
    out = model(ids, labels=ids, backend=backend)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_backends_agree(model, ids, backend):
    want_logits, want_grads = _grads(model, ids, "reference")
    got_logits, got_grads = _grads(model, ids, backend)
    assert_close("logits", got_logits, want_logits, tol=1e-5)
    for name, want in want_grads.items():
        assert_close(name, got_grads[name], want, tol=1e-4)


@pytest.mark.skipif(bool(CPU_CANNOT_WRITE), reason="cpu backend unavailable: " + "; ".join(CPU_CANNOT_WRITE))
@pytest.mark.parametrize("mode", MODES)
def test_cpu_reads_and_writes_match_reference(mode, monkeypatch):
    # The cpu memory reads and writes under the model, memory attention on the reference (automatic
    # dispatch with memory_attention taken out of the cpu backend), against the reference everywhere.
    monkeypatch.setattr(BACKENDS["cpu"], "ops", BACKENDS["cpu"].ops - {"memory_attention"})
    _assert_backends_agree(_model(memory_mode=mode, merge="gate", backend=None), _tokens(2, 24), None)


@pytest.mark.skipif(bool(CPU_CANNOT_ATTEND), reason="cpu backend cannot serve memory_attention: "
                    + "; ".join(CPU_CANNOT_ATTEND))
@pytest.mark.parametrize("merge", ["joint", "gate"])
@pytest.mark.parametrize("mode", MODES)
def test_cpu_backend_matches_reference(mode, merge):
    _assert_backends_agree(_model(memory_mode=mode, merge=merge), _tokens(2, 24), "cpu")


@pytest.mark.parametrize("mode", MODES)
def test_generate_is_deterministic_and_greedy(mode):
    model = _model(memory_mode=mode)
    prompt = _tokens(2, 6)
    tokens, state = model.generate(prompt, 11)                # crosses two segment boundaries
    assert tokens.shape == (2, 17) and torch.equal(tokens[:, :6], prompt) and state.position == 17
    assert torch.equal(model.generate(prompt, 11).tokens, tokens)
    # Each new token is the argmax of the teacher-forced logits of the same sequence.
    teacher_forced = model(tokens[:, :-1])
    assert torch.equal(teacher_forced.logits[:, 5:].argmax(-1), tokens[:, 6:])
    # Continuing from the state equals continuing the whole sequence.
    more = model.generate(tokens[:, -1:], 2, state=teacher_forced.state).tokens
    assert torch.equal(more, model.generate(tokens, 2).tokens[:, 16:])


def test_memory_layers_subset():
    model = _model(memory_layers=(-1,), merge="gate", n_layers=3)
    assert [block.has_memory for block in model.blocks] == [False, False, True]
    assert model.blocks[0].attn.gate is None and model.blocks[2].attn.gate is not None
    state = model(_tokens(1, 12)).state
    assert state.layers[0].mem_values is None and state.layers[2].valid_len.item() == 8


def test_rejects_bad_configuration_and_input():
    for bad, field in [(dict(window=9), "window"), (dict(memory_mode="ring"), "memory_mode"),
                       (dict(topk=17), "topk"), (dict(memory_layers=(2,)), "memory_layers"),
                       (dict(n_kv_heads=3), "n_kv_heads"), (dict(merge="sum"), "merge")]:
        with pytest.raises(ValueError, match=field):
            _model(**bad)
    model = _model()
    state = model(_tokens(2, 3)).state
    with pytest.raises(ValueError, match="state"):
        model(_tokens(3, 3), state)
    with pytest.raises(ValueError, match="labels"):
        model(_tokens(2, 3), labels=_tokens(2, 4))
    config = dataclasses.asdict(model.config)
    assert config["window"] == 6 and config["memory_layers"] == (0, 1)
