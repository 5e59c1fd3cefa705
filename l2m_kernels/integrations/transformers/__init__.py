"""A block memory of past keys and values for Hugging Face ``transformers`` decoder-only models.

    from l2m_kernels.integrations.transformers import attach_memory, detach_memory, MemoryConfig

    model = AutoModelForCausalLM.from_pretrained(...)
    attach_memory(model, window=512, block_size=64, topk_blocks=8, sink=4)
    out = model.generate(long_input_ids, max_new_tokens=32)     # or model(...) with a cache
    detach_memory(model)                                        # the original attention, exactly

What attaching does (InfLLM's scheme, after Xiao et al. 2024): every attention layer keeps the
first ``sink`` tokens, a local segment of at least the last ``window`` tokens, and every older token
in blocks of ``block_size`` (at most ``capacity`` tokens of blocks: the oldest blocks go first). The
queries of a chunk of at most ``chunk_size`` tokens attend, causally, to the local segment, and to
the sink plus the ``topk_blocks`` blocks whose representative keys score best against the chunk's
queries (``block_repr``: ``"mean"``, the mean key of the block, or ``"max"``, every key of the block,
the block scoring its best key); the two parts are merged exactly by their log-sum-exp
(:func:`l2m_kernels.merge_attention`). The selection is per key-value head (a group of query heads
shares it), by the sum of the chunk's query scores, and stays on the device.

``position_mode``:
  ``"original"``: memory keys keep their true positions (the keys the model rotated), so that with
  ``topk_blocks`` at least the number of blocks the output is the unpatched model's.
  ``"fixed"``: memory keys (sink and blocks) are stored without their rotary position and read as if
  at ``fixed_distance`` (default: ``window``) before every query, as InfLLM does, so that inputs far
  longer than the trained length never show the model a larger distance than about ``window`` plus
  ``block_size`` plus ``chunk_size``. Needs rotary position embeddings (Llama, Mistral, Qwen2).

The model's own ``model(...)`` and ``model.generate(...)`` work after attaching: the memory lives in a
:class:`MemoryCache`, which attaching swaps in for an empty cache (or none) at the model's input; a
call that brings many tokens is processed in chunks of ``chunk_size`` queries inside each layer, so a
long prompt in one call uses the memory as a chunked prefill does. Padding masks (a 2D
``attention_mask``) are honoured: a padded key is never attended, locally or from memory. Without
a cache of ours (a cache of another kind passed in, or the memory detached) the layers attend exactly.

The package's own modules in transformers models (:mod:`.layers`): ``replace_mlp_with_memory``
puts a :class:`~l2m_kernels.modules.ProductKeyMemory` in place of chosen MLPs,
``add_memory_attention`` the package's :class:`~l2m_kernels.modules.MemoryAttention` (with a learned
top-k memory, the layer's weights carried over) in place of chosen attention layers, and
``from_pretrained`` loads a ``save_pretrained`` checkpoint of such a model back.

Hooks only, no forward method rewritten: the attention is registered with transformers'
``AttentionInterface`` (and its mask with ``AttentionMaskInterface``), and forward pre-hooks hand each
attention layer the call's cache. Supported: decoder-only models whose attention layers dispatch
through ``AttentionInterface`` (Llama, Mistral, Qwen2, GPT-2 and most current families), with
transformers >= 5.0; anything else is refused with the missing piece named.
"""
from .block_memory import (IMPLEMENTATION, MemoryCache, MemoryConfig, MemoryLayer, attach_memory,  # noqa: F401
                           detach_memory)
from .layers import HFMemoryAttention, add_memory_attention, from_pretrained, replace_mlp_with_memory  # noqa: F401

__all__ = ["MemoryConfig", "MemoryCache", "MemoryLayer", "attach_memory", "detach_memory", "IMPLEMENTATION",
           "replace_mlp_with_memory", "add_memory_attention", "HFMemoryAttention", "from_pretrained"]
