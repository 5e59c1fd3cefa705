"""Integrations of l2m-kernels with other libraries, each imported on demand:

- :mod:`l2m_kernels.integrations.transformers`: a block memory of past keys and values for Hugging
  Face ``transformers`` decoder-only models (``attach_memory``), through transformers' own extension
  points (``AttentionInterface``, ``AttentionMaskInterface`` and a ``Cache``), and the package's
  memory modules inside such models (``replace_mlp_with_memory``, ``add_memory_attention``,
  ``from_pretrained``).
"""
