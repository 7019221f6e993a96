"""Block-level mask information shared by every flash-attention backend.

A ``Mask`` (causal, window, segments, positions, block sparsity) is turned into a
classification of each (query block, key block) pair of a tiling:

* ``SKIP``    — provably no visible (query, key) pair: the kernel never visits it
  (no DMA / load, no math);
* ``PARTIAL`` — may be partly visible: the kernel masks element by element from the
  positions / segments of that block;
* ``FULL``    — provably every real pair visible: the kernel runs with no mask code.

The classification runs on device under ``jit`` from per-block min/max of positions
and segment ids (packed documents differ per batch row), so it is conservative: a
block is skipped only when empty for sure and called full only when visible for sure.
Visited blocks are compacted into *visit tables* that the kernels read as scalars
(TPU: scalar prefetch into SMEM, so index_maps fetch only visited blocks; Triton: a
small int32 row per program):

    table[b, n, i, 0]     = number of visited blocks of row i
    table[b, n, i, 1 + j] = 2 * block_index + (1 if PARTIAL else 0),  j < count

Entries past ``count`` repeat the last visited block so a TPU pipeline issues no new
DMA for them. ``n`` ranges over ``Nm`` = N when a per-head ``block_mask`` is given,
else 1. The forward / dQ kernels use the table over key blocks per query block; the
dK/dV kernel uses the transposed table (per key block, the query blocks that see it).

Example:
  >>> from attn.masks import Mask
  >>> from kernels_pallas.flash import masking
  >>> m = Mask(causal=True)
  >>> til = masking.make_tiling(m, batch=1, q_len=64, kv_len=64, num_heads=2,
  ...                           block_q=16, block_kv=16)
  >>> kind = masking.classify(m, til)
  >>> kind[0, 0].tolist()
  [[1, 0, 0, 0], [2, 1, 0, 0], [2, 2, 1, 0], [2, 2, 2, 1]]
  >>> masking.visit_table(kind, til.max_kv_visits)[0, 0, 1].tolist()
  [2, 0, 3, 2, 2]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from attn.masks import Mask

Array = Any

SKIP, PARTIAL, FULL = 0, 1, 2
_BIG = np.int32(2**31 - 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static block geometry of one kernel launch (hashable: usable as a jit static).

    ``max_kv_visits`` bounds the visited key blocks of any query block (the TPU grid
    extent of the visit axis); ``max_q_visits`` bounds the query blocks visiting any
    key block (dK/dV kernel).
    """

    batch: int
    q_len: int
    kv_len: int
    num_heads: int
    mask_heads: int
    block_q: int
    block_kv: int
    max_kv_visits: int
    max_q_visits: int

    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.q_len, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.kv_len, self.block_kv)

    @property
    def q_padded(self) -> int:
        return self.num_q_blocks * self.block_q

    @property
    def kv_padded(self) -> int:
        return self.num_kv_blocks * self.block_kv


class Tokens(NamedTuple):
    """Per-token int32 arrays padded to the tiling: positions always, segments or None."""

    q_pos: Array  # [B, Tp]
    kv_pos: Array  # [B, Sp]
    q_seg: Array | None  # [B, Tp]; padding rows 0
    kv_seg: Array | None  # [B, Sp]; padding keys 0


# --------------------------------------------------------------------------- static
def mask_heads(mask: Mask, num_heads: int) -> int:
    """``N`` when the mask differs per head (a per-head ``block_mask``), else 1.

    Example:
      >>> from attn.masks import Mask
      >>> mask_heads(Mask(causal=True), 8)
      1
    """
    bm = mask.block_mask
    if bm is not None and bm.shape[0] == num_heads and num_heads > 1:
        return num_heads
    return 1


def block_mask_fits(mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int) -> str | None:
    """None if every kernel block lies inside one ``block_mask`` block, else why not.

    Example:
      >>> import jax.numpy as jnp
      >>> from attn.masks import Mask
      >>> m = Mask(block_mask=jnp.ones((1, 2, 2), bool), block_size=(64, 64))
      >>> block_mask_fits(m, 128, 128, 32, 64) is None, block_mask_fits(m, 128, 128, 128, 64)[:15]
      (True, 'Mask.block_size')
    """
    if mask.block_mask is None:
        return None
    mq, mk = mask.block_size
    for name, m, c, length in (("query", mq, block_q, q_len), ("key", mk, block_kv, kv_len)):
        single = c >= length and m >= length  # one kernel block, one mask block
        if not (m % c == 0 or single):
            return (f"Mask.block_size {mask.block_size}: the {name} block {m} is not a multiple "
                    f"of the kernel's {name} block {c}")
    return None


def choose_block(target: int, length: int, *, multiple: int, single_multiple: int,
                 mask_block: int | None = None, pow2: bool = False) -> int | None:
    """Largest legal block size <= ``target`` for a sequence of ``length``.

    One block covers short sequences (rounded up to ``single_multiple``); otherwise
    blocks are multiples of ``multiple`` (powers of two with ``pow2``) that divide
    ``mask_block`` when a block mask is given. None when nothing fits.

    Example:
      >>> choose_block(512, 100, multiple=128, single_multiple=16)
      112
      >>> choose_block(512, 3000, multiple=128, single_multiple=16, mask_block=384)
      384
    """
    def round_single(x):
        if pow2:
            return max(single_multiple, 1 << (max(x, 1) - 1).bit_length())
        return _cdiv(max(x, 1), single_multiple) * single_multiple

    if length <= target:
        c = round_single(length)
        if mask_block is None or mask_block >= length or mask_block % c == 0:
            return c
    c = (1 << (target.bit_length() - 1)) if pow2 else (target // multiple) * multiple
    while c >= multiple:
        if mask_block is None or mask_block % c == 0:
            return c
        c = c // 2 if pow2 else c - multiple
    return None


def make_tiling(mask: Mask, *, batch: int, q_len: int, kv_len: int, num_heads: int,
                block_q: int, block_kv: int) -> Tiling:
    """Build the static ``Tiling``; visit bounds are exact when positions are default.

    With default positions the position rules (causal / window) are static, so the
    visit bound is computed on the host; with explicit positions (decode, context
    parallel) the bound is the number of blocks.

    Example:
      >>> from attn.masks import Mask
      >>> t = make_tiling(Mask(causal=True, window=(100, 0)), batch=1, q_len=1000,
      ...                 kv_len=1000, num_heads=4, block_q=128, block_kv=128)
      >>> t.num_q_blocks, t.q_padded, t.max_kv_visits
      (8, 1024, 2)
    """
    til = Tiling(batch, q_len, kv_len, num_heads, mask_heads(mask, num_heads), block_q,
                 block_kv, max_kv_visits=0, max_q_visits=0)
    if mask.q_positions is None and mask.kv_positions is None:
        vq, vk = _static_bounds(mask.causal, mask.window, q_len, kv_len, block_q, block_kv)
    else:
        vq, vk = til.num_kv_blocks, til.num_q_blocks
    return dataclasses.replace(til, max_kv_visits=vq, max_q_visits=vk)


@functools.lru_cache(maxsize=256)
def _static_bounds(causal, window, q_len, kv_len, block_q, block_kv) -> tuple[int, int]:
    """Visit bounds from the position rules alone (default positions), on the host."""
    til = Tiling(1, q_len, kv_len, 1, 1, block_q, block_kv, 0, 0)
    kind = classify(Mask(causal=causal, window=window), til, xp=np)
    vq = int((kind > 0).sum(-1).max(initial=0))
    vk = int((kind > 0).sum(-2).max(initial=0))
    return max(vq, 1), max(vk, 1)


# --------------------------------------------------------------------------- tokens
def tokens(mask: Mask, til: Tiling, xp=jnp) -> Tokens:
    """Positions (default ``arange``) and segments padded to the tiling.

    Padding rows/keys get position 0 (their visibility is decided by index, never by
    position) and segment 0; default positions simply continue the ``arange``.
    Shapes: ``q_pos [B, Tp]``, ``kv_pos [B, Sp]``, segments alike or None.

    Example:
      >>> from attn.masks import Mask
      >>> t = make_tiling(Mask(), batch=1, q_len=3, kv_len=3, num_heads=1, block_q=4, block_kv=4)
      >>> tokens(Mask(), t).q_pos.tolist()
      [[0, 1, 2, 3]]
    """
    B, T, S = til.batch, til.q_len, til.kv_len
    Tp, Sp = til.q_padded, til.kv_padded

    def pad(x, length):
        x = xp.asarray(x).astype(xp.int32)
        return xp.pad(x, ((0, 0), (0, length - x.shape[1])))

    def pos(x, length, padded):
        if x is None:
            return xp.broadcast_to(xp.arange(padded, dtype=xp.int32), (B, padded))
        return pad(x, padded)

    q_seg = kv_seg = None
    if mask.has_segments:
        q_seg, kv_seg = pad(mask.q_segment_ids, Tp), pad(mask.kv_segment_ids, Sp)
    return Tokens(pos(mask.q_positions, T, Tp), pos(mask.kv_positions, S, Sp), q_seg, kv_seg)


def _block_minmax(x, real, c, xp, nonzero=False):
    """Per-block (min, max) of ``x [B, L]`` over real (optionally non-zero) tokens."""
    B, L = x.shape
    xb = x.reshape(B, L // c, c)
    keep = xp.broadcast_to(real.reshape(1, L // c, c), xb.shape)
    if nonzero:
        keep = keep & (xb != 0)
    lo = xp.where(keep, xb, _BIG).min(-1)
    hi = xp.where(keep, xb, -_BIG).max(-1)
    return lo, hi


# --------------------------------------------------------------------------- classify
def classify(mask: Mask, til: Tiling, toks: Tokens | None = None, xp=jnp) -> Array:
    """Block kinds ``[B, Nm, nQ, nK]`` int32: ``SKIP`` / ``PARTIAL`` / ``FULL``.

    Conservative: ``SKIP`` only when no pair can be visible, ``FULL`` only when every
    real pair is visible and the key block holds no padding. ``toks`` defaults to
    ``tokens(mask, til)``; ``xp`` is ``jnp`` (device, under jit) or ``np`` (host).

    Example:
      >>> from attn.masks import Mask
      >>> t = make_tiling(Mask(window=(8, 8)), batch=1, q_len=32, kv_len=32, num_heads=1,
      ...                 block_q=8, block_kv=8)
      >>> classify(Mask(window=(8, 8)), t)[0, 0].tolist()
      [[2, 1, 0, 0], [1, 2, 1, 0], [0, 1, 2, 1], [0, 0, 1, 2]]
    """
    toks = tokens(mask, til, xp) if toks is None else toks
    T, S, Cq, Ck = til.q_len, til.kv_len, til.block_q, til.block_kv
    nq, nk = til.num_q_blocks, til.num_kv_blocks
    q_real = xp.arange(til.q_padded) < T
    k_real = xp.arange(til.kv_padded) < S
    qlo, qhi = _block_minmax(toks.q_pos, q_real, Cq, xp)
    klo, khi = _block_minmax(toks.kv_pos, k_real, Ck, xp)
    qlo, qhi = qlo[:, :, None], qhi[:, :, None]  # [B, nQ, 1]
    klo, khi = klo[:, None, :], khi[:, None, :]  # [B, 1, nK]
    any_vis = xp.ones((toks.q_pos.shape[0], nq, nk), bool)
    all_vis = any_vis
    # Bounds are clipped so int32 arithmetic cannot overflow for huge windows.
    clip = lambda w: int(min(w, 2**30))
    right = mask.window_right  # causal folded in: <= 0
    left = mask.window_left
    if right is not None:  # visible iff kv_pos - q_pos <= right
        any_vis = any_vis & (klo - qhi <= clip(right))
        all_vis = all_vis & (khi - qlo <= clip(right))
    if left is not None:  # visible iff q_pos - kv_pos <= left
        any_vis = any_vis & (qlo - khi <= clip(left))
        all_vis = all_vis & (qhi - klo <= clip(left))
    if toks.q_seg is not None:
        qslo, qshi = _block_minmax(toks.q_seg, q_real, Cq, xp)
        kslo, kshi = _block_minmax(toks.kv_seg, k_real, Ck, xp)
        qnlo, qnhi = _block_minmax(toks.q_seg, q_real, Cq, xp, nonzero=True)
        knlo, knhi = _block_minmax(toks.kv_seg, k_real, Ck, xp, nonzero=True)
        # Some non-zero segment id range of the query block meets the key block's.
        any_vis = any_vis & (qnlo[:, :, None] <= knhi[:, None, :]) & (knlo[:, None, :] <= qnhi[:, :, None])
        one_q = (qslo == qshi) & (qslo != 0)
        one_k = kslo == kshi
        all_vis = all_vis & (one_q[:, :, None] & one_k[:, None, :]
                             & (qslo[:, :, None] == kslo[:, None, :]))
    has_pad = (np.arange(nk) + 1) * Ck > S  # padded keys are hidden by index: never FULL
    all_vis = all_vis & xp.asarray(~has_pad)[None, None, :]
    kind = xp.where(any_vis, xp.where(all_vis, FULL, PARTIAL), SKIP).astype(xp.int32)
    kind = kind[:, None]  # [B, 1, nQ, nK]
    if mask.block_mask is not None:
        mq, mk = mask.block_size
        qi = (np.arange(nq) * Cq) // mq
        kj = (np.arange(nk) * Ck) // mk
        bm = xp.asarray(mask.block_mask).astype(bool)[:, qi][:, :, kj]  # [Nb, nQ, nK]
        kind = xp.where(bm[None], kind, SKIP)
    return xp.broadcast_to(kind, (kind.shape[0], til.mask_heads, nq, nk)).astype(xp.int32)


def exact_kinds(dense, til: Tiling) -> np.ndarray:
    """Exact block kinds from a dense bool mask ``[B, Nm, T, S]`` (tests, numpy).

    Example:
      >>> import numpy as np
      >>> t = Tiling(1, 4, 4, 1, 1, 2, 2, 2, 2)
      >>> exact_kinds(np.tril(np.ones((4, 4), bool))[None, None], t)[0, 0].tolist()
      [[1, 0], [2, 1]]
    """
    d = np.asarray(dense, bool)
    B, Nm, T, S = d.shape
    d = np.pad(d, ((0, 0), (0, 0), (0, til.q_padded - T), (0, til.kv_padded - S)))
    real = np.zeros((til.q_padded, til.kv_padded), bool)
    real[:T, :S] = True
    shape = (B, Nm, til.num_q_blocks, til.block_q, til.num_kv_blocks, til.block_kv)
    d = d.reshape(shape)
    rq = real.reshape(shape[2:])
    any_vis = d.any(axis=(3, 5))
    # FULL: every real pair visible and no padded key in the block (kernels mask those).
    all_vis = (d | ~rq[None, None]).all(axis=(3, 5))
    pad_k = (np.arange(til.num_kv_blocks) + 1) * til.block_kv > S
    all_vis &= ~pad_k
    return np.where(any_vis, np.where(all_vis, FULL, PARTIAL), SKIP).astype(np.int32)


# --------------------------------------------------------------------------- tables
def visit_table(kind: Array, max_visits: int) -> Array:
    """Compact ``kind [..., R, C]`` into ``[..., R, 1 + max_visits]`` visit rows.

    Row layout: ``[count, 2*c_0 + partial_0, 2*c_1 + partial_1, ...]`` with visited
    column blocks ``c_j`` ascending; entries past ``count`` repeat the last visited
    block (partial bit cleared) so no new block is fetched for them.

    Example:
      >>> import jax.numpy as jnp
      >>> visit_table(jnp.array([[0, 2, 1, 0]]), 3).tolist()
      [[2, 2, 5, 4]]
    """
    kind = jnp.asarray(kind)
    n = kind.shape[-1]
    v = max(1, min(max_visits, n))
    visited = kind > SKIP
    count = visited.sum(-1).astype(jnp.int32)
    order = jnp.argsort(jnp.where(visited, 0, 1), axis=-1, stable=True)[..., :v].astype(jnp.int32)
    partial = jnp.take_along_axis(kind, order, axis=-1) == PARTIAL
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    valid = jnp.arange(v) < count[..., None]
    ids = jnp.where(valid, order, last)
    entries = ids * 2 + (partial & valid).astype(jnp.int32)
    return jnp.concatenate([count[..., None], entries], axis=-1)


def tables(kind: Array, til: Tiling, *, transposed: bool = True):
    """``(fwd, bwd)`` visit tables: per query block over key blocks, and the transpose.

    ``fwd [B, Nm, nQ, 1 + max_kv_visits]``; ``bwd [B, Nm, nK, 1 + max_q_visits]`` or
    None when ``transposed`` is False.

    Example:
      >>> from attn.masks import Mask
      >>> t = make_tiling(Mask(causal=True), batch=1, q_len=4, kv_len=4, num_heads=1,
      ...                 block_q=2, block_kv=2)
      >>> fwd, bwd = tables(classify(Mask(causal=True), t), t)
      >>> fwd[0, 0].tolist(), bwd[0, 0].tolist()
      ([[1, 1, 0], [2, 0, 3]], [[2, 1, 2], [1, 3, 2]])
    """
    fwd = visit_table(kind, til.max_kv_visits)
    bwd = visit_table(jnp.swapaxes(kind, -1, -2), til.max_q_visits) if transposed else None
    return fwd, bwd


def mask_aux(mask: Mask) -> dict:
    """The array fields of a mask: the kernels' non-differentiable ``aux`` input.

    Example:
      >>> from attn.masks import Mask
      >>> sorted(mask_aux(Mask(causal=True)))
      ['bm', 'kv_pos', 'kv_seg', 'q_pos', 'q_seg']
    """
    return dict(q_pos=mask.q_positions, kv_pos=mask.kv_positions, q_seg=mask.q_segment_ids,
                kv_seg=mask.kv_segment_ids, bm=mask.block_mask)


def mask_from_aux(aux: dict, *, causal: bool, window, block_size) -> Mask:
    """Rebuild the ``Mask`` from ``mask_aux`` arrays and its static fields.

    Example:
      >>> from attn.masks import Mask
      >>> m = Mask(causal=True, window=(4, 0))
      >>> mask_from_aux(mask_aux(m), causal=True, window=(4, 0), block_size=None) == m
      True
    """
    return Mask(causal=causal, window=window, q_segment_ids=aux["q_seg"],
                kv_segment_ids=aux["kv_seg"], q_positions=aux["q_pos"],
                kv_positions=aux["kv_pos"], block_mask=aux["bm"],
                block_size=block_size if aux["bm"] is not None else None)


@dataclasses.dataclass(frozen=True)
class PlanBase:
    """What every kernel's plan keeps of a call: head dims and the mask's statics.

    The kernels' ``Plan`` classes extend it with their config and tilings; ``mask``
    rebuilds the ``Mask`` inside their custom VJPs from the ``mask_aux`` arrays.
    """

    H: int
    E: int
    causal: bool
    window: tuple | None
    mask_block_size: tuple | None

    def mask(self, aux) -> Mask:
        return mask_from_aux(aux, causal=self.causal, window=self.window,
                             block_size=self.mask_block_size)


def table_counts(table: Array) -> Array:
    """Visited-block counts ``[..., R]`` of a visit table ``[..., R, 1 + V]``.

    Example:
      >>> import jax.numpy as jnp
      >>> table_counts(visit_table(jnp.array([[0, 2, 1, 0]]), 3)).tolist()
      [2]
    """
    return table[..., 0]
