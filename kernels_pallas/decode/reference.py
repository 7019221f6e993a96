"""XLA reference for decode: split-K over the page list with an lse merge, GQA rows packed.

The same math as the Pallas kernels (``kernels_pallas.decode.tpu`` / ``.triton``), in
plain XLA: every sequence's pages (all ``maxP`` of the page table, masked past
``num_pages``) are gathered, cut into ``num_splits`` contiguous ranges, and each range
computes its softmax over ``[K, M = G·T]`` rows (one einsum per kv head group, so a K/V
element is multiplied against all G query heads at once: GQA never repeats K/V). The
ranges merge with ``common.merge_splits``. Accumulates in float32 (float64 inputs stay
float64, for oracle tests).

XLA cannot skip pages, so this path reads all ``maxP`` pages; the kernels read only the
live ones (``common.live_pages``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from kernels_pallas.decode.common import from_dense
  >>> from kernels_pallas.decode.reference import decode_reference
  >>> k = jax.random.normal(jax.random.key(0), (2, 24, 2, 8))
  >>> pos = jnp.tile(jnp.arange(24), (2, 1))
  >>> kv = from_dense(k, k, pos, jnp.ones_like(pos), page_size=8)
  >>> q = jax.random.normal(jax.random.key(1), (2, 1, 4, 8))
  >>> o, lse = decode_reference(q, kv, q_positions=jnp.full((2, 1), 23), num_splits=2)
  >>> o.shape, lse.shape
  ((2, 1, 4, 8), (2, 4, 1))
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from kernels_pallas.decode import common
from kernels_pallas.decode.common import LN2, DecodeCfg, PagedKV, from_dense  # noqa: F401


def _split_pages(kv: PagedKV, cfg: DecodeCfg):
    """Gathered ``k [B,X,S',K,H]``, ``v [B,X,S',K,E]``, ``pos/seg [B,X,S']`` (S' = pps·C)."""
    X, pps = cfg.num_splits, cfg.pages_per_split
    B, maxP = kv.page_table.shape
    pad = X * pps - maxP
    table = jnp.pad(jnp.clip(kv.page_table, 0, kv.positions.shape[0] - 1), ((0, 0), (0, pad)))
    valid = jnp.arange(X * pps)[None] < kv.num_pages[:, None]  # [B, X·pps]
    C = cfg.page_size

    def split(g):  # [B, X·pps, C, ...] -> [B, X, pps·C, ...]
        return g.reshape((B, X, pps * C) + g.shape[3:])

    if hasattr(kv, "dequant_k"):  # quantized pages: gather the codes, dequantize in place
        k_g, v_g = split(kv.dequant_k(table)), split(kv.dequant_v(table))
    else:
        k_g, v_g = split(kv.k[table]), split(kv.values()[table])

    seg = jnp.where(valid[..., None], kv.segment_ids[table], 0).reshape(B, X, pps * C)
    # Pages past num_pages may hold anything (a recycled page, NaN): zero them so that
    # p = 0 there never meets a NaN value (the kernels never read those pages at all).
    live = (seg != 0)[..., None, None]
    zero = lambda x: jnp.where(live, x, jnp.zeros((), x.dtype))
    return zero(k_g), zero(v_g), split(kv.positions[table]), seg


def split_partials(q, kv: PagedKV, q_pos_BT, q_seg_BT, cfg: DecodeCfg):
    """Per split ``o_s [B,K,X,M,E]`` (normalised in the split) and ``lse_s [B,K,X,M]``."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    k, v, kpos, kseg = _split_pages(kv, cfg)
    qr = common.q_rows(q, cfg)  # [B, K, M, H]
    s = jnp.einsum("BKMH,BXSKH->BKXMS", qr, k.astype(q.dtype), preferred_element_type=acc)
    s = common.logits2(s, cfg)
    qpos, qseg = common.row_meta(q_pos_BT, q_seg_BT, cfg)  # [B, M]
    vis = common.visible(qpos[:, None, None, :, None], qseg[:, None, None, :, None],
                         kpos[:, None, :, None, :], kseg[:, None, :, None, :], cfg)
    s = jnp.where(vis, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp2(s - m_safe[..., None])
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("BKXMS,BXSKE->BKXME", p, v.astype(acc))
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o = o / l_safe[..., None]
    lse = jnp.where(seen, (m_safe + jnp.log2(l_safe)) * LN2, -jnp.inf)
    return o, lse


def decode_reference(q, kv: PagedKV, *, q_positions, q_segment_ids=None, causal: bool = True,
                     window=None, scale=None, softcap=None, sinks=None, num_splits=None):
    """Decode attention over a paged cache in XLA; returns ``(o [B,T,N,E], lse [B,N,T])``.

    Args:
      q: ``[B, T, N, H]`` queries (1 <= T <= 16).
      kv: ``PagedKV`` (``common``): pool, page tables, per-sequence page counts.
      q_positions: ``[B, T]`` int position ids of the queries.
      q_segment_ids: ``[B, T]`` int, 0 = padding query (sees nothing); default ones
        (every non-empty slot of the row is the same document).
      causal: hide slots at later positions.  window: ``(left, right)`` or None.
      scale: default ``H ** -0.5``.  softcap: ``c · tanh(logits / c)``.
      sinks: ``[N]`` sink logits.  num_splits: split-K ranges (default
        ``common.default_splits``).

    Example:
      >>> import jax.numpy as jnp
      >>> kv = from_dense(jnp.ones((1, 8, 1, 4)), jnp.ones((1, 8, 1, 4)),
      ...                 jnp.arange(8)[None], jnp.ones((1, 8), jnp.int32), page_size=4)
      >>> decode_reference(jnp.ones((1, 1, 2, 4)), kv, q_positions=jnp.array([[7]]))[0].shape
      (1, 1, 2, 4)
    """
    cfg = common.make_cfg(q.shape, kv, causal=causal, window=window, scale=scale,
                          softcap=softcap, num_splits=num_splits)
    return common.run_split_k(split_partials, q, kv, q_positions, q_segment_ids, sinks, cfg)
