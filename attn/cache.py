"""KV-cache pytrees and their update rules: a full cache and a ring buffer.

Both caches store, per slot, the key, the value, the token's *position id* and its
*segment id* (0 = empty slot). Attention masks are built from those stored positions
and segments, never from slot indices, so

* an empty slot is invisible (segment 0 never matches a query),
* a ring buffer stays correct after eviction and wrap-around,
* left-padded prompts and packed documents need no special cases.

Both expose one method the layers call, so layers never branch on the cache kind::

    k_BSKH, v_BSKE, kv_pos_BS, kv_seg_BS, new_cache = cache.append(k, v, pos, seg)

``KVCache`` (full): writes the T new tokens at ``length`` and returns the whole buffer
(``S = max_len``) to attend over. A full cache overflows when more than ``max_len``
tokens are appended: this raises ``ValueError`` whenever it is statically known (T >
max_len, or a concrete ``length``); under ``jit`` with a traced ``length`` the
overflow cannot raise, so tokens past ``max_len`` are *dropped* (never written over
older slots) and ``length`` keeps counting. The jitted code cannot raise, so the host
must: ``overflow_state(caches)`` (jit-safe) carries the numbers out of the traced
function and ``check_overflow(...)`` raises on them at the next host boundary.
``models.transformer.generate`` and ``models.vlm.generate`` both do; any other decode
loop a user writes should too.

``RingKVCache`` (sliding window of ``left = W``): capacity ``W`` slots. Appending T
tokens (any T, also T > W) attends over ``concat(ring, new)`` (``S = W + T``), then
writes the newest ``min(T, W)`` tokens into slots ``(length + i) % W``. Correct as
long as a row's position ids grow by at most one per appended token (true for
consecutive decoding, left padding and packed documents), because then the last W
writes contain every key the window can still see.

Example:
  >>> import jax.numpy as jnp
  >>> from attn.cache import KVCache
  >>> c = KVCache.create(batch=1, max_len=8, num_kv_heads=2, head_dim=4)
  >>> k = jnp.ones((1, 3, 2, 4))
  >>> pos, seg = jnp.arange(3)[None], jnp.ones((1, 3), jnp.int32)
  >>> k_all, v_all, kp, ks, c = c.append(k, k, pos, seg)
  >>> k_all.shape, int(c.length), ks.tolist()
  ((1, 8, 2, 4), 3, [[1, 1, 1, 0, 0, 0, 0, 0]])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

Array = Any

# Bytes of bookkeeping per cached slot: an int32 position and an int32 segment id.
SLOT_META_BYTES = 8


def _concrete_int(x) -> int | None:
    """``int(x)`` when x is concrete (not traced), else None."""
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError, TypeError):
        return None


def _check_new(cache, k_BTKH, v_BTKE, positions_BT, segment_ids_BT) -> None:
    """Shapes of the new tokens must match the cache's [B, ., K, H|E]."""
    B, _, K, H = cache.k.shape
    E = cache.v.shape[-1]
    if k_BTKH.ndim != 4 or (k_BTKH.shape[0], k_BTKH.shape[2], k_BTKH.shape[3]) != (B, K, H):
        raise ValueError(f"cache append: k has shape {k_BTKH.shape}, cache expects [{B}, T, {K}, {H}]")
    T = k_BTKH.shape[1]
    if tuple(v_BTKE.shape) != (B, T, K, E):
        raise ValueError(f"cache append: v has shape {v_BTKE.shape}, expected {(B, T, K, E)}")
    for name, a in (("positions", positions_BT), ("segment_ids", segment_ids_BT)):
        if tuple(a.shape) != (B, T):
            raise ValueError(f"cache append: {name} has shape {tuple(a.shape)}, expected {(B, T)}")


def _empty(batch, slots, num_kv_heads, head_dim, value_dim, dtype):
    """Zeroed buffers; segment 0 marks every slot empty."""
    return dict(
        k=jnp.zeros((batch, slots, num_kv_heads, head_dim), dtype),
        v=jnp.zeros((batch, slots, num_kv_heads, value_dim), dtype),
        positions=jnp.zeros((batch, slots), jnp.int32),
        segment_ids=jnp.zeros((batch, slots), jnp.int32),
        length=jnp.zeros((), jnp.int32),
    )


@struct.dataclass
class KVCache:
    """Full KV cache of ``max_len`` slots.

    Attributes:
      k: ``[B, S, K, H]`` keys (S = max_len).
      v: ``[B, S, K, E]`` values.
      positions: ``[B, S]`` int32 position id of each slot.
      segment_ids: ``[B, S]`` int32; 0 = empty slot (or padding token).
      length: ``[]`` int32 tokens appended so far (the next write index).

    Example:
      >>> c = KVCache.create(batch=2, max_len=16, num_kv_heads=1, head_dim=8)
      >>> c.k.shape, c.capacity
      ((2, 16, 1, 8), 16)
    """

    k: Array
    v: Array
    positions: Array
    segment_ids: Array
    length: Array

    @classmethod
    def create(cls, *, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
               value_dim: int | None = None, dtype=jnp.float32) -> "KVCache":
        """An empty cache (every slot has segment 0)."""
        if max_len <= 0:
            raise ValueError(f"KVCache: max_len must be positive, got {max_len!r}")
        value_dim = head_dim if value_dim is None else value_dim
        return cls(**_empty(batch, max_len, num_kv_heads, head_dim, value_dim, dtype))

    @property
    def capacity(self) -> int:
        return self.k.shape[-3]

    @property
    def overflowed(self) -> Array:
        """True once more than ``capacity`` tokens were appended (tokens were dropped)."""
        return self.length > self.capacity

    def append(self, k_BTKH, v_BTKE, positions_BT, segment_ids_BT):
        """Write T tokens at ``length``; return ``(k, v, kv_pos, kv_seg, new_cache)`` over all S slots."""
        _check_new(self, k_BTKH, v_BTKE, positions_BT, segment_ids_BT)
        T, S = k_BTKH.shape[1], self.capacity
        if T > S:
            raise ValueError(f"KVCache overflow: appending T={T} tokens to a cache of max_len={S}")
        n = _concrete_int(self.length)
        if n is not None and n + T > S:
            raise ValueError(
                f"KVCache overflow: length={n} + T={T} new tokens exceeds max_len={S}; "
                "create the cache with a larger max_len"
            )
        # Scatter with mode="drop": a traced overflow drops the extra tokens instead of
        # clamping the start index (dynamic_update_slice would overwrite older slots).
        idx_T = self.length + jnp.arange(T, dtype=jnp.int32)

        def write(buf, new):
            return buf.at[:, idx_T].set(new.astype(buf.dtype), mode="drop")

        new = self.replace(
            k=write(self.k, k_BTKH),
            v=write(self.v, v_BTKE),
            positions=write(self.positions, positions_BT.astype(jnp.int32)),
            segment_ids=write(self.segment_ids, segment_ids_BT.astype(jnp.int32)),
            length=self.length + T,
        )
        return new.k, new.v, new.positions, new.segment_ids, new


@struct.dataclass
class RingKVCache:
    """Ring-buffer KV cache for a causal sliding window of ``left = capacity`` keys.

    Same fields as ``KVCache``; ``S`` is the window ``W``. Memory is bounded: ``W``
    slots however many tokens are appended.

    Example:
      >>> import jax.numpy as jnp
      >>> c = RingKVCache.create(batch=1, window=2, num_kv_heads=1, head_dim=2)
      >>> x = jnp.ones((1, 5, 1, 2)); pos = jnp.arange(5)[None]
      >>> *_, c = c.append(x, x, pos, jnp.ones_like(pos))
      >>> c.positions.tolist()    # the newest two tokens, at slots (length + i) % 2
      [[4, 3]]
    """

    k: Array
    v: Array
    positions: Array
    segment_ids: Array
    length: Array

    @classmethod
    def create(cls, *, batch: int, window: int, num_kv_heads: int, head_dim: int,
               value_dim: int | None = None, dtype=jnp.float32) -> "RingKVCache":
        """An empty ring of ``max(window, 1)`` slots."""
        if window < 0:
            raise ValueError(f"RingKVCache: window must be >= 0, got {window!r}")
        value_dim = head_dim if value_dim is None else value_dim
        return cls(**_empty(batch, max(window, 1), num_kv_heads, head_dim, value_dim, dtype))

    @property
    def capacity(self) -> int:
        return self.k.shape[-3]

    @property
    def overflowed(self) -> Array:
        """Always False: a ring evicts by design."""
        return jnp.zeros((), bool)

    def append(self, k_BTKH, v_BTKE, positions_BT, segment_ids_BT):
        """Return ``concat(ring, new)`` to attend over (S = W + T) and the ring with the newest tokens written."""
        _check_new(self, k_BTKH, v_BTKE, positions_BT, segment_ids_BT)
        T, C = k_BTKH.shape[1], self.capacity
        positions_BT = positions_BT.astype(jnp.int32)
        segment_ids_BT = segment_ids_BT.astype(jnp.int32)
        cat = lambda buf, new: jnp.concatenate([buf, new.astype(buf.dtype)], axis=1)
        k_all, v_all = cat(self.k, k_BTKH), cat(self.v, v_BTKE)
        pos_all, seg_all = cat(self.positions, positions_BT), cat(self.segment_ids, segment_ids_BT)
        # Only the newest min(T, C) tokens survive; their slots are distinct mod C.
        keep = min(T, C)
        idx = (self.length + (T - keep) + jnp.arange(keep, dtype=jnp.int32)) % C

        def write(buf, new):
            return buf.at[:, idx].set(new[:, T - keep:].astype(buf.dtype), unique_indices=True)

        new = self.replace(
            k=write(self.k, k_BTKH),
            v=write(self.v, v_BTKE),
            positions=write(self.positions, positions_BT),
            segment_ids=write(self.segment_ids, segment_ids_BT),
            length=self.length + T,
        )
        return k_all, v_all, pos_all, seg_all, new


def cache_nbytes(cache) -> int:
    """Total bytes of every array in a cache pytree (for ``stats`` checks).

    Example:
      >>> cache_nbytes(KVCache.create(batch=1, max_len=2, num_kv_heads=1, head_dim=4))
      84
    """
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache)))


def _full_caches(caches) -> list:
    # Caches that can overflow: the full KVCache, and any cache defining
    # ``overflow_pair() -> int32 [2]`` (appended, capacity), e.g. attn.paged_cache.
    can = lambda x: isinstance(x, KVCache) or hasattr(x, "overflow_pair")
    return [c for c in jax.tree_util.tree_leaves(caches, is_leaf=can) if can(c)]


def overflow_state(caches) -> Array:
    """``int32 [2]``: (tokens appended, capacity) of the most overflowed full cache.

    Jit-safe: return it from the traced function and hand it to ``check_overflow`` on
    the host. ``(0, 0)`` when no full cache overflowed (ring caches never do).

    Example:
      >>> c = KVCache.create(batch=1, max_len=2, num_kv_heads=1, head_dim=1)
      >>> overflow_state({"layer": c.replace(length=jnp.int32(5))}).tolist()
      [5, 2]
    """
    worst = jnp.zeros((2,), jnp.int32)
    for c in _full_caches(caches):
        if hasattr(c, "overflow_pair"):
            cand = c.overflow_pair()
        else:
            length = jnp.max(c.length)  # scanned layers stack one length per repeat
            cand = jnp.stack([length, jnp.int32(c.capacity)]).astype(jnp.int32)
        worse = (cand[0] - cand[1]) > (worst[0] - worst[1])
        worst = jnp.where(worse, cand, worst)
    return worst


def check_overflow(caches_or_state, *, where: str = "KV cache") -> None:
    """Host side: raise ``ValueError`` with the numbers if a full cache overflowed.

    Takes a cache pytree (concrete arrays) or the output of ``overflow_state``. Must not
    be called under ``jit`` (it reads values).

    Example:
      >>> c = KVCache.create(batch=1, max_len=2, num_kv_heads=1, head_dim=1)
      >>> check_overflow(c)  # nothing appended: fine
      >>> check_overflow(c.replace(length=jnp.int32(3)), where="decode")
      Traceback (most recent call last):
      ...
      ValueError: decode: KV cache overflow: 3 tokens appended to a cache of max_len=2; the last 1 were dropped (not attended to); create the cache with max_len >= 3
    """
    state = caches_or_state
    if not (hasattr(state, "shape") and tuple(state.shape) == (2,)):
        state = overflow_state(caches_or_state)
    appended, capacity = (int(x) for x in jax.device_get(state))
    if appended > capacity:
        raise ValueError(f"{where}: KV cache overflow: {appended} tokens appended to a cache of "
                         f"max_len={capacity}; the last {appended - capacity} were dropped (not "
                         f"attended to); create the cache with max_len >= {appended}")
