"""Per-kv-head KV caches: every (row, kv head) keeps its own set of tokens.

KV eviction and per-head policies (SnapKV, H2O, RazorAttention, DuoAttention, ThinK, ...)
keep *different* prompt tokens in different heads, and different numbers of them in
different rows of a batch. Two pytrees carry that through the layers' cache protocol
(``cache.attend``, see ``attn.mha``):

``HeadKVCache``
    A ``PagedKVCache`` whose rows are the ``B·K`` pairs (row ``b``, kv head ``k``), each
    with one kv head: row ``b·K + k`` owns exactly the pages its tokens need, so a head
    that keeps 5% of the prompt holds 5% of the pages (``held_bytes``). Every slot stores
    its token's *position*, so causal masks stay exact after eviction, and the keys are
    stored after RoPE, so nothing is re-rotated. Attention folds the kv heads into the
    batch (``q [B, T, N, H] -> [B·K, T, G, H]``, keys ``[B·K, S, 1, H]``), which any
    implementation of the op contract serves; with ``channels`` (ThinK) only the kept key
    channels are stored and the queries are gathered to the same channels (the logit
    scale stays ``H ** -0.5`` of the full head).

``PolicyPrefillCache``
    What a layer sees at prefill: it runs exact causal attention over the prompt, then
    hands the prompt's ``Observation`` (queries, keys, values, positions) to the policy,
    and returns the ``HeadKVCache`` holding what the policy kept. Decoding continues on
    that cache; new tokens are kept in every head.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn.kv.head_cache import HeadKVCache
  >>> B, S, K, H = 2, 6, 2, 4
  >>> k = jax.random.normal(jax.random.key(0), (B, S, K, H))
  >>> pos = jnp.tile(jnp.arange(S), (B, 1)); seg = jnp.ones((B, S), jnp.int32)
  >>> keep = jnp.zeros((B, K, S), bool).at[:, 0, :3].set(True).at[:, 1, 4:].set(True)
  >>> c = HeadKVCache.build(k, k, pos, seg, keep, max_new=2, page_size=2)
  >>> c.paged.lengths.tolist()       # rows (b, k): 3 and 2 tokens kept
  [3, 2, 3, 2]
  >>> q = jax.random.normal(jax.random.key(1), (B, 1, 4, H))
  >>> o, c = c.attend(q, k[:, :1], k[:, :1], jnp.full((B, 1), S), jnp.ones((B, 1), jnp.int32))
  >>> o.shape, c.paged.lengths.tolist()
  ((2, 1, 4, 4), [4, 3, 4, 3])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from attn.cache import SLOT_META_BYTES
from attn.paged_cache import PagedKVCache

Array = Any


def fold_heads(x_BTKH):
    """``[B, T, K, H] -> [B·K, T, 1, H]`` (row ``b·K + k``)."""
    B, T, K, H = x_BTKH.shape
    return x_BTKH.transpose(0, 2, 1, 3).reshape(B * K, T, 1, H)


def fold_queries(q_BTNH, K: int):
    """``[B, T, N, H] -> [B·K, T, G, H]``: the G query heads of kv group k."""
    B, T, N, H = q_BTNH.shape
    return q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 1, 3, 4).reshape(B * K, T, N // K, H)


def unfold_out(o_RTGE, B: int):
    """``[B·K, T, G, E] -> [B, T, N, E]``."""
    R, T, G, E = o_RTGE.shape
    K = R // B
    return o_RTGE.reshape(B, K, T, G, E).transpose(0, 2, 1, 3, 4).reshape(B, T, K * G, E)


def _rows(a_BT, K: int):
    """Per-row ``[B, T]`` metadata repeated for each kv head: ``[B·K, T]``."""
    return jnp.repeat(a_BT, K, axis=0)


def _gather_channels(x, channels_R1C):
    """Keep channels ``channels_R1C [B·K, 1, H']`` of ``x [B·K, T, G, H]``."""
    idx = jnp.broadcast_to(channels_R1C[:, :, None, :], x.shape[:3] + channels_R1C.shape[-1:])
    return jnp.take_along_axis(x, idx, axis=-1)


@struct.dataclass
class HeadKVCache:
    """Per-(row, kv head) paged cache; see the module docstring.

    Attributes:
      paged: ``PagedKVCache`` with ``B·K`` rows and one kv head (``k [P, C, 1, H']``).
      channels: ``[B, K, H']`` int32 kept key channels, or None (all ``H``).
      num_kv_heads: static K.  head_dim: static H of the full keys (sets the scale).
    """

    paged: PagedKVCache
    channels: Array | None = None
    num_kv_heads: int = struct.field(pytree_node=False, default=1)
    head_dim: int = struct.field(pytree_node=False, default=1)

    @property
    def length(self) -> Array:
        """Positions are carried by the caller; this is the longest (row, head) list."""
        return self.paged.length

    def overflow_pair(self) -> Array:
        """``(appended, stored)`` for ``attn.cache.check_overflow`` (the pool is sized to fit)."""
        return self.paged.overflow_pair()

    @classmethod
    def build(cls, k_BSKH, v_BSKE, positions_BS, segment_ids_BS, keep_BKS, *, max_new: int,
              page_size: int = 16, max_keep: int | None = None, channels_BKC=None,
              extra=None) -> "HeadKVCache":
        """A cache holding, per (row, kv head), the prompt tokens where ``keep_BKS``.

        Args:
          k_BSKH, v_BSKE: the prompt's keys (after RoPE) and values.
          positions_BS, segment_ids_BS: int ``[B, S]`` (segment 0 = padding, never kept).
          keep_BKS: bool ``[B, K, S]``.
          max_new: tokens each (row, head) must still be able to append (decoding).
          page_size: tokens per page.
          max_keep: static bound on the prompt tokens any (row, head) keeps (default S);
            sizes the pool: ``B·K·ceil((max_keep + X + max_new) / C)`` pages. A policy
            that keeps more is not silently truncated: the extra tokens are counted as
            dropped and ``attn.cache.check_overflow`` raises on the host.
          channels_BKC: int ``[B, K, H']`` key channels to store (ThinK), or None.
          extra: optional ``(k [B, X, K, H], v [B, X, K, E], pos [B, X], seg [B, X, K])``
            tokens appended after the kept ones (e.g. RazorAttention's compensation
            token); seg 0 entries are not stored.

        ``held_bytes`` counts the live pages, ``reserved_bytes`` the whole pool.
        """
        B, S, K, H = k_BSKH.shape
        C = page_size
        X = 0 if extra is None else extra[0].shape[1]
        keep_max = S if max_keep is None else min(int(max_keep), S)
        max_pages = -(-(keep_max + X + max_new) // C)
        kf, vf = fold_heads(k_BSKH), fold_heads(v_BSKE)
        if channels_BKC is not None:
            kf = jnp.take_along_axis(kf, channels_BKC.reshape(B * K, 1, 1, -1), axis=-1)
        Hc = kf.shape[-1]
        paged = PagedKVCache.create(batch=B * K, num_pages=B * K * max_pages, page_size=C,
                                    max_pages=max_pages, num_kv_heads=1, head_dim=Hc,
                                    value_dim=v_BSKE.shape[-1], dtype=k_BSKH.dtype)
        keep_RS = keep_BKS.reshape(B * K, S) & (_rows(segment_ids_BS, K) != 0)
        seg_RS = jnp.where(keep_RS, _rows(segment_ids_BS, K), 0)
        *_, paged = paged.append(kf, vf, _rows(positions_BS, K), seg_RS)
        if extra is not None:
            ek, ev, epos, eseg = extra
            ekf = fold_heads(ek)
            if channels_BKC is not None:
                ekf = jnp.take_along_axis(ekf, channels_BKC.reshape(B * K, 1, 1, -1), axis=-1)
            eseg_RX = eseg.transpose(0, 2, 1).reshape(B * K, X)
            *_, paged = paged.append(ekf, fold_heads(ev), _rows(epos, K), eseg_RX)
        return cls(paged=paged, channels=channels_BKC, num_kv_heads=K, head_dim=H)

    @classmethod
    def from_observation(cls, obs, policy, *, max_new: int, page_size: int = 16,
                         max_keep: int | None = None) -> "HeadKVCache":
        """The cache ``policy`` makes of one layer's ``Observation``.

        ``PolicyPrefillCache(policy=None)`` returns the observation as the layer's "cache",
        so one prefill can be compressed by many policies and budgets
        (``obs.replace``-style: ``dataclasses.replace(obs, budget_B=...)``); with
        stacked layers, ``jax.vmap`` this over the layer axis.
        """
        sel = policy.select(obs)
        return cls.build(obs.k, obs.v, obs.positions, obs.segment_ids, sel.keep, max_new=max_new,
                         page_size=page_size, max_keep=max_keep, channels_BKC=sel.channels,
                         extra=sel.extra)

    @classmethod
    def empty_like(cls, one: "HeadKVCache", *, batch: int, max_len: int) -> "HeadKVCache":
        """An empty cache of ``batch`` rows shaped like ``one`` (a serving batch's pool).

        Every (row, head) can hold ``max_len`` tokens (the pool is sized so that it never
        overflows); ``insert`` fills a row from a prefilled single-request cache.
        """
        p, K = one.paged, one.num_kv_heads
        C = p.page_size
        pages = -(-max_len // C)
        paged = PagedKVCache.create(batch=batch * K, num_pages=batch * K * pages, page_size=C,
                                    max_pages=pages, num_kv_heads=1, head_dim=p.k.shape[-1],
                                    value_dim=p.v.shape[-1], dtype=p.k.dtype)
        ch = None if one.channels is None else jnp.zeros((batch,) + one.channels.shape[1:],
                                                         one.channels.dtype)
        return cls(paged=paged, channels=ch, num_kv_heads=K, head_dim=one.head_dim)

    def insert(self, one: "HeadKVCache", row) -> "HeadKVCache":
        """Row ``row`` (traced int; must be empty) takes the tokens of ``one`` (batch 1).

        The kept tokens are copied into fresh pages of this pool, so a request prefilled
        alone (its policy saw its whole prompt) joins a running batch.
        """
        K = self.num_kv_heads
        R = self.paged.page_table.shape[0]
        k, v, pos, seg = one.paged.gather_dense()  # [K, S1, 1, H], ..., [K, S1]
        put = lambda a: jax.lax.dynamic_update_slice_in_dim(
            jnp.zeros((R,) + a.shape[1:], a.dtype), a, row * K, axis=0)
        *_, paged = self.paged.append(put(k), put(v), put(pos), put(seg))
        ch = self.channels
        if ch is not None:
            ch = jax.lax.dynamic_update_slice_in_dim(ch, one.channels.astype(ch.dtype), row, axis=0)
        return self.replace(paged=paged, channels=ch)

    def release(self, rows_B) -> "HeadKVCache":
        """Free the pages of rows where ``rows_B [B]`` is True (all their heads)."""
        return self.replace(paged=self.paged.release(_rows(jnp.asarray(rows_B, bool), self.num_kv_heads)))

    def kept_BK(self) -> Array:
        """int32 ``[B, K]``: tokens held per (row, kv head)."""
        return self.paged.lengths.reshape(-1, self.num_kv_heads)

    def _slot_bytes(self) -> int:
        p = self.paged
        return (p.k.shape[-1] * p.k.dtype.itemsize + p.v.shape[-1] * p.v.dtype.itemsize
                + SLOT_META_BYTES)

    def held_bytes(self) -> Array:
        """Bytes of the live pages (K + V + position and segment per slot); summed over
        the layer axis when the caches are stacked (``scan_layers``)."""
        C = self.paged.k.shape[-3]  # k is [(L,) P, C, 1, H']: not .page_size when stacked
        return jnp.sum(self.paged.num_pages) * C * self._slot_bytes()

    def reserved_bytes(self) -> int:
        """Bytes of the whole page pool (what the arrays occupy), all stacked layers."""
        pages_and_slots = int(np.prod(self.paged.k.shape[:-2]))
        return pages_and_slots * self._slot_bytes()

    def attend(self, q_BTNH, k_BTKH, v_BTKE, positions_BT, segment_ids_BT, *, window=None,
               softcap=None, sinks=None, impl: str = "auto"):
        """Append the T new tokens to every head, attend; ``(o [B, T, N, E], new_cache)``."""
        from attn.core import attention
        from attn.masks import Mask

        if sinks is not None:
            raise NotImplementedError("per-head KV caches do not support attention sinks "
                                      "(the sink logit is per query head, the fold is per kv head)")
        B, T, N, H = q_BTNH.shape
        K = self.num_kv_heads
        qf = fold_queries(q_BTNH, K)
        kf, vf = fold_heads(k_BTKH), fold_heads(v_BTKE)
        if self.channels is not None:
            ch = self.channels.reshape(B * K, 1, -1)
            qf, kf = _gather_channels(qf, ch), _gather_channels(kf, ch)
        pos_R, seg_R = _rows(positions_BT.astype(jnp.int32), K), _rows(segment_ids_BT.astype(jnp.int32), K)
        k_all, v_all, kv_pos, kv_seg, paged = self.paged.append(kf, vf, pos_R, seg_R)
        mask = Mask(causal=True, window=window, q_positions=pos_R, kv_positions=kv_pos,
                    q_segment_ids=seg_R, kv_segment_ids=kv_seg)
        o = attention(qf, k_all.astype(q_BTNH.dtype), v_all.astype(q_BTNH.dtype), mask=mask,
                      scale=self.head_dim ** -0.5, softcap=softcap, impl=impl,
                      self_attention=False)
        return unfold_out(o, B), self.replace(paged=paged)


@struct.dataclass
class PolicyPrefillCache:
    """A layer's cache before prefill: exact attention over the prompt, then the policy.

    Attributes:
      budget_B: int32 ``[B]`` tokens each head of row b may keep (the policy reads it).
      layer_state: the policy's per-layer arrays (e.g. per-head retrieval scores ``[K]``)
        or None; stacked along the layer axis like every cache leaf under ``scan``.
      policy: static, hashable ``attn.kv.policy.KVPolicy``; None: the prefill returns the
        layer's ``Observation`` instead of a cache (``HeadKVCache.from_observation``).
      max_new: static tokens to be decoded after the prompt.  page_size: static.
      max_keep: static bound on the tokens one head keeps (sizes the pool), or None.
    """

    budget_B: Array
    layer_state: Any = None
    policy: Any = struct.field(pytree_node=False, default=None)
    max_new: int = struct.field(pytree_node=False, default=1)
    page_size: int = struct.field(pytree_node=False, default=16)
    max_keep: int | None = struct.field(pytree_node=False, default=None)

    @property
    def length(self) -> Array:
        return jnp.zeros((), jnp.int32)

    def attend(self, q_BTNH, k_BTKH, v_BTKE, positions_BT, segment_ids_BT, *, window=None,
               softcap=None, sinks=None, impl: str = "auto"):
        """Prefill: ``(o, HeadKVCache)`` — exact prompt attention, then what the policy keeps."""
        from attn.core import attention
        from attn.kv.policy import Observation
        from attn.masks import Mask

        pos = positions_BT.astype(jnp.int32)
        seg = segment_ids_BT.astype(jnp.int32)
        mask = Mask(causal=True, window=window, q_positions=pos, kv_positions=pos,
                    q_segment_ids=seg, kv_segment_ids=seg)
        o = attention(q_BTNH, k_BTKH, v_BTKE, mask=mask, softcap=softcap, sinks=sinks,
                      impl=impl, self_attention=True)
        obs = Observation(q=q_BTNH, k=k_BTKH, v=v_BTKE, positions=pos, segment_ids=seg,
                          budget_B=self.budget_B, layer_state=self.layer_state,
                          softcap=softcap, window=window)
        if self.policy is None:  # keep the observation itself (see ``from_observation``)
            return o, obs
        return o, HeadKVCache.from_observation(obs, self.policy, max_new=self.max_new,
                                               page_size=self.page_size, max_keep=self.max_keep)
