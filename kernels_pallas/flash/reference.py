"""The reference for the flash kernels: ``(o, lse)`` exactly as the ``xla`` implementation.

Forward and backward tests of every backend compare against this (and against the
float64 oracle of the test suite). Gradients come from autodiff of the dense XLA math.

Example:
  >>> import jax
  >>> from attn.masks import Mask
  >>> from kernels_pallas.flash.reference import reference_attention
  >>> q = jax.random.normal(jax.random.key(0), (1, 5, 4, 8))
  >>> kv = jax.random.normal(jax.random.key(1), (1, 7, 2, 8))
  >>> o, lse = reference_attention(q, kv, kv, mask=Mask(causal=True))
  >>> o.shape, lse.shape
  ((1, 5, 4, 8), (1, 4, 5))
"""

from __future__ import annotations

from attn.core import xla_attention
from attn.masks import Mask


def reference_attention(q, k, v, *, mask: Mask | None = None, scale: float | None = None,
                        softcap: float | None = None, sinks=None, bias=None):
    """Dense attention; returns ``(o [B, T, N, E], lse [B, N, T] float32)``.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, E]``.
      mask: any ``Mask`` (``dense`` included); scale default ``H ** -0.5``.
      softcap: ``c · tanh(logits / c)`` before ``bias``; sinks: ``[N]``;
      bias: broadcastable to ``[B, N, T, S]``.

    Example:
      >>> import jax
      >>> from kernels_pallas.flash.reference import reference_attention
      >>> x = jax.random.normal(jax.random.key(0), (1, 3, 2, 4))
      >>> reference_attention(x, x, x)[1].shape
      (1, 2, 3)
    """
    return xla_attention(q, k, v, mask=mask, scale=scale, softcap=softcap, sinks=sinks,
                         bias=bias, return_lse=True)
