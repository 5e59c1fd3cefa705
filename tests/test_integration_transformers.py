"""attach_memory on random tiny transformers models (Llama, Mistral, Qwen2, GPT-2), float32.

Exactness: with the window at least the input, or with every block read in position_mode
"original", the logits equal the unpatched model's (sdpa) to 1e-4, in one call, in a chunked prefill
and through generate; padding masks are honoured; "fixed" mode against a brute-force loop; the block
selection against brute force; capacity; errors; detach restores the model bitwise.
"""
import dataclasses
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="the integration needs transformers >= 5 (scripts/install.sh installs it)")

from l2m_kernels.integrations import transformers as hf  # noqa: E402
from l2m_kernels.integrations.transformers import block_memory, layers  # noqa: E402

VOCAB = 101
TOL = 1e-4


def tiny(family, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **common))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=4096, bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(family)
    model.generation_config.pad_token_id = 0
    return model.eval()


FAMILIES = ["llama", "mistral", "qwen2", "gpt2"]
EXACT = [dict(window=512, block_size=16, topk_blocks=0, sink=4, chunk_size=512),        # window >= input
         dict(window=64, block_size=16, topk_blocks=10 ** 6, sink=4, chunk_size=50),     # every block
         dict(window=37, block_size=9, topk_blocks=10 ** 6, sink=0, chunk_size=23, block_repr="max"),
         dict(window=20, block_size=7, topk_blocks=10 ** 6, sink=3, chunk_size=1)]


def max_error(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", EXACT, ids=["window", "all-blocks", "max-repr", "token-chunks"])
def test_exact_one_call_chunked_prefill_and_generate(family, settings):
    model = tiny(family)
    ids = torch.randint(1, VOCAB, (2, 211))
    with torch.no_grad():
        reference = model(ids).logits
        expected = model.generate(ids[:, :150], max_new_tokens=12, do_sample=False)
        hf.attach_memory(model, **settings)
        assert max_error(model(ids).logits, reference) < TOL
        cache = hf.MemoryCache.for_model(model)
        pieces = [model(piece, cache=cache, use_cache=True).logits for piece in ids.split(41, dim=1)]
        assert max_error(torch.cat(pieces, dim=1), reference) < TOL
        layer = cache.layers[0]
        assert layer.seen == ids.shape[1]
        if settings["window"] < ids.shape[1]:  # the memory was used
            assert layer.num_blocks > 0 and layer.local_start > 0
        assert torch.equal(model.generate(ids[:, :150], max_new_tokens=12, do_sample=False), expected)


def test_memory_changes_the_output_when_blocks_are_left_out():
    model = tiny("llama")
    ids = torch.randint(1, VOCAB, (1, 300))
    with torch.no_grad():
        reference = model(ids).logits
        hf.attach_memory(model, window=32, block_size=16, topk_blocks=1, sink=2, chunk_size=32)
        out = model(ids).logits
    # Positions whose whole past is local or read agree; later ones read 1 block of many.
    assert max_error(out[:, :32], reference[:, :32]) < TOL
    assert max_error(out[:, -32:], reference[:, -32:]) > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padding_is_honoured(family):
    model = tiny(family)
    ids = torch.randint(1, VOCAB, (2, 160))
    mask = torch.ones_like(ids)
    mask[1, :45] = 0  # row 1: 45 pad tokens in front, which fall into the sink and the blocks
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        hf.attach_memory(model, window=24, block_size=8, topk_blocks=10 ** 6, sink=4, chunk_size=30)
        out = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert max_error(out[valid], reference[valid]) < TOL
    # Without the mask the padded keys are read: the logits move.
    with torch.no_grad():
        assert max_error(model(ids).logits[1, -1], reference[1, -1]) > 1e-3


def test_padded_generate_matches_unpatched():
    model = tiny("qwen2")
    ids = torch.randint(1, VOCAB, (2, 120))
    mask = torch.ones_like(ids)
    mask[0, :30] = 0
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        hf.attach_memory(model, window=32, block_size=8, topk_blocks=10 ** 6, sink=2, chunk_size=40)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False), expected)


def brute_force_memory_read(q, k, v, positions, *, window, block_size, sink, chunk, distance, inv_freq, scale):
    """InfLLM's read with every block, by loops: q, k, v (H, T, D) as the model rotated them at
    ``positions``; for each chunk, keys of the local segment (whose start follows the cache's rule:
    the sink, then blocks ending at multiples of ``block_size``, while at least ``window`` tokens stay
    before the chunk) are scored at their true distance, older keys at ``distance``."""
    T = q.shape[1]
    out = torch.empty(q.shape[0], T, v.shape[-1], dtype=torch.float64)
    raw_k = block_memory._rotate(k[None], -positions[None], inv_freq)[0].double()
    start = 0
    for a in range(0, T, chunk):
        while True:
            n = sink - start if start < sink else block_size - start % block_size
            if a - (start + n) < window:
                break
            start += n
        for t in range(a, min(T, a + chunk)):
            q_far = block_memory._rotate(q[:, t:t + 1][None], torch.tensor([[distance - positions[t]]]), inv_freq)[0, :, 0]
            for h in range(q.shape[0]):
                scores = []
                for j in range(t + 1):
                    if j >= start:
                        scores.append(q[h, t].double() @ k[h, j].double())
                    else:
                        scores.append(q_far[h].double() @ raw_k[h, j])
                weights = torch.softmax(torch.stack(scores) * scale, dim=0)
                out[h, t] = weights @ v[h, :t + 1].double()
    return out


def test_fixed_positions_against_brute_force():
    torch.manual_seed(3)
    H, T, D = 2, 90, 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    positions = torch.arange(T)
    q = block_memory._rotate(torch.randn(1, H, T, D), positions[None], inv_freq)
    k = block_memory._rotate(torch.randn(1, H, T, D), positions[None], inv_freq)
    v = torch.randn(1, H, T, D)
    config = hf.MemoryConfig(window=16, block_size=8, topk_blocks=10 ** 6, sink=3, chunk_size=11,
                             position_mode="fixed", fixed_distance=20)

    class Layer(torch.nn.Module):
        layer_idx = 0

    module = Layer()
    module._l2m_state = block_memory._Attached(config, 1, inv_freq, None, [])
    cache = hf.MemoryCache(config, 1, inv_freq)
    module._l2m_cache = cache
    keys, values = cache.update(k, v, 0)
    out, _ = block_memory.memory_attention_forward(module, q, keys, values, None, scaling=D ** -0.5,
                                         position_ids=positions[None])
    expected = brute_force_memory_read(q[0], k[0], v[0], positions, window=16, block_size=8, sink=3, chunk=11,
                                       distance=20, inv_freq=inv_freq, scale=D ** -0.5)
    assert cache.layers[0].num_blocks > 0
    assert max_error(out[0].transpose(0, 1).double(), expected) < 1e-5


def test_fixed_mode_is_exact_within_the_window_and_differs_beyond():
    model = tiny("llama")
    ids = torch.randint(1, VOCAB, (1, 200))
    with torch.no_grad():
        reference = model(ids).logits
        hf.attach_memory(model, window=256, position_mode="fixed")
        assert max_error(model(ids).logits, reference) < TOL
        hf.detach_memory(model)
        hf.attach_memory(model, window=32, block_size=16, topk_blocks=10 ** 6, sink=4, position_mode="fixed",
                         chunk_size=32)
        out = model(ids).logits
    assert max_error(out[:, :32], reference[:, :32]) < TOL
    assert max_error(out[:, -1], reference[:, -1]) > 1e-4


@pytest.mark.parametrize("block_repr", ["mean", "max"])
def test_block_selection_against_brute_force(block_repr):
    torch.manual_seed(1)
    config = hf.MemoryConfig(window=4, block_size=5, topk_blocks=3, sink=0, block_repr=block_repr)
    layer = hf.MemoryLayer(config)
    B, Hk, G, C, D = 2, 2, 3, 4, 8
    keys, values = torch.randn(B, Hk, 64, D), torch.randn(B, Hk, 64, D)
    layer.update(keys, values)
    valid = torch.rand(B, 64) > 0.2
    valid[0, 4:9] = False  # a block of padding only
    layer.note_inputs(valid, torch.arange(64).expand(B, 64))
    layer.roll(64)
    blocks = layer.num_blocks
    assert blocks == (64 - 4) // 5
    q = torch.randn(B, Hk, G, C, D)
    chosen = layer.select(q, 0.5, 3)
    for b in range(B):
        for h in range(Hk):
            scores = []
            for n in range(blocks):
                block = keys[b, h, n * 5:(n + 1) * 5]
                ok = valid[b, n * 5:(n + 1) * 5]
                if not ok.any():  # padding only: never chosen before a block with a token
                    scores.append(float("-inf"))
                elif block_repr == "mean":
                    rep = (block * ok[:, None]).sum(0) / int(ok.sum())
                    scores.append(sum(float(q[b, h, g, c] @ rep) for g in range(G) for c in range(C)))
                else:
                    scores.append(sum(max(float(q[b, h, g, c] @ block[t]) for t in range(5) if ok[t])
                                      for g in range(G) for c in range(C)))
            expected = sorted(sorted(range(blocks), key=lambda n: (-scores[n], n))[:3])
            assert chosen[b, h].tolist() == expected


@pytest.mark.parametrize("block_repr", ["mean", "max"])
def test_capacity_evicts_the_oldest_blocks(block_repr):
    model = tiny("llama")
    ids = torch.randint(1, VOCAB, (1, 400))
    hf.attach_memory(model, window=32, block_size=16, topk_blocks=2, sink=4, capacity=64, chunk_size=32,
                     block_repr=block_repr)
    cache = hf.MemoryCache.for_model(model)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    layer = cache.layers[1]
    assert layer.num_blocks == 4 and layer.evicted_blocks > 0
    assert layer.sink_blocks == 1 and layer.block_keys.view().shape[2] == 1 + 4   # the sink's block kept
    assert layer.local_start + layer.keys.shape[-2] == 400
    # The kept blocks are the sink's and the newest ones: layer 0's keys do not depend on what
    # memory was read.
    unbounded = hf.MemoryCache(dataclasses.replace(model._l2m_memory.config, capacity=None), 2)
    with torch.no_grad():
        model(ids, cache=unbounded, use_cache=True)
    kept, every = cache.layers[0], unbounded.layers[0]

    def expected(t, dim):
        return torch.cat([t.narrow(dim, 0, 1), t.narrow(dim, t.shape[dim] - 4, 4)], dim)
    assert torch.equal(kept.block_keys.view(), expected(every.block_keys.view(), 2))
    assert torch.equal(kept.block_valid.view(), expected(every.block_valid.view(), 1))
    assert kept.block_valid.view()[:, 0].sum() == 4                                # 4 sink tokens, padding
    if block_repr == "mean":
        assert torch.equal(kept.block_repr.view(), expected(every.block_repr.view(), 2))


def test_detach_restores_the_model_bitwise():
    model = tiny("gpt2")
    ids = torch.randint(1, VOCAB, (1, 100))
    before = model.config._attn_implementation
    with torch.no_grad():
        reference = model(ids).logits
        hf.attach_memory(model, window=16, block_size=8, topk_blocks=1)
        assert model.config._attn_implementation == hf.IMPLEMENTATION
        hf.detach_memory(model)
        assert model.config._attn_implementation == before
        assert torch.equal(model(ids).logits, reference)
    assert not any(hasattr(m, "_l2m_cache") or hasattr(m, "_l2m_state") for m in model.modules())


def test_training_step_with_memory_has_gradients():
    model = tiny("llama").train()
    ids = torch.randint(1, VOCAB, (2, 120))
    hf.attach_memory(model, window=16, block_size=8, topk_blocks=4, sink=2, chunk_size=24)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_errors_are_clear():
    model = tiny("gpt2")
    with pytest.raises(TypeError, match="rotary"):
        hf.attach_memory(model, position_mode="fixed")
    hf.attach_memory(model)
    with pytest.raises(ValueError, match="already has memory"):
        hf.attach_memory(model)
    hf.detach_memory(model)
    with pytest.raises(ValueError, match="no memory attached"):
        hf.detach_memory(model)
    with pytest.raises(ValueError, match="no memory attached"):
        hf.MemoryCache.for_model(model)
    with pytest.raises(TypeError, match="not a transformers PreTrainedModel"):
        hf.attach_memory(torch.nn.Linear(2, 2))
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    with pytest.raises(TypeError, match="encoder-decoder"):
        hf.attach_memory(t5)
    for bad in (dict(window=0), dict(block_size=0), dict(sink=-1), dict(topk_blocks=1.5), dict(chunk_size=True),
                dict(capacity=-1), dict(block_repr="median"), dict(position_mode="relative")):
        with pytest.raises(ValueError, match="MemoryConfig"):
            hf.MemoryConfig(**bad)
    with pytest.raises(TypeError):
        hf.attach_memory(model, no_such_option=1)
    model = tiny("llama")
    hf.attach_memory(model)
    cache = hf.MemoryCache.for_model(model)
    with pytest.raises(ValueError, match="must cover past and current"):
        with torch.no_grad():
            model(torch.randint(1, VOCAB, (1, 10)), cache=cache, use_cache=True)
            model(torch.randint(1, VOCAB, (1, 5)), attention_mask=torch.ones(1, 5, dtype=torch.long), cache=cache,
                  use_cache=True)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)


def test_config_overrides_and_defaults():
    config = hf.MemoryConfig(window=100)
    assert config.distance == 100
    assert dataclasses.replace(config, fixed_distance=7).distance == 7
    model = tiny("llama")
    hf.attach_memory(model, config, sink=0)
    assert model._l2m_memory.config == hf.MemoryConfig(window=100, sink=0)
    assert math.isclose(hf.MemoryConfig().window, 512)


@pytest.mark.parametrize("grad", [False, True])
def test_flash_path_matches_the_eager_attention(grad):
    """_attend_any (PyTorch's CPU flash kernel without autograd, else _attend) against _attend, with
    padding, grouped heads and rows that may attend nothing (output 0, lse -inf)."""
    torch.manual_seed(2)
    B, Hk, G, C, L, D = 2, 2, 3, 5, 9, 8
    q = torch.randn(B, Hk, G, C, D, requires_grad=grad)
    k, v = torch.randn(B, Hk, L, D), torch.randn(B, Hk, L, D)
    local = block_memory._causal(L - C, C, L, "cpu") & (torch.rand(B, L) > 0.3)[:, None, None, None, :]
    local[1, ..., 2, :] = False
    memory = (torch.rand(B, Hk, L) > 0.3)[:, :, None, None, :]
    memory[0, 1] = False
    decoding = (q[:, :, :, -1:], local[..., -1:, :].clone())  # one query: the mask folds into the key-value heads
    decoding[1][0, ..., :] = False                      # and a sequence whose query may attend nothing
    for queries, allowed in ((q, local), (q, memory), decoding):
        expected_out, expected_lse = block_memory._attend(queries, k, v, allowed, 0.3, 0.0, False)
        out, lse = block_memory._attend_any(queries, k, v, allowed, 0.3, 0.0, False)
        assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse)) and torch.isinf(expected_lse).any()
        assert max_error(out, expected_out) < 1e-5
        finite = torch.isfinite(expected_lse)
        assert max_error(lse[finite], expected_lse[finite]) < 1e-5
        assert (out[~finite] == 0).all()


def test_prefill_benchmark_tiny():
    from l2m_kernels.bench import hf_memory
    rows = hf_memory.run(torch.device("cpu"), tiny=True)
    measured = [r for r in rows if r.fwd_ms == r.fwd_ms]
    assert {r.variant for r in measured} == set(hf_memory.VARIANTS)
    assert {r.op for r in measured} == {hf_memory.OP, hf_memory.DECODE_OP}
    assert all(r.fwd_ms > 0 and "tokens/s" in r.note for r in measured)
    assert any(r.variant == "sdpa (unpatched)" and "not run" in r.note for r in rows)


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of the attached model: a forward whose layers read memory blocks
    (no cache passed: attaching swaps one in) and a training step, equal to eager."""
    model = tiny("llama")
    ids = torch.randint(1, VOCAB, (1, 160))
    with torch.no_grad():
        reference = model(ids).logits
    hf.attach_memory(model, window=32, block_size=16, topk_blocks=10 ** 6, sink=4, chunk_size=40)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert max_error(compiled(ids, use_cache=False).logits, reference) < TOL
    model.train()
    eager_loss = model(ids, labels=ids, use_cache=False).loss
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss = compiled(ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert abs(loss.item() - eager_loss.item()) < 1e-5
    assert all(max_error(p.grad, g) < 1e-4 for p, g in zip(model.parameters(), eager_grads))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_product_key_memory_in_place_of_mlps_round_trips(family, tmp_path):
    from l2m_kernels.modules import ProductKeyMemory
    model = tiny(family)
    ids = torch.randint(1, VOCAB, (2, 30))
    with torch.no_grad():
        before = model(ids).logits
    hf.replace_mlp_with_memory(model, layers=[-1], n_sub=16, key_dim=32, heads=2, k=4, gated=True)
    decoder, _ = layers._decoder_layers(model, "test")
    assert isinstance(decoder[1].mlp, ProductKeyMemory) and not isinstance(decoder[0].mlp, ProductKeyMemory)
    assert model.config.l2m_memory == {"mlp": [{"layers": [1], "args": dict(n_sub=16, key_dim=32, heads=2, k=4,
                                                                              gated=True)}]}
    model.train()
    model(ids, labels=ids).loss.backward()
    assert decoder[1].mlp.values.grad is not None and decoder[1].mlp.values.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        after = model(ids).logits
    assert max_error(after, before) > 1e-3
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == type(model).__name__
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, after)
        # Memory attached on top: exact with every block read.
        hf.attach_memory(loaded, window=8, block_size=4, topk_blocks=10 ** 6, sink=1, chunk_size=8)
        assert max_error(loaded(ids).logits, after) < TOL


def test_replace_mlp_with_memory_errors():
    model = tiny("qwen2")
    with pytest.raises(TypeError, match="unknown ProductKeyMemory argument"):
        hf.replace_mlp_with_memory(model, n_sub=8, key_dim=16, dim=64)
    with pytest.raises(TypeError, match="n_sub is required"):
        hf.replace_mlp_with_memory(model, key_dim=16)
    with pytest.raises(ValueError, match="indices of the 2 decoder layers"):
        hf.replace_mlp_with_memory(model, layers=[2], n_sub=8, key_dim=16)
    with pytest.raises(ValueError, match="key_dim"):
        hf.replace_mlp_with_memory(model, layers=[0, 1], n_sub=8, key_dim=15, k=4)
    assert getattr(model.config, "l2m_memory", None) is None
    assert not any(type(m).__name__ == "ProductKeyMemory" for m in model.modules())
    hf.replace_mlp_with_memory(model, n_sub=8, key_dim=16, k=4)  # default: the middle layer
    assert model.config.l2m_memory["mlp"][0]["layers"] == [1]


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_attention_without_memory_is_the_model(family):
    """add_memory_attention with no memory yet: the package's MemoryAttention, carrying the layer's
    weights, computes the model's attention (forward and generate, through the transformers cache)."""
    model = tiny(family)
    ids = torch.randint(1, VOCAB, (2, 50))
    with torch.no_grad():
        reference = model(ids).logits
        expected = model.generate(ids[:, :30], max_new_tokens=8, do_sample=False)
        hf.add_memory_attention(model, layers=[0, 1], num_slots=None)
        assert sum(isinstance(m, hf.HFMemoryAttention) for m in model.modules()) == 2
        assert max_error(model(ids).logits, reference) < TOL
        assert torch.equal(model.generate(ids[:, :30], max_new_tokens=8, do_sample=False), expected)


def test_memory_attention_trains_and_round_trips(tmp_path):
    model = tiny("llama")
    ids = torch.randint(1, VOCAB, (2, 40))
    hf.add_memory_attention(model, num_slots=64, topk=4, merge="gate")
    decoder, _ = layers._decoder_layers(model, "test")
    inner = decoder[-1].self_attn.inner
    assert inner.memory.num_slots == 64 and inner.merge == "gate"
    model.train()
    model(ids, labels=ids).loss.backward()
    assert inner.memory.keys.grad is not None and inner.memory.values.grad.abs().sum() > 0
    assert inner.gate.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="no padding mask"):
        loaded(ids, attention_mask=mask)
    loaded(ids, attention_mask=torch.ones_like(ids))  # an all-ones mask is no padding


def test_add_memory_attention_errors():
    model = tiny("llama")
    with pytest.raises(ValueError, match="indices of the 2 decoder layers"):
        hf.add_memory_attention(model, layers=[5])
    model.config.rope_parameters = dict(model.config.rope_parameters, rope_type="linear", factor=2.0)
    with pytest.raises(TypeError, match="rotary type 'linear'"):
        hf.add_memory_attention(model)
    assert not any(isinstance(m, hf.HFMemoryAttention) for m in model.modules())


def test_beam_search_reorders_the_memory():
    """num_beams expands (batch_repeat_interleave) and reorders (reorder_cache) every part of the
    memory: with every block read, the beams are the unpatched model's."""
    model = tiny("llama")
    ids = torch.randint(1, VOCAB, (2, 120))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
        hf.attach_memory(model, window=32, block_size=8, topk_blocks=10 ** 6, sink=2, chunk_size=40)
        assert torch.equal(model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False), expected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bfloat16_model_within_the_dtype_tolerance(family):
    """A bfloat16 model with every block read: the logits within bfloat16's relative RMS tolerance
    of the unpatched bfloat16 model (l2m_kernels.testing.assert_close)."""
    from l2m_kernels.testing import assert_close
    model = tiny(family).to(torch.bfloat16)
    ids = torch.randint(1, VOCAB, (2, 200))
    with torch.no_grad():
        reference = model(ids).logits
        hf.attach_memory(model, window=32, block_size=16, topk_blocks=10 ** 6, sink=4, chunk_size=50)
        out = model(ids).logits
    assert out.dtype == torch.bfloat16
    assert_close("logits", out, reference, dtype=torch.bfloat16)


def test_soft_capped_logits_and_refused_sinks():
    """Gemma 2's attention logit soft-capping is applied in both parts (exact against the unpatched
    eager model, whose sdpa path does not cap); learned attention sinks (gpt-oss's s_aux) are refused
    rather than ignored."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=4096, sliding_window=4096,
                                       attn_logit_softcapping=0.5, attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # scores of a few units (random init gives ~0.01), so that the cap at 0.5 matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
    ids = torch.randint(1, VOCAB, (2, 150))
    with torch.no_grad():
        reference = model(ids).logits
        hf.attach_memory(model, window=32, block_size=8, topk_blocks=10 ** 6, sink=2, chunk_size=30)
        assert max_error(model(ids).logits, reference) < TOL

    class Layer(torch.nn.Module):
        layer_idx = 0

    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match="s_aux"):
        block_memory.memory_attention_forward(Layer(), q, k, k, None, s_aux=torch.zeros(2))


STORE = dict(capacity=512, block_size=8)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("sink", [0, 3])
def test_store_memory_reading_every_entry_is_the_model(family, sink):
    model = tiny(family)
    ids = torch.randint(1, VOCAB, (2, 211))
    with torch.no_grad():
        reference = model(ids).logits
        expected = model.generate(ids[:, :150], max_new_tokens=8, do_sample=False)
        hf.attach_memory(model, window=40, block_size=8, sink=sink, chunk_size=32, store=STORE,
                         store_topk=256)
        assert max_error(model(ids).logits, reference) < TOL
        cache = hf.MemoryCache.for_model(model)
        pieces = [model(piece, cache=cache, use_cache=True).logits for piece in ids.split(41, dim=1)]
        assert max_error(torch.cat(pieces, dim=1), reference) < TOL
        store = cache.layers[0].store
        assert store is not None and len(store) > 100 and store.num_heads == 2 * (4 if family == "gpt2" else 2)
        assert torch.equal(model.generate(ids[:, :150], max_new_tokens=8, do_sample=False), expected)


def test_store_memory_compressed_two_level_and_refusals():
    model = tiny("llama")
    ids = torch.randint(1, VOCAB, (1, 300))
    with torch.no_grad():
        reference = model(ids).logits
        hf.attach_memory(model, window=32, block_size=8, sink=4, chunk_size=64, store_topk=16,
                         store_blocks=4, store=dict(capacity=128, block_size=8, key_format="int8",
                                                    value_format="int8", eviction="usage"))
        logits = model(ids).logits
        assert torch.isfinite(logits).all()
        assert max_error(logits[:, :32], reference[:, :32]) < TOL   # inside the window: exact
        padded = torch.ones(2, 120, dtype=torch.long)
        padded[0, :5] = 0
        with pytest.raises(NotImplementedError, match="padded"):
            model(torch.randint(1, VOCAB, (2, 120)), attention_mask=padded)
        with pytest.raises(NotImplementedError, match="beam"):
            model.generate(torch.randint(1, VOCAB, (1, 100)), max_new_tokens=2, num_beams=2, do_sample=False)
    with pytest.raises(ValueError, match="capacity"):
        hf.MemoryConfig(store=dict(block_size=8))
