"""A quantized KV cache with KIVI's full-precision recent window (a jit-friendly pytree).

Each row keeps its newest tokens in a full-precision **tail page** ``[C, K, H]``; when the
tail fills, it is quantized as one page (``attn.kv_quant``: int8 / int4 with per-channel
key scales over the page's C tokens and per-token value scales, or fp8) into the row's
next pool page. So the ``n % C`` most recent tokens are always exact, and per-channel key
statistics are taken over whole pages, as KIVI groups them.

Attention over the cache (``decode``) merges two exact partial softmaxes:

* the quantized pool pages (``kernels_pallas.decode``: the Pallas kernels read codes +
  scales directly; the XLA reference, ``backend="xla"``, dequantizes in XLA), and
* the tail (at most C slots, plain XLA),

with ``lse = logaddexp(lse_pool, lse_tail)`` (sinks added once, in the merge).

Row b owns pool pages ``b·maxP .. (b+1)·maxP − 1`` (no sharing); a token past
``maxP·C + C`` is counted in ``dropped`` and ``attn.cache.check_overflow`` raises on it
(``overflow_pair``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> c = QuantKVCache.create("int8", batch=1, max_pages=2, page_size=4, num_kv_heads=1,
  ...                         head_dim=8)
  >>> x = jax.random.normal(jax.random.key(0), (1, 6, 1, 8)); pos = jnp.arange(6)[None]
  >>> c = c.write(x, x, pos, jnp.ones_like(pos))
  >>> c.pool.num_pages.tolist(), c.tail_len.tolist()   # 4 tokens quantized, 2 exact
  ([1], [2])
  >>> o, lse = c.decode(jax.random.normal(jax.random.key(1), (1, 1, 2, 8)), jnp.array([[5]]))
  >>> o.shape
  (1, 1, 2, 8)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from attn.errors import UserError
from attn.kv_quant import FORMATS, QuantPagedKV, get_format

Array = Any


@struct.dataclass
class QuantKVCache:
    """Quantized pool + full-precision tail; see the module docstring.

    Attributes:
      pool: ``QuantPagedKV`` of ``B·maxP`` pages (page table ``[B, maxP]`` fixed per row).
      tail_k, tail_v: ``[B, C, K, H|E]`` the newest ``tail_len`` tokens, full precision.
      tail_pos, tail_seg: ``[B, C]`` int32 (segment 0 = empty).
      tail_len: ``[B]`` int32.  dropped: ``[B]`` int32 tokens that found no room.
    """

    pool: QuantPagedKV
    tail_k: Array
    tail_v: Array
    tail_pos: Array
    tail_seg: Array
    tail_len: Array
    dropped: Array

    @classmethod
    def create(cls, fmt: str, *, batch: int, max_pages: int, page_size: int, num_kv_heads: int,
               head_dim: int, value_dim: int | None = None, dtype=jnp.float32) -> "QuantKVCache":
        """An empty cache quantizing full pages with format ``fmt``."""
        f = get_format(fmt)
        E = head_dim if value_dim is None else value_dim
        B, C, K, P = batch, page_size, num_kv_heads, batch * max_pages
        if f.bits == 4 and (head_dim % 2 or E % 2):
            raise UserError(f"int4 packs two values per byte: head dims must be even, got "
                            f"H={head_dim}, E={E}")
        # Empty pages as zeros of the shapes/dtypes quantize() returns: quantizing a zeros
        # array instead would be constant-folded (seconds of compile) when built under jit.
        # Empty slots have segment 0 and are never visible, so their codes/scales are moot.
        zeros = lambda D, axis: jax.tree.map(
            lambda a: jnp.zeros(a.shape, a.dtype),
            jax.eval_shape(lambda x: f.quantize(x, axis),
                           jax.ShapeDtypeStruct((P, C, K, D), jnp.float32)))
        kq, ks, kz = zeros(head_dim, f.key_axis)
        vq, vs, vz = zeros(E, -1)
        chan = lambda a: None if a is None else a[:, 0]
        tok = lambda a: None if a is None else jnp.swapaxes(a[..., 0], 1, 2)
        ks, kz = (chan(ks), chan(kz)) if f.key_axis == 1 else (tok(ks), tok(kz))
        pool = QuantPagedKV(
            k_q=kq, k_scale=ks, k_zero=kz, v_q=vq, v_scale=tok(vs), v_zero=tok(vz),
            positions=jnp.zeros((P, C), jnp.int32), segment_ids=jnp.zeros((P, C), jnp.int32),
            page_table=jnp.arange(P, dtype=jnp.int32).reshape(B, max_pages),
            num_pages=jnp.zeros((B,), jnp.int32), fmt=fmt, dims=(head_dim, E), dtype=dtype)
        return cls(pool=pool, tail_k=jnp.zeros((B, C, K, head_dim), dtype),
                   tail_v=jnp.zeros((B, C, K, E), dtype), tail_pos=jnp.zeros((B, C), jnp.int32),
                   tail_seg=jnp.zeros((B, C), jnp.int32), tail_len=jnp.zeros((B,), jnp.int32),
                   dropped=jnp.zeros((B,), jnp.int32))

    @property
    def page_size(self) -> int:
        return self.tail_k.shape[1]

    @property
    def lengths(self) -> Array:
        return self.pool.num_pages * self.page_size + self.tail_len

    @property
    def length(self) -> Array:
        return jnp.max(self.lengths)

    def overflow_pair(self) -> Array:
        """``int32 [2]`` (tokens appended, tokens stored), for ``attn.cache.check_overflow``."""
        stored = jnp.sum(self.lengths)
        return jnp.stack([stored + jnp.sum(self.dropped), stored]).astype(jnp.int32)

    # ------------------------------------------------------------------ writes
    def _flush(self, full_B):
        """Quantize the tail of rows ``full_B`` into their next pool page; empty those tails."""
        f = FORMATS[self.pool.fmt]
        p = self.pool
        B, maxP = p.page_table.shape
        P = p.positions.shape[0]
        room = p.num_pages < maxP
        go = full_B & room
        page = jnp.where(go, p.page_table[jnp.arange(B), jnp.minimum(p.num_pages, maxP - 1)], P)
        kq, ks, kz = f.quantize(self.tail_k, 1 if f.key_axis == 1 else -1)
        vq, vs, vz = f.quantize(self.tail_v, -1)
        chan = lambda a: None if a is None else a[:, 0]
        tok = lambda a: None if a is None else jnp.swapaxes(a[..., 0], 1, 2)
        ks, kz = (chan(ks), chan(kz)) if f.key_axis == 1 else (tok(ks), tok(kz))
        put = lambda buf, new: None if buf is None else buf.at[page].set(
            new.astype(buf.dtype), mode="drop")
        pool = p.replace(k_q=put(p.k_q, kq), k_scale=put(p.k_scale, ks), k_zero=put(p.k_zero, kz),
                         v_q=put(p.v_q, vq), v_scale=put(p.v_scale, tok(vs)),
                         v_zero=put(p.v_zero, tok(vz)), positions=put(p.positions, self.tail_pos),
                         segment_ids=put(p.segment_ids, self.tail_seg),
                         num_pages=p.num_pages + go)
        # A full tail with no pool page left stays in place: its next token is dropped.
        clear = go[:, None]
        return self.replace(pool=pool, tail_seg=jnp.where(clear, 0, self.tail_seg),
                            tail_len=jnp.where(go, 0, self.tail_len))

    def append(self, k_BTKH, v_BTKE, positions_BT, segment_ids_BT):
        """The layers' cache protocol: ``(k, v, kv_pos, kv_seg, new_cache)``, dense.

        Returns the dequantized pool pages followed by the exact tail
        (``[B, maxP·C + C, ...]``): a full-precision copy per call, which lets the existing
        layers (``attn.mha``) run on this cache unchanged (generate / perplexity with a
        quantized cache). ``decode`` is the path that reads the codes without a copy.
        """
        c = self.write(k_BTKH, v_BTKE, positions_BT, segment_ids_BT)
        return (*c.dense(), c)

    def dense(self):
        """``(k, v, pos, seg)`` ``[B, maxP·C + C, ...]``: dequantized pages, then the tail."""
        p = self.pool
        B, maxP = p.page_table.shape
        flat = lambda x: x.reshape((B, -1) + x.shape[3:])
        live = (jnp.arange(maxP)[None] < p.num_pages[:, None])[..., None]
        seg = jnp.where(live, p.segment_ids[p.page_table], 0).reshape(B, -1)
        cat = lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=1)
        return (cat(flat(p.dequant_k(p.page_table)), self.tail_k),
                cat(flat(p.dequant_v(p.page_table)), self.tail_v),
                cat(p.positions[p.page_table].reshape(B, -1), self.tail_pos),
                cat(seg, self.tail_seg))

    def write(self, k_BTKH, v_BTKE, positions_BT, segment_ids_BT) -> "QuantKVCache":
        """Append each row's real tokens (segment id != 0) one by one (a ``lax.scan``)."""
        C = self.page_size

        def one(c, xs):
            k, v, pos, seg = xs  # [B, K, H], [B, K, E], [B], [B]
            real = seg != 0
            c = c._flush(real & (c.tail_len == C))
            ok = real & (c.tail_len < C)
            B = k.shape[0]
            slot = jnp.where(ok, c.tail_len, C)  # C: out of range, dropped
            rows = jnp.arange(B)
            w = lambda buf, new: buf.at[rows, slot].set(new.astype(buf.dtype), mode="drop")
            c = c.replace(tail_k=w(c.tail_k, k), tail_v=w(c.tail_v, v),
                          tail_pos=w(c.tail_pos, pos), tail_seg=w(c.tail_seg, seg),
                          tail_len=c.tail_len + ok, dropped=c.dropped + (real & ~ok))
            return c, None

        xs = (jnp.swapaxes(k_BTKH, 0, 1), jnp.swapaxes(v_BTKE, 0, 1),
              positions_BT.T.astype(jnp.int32), segment_ids_BT.T.astype(jnp.int32))
        c, _ = jax.lax.scan(one, self, xs)
        return c

    # ------------------------------------------------------------------ reads
    def decode(self, q_BTNH, q_positions_BT, q_segment_ids_BT=None, *, causal: bool = True,
               window=None, scale=None, softcap=None, sinks=None, num_splits=None,
               backend: str = "xla", interpret: bool = False):
        """``(o [B,T,N,E], lse [B,N,T])`` over quantized pages + the exact tail."""
        from attn.core import xla_attention
        from attn.masks import Mask
        from kernels_pallas.decode.api import decode_attention

        B, T = q_positions_BT.shape
        qs = jnp.ones((B, T), jnp.int32) if q_segment_ids_BT is None else q_segment_ids_BT
        o1, lse1 = decode_attention(q_BTNH, self.pool, q_positions=q_positions_BT,
                                    q_segment_ids=qs, causal=causal, window=window, scale=scale,
                                    softcap=softcap, num_splits=num_splits, backend=backend,
                                    interpret=interpret)
        mask = Mask(causal=causal, window=window, q_positions=q_positions_BT.astype(jnp.int32),
                    kv_positions=self.tail_pos, q_segment_ids=qs.astype(jnp.int32),
                    kv_segment_ids=self.tail_seg)
        o2, lse2 = xla_attention(q_BTNH, self.tail_k.astype(q_BTNH.dtype),
                                 self.tail_v.astype(q_BTNH.dtype), mask=mask, scale=scale,
                                 softcap=softcap, return_lse=True)
        parts = [lse1.astype(jnp.float32), lse2.astype(jnp.float32)]
        if sinks is not None:
            parts.append(jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None], parts[0].shape))
        stack = jnp.stack(parts)
        m = jnp.max(stack, axis=0)
        m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
        tot = jnp.sum(jnp.exp(stack - m_safe), axis=0)
        seen = tot > 0
        lse = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, tot, 1.0)), -jnp.inf)
        lse_safe = jnp.where(seen, lse, 0.0)
        w = lambda l: jnp.where(seen, jnp.exp(l - lse_safe), 0.0).transpose(0, 2, 1)[..., None]
        o = w(parts[0]) * o1.astype(jnp.float32) + w(parts[1]) * o2.astype(jnp.float32)
        return o.astype(q_BTNH.dtype), lse
