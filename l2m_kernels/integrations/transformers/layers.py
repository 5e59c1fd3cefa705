"""The package's modules inside transformers models: :class:`~l2m_kernels.modules.ProductKeyMemory`
in place of MLPs (:func:`replace_mlp_with_memory`), :class:`~l2m_kernels.modules.MemoryAttention` in
place of attention layers (:func:`add_memory_attention`), and :func:`from_pretrained` for the
checkpoints of such models."""
from __future__ import annotations

from typing import Optional

import torch
import transformers

# ---- product-key memory layers in place of MLPs ----

_MLP_NAMES = ("mlp", "feed_forward", "ffn")
# The ProductKeyMemory arguments a checkpoint records (config.l2m_memory): everything but device/dtype.
_PKM_ARGUMENTS = ("n_sub", "key_dim", "value_dim", "heads", "k", "k_sub", "gated", "sparse_grad", "backend")


def _decoder_layers(model, caller: str):
    """The base model's list of decoder layers: its nn.ModuleList of num_hidden_layers modules."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module, config
    raise TypeError(f"{caller}: no list of {count} decoder layers found in "
                    f"{type(model.base_model).__name__}")


def _sublayer(layer, names: tuple, index: int, caller: str, what: str):
    """(attribute name, module) of the first of ``names`` that decoder layer ``index`` has."""
    name = next((n for n in names if isinstance(getattr(layer, n, None), torch.nn.Module)), None)
    if name is None:
        raise TypeError(f"{caller}: decoder layer {index} ({type(layer).__name__}) has no {what} attribute "
                        f"(one of {', '.join(names)})")
    return name, getattr(layer, name)


def _layer_indices(decoder, layers, default: int, caller: str) -> list:
    """The sorted distinct decoder-layer indices of ``layers`` (negative ones from the end), or [default]."""
    if layers is None:
        return [default]
    layers = [int(i) for i in layers]
    if not layers or any(not -len(decoder) <= i < len(decoder) for i in layers):
        raise ValueError(f"{caller}: layers must be indices of the {len(decoder)} decoder layers, got {layers}")
    return sorted({i % len(decoder) for i in layers})


def _put_memory_layers(model, spec: dict) -> None:
    from l2m_kernels.modules import ProductKeyMemory
    layers, config = _decoder_layers(model, "replace_mlp_with_memory")
    replacements = []  # every memory layer built before any is put in: a bad argument changes nothing
    for index in spec["layers"]:
        layer = layers[index]
        name, mlp = _sublayer(layer, _MLP_NAMES, index, "replace_mlp_with_memory", "MLP")
        reference = next(mlp.parameters(), None)
        factory = {} if reference is None else dict(device=reference.device, dtype=reference.dtype)
        replacements.append((layer, name, ProductKeyMemory(config.hidden_size, **spec["args"], **factory)))
    for layer, name, memory in replacements:
        setattr(layer, name, memory)


def replace_mlp_with_memory(model, layers=None, **pkm_args):
    """Replaces the MLP of decoder layers ``layers`` (indices; default: the middle layer) of a
    transformers model by :class:`l2m_kernels.modules.ProductKeyMemory` ``(dim=hidden_size,
    **pkm_args)`` (``n_sub`` and ``key_dim`` required), in place, on the MLP's device and dtype, and
    records the replacement in ``model.config.l2m_memory`` so that :func:`from_pretrained` rebuilds
    it from a ``save_pretrained`` checkpoint. Returns the model.

        replace_mlp_with_memory(model, layers=[4], n_sub=512, key_dim=256, heads=4, k=32, gated=True)
        model.save_pretrained(path)
        model = from_pretrained(path)                 # the same model, memory layers included
    """
    unknown = sorted(set(pkm_args) - set(_PKM_ARGUMENTS))
    if unknown:
        raise TypeError(f"replace_mlp_with_memory: unknown ProductKeyMemory argument(s) {', '.join(unknown)} "
                        f"(known: {', '.join(_PKM_ARGUMENTS)}; dim is the model's hidden size)")
    for name in ("n_sub", "key_dim"):
        if name not in pkm_args:
            raise TypeError(f"replace_mlp_with_memory: the ProductKeyMemory argument {name} is required")
    decoder, _ = _decoder_layers(model, "replace_mlp_with_memory")
    layers = _layer_indices(decoder, layers, len(decoder) // 2, "replace_mlp_with_memory")
    recorded = dict(getattr(model.config, "l2m_memory", None) or {})
    spec = {"layers": layers, "args": dict(pkm_args)}
    _put_memory_layers(model, spec)
    recorded.setdefault("mlp", []).append(spec)
    model.config.l2m_memory = recorded
    return model


# ---- the package's MemoryAttention in place of a layer's attention ----

_ATTENTION_NAMES = ("self_attn", "attn", "attention")


class HFMemoryAttention(torch.nn.Module):
    """:class:`l2m_kernels.modules.MemoryAttention` as a transformers attention layer: it takes the
    keyword arguments decoder layers pass (``hidden_states``, ``attention_mask``, the cache, ...) and
    returns ``(out, None)``; the layer's keys and values go into the call's transformers cache
    (``cache.update``), so ``generate`` works. ``inner`` is the MemoryAttention (its projections,
    rotary embedding, sliding window and memory)."""

    def __init__(self, inner, layer_idx: int):
        super().__init__()
        self.inner, self.layer_idx = inner, layer_idx

    def forward(self, hidden_states, attention_mask=None, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        past, length = None, 0
        if cache is not None and cache.get_seq_length(self.layer_idx) > 0:
            layer = cache.layers[self.layer_idx]
            past, length = (layer.keys, layer.values), layer.keys.shape[-2]
        result = self.inner.attend(hidden_states, past_kv=past)
        if cache is not None:
            cache.update(result.context_keys[:, :, length:], result.context_values[:, :, length:], self.layer_idx)
        return result.out, None


def _split_projections(attention, hidden: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """The original attention's q/k/v/o weights and biases as nn.Linear tensors (out, in)."""
    if all(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        linear = {n: getattr(attention, f"{n}_proj") for n in "qkvo"}
        return {n: (m.weight, m.bias) for n, m in linear.items()}
    if hasattr(attention, "c_attn") and hasattr(attention, "c_proj"):  # GPT-2: Conv1D, weight (in, out)
        weight, bias = attention.c_attn.weight.t(), attention.c_attn.bias
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        parts = dict(zip("qkv", zip(weight.split(sizes, dim=0), bias.split(sizes, dim=0))))
        parts["o"] = (attention.c_proj.weight.t(), attention.c_proj.bias)
        return parts
    raise TypeError(f"add_memory_attention: {type(attention).__name__} has neither q_proj/k_proj/v_proj/o_proj "
                    "nor GPT-2's c_attn/c_proj: its weights cannot be carried over")


def add_memory_attention(model, layers=None, *, num_slots: Optional[int] = 4096, topk: int = 32, merge: str = "joint",
                         memory_heads: Optional[int] = None, trainable: bool = True, deterministic: bool = False,
                         backend: Optional[str] = None):
    """Replaces the attention of decoder layers ``layers`` (indices; default: the last layer) by the
    package's :class:`l2m_kernels.modules.MemoryAttention` with an owned
    :class:`~l2m_kernels.modules.TopKMemory` of ``num_slots`` slots per memory head
    (``memory_heads``, default the key-value heads; ``trainable``: learned keys and values, else
    state to ``load_``), read ``topk`` per query and merged with the local attention (``merge``:
    "joint" or "gate"); ``num_slots=None``: no memory yet (``layer.inner.memory`` may be set later).
    The original projections' weights (and biases) are carried over, with the model's rotary
    embedding (default rotary type, its ``rope_theta``), sliding window and attention scale, so that
    without memory the model computes what it did, through the fused op. Recorded in
    ``model.config.l2m_memory`` for :func:`from_pretrained`. Returns the model.

    Padding masks are refused (ValueError at the call): the fused op has no key padding mask.
    Supported: Llama, Mistral, Qwen2 (q/k/v/o projections, rotate-half rotary) and GPT-2 (c_attn,
    absolute positions)."""
    spec = {"layers": layers, "args": dict(num_slots=num_slots, topk=topk, merge=merge, memory_heads=memory_heads,
                                           trainable=trainable, deterministic=deterministic, backend=backend)}
    decoder, _ = _decoder_layers(model, "add_memory_attention")
    spec["layers"] = _layer_indices(decoder, layers, len(decoder) - 1, "add_memory_attention")
    _put_memory_attention(model, spec, copy_weights=True)
    recorded = dict(getattr(model.config, "l2m_memory", None) or {})
    recorded.setdefault("attention", []).append(spec)
    model.config.l2m_memory = recorded
    return model


def _refuse_padding(module, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.ndim == 2 and not bool(mask.all()):
        raise ValueError("add_memory_attention: this model's MemoryAttention layers take no padding mask "
                         "(memory_attention has no key padding mask); pass unpadded inputs")


def _put_memory_attention(model, spec: dict, copy_weights: bool) -> None:
    from l2m_kernels.modules import MemoryAttention, TopKMemory
    decoder, config = _decoder_layers(model, "add_memory_attention")
    args = dict(spec["args"])
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    rope = getattr(config, "rope_parameters", None) or {}
    replacements = []
    for index in spec["layers"]:
        layer = decoder[index]
        name, attention = _sublayer(layer, _ATTENTION_NAMES, index, "add_memory_attention", "attention")
        head_dim = getattr(attention, "head_dim", None) or config.hidden_size // heads
        parts = _split_projections(attention, config.hidden_size, heads, kv_heads, head_dim)
        rotary = hasattr(attention, "q_proj")
        if rotary and rope.get("rope_type", "default") != "default":
            raise TypeError(f"add_memory_attention: rotary type {rope.get('rope_type')!r}: MemoryAttention "
                            "implements the default rotary embedding only")
        reference = parts["q"][0]
        memory = None if args["num_slots"] is None else TopKMemory(
            args["num_slots"], head_dim, head_dim, args["memory_heads"] or kv_heads, trainable=args["trainable"],
            backend=args["backend"], device=reference.device, dtype=reference.dtype)
        inner = MemoryAttention(config.hidden_size, heads, n_kv_heads=kv_heads, head_dim=head_dim,
                                topk=args["topk"], window=getattr(config, "sliding_window", None) if rotary else None,
                                merge=args["merge"], memory=memory, rotary_dims=head_dim if rotary else 0,
                                rope_base=float(rope.get("rope_theta", 10000.0)),
                                scale=getattr(attention, "scaling", None),
                                bias=any(bias is not None for _, bias in parts.values()),
                                deterministic=args["deterministic"], backend=args["backend"],
                                device=reference.device, dtype=reference.dtype)
        if copy_weights:
            with torch.no_grad():
                for n, (weight, bias) in parts.items():
                    target = getattr(inner, f"{n}_proj")
                    target.weight.copy_(weight)
                    if target.bias is not None:
                        target.bias.copy_(bias) if bias is not None else target.bias.zero_()
        replacements.append((layer, name, HFMemoryAttention(inner, index)))
    for layer, name, module in replacements:
        setattr(layer, name, module)
    if not getattr(model, "_l2m_padding_hook", None):
        model._l2m_padding_hook = model.base_model.register_forward_pre_hook(_refuse_padding, with_kwargs=True)


def from_pretrained(path, model_class=None, **kwargs):
    """Loads a ``save_pretrained`` checkpoint of a model with product-key memory layers
    (:func:`replace_mlp_with_memory`) or memory attention (:func:`add_memory_attention`): the class of ``config.architectures[0]`` (or ``model_class``),
    extended so that construction puts the memory layers where ``config.l2m_memory`` records them,
    then transformers' own ``from_pretrained`` (``**kwargs``: its options) loads every weight. A
    checkpoint without memory layers loads as the plain class does."""
    config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise ValueError(f"from_pretrained: the checkpoint's config names no transformers architecture "
                             f"({names}); pass model_class")

    class WithMemory(model_class):
        def __init__(self, config, *args, **init_kwargs):
            super().__init__(config, *args, **init_kwargs)
            recorded = getattr(config, "l2m_memory", None) or {}
            for spec in recorded.get("mlp", []):
                _put_memory_layers(self, spec)
            for spec in recorded.get("attention", []):
                _put_memory_attention(self, spec, copy_weights=False)

    WithMemory.__name__ = WithMemory.__qualname__ = model_class.__name__
    return WithMemory.from_pretrained(path, **kwargs)
