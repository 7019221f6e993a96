"""Models built from attnlab's attention layers.

``models.transformer``: the decoder LM (``LMConfig``, ``Transformer``, ``init_cache``,
``generate``).

Example:
  >>> from models import LMConfig
  >>> LMConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2).pattern
  ('mha',)
"""

from models.transformer import LMConfig, Transformer, generate, init_cache

__all__ = ["LMConfig", "Transformer", "generate", "init_cache"]
