"""Quantized KV pages: int8, int4 (KIVI) and fp8 (e4m3), each with its scales.

Formats (``FORMATS``, a name -> ``QuantFormat`` table; no dispatch on names):

* ``int8``  symmetric; keys **per channel** (one scale per page, kv head and channel: the
  outlier channels of keys stay in their own range, KIVI's observation), values **per
  token** (one scale per slot and kv head).
* ``int4``  asymmetric (scale and zero point, KIVI), same grouping, two values per byte.
* ``fp8``   ``float8_e4m3fn`` with a per-token, per-head float32 scale (absmax / 448) for
  both keys and values.

``quantize_pages(kv, name)`` turns a ``kernels_pallas.decode.common.PagedKV`` into a
``QuantPagedKV``, which every decode backend takes in place of a ``PagedKV``. The Pallas
kernels (``kernels_pallas.decode.tpu`` / ``.triton``) read the codes and scales of the
live pages and never dequantize a tile: scales fold into the query (per-channel keys),
the logit columns (per-token keys) or the probabilities (values). The XLA reference
gathers the codes and dequantizes in XLA; on CPU that materialises an f32 copy of the
gathered pages (``benchmarks/results/decode-cpu-2026-12-02.md``), so it is the kernels'
reference, not the memory-saving path.

``attn.quant_cache.QuantKVCache`` adds KIVI's full-precision recent window. Pages are
quantized as a whole, empty slots included (they only widen a page's range).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from kernels_pallas.decode.common import from_dense
  >>> k = jax.random.normal(jax.random.key(0), (1, 16, 2, 8))
  >>> kv = from_dense(k, k, jnp.arange(16)[None], jnp.ones((1, 16), jnp.int32), page_size=8)
  >>> qkv = quantize_pages(kv, "int8")
  >>> qkv.k_q.dtype, qkv.k_scale.shape, qkv.v_scale.shape
  (dtype('int8'), (2, 2, 8), (2, 2, 8))
  >>> float(jnp.max(jnp.abs(qkv.dequant_k(jnp.arange(2)) - kv.k))) < 0.02
  True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
from flax import struct

from attn.errors import UserError

Array = Any
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _absmax_scale(x, axis, qmax):
    s = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis, keepdims=True) / qmax
    return jnp.where(s > 0, s, 1.0)


def _int8_q(x, axis):
    s = _absmax_scale(x, axis, 127.0)
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / s), -127, 127).astype(jnp.int8)
    return q, s, None


def _int8_dq(q, s, z):
    return q.astype(jnp.float32) * s


def _int4_q(x, axis):
    x = x.astype(jnp.float32)
    lo = jnp.min(x, axis=axis, keepdims=True)
    hi = jnp.max(x, axis=axis, keepdims=True)
    s = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
    q = jnp.clip(jnp.round((x - lo) / s), 0, 15).astype(jnp.uint8)
    # Two 4-bit codes per byte: channel j in the low nibble, channel j + D/2 in the high
    # one, so a kernel unpacks into two contiguous halves (two matmuls, no interleave).
    h = q.shape[-1] // 2
    return q[..., :h] | (q[..., h:] << 4), s, lo


def unpack_int4(codes):
    """``[..., D/2]`` uint8 -> ``[..., D]`` codes 0..15 (low nibbles, then high ones)."""
    return jnp.concatenate([codes & 0xF, codes >> 4], axis=-1)


def _int4_dq(q, s, z):
    return unpack_int4(q).astype(jnp.float32) * s + z


def _fp8_q(x, axis):
    # fp8 keeps a per-token scale for keys too: its exponent already adapts per element,
    # the scale only maps each token's range onto e4m3's.
    s = _absmax_scale(x, -1, FP8_MAX)
    return (x.astype(jnp.float32) / s).astype(jnp.float8_e4m3fn), s, None


def _fp8_dq(q, s, z):
    return q.astype(jnp.float32) * s


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """One KV quantization format: quantize along an axis, dequantize, storage cost."""

    name: str
    quantize: Callable  # (x, axis) -> (codes, scale, zero | None)
    dequantize: Callable  # (codes, scale, zero) -> float32
    bits: int
    key_axis: int  # reduced for key scales: 1 = over the page's tokens (per channel)

    def bytes_per_token(self, num_kv_heads: int, head_dim: int, value_dim: int,
                        page_size: int) -> float:
        """Codes plus amortised float32 scales (and zero points) per token, K and V.

        Example:
          >>> FORMATS["int8"].bytes_per_token(3, 64, 64, 16)  # per-channel key scales / C
          444.0
        """
        nz = 2 if self.name == "int4" else 1  # scale (+ zero point)
        codes = num_kv_heads * (head_dim + value_dim) * self.bits / 8
        per_channel = num_kv_heads * head_dim * nz * 4 / page_size
        k_scales = per_channel if self.key_axis == 1 else num_kv_heads * nz * 4
        return codes + k_scales + num_kv_heads * nz * 4


FORMATS: dict[str, QuantFormat] = {
    "int8": QuantFormat("int8", _int8_q, _int8_dq, 8, key_axis=1),
    "int4": QuantFormat("int4", _int4_q, _int4_dq, 4, key_axis=1),
    "fp8": QuantFormat("fp8", _fp8_q, _fp8_dq, 8, key_axis=-1),
}


def get_format(name: str) -> QuantFormat:
    """The format called ``name``; ``UserError`` naming the known ones otherwise."""
    if name not in FORMATS:
        raise UserError(f"unknown KV quantization {name!r}; known: {sorted(FORMATS)} (or 'none')")
    return FORMATS[name]


@struct.dataclass
class QuantPagedKV:
    """A ``PagedKV`` whose K/V pages are stored quantized (codes + scales [+ zeros]).

    Shapes (the layout the kernels read: scales of one page and kv head are one row):
    ``k_q [P, C, K, H·bits/8]``; ``k_scale``/``k_zero`` ``[P, K, H]`` (per channel:
    int8, int4) or ``[P, K, C]`` (per token: fp8); ``v_q [P, C, K, E·bits/8]``;
    ``v_scale``/``v_zero`` ``[P, K, C]``; ``*_zero`` None for symmetric formats;
    positions, segments, page table and counts as in ``PagedKV``.
    """

    k_q: Array
    k_scale: Array
    k_zero: Array | None
    v_q: Array
    v_scale: Array
    v_zero: Array | None
    positions: Array
    segment_ids: Array
    page_table: Array
    num_pages: Array
    fmt: str = struct.field(pytree_node=False, default="int8")
    dims: tuple = struct.field(pytree_node=False, default=(0, 0))  # (H, E)
    dtype: Any = struct.field(pytree_node=False, default=jnp.float32)  # dequantized dtype
    value_dim = None
    v = ()  # not None: values are stored (no MLA mode for quantized pages)

    page_size = property(lambda self: self.k_q.shape[1])
    num_kv_heads = property(lambda self: self.k_q.shape[2])
    head_dim = property(lambda self: self.dims[0])
    v_dim = property(lambda self: self.dims[1])
    batch = property(lambda self: self.page_table.shape[0])
    max_pages = property(lambda self: self.page_table.shape[1])
    num_physical_pages = property(lambda self: self.k_q.shape[0])

    @property
    def key_per_channel(self) -> bool:
        return FORMATS[self.fmt].key_axis == 1

    def _dq(self, codes, scale, zero, idx, per_channel):
        def bcast(a):  # kernel layout -> broadcastable against [..., C, K, D]
            if a is None:
                return None
            a = a[idx]
            return a[..., None, :, :] if per_channel else jnp.swapaxes(a, -1, -2)[..., None]
        f = FORMATS[self.fmt]
        return f.dequantize(codes[idx], bcast(scale), bcast(zero)).astype(self.dtype)

    def dequant_k(self, idx):
        """Dequantized keys of pages ``idx`` (any int array): ``idx.shape + [C, K, H]``."""
        return self._dq(self.k_q, self.k_scale, self.k_zero, idx, self.key_per_channel)

    def dequant_v(self, idx):
        """Dequantized values of pages ``idx``: ``idx.shape + [C, K, E]``."""
        return self._dq(self.v_q, self.v_scale, self.v_zero, idx, False)

    def nbytes_per_page(self) -> int:
        """Bytes of one page: codes, scales and zeros of K and V (positions/segments not counted)."""
        arrs = [self.k_q, self.k_scale, self.k_zero, self.v_q, self.v_scale, self.v_zero]
        return int(sum(a[0].size * a.dtype.itemsize for a in arrs if a is not None))


def quantize_pages(kv, name: str) -> QuantPagedKV:
    """Quantize every page of a ``PagedKV`` (not MLA mode) with format ``name``."""
    f = get_format(name)
    if kv.v is None:
        raise UserError("quantize_pages: MLA-mode pages (v=None) are not supported")
    H, E = kv.k.shape[-1], kv.v.shape[-1]
    if f.bits == 4 and (H % 2 or E % 2):
        raise UserError(f"int4 packs two values per byte: head dims must be even, got H={H}, E={E}")
    kq, ks, kz = f.quantize(kv.k, f.key_axis)
    vq, vs, vz = f.quantize(kv.v, -1)
    chan = lambda a: None if a is None else a[:, 0]  # [P, 1, K, H] -> [P, K, H]
    tok = lambda a: None if a is None else jnp.swapaxes(a[..., 0], 1, 2)  # [P, C, K, 1] -> [P, K, C]
    ks, kz = (chan(ks), chan(kz)) if f.key_axis == 1 else (tok(ks), tok(kz))
    vs, vz = tok(vs), tok(vz)
    return QuantPagedKV(k_q=kq, k_scale=ks, k_zero=kz, v_q=vq, v_scale=vs, v_zero=vz,
                        positions=kv.positions, segment_ids=kv.segment_ids,
                        page_table=kv.page_table, num_pages=kv.num_pages, fmt=name, dims=(H, E),
                        dtype=kv.k.dtype)
