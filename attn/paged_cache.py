"""A paged KV cache (a jit-friendly pytree): page pool, page tables, allocation, sharing.

Layout (the ``kernels_pallas.decode.common.PagedKV`` view is a free re-labelling)::

    k [P, C, K, H]   v [P, C, K, E]   positions [P, C]   segment_ids [P, C] (0 = empty)
    page_table [B, maxP]   num_pages [B]   lengths [B] (tokens stored per row)
    refcount [P]   (0 = free; > 1 = shared by prefix sharing)   dropped [B]

* **Allocation** happens inside ``append`` (under ``jit``): row b needs
  ``ceil((lengths[b] + T) / C) − num_pages[b]`` new pages; free pages (refcount 0) are
  handed out lowest id first, rows in order, all or nothing per row. A fresh page has its
  segment ids cleared, so nothing a previous owner left there is ever visible.
* **Release** (``release(rows)``) drops a row's references; pages whose count reaches 0
  are free again.
* **Prefix sharing** (``share_prefix(src, dst, n)``): ``dst`` gets ``src``'s first
  ``n // C`` *full* pages by reference (refcount + 1) and a private copy of the partial
  page (``n % C`` slots). Writes only ever go past a row's length, so a shared page is
  never written: no copy-on-write is needed.
* **Overflow is an error, never a silent drop.** Under ``jit`` nothing can raise, so a
  token that finds no page (pool exhausted, or past ``maxP · C`` for its row) is not
  written and is counted in ``dropped``; ``attn.cache.overflow_state`` /
  ``check_overflow`` (the dense cache's host-boundary check) see this cache too
  (``overflow_pair``) and raise on the host between steps. The serving loop checks after
  every step; pools sized with ``pages_for(...)`` cannot overflow.

Example:
  >>> import jax.numpy as jnp
  >>> c = PagedKVCache.create(batch=2, num_pages=6, page_size=4, max_pages=3,
  ...                         num_kv_heads=1, head_dim=2)
  >>> x = jnp.ones((2, 5, 1, 2)); pos = jnp.tile(jnp.arange(5), (2, 1))
  >>> *_, c = c.append(x, x, pos, jnp.ones_like(pos))
  >>> c.lengths.tolist(), c.num_pages.tolist(), int((c.refcount > 0).sum())
  ([5, 5], [2, 2], 4)
  >>> c = c.release(jnp.array([True, False]))
  >>> c.num_pages.tolist(), int((c.refcount > 0).sum())
  ([0, 2], 2)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from attn.cache import SLOT_META_BYTES
from attn.errors import UserError

Array = Any


def pages_for(batch: int, max_len: int, page_size: int) -> int:
    """Pool pages that let every row hold ``max_len`` tokens (so no overflow can happen).

    Example:
      >>> pages_for(4, 100, 16)
      28
    """
    return batch * -(-max_len // page_size)


@struct.dataclass
class PagedKVCache:
    """Paged KV cache; see the module docstring. All fields are arrays (a pytree).

    Example:
      >>> c = PagedKVCache.create(batch=1, num_pages=4, page_size=8, max_pages=4,
      ...                         num_kv_heads=2, head_dim=4)
      >>> c.k.shape, c.page_size, c.capacity
      ((4, 8, 2, 4), 8, 32)
    """

    k: Array
    v: Array
    positions: Array
    segment_ids: Array
    page_table: Array
    num_pages: Array
    lengths: Array
    refcount: Array
    dropped: Array

    @classmethod
    def create(cls, *, batch: int, num_pages: int, page_size: int, max_pages: int,
               num_kv_heads: int, head_dim: int, value_dim: int | None = None,
               dtype=jnp.float32) -> "PagedKVCache":
        """An empty cache: every page free, every row empty."""
        for name, val in (("batch", batch), ("num_pages", num_pages), ("page_size", page_size),
                          ("max_pages", max_pages), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim)):
            if not isinstance(val, int) or val <= 0:
                raise UserError(f"PagedKVCache.create: {name} must be a positive int, got {val!r}")
        E = head_dim if value_dim is None else value_dim
        P, C = num_pages, page_size
        return cls(k=jnp.zeros((P, C, num_kv_heads, head_dim), dtype),
                   v=jnp.zeros((P, C, num_kv_heads, E), dtype),
                   positions=jnp.zeros((P, C), jnp.int32), segment_ids=jnp.zeros((P, C), jnp.int32),
                   page_table=jnp.zeros((batch, max_pages), jnp.int32),
                   num_pages=jnp.zeros((batch,), jnp.int32), lengths=jnp.zeros((batch,), jnp.int32),
                   refcount=jnp.zeros((P,), jnp.int32), dropped=jnp.zeros((batch,), jnp.int32))

    @classmethod
    def for_max_len(cls, *, batch: int, max_len: int, page_size: int, **kw) -> "PagedKVCache":
        """A pool big enough for ``batch`` rows of ``max_len`` tokens (never overflows)."""
        if max_len % page_size:
            raise UserError(f"PagedKVCache: page_size={page_size} must divide max_len={max_len}")
        return cls.create(batch=batch, num_pages=pages_for(batch, max_len, page_size),
                          page_size=page_size, max_pages=max_len // page_size, **kw)

    # ------------------------------------------------------------------ sizes
    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        """Tokens one row can address (``maxP · C``)."""
        return self.page_table.shape[1] * self.page_size

    @property
    def length(self) -> Array:
        """Longest row (the ``.length`` every cache exposes)."""
        return jnp.max(self.lengths)

    def overflow_pair(self) -> Array:
        """``int32 [2]`` (tokens appended, tokens stored): differ iff tokens were dropped."""
        stored = jnp.sum(self.lengths)
        return jnp.stack([stored + jnp.sum(self.dropped), stored]).astype(jnp.int32)

    def view(self):
        """The ``PagedKV`` the decode kernels read (no copy)."""
        from kernels_pallas.decode.common import PagedKV
        return PagedKV(k=self.k, v=self.v, positions=self.positions,
                       segment_ids=self.segment_ids, page_table=self.page_table,
                       num_pages=self.num_pages)

    # ------------------------------------------------------------------ pages
    def _allocate(self, need_B):
        """Give row b ``need_B[b]`` new pages (all or nothing per row); returns the cache."""
        B, maxP = self.page_table.shape
        P = self.refcount.shape[0]
        free = self.refcount == 0
        order = jnp.argsort(~free, stable=True)  # free page ids first, lowest first
        nfree = jnp.sum(free)
        start = jnp.cumsum(need_B) - need_B
        ok = start + need_B <= nfree
        need_B = jnp.where(ok, need_B, 0)
        start = jnp.cumsum(need_B) - need_B
        j = jnp.arange(maxP)[None]
        is_new = (j >= self.num_pages[:, None]) & (j < (self.num_pages + need_B)[:, None])
        ids = order[jnp.clip(start[:, None] + j - self.num_pages[:, None], 0, P - 1)]
        table = jnp.where(is_new, ids, self.page_table)
        new_ids = jnp.where(is_new, ids, P).reshape(-1)  # P: out of range, dropped
        return self.replace(
            page_table=table.astype(jnp.int32), num_pages=self.num_pages + need_B,
            refcount=self.refcount.at[new_ids].add(1, mode="drop"),
            segment_ids=self.segment_ids.at[new_ids].set(0, mode="drop"))

    def append(self, k_BTKH, v_BTKE, positions_BT, segment_ids_BT):
        """Append each row's real tokens (segment id != 0); returns ``(k, v, kv_pos, kv_seg, new_cache)``.

        The four arrays are the rows' pages gathered densely (``[B, maxP·C, ...]``, slots
        past ``num_pages`` empty), the protocol of ``attn.cache.KVCache.append`` so the
        layers can use this cache unchanged; the decode kernels read ``view()`` instead
        and copy nothing.
        """
        B, T = k_BTKH.shape[:2]
        C, (_, maxP) = self.page_size, self.page_table.shape
        if tuple(k_BTKH.shape[2:]) != tuple(self.k.shape[2:]) or B != self.page_table.shape[0]:
            raise UserError(f"PagedKVCache.append: k has shape {tuple(k_BTKH.shape)}, cache "
                            f"expects [{self.page_table.shape[0]}, T, {self.k.shape[2]}, {self.k.shape[3]}]")
        # Tokens with segment id 0 (padding, idle rows of a serving batch) are not stored:
        # each row's real tokens are packed after its length, so rows may append different
        # numbers of tokens in one call (continuous batching, chunked prefill).
        real = segment_ids_BT != 0
        n_real = jnp.sum(real, axis=1).astype(jnp.int32)
        want = jnp.minimum(-(-(self.lengths + n_real) // C), maxP)
        c = self._allocate(jnp.maximum(want - self.num_pages, 0))
        slot = c.lengths[:, None] + jnp.cumsum(real, axis=1) - 1  # [B, T]
        lp = slot // C
        ok = real & (lp < c.num_pages[:, None])
        P = c.k.shape[0]
        phys = jnp.where(ok, jnp.take_along_axis(c.page_table, jnp.clip(lp, 0, maxP - 1), 1), P)
        off = slot % C

        def write(buf, new):
            return buf.at[phys, off].set(new.astype(buf.dtype), mode="drop")

        stored = jnp.sum(ok, axis=1).astype(jnp.int32)
        c = c.replace(k=write(c.k, k_BTKH), v=write(c.v, v_BTKE),
                      positions=write(c.positions, positions_BT.astype(jnp.int32)),
                      segment_ids=write(c.segment_ids, segment_ids_BT.astype(jnp.int32)),
                      lengths=c.lengths + stored, dropped=c.dropped + (n_real - stored))
        return (*c.gather_dense(), c)

    def gather_dense(self):
        """``(k [B,S,K,H], v [B,S,K,E], pos [B,S], seg [B,S])`` with S = maxP·C (a copy)."""
        B, maxP = self.page_table.shape
        live = (jnp.arange(maxP)[None] < self.num_pages[:, None])[..., None]
        g = lambda x: x[self.page_table].reshape((B, maxP * self.page_size) + x.shape[2:])
        seg = jnp.where(live, self.segment_ids[self.page_table], 0).reshape(B, -1)
        return g(self.k), g(self.v), g(self.positions), seg

    def release(self, rows_B):
        """Free the pages of rows where ``rows_B`` is True (shared pages keep their other owners)."""
        rows_B = jnp.asarray(rows_B, bool)
        maxP = self.page_table.shape[1]
        owned = rows_B[:, None] & (jnp.arange(maxP)[None] < self.num_pages[:, None])
        P = self.refcount.shape[0]
        ids = jnp.where(owned, self.page_table, P).reshape(-1)
        z = lambda x: jnp.where(rows_B, 0, x)
        return self.replace(refcount=self.refcount.at[ids].add(-1, mode="drop"),
                            num_pages=z(self.num_pages), lengths=z(self.lengths),
                            dropped=z(self.dropped))

    def share_prefix(self, src: int, dst: int, num_tokens: int):
        """Row ``dst`` (empty) starts with the first ``num_tokens`` tokens of row ``src``.

        Full pages are shared by reference; the partial page is copied into a fresh page.
        ``src``, ``dst`` and ``num_tokens`` are host ints (the scheduler decides them).
        """
        C = self.page_size
        full, tail = divmod(int(num_tokens), C)
        if src == dst:
            raise UserError(f"share_prefix: src and dst are both row {src}")
        c = self.replace(num_pages=self.num_pages.at[dst].set(0))
        shared = c.page_table[src, :full]
        c = c.replace(page_table=c.page_table.at[dst, :full].set(shared),
                      num_pages=c.num_pages.at[dst].set(full),
                      refcount=c.refcount.at[shared].add(1))
        if tail:
            need = jnp.zeros_like(c.num_pages).at[dst].set(1)
            c = c._allocate(need)
            s_page, d_page = c.page_table[src, full], c.page_table[dst, full]
            keep = jnp.arange(C) < tail
            cp = lambda buf, empty: buf.at[d_page].set(
                jnp.where(keep.reshape((C,) + (1,) * (buf.ndim - 2)), buf[s_page], empty))
            c = c.replace(k=cp(c.k, 0), v=cp(c.v, 0), positions=cp(c.positions, 0),
                          segment_ids=cp(c.segment_ids, 0))
        got = jnp.where(c.num_pages[dst] == full + (1 if tail else 0), num_tokens, full * C)
        return c.replace(lengths=c.lengths.at[dst].set(got),
                         dropped=c.dropped.at[dst].set(num_tokens - got))


def kv_bytes_per_token(num_kv_heads: int, head_dim: int, value_dim: int | None = None,
                       dtype=jnp.bfloat16) -> int:
    """Bytes one cached token takes in the pool (K + V + int32 position and segment).

    Example:
      >>> kv_bytes_per_token(3, 64)  # SmolLM2-135M, bf16
      776
    """
    E = head_dim if value_dim is None else value_dim
    return num_kv_heads * (head_dim + E) * jnp.dtype(dtype).itemsize + SLOT_META_BYTES
