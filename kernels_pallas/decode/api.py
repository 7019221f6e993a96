"""``decode_attention``: one entry point over the decode backends (a name -> function table).

Backends (``BACKENDS``):

* ``"xla"``            ``reference.decode_reference`` (split-K in XLA; reads every page);
* ``"pallas_tpu"``     ``tpu.decode_tpu`` (Mosaic TPU; reads live pages only);
* ``"pallas_triton"``  ``triton.decode_triton`` (Triton GPU; reads live pages only).

``interpret=True`` runs a Pallas backend in interpret mode on any platform.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from kernels_pallas.decode.api import decode_attention
  >>> from kernels_pallas.decode.common import from_dense
  >>> k = jax.random.normal(jax.random.key(0), (1, 16, 1, 8)); pos = jnp.arange(16)[None]
  >>> kv = from_dense(k, k, pos, jnp.ones_like(pos), page_size=8)
  >>> q = jax.random.normal(jax.random.key(1), (1, 1, 2, 8))
  >>> a = decode_attention(q, kv, q_positions=jnp.array([[15]]), backend="xla")[0]
  >>> b = decode_attention(q, kv, q_positions=jnp.array([[15]]), backend="pallas_tpu",
  ...                      interpret=True)[0]
  >>> bool(jnp.allclose(a, b, atol=1e-5))
  True
"""

from __future__ import annotations

from attn.errors import UserError
from kernels_pallas.decode import reference, tpu, triton
from kernels_pallas.decode.common import PagedKV


def _xla(q, kv, *, interpret=False, **kw):
    return reference.decode_reference(q, kv, **kw)


BACKENDS = {
    "xla": _xla,
    "pallas_tpu": tpu.decode_tpu,
    "pallas_triton": triton.decode_triton,
}


def decode_attention(q, kv: PagedKV, *, q_positions, q_segment_ids=None, causal: bool = True,
                     window=None, scale=None, softcap=None, sinks=None, num_splits=None,
                     backend: str = "xla", interpret: bool = False):
    """Attention of a few new tokens over a paged cache: ``(o [B,T,N,E], lse [B,N,T])``.

    Args:
      q: ``[B, T, N, H]``, 1 <= T <= 16 (T > 1: speculative verification, chunked steps).
      kv: ``common.PagedKV`` (``from_dense`` views a dense cache as one).
      q_positions: ``[B, T]`` int.  q_segment_ids: ``[B, T]`` int or None (ones).
      causal, window, scale, softcap, sinks: as in ``attn.core.attention``.
      num_splits: split-K ranges per sequence (default ``common.default_splits``).
      backend: a key of ``BACKENDS``.  interpret: Pallas interpret mode.

    Example:
      >>> sorted(BACKENDS)
      ['pallas_tpu', 'pallas_triton', 'xla']
    """
    if backend not in BACKENDS:
        raise UserError(f"decode_attention: unknown backend {backend!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[backend](q, kv, q_positions=q_positions, q_segment_ids=q_segment_ids,
                             causal=causal, window=window, scale=scale, softcap=softcap,
                             sinks=sinks, num_splits=num_splits, interpret=interpret)
