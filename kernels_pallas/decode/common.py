"""What every decode backend shares: the paged K/V view, the page lists, the lse merge.

A decode call reads a **page pool** through per-sequence **page tables**:

    k          [P, C, K, H]   P pages of C slots, K kv heads (the dense cache
    v          [P, C, K, E]   [B, S, K, H] is the same thing with P = B·S/C: a free reshape)
    positions  [P, C] int32   position id of each slot
    segment_ids[P, C] int32   0 = empty slot (never visible)
    page_table [B, maxP] int32  physical page of each logical page of sequence b
    num_pages  [B] int32       logical pages in use (pages past it are never read)

MLA mode (``value_dim`` set, ``v`` None): one latent head (K = 1) whose slots hold
``[c_kv, k_rope]`` side by side (H = L + Hr); the value is the first ``E = L`` columns of
the same slot, so nothing is concatenated or copied per step.

Visibility of slot (p, c) to query t of row b (the ``attn.masks.Mask`` rules, on
positions): ``seg[p,c] == q_seg[b,t] != 0`` and ``left``/``right`` window on
``pos[p,c] - q_pos[b,t]`` (causal folds into ``right <= 0``).

**Split-K.** The live page list of each sequence is cut into ``num_splits`` contiguous
ranges; each range yields ``(o_s, lse_s)`` (normalised within the range) and the ranges
merge exactly (sinks join here, as one more term with a zero value)::

    lse = log(Σ_s exp(lse_s) + exp(sink)),   o = Σ_s exp(lse_s − lse) · o_s

A row that sees nothing has every ``lse_s = −inf``: ``o = 0``, ``lse = −inf`` (or the sink).

Example:
  >>> import jax.numpy as jnp
  >>> k = jnp.ones((2, 16, 1, 4)); pos = jnp.tile(jnp.arange(16), (2, 1))
  >>> kv = from_dense(k, k, pos, jnp.ones_like(pos), page_size=8)
  >>> kv.k.shape, kv.page_table.tolist(), kv.num_pages.tolist()
  ((4, 8, 1, 4), [[0, 1], [2, 3]], [2, 2])
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from attn.errors import UserError

Array = Any
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Decode calls have few query tokens per sequence; above this the flash kernels (which
# tile T) are the right tool, so the decode implementations refuse.
MAX_DECODE_Q = 16


@struct.dataclass
class PagedKV:
    """A page pool and the page tables that map sequences onto it (a pytree).

    Attributes:
      k: ``[P, C, K, H]`` keys (MLA: the latent ``[c_kv, k_rope]``, K = 1).
      v: ``[P, C, K, E]`` values, or None in MLA mode (values are ``k[..., :value_dim]``).
      positions: ``[P, C]`` int32 position id per slot.
      segment_ids: ``[P, C]`` int32 segment id per slot; 0 = empty.
      page_table: ``[B, maxP]`` int32 physical page ids (entries past ``num_pages`` unused).
      num_pages: ``[B]`` int32 pages in use per sequence.
      value_dim: static; MLA mode when set (E = value_dim columns of k).

    Example:
      >>> import jax.numpy as jnp
      >>> kv = PagedKV(k=jnp.zeros((3, 8, 1, 6)), v=None, positions=jnp.zeros((3, 8), jnp.int32),
      ...              segment_ids=jnp.zeros((3, 8), jnp.int32),
      ...              page_table=jnp.zeros((2, 2), jnp.int32), num_pages=jnp.ones(2, jnp.int32),
      ...              value_dim=4)
      >>> kv.page_size, kv.num_kv_heads, kv.head_dim, kv.v_dim
      (8, 1, 6, 4)
    """

    k: Array
    v: Array | None
    positions: Array
    segment_ids: Array
    page_table: Array
    num_pages: Array
    value_dim: int | None = struct.field(pytree_node=False, default=None)

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def v_dim(self) -> int:
        return self.value_dim if self.v is None else self.v.shape[3]

    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def max_pages(self) -> int:
        return self.page_table.shape[1]

    def values(self):
        """``[P, C, K, E]`` values (MLA: a slice of the latent, fused by XLA into its reader)."""
        return self.k[..., : self.value_dim] if self.v is None else self.v


def check_paged(kv: PagedKV) -> None:
    """Raise ``UserError`` naming the field whose shape does not fit the others."""
    if hasattr(kv, "dequant_k"):  # attn.kv_quant.QuantPagedKV: built by quantize_pages
        return
    if kv.k.ndim != 4:
        raise UserError(f"PagedKV.k must be [P, C, K, H], got shape {tuple(kv.k.shape)}")
    P, C, K, H = kv.k.shape
    if kv.v is None:
        if kv.value_dim is None or not 0 < kv.value_dim <= H:
            raise UserError(f"PagedKV: v=None (MLA mode) needs 0 < value_dim <= H={H}, "
                            f"got {kv.value_dim!r}")
    elif kv.v.ndim != 4 or tuple(kv.v.shape[:3]) != (P, C, K):
        raise UserError(f"PagedKV.v must be [P={P}, C={C}, K={K}, E], got {tuple(kv.v.shape)}")
    for name in ("positions", "segment_ids"):
        a = getattr(kv, name)
        if tuple(a.shape) != (P, C):
            raise UserError(f"PagedKV.{name} must be [P, C]={(P, C)}, got {tuple(a.shape)}")
    if kv.page_table.ndim != 2 or tuple(kv.num_pages.shape) != (kv.page_table.shape[0],):
        raise UserError(f"PagedKV: page_table must be [B, maxP] and num_pages [B], got "
                        f"{tuple(kv.page_table.shape)} and {tuple(kv.num_pages.shape)}")


def from_dense(k_BSKH, v_BSKE, kv_pos_BS, kv_seg_BS, *, page_size: int,
               value_dim: int | None = None) -> PagedKV:
    """View a dense cache ``[B, S, K, ·]`` as a page pool (free reshape when C divides S).

    Sequence b owns pages ``b·S/C .. (b+1)·S/C − 1``; when C does not divide S the tail is
    padded with empty slots (segment 0), which costs a copy.

    Example:
      >>> import jax.numpy as jnp
      >>> k = jnp.ones((1, 5, 2, 4)); pos = jnp.arange(5)[None]
      >>> kv = from_dense(k, k, pos, jnp.ones_like(pos), page_size=4)
      >>> kv.k.shape, kv.segment_ids.tolist()
      ((2, 4, 2, 4), [[1, 1, 1, 1], [1, 0, 0, 0]])
    """
    if not isinstance(page_size, int) or page_size <= 0:
        raise UserError(f"from_dense: page_size must be a positive int, got {page_size!r}")
    B, S, K, H = k_BSKH.shape
    nP = -(-S // page_size)
    pad = nP * page_size - S

    def pages(x):
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((B * nP, page_size) + x.shape[2:])

    table = jnp.arange(B * nP, dtype=jnp.int32).reshape(B, nP)
    return PagedKV(k=pages(k_BSKH), v=None if v_BSKE is None else pages(v_BSKE),
                   positions=pages(kv_pos_BS.astype(jnp.int32)),
                   segment_ids=pages(kv_seg_BS.astype(jnp.int32)),
                   page_table=table, num_pages=jnp.full((B,), nP, jnp.int32),
                   value_dim=value_dim if v_BSKE is None else None)


@dataclasses.dataclass(frozen=True)
class DecodeCfg:
    """Static description of one decode call (hashable; a jit static argument)."""

    B: int
    T: int
    N: int
    K: int
    H: int
    E: int
    page_size: int
    max_pages: int
    num_splits: int
    scale: float
    softcap: float | None
    left: int | None
    right: int | None  # causality folded in (causal: <= 0)
    mla: bool  # values are the first E columns of the keys
    interpret: bool = False
    quant: str | None = None  # attn.kv_quant format of the pages ("int8", "int4", "fp8")

    @property
    def key_per_channel(self) -> bool:
        """Quantized keys carry one scale per channel (else one per token)."""
        from attn.kv_quant import FORMATS
        return self.quant is not None and FORMATS[self.quant].key_axis == 1

    @property
    def has_zero(self) -> bool:
        return self.quant == "int4"

    @property
    def code_dims(self) -> tuple[int, int]:
        """Stored code columns of a key / value slot (int4 packs two per byte)."""
        div = 2 if self.quant == "int4" else 1
        return self.H // div, self.E // div

    @property
    def G(self) -> int:
        return self.N // self.K

    @property
    def M(self) -> int:
        """Query rows per kv head: the G heads of a group times T (row r = t·G + g)."""
        return self.G * self.T

    @property
    def pages_per_split(self) -> int:
        return -(-self.max_pages // self.num_splits)


def default_splits(batch: int, kv_heads: int, max_pages: int, *, target: int = 256) -> int:
    """Split count so ``B·K·splits`` reaches ``target`` programs (untuned starting point).

    Example:
      >>> default_splits(1, 8, 64), default_splits(32, 8, 64), default_splits(1, 1, 3)
      (32, 1, 3)
    """
    return max(1, min(max_pages, -(-target // max(1, batch * kv_heads))))


def make_cfg(q_shape, kv: PagedKV, *, causal: bool, window, scale, softcap,
             num_splits: int | None, interpret: bool = False) -> DecodeCfg:
    """Validate a decode call and build its ``DecodeCfg``."""
    check_paged(kv)
    if len(q_shape) != 4:
        raise UserError(f"decode: q must be [B, T, N, H], got shape {tuple(q_shape)}")
    B, T, N, H = q_shape
    K = kv.num_kv_heads
    if B != kv.batch:
        raise UserError(f"decode: q has batch {B} but page_table has {kv.batch} rows")
    if H != kv.head_dim:
        raise UserError(f"decode: q head dim {H} differs from the cache's {kv.head_dim}")
    if N % K:
        raise UserError(f"decode: N={N} query heads must be a multiple of K={K} kv heads")
    if not 0 < T <= MAX_DECODE_Q:
        raise UserError(f"decode: T={T} query tokens; decode serves 1..{MAX_DECODE_Q} "
                        "(use the flash kernels for prefill)")
    if window is not None and not (isinstance(window, tuple) and len(window) == 2):
        raise UserError(f"decode: window must be (left, right) or None, got {window!r}")
    left = None if window is None or window[0] is None else int(min(window[0], 2**30))
    right = None if window is None or window[1] is None else int(min(window[1], 2**30))
    if causal:
        right = 0 if right is None else min(right, 0)
    splits = num_splits or default_splits(B, K, kv.max_pages)
    if not 0 < splits:
        raise UserError(f"decode: num_splits must be positive, got {num_splits!r}")
    splits = min(splits, kv.max_pages)
    return DecodeCfg(B=B, T=T, N=N, K=K, H=H, E=kv.v_dim, page_size=kv.page_size,
                     max_pages=kv.max_pages, num_splits=splits,
                     scale=float(H ** -0.5 if scale is None else scale),
                     softcap=None if softcap is None else float(softcap), left=left,
                     right=right, mla=kv.v is None, interpret=bool(interpret),
                     quant=getattr(kv, "fmt", None))


def q_rows(q_BTNH, cfg: DecodeCfg):
    """``[B, T, N, H]`` -> ``[B, K, M, H]`` with row ``r = t·G + g`` (all G heads in one M)."""
    B, T, N, H = q_BTNH.shape
    return q_BTNH.reshape(B, T, cfg.K, cfg.G, H).transpose(0, 2, 1, 3, 4).reshape(
        B, cfg.K, T * cfg.G, H)


def from_rows(o_BKME, cfg: DecodeCfg):
    """``[B, K, M, E]`` -> ``[B, T, N, E]``."""
    B, K, _, E = o_BKME.shape
    return o_BKME.reshape(B, K, cfg.T, cfg.G, E).transpose(0, 2, 1, 3, 4).reshape(
        B, cfg.T, cfg.N, E)


def row_meta(q_pos_BT, q_seg_BT, cfg: DecodeCfg):
    """Per query row ``[B, M]`` position and segment (row r is token r // G)."""
    rep = lambda x: jnp.repeat(x.astype(jnp.int32), cfg.G, axis=1)
    return rep(q_pos_BT), rep(q_seg_BT)


def live_pages(kv: PagedKV, q_pos_BT, q_seg_BT, cfg: DecodeCfg):
    """Compacted page lists: ``(pages [B, maxP], count [B])`` of the pages worth reading.

    A logical page is live when it is below ``num_pages`` and some slot in it is not
    empty and lies inside the window/causal reach of some query of the row (exact for
    positions, conservative for segments). Live pages keep their order (a stable sort
    on device); entries past ``count`` repeat the last live page (or page 0), so a
    kernel that indexes them re-reads a page it already has instead of a stray one.

    Example:
      >>> import jax.numpy as jnp
      >>> pos = jnp.arange(16)[None]; seg = (pos < 9).astype(jnp.int32)
      >>> kv = from_dense(jnp.ones((1, 16, 1, 2)), jnp.ones((1, 16, 1, 2)), pos, seg, page_size=4)
      >>> cfg = make_cfg((1, 1, 1, 2), kv, causal=True, window=None, scale=None, softcap=None,
      ...                num_splits=1)
      >>> pages, count = live_pages(kv, jnp.array([[8]]), jnp.ones((1, 1), jnp.int32), cfg)
      >>> pages.tolist(), count.tolist()
      ([[0, 1, 2, 2]], [3])
    """
    B, maxP = kv.page_table.shape
    table = jnp.clip(kv.page_table, 0, kv.positions.shape[0] - 1)
    pos = kv.positions[table]  # [B, maxP, C]  (8 bytes per slot: small next to K/V)
    seg = kv.segment_ids[table]
    used = seg != 0
    big = jnp.int32(2**30)
    lo = jnp.min(jnp.where(used, pos, big), axis=-1)
    hi = jnp.max(jnp.where(used, pos, -big), axis=-1)
    q_used = q_seg_BT != 0
    q_lo = jnp.min(jnp.where(q_used, q_pos_BT, big), axis=1)[:, None]
    q_hi = jnp.max(jnp.where(q_used, q_pos_BT, -big), axis=1)[:, None]
    live = jnp.any(used, axis=-1) & (jnp.arange(maxP)[None] < kv.num_pages[:, None])
    live &= jnp.any(q_used, axis=1)[:, None]
    if cfg.right is not None:
        live &= lo - q_hi <= cfg.right
    if cfg.left is not None:
        live &= q_lo - hi <= cfg.left
    order = jnp.argsort(~live, axis=1, stable=True)
    count = jnp.sum(live, axis=1).astype(jnp.int32)
    idx = jnp.minimum(jnp.arange(maxP)[None], jnp.maximum(count - 1, 0)[:, None])
    pages = jnp.take_along_axis(table, jnp.take_along_axis(order, idx, axis=1), axis=1)
    return pages.astype(jnp.int32), count


@functools.partial(jax.jit, static_argnames=("partials", "cfg"))
def run_split_k(partials, q, kv, q_positions, q_segment_ids, sinks, cfg: DecodeCfg):
    """One backend's split pass ``partials(q, kv, pos, seg, cfg) -> (o_s, lse_s)``, then the merge.

    Every backend (XLA reference, TPU, Triton) differs only in ``partials``; the default
    segment ids, the int32 row metadata and the lse merge with sinks are shared here.
    """
    if q_segment_ids is None:
        q_segment_ids = jnp.ones(q_positions.shape, jnp.int32)
    o_s, lse_s = partials(q, kv, q_positions.astype(jnp.int32),
                          q_segment_ids.astype(jnp.int32), cfg)
    return merge_splits(o_s, lse_s, sinks, cfg, q.dtype)


def merge_splits(o_BKXME, lse_BKXM, sinks_N, cfg: DecodeCfg, out_dtype):
    """Merge split results (float32, lse natural units) into ``o [B,T,N,E]``, ``lse [B,N,T]``.

    Splits that saw nothing have ``lse_s = −inf`` and contribute 0 (no NaN).
    """
    acc = jnp.promote_types(o_BKXME.dtype, jnp.float32)  # float64 stays (oracle tests)
    lse_s = lse_BKXM.astype(acc)
    m = jnp.max(lse_s, axis=2)  # [B, K, M]
    if sinks_N is not None:
        sink = jnp.repeat(sinks_N.astype(acc).reshape(cfg.K, 1, cfg.G), cfg.T,
                          axis=1).reshape(cfg.K, cfg.M)[None]  # row r = t·G + g
        m = jnp.maximum(m, sink)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_s - m_safe[:, :, None])  # exp(-inf) = 0
    tot = jnp.sum(w, axis=2)
    if sinks_N is not None:
        tot = tot + jnp.exp(sink - m_safe)
    seen = tot > 0
    tot_safe = jnp.where(seen, tot, 1.0)
    o = jnp.einsum("BKXM,BKXME->BKME", w / tot_safe[:, :, None], o_BKXME.astype(acc))
    lse = jnp.where(seen, m_safe + jnp.log(tot_safe), -jnp.inf)
    lse_BNT = lse.reshape(cfg.B, cfg.K, cfg.T, cfg.G).transpose(0, 1, 3, 2).reshape(
        cfg.B, cfg.N, cfg.T)
    return from_rows(o, cfg).astype(out_dtype), lse_BNT


def visible(qpos_M1, qseg_M1, kpos_1C, kseg_1C, cfg: DecodeCfg):
    """``[M, C]`` visibility of one page's slots (broadcasting row/column vectors)."""
    vis = (qseg_M1 == kseg_1C) & (qseg_M1 != 0)
    d = kpos_1C - qpos_M1
    if cfg.right is not None:
        vis &= d <= cfg.right
    if cfg.left is not None:
        vis &= d >= -cfg.left
    return vis


def logits2(s_raw, cfg: DecodeCfg):
    """Base-2 logits ``log2e · softcap(scale · q·k)`` from raw float32 ``q·k``."""
    if cfg.softcap is None:
        return s_raw * (cfg.scale * LOG2E)
    return jnp.tanh(s_raw * (cfg.scale / cfg.softcap)) * (cfg.softcap * LOG2E)


def fit_last(x, n: int):
    """Zero-pad the last axis of ``x`` to ``n`` (no-op when equal)."""
    pad = n - x.shape[-1]
    return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


# --------------------------------------------------------------------------- quantized pages
def code_parts(codes, cfg: DecodeCfg):
    """The code tile ``[C, D·bits/8]`` as float32 pieces ``[(channel offset, [C, w])]``.

    int4 holds channel j in the low nibble and j + D/2 in the high one
    (``attn.kv_quant``), so it yields two halves; other formats one piece.
    """
    if cfg.quant == "int4":
        w = codes.shape[-1]
        return [(0, (codes & 0xF).astype(jnp.float32)), (w, (codes >> 4).astype(jnp.float32))]
    return [(0, codes.astype(jnp.float32))]


def quant_logits(q_MH, codes_CD, scale_1X, zero_1X, cfg: DecodeCfg, *, q_cols=None,
                 scale_cols=None):
    """Raw ``q·k`` ``[M, C]`` of quantized keys without dequantizing the tile.

    Per-channel keys ``k[c,h] = code[c,h]·s[h] + z[h]``: the scale folds into the query
    (``q·s``, O(M·H) instead of O(C·H)) and the zero point is one per-row term ``q·z``.
    Per-token keys (fp8) ``k[c,h] = code[c,h]·s[c]``: the scale multiplies logit columns.
    ``q_cols(off, w)`` / ``scale_cols(off, w)`` load column ranges (Triton cannot slice
    values, only refs); by default the arrays are sliced.
    """
    q = q_MH.astype(jnp.float32)
    q_cols = q_cols or (lambda off, w: q[:, off:off + w])
    dims = (((1,), (1,)), ((), ()))
    if cfg.key_per_channel:
        scale_cols = scale_cols or (lambda off, w: scale_1X[:, off:off + w])
        s = sum(jax.lax.dot_general(q_cols(off, c.shape[1]).astype(jnp.float32)
                                    * scale_cols(off, c.shape[1]), c, dims,
                                    preferred_element_type=jnp.float32)
                for off, c in code_parts(codes_CD, cfg))
        if zero_1X is not None:
            s = s + jnp.sum(q * zero_1X, axis=1, keepdims=True)
        return s
    s = sum(jax.lax.dot_general(q_cols(off, c.shape[1]).astype(jnp.float32), c, dims,
                                preferred_element_type=jnp.float32)
            for off, c in code_parts(codes_CD, cfg))
    s = s * scale_1X
    if zero_1X is not None:
        s = s + jnp.sum(q, axis=1, keepdims=True) * zero_1X
    return s


def quant_pv(p_MC, codes_CD, scale_1C, zero_1C, cfg: DecodeCfg):
    """``p·v`` of per-token quantized values as pieces ``[(channel offset, [M, w])]``.

    ``v[c,e] = code[c,e]·s[c] + z[c]``: the scale folds into ``p`` (``p·s``) and the zero
    point adds ``p·z`` to every channel.
    """
    dims = (((1,), (0,)), ((), ()))
    p = p_MC.astype(jnp.float32)
    pw = p * scale_1C
    extra = None if zero_1C is None else jnp.sum(p * zero_1C, axis=1, keepdims=True)
    out = []
    for off, c in code_parts(codes_CD, cfg):
        piece = jax.lax.dot_general(pw, c, dims, preferred_element_type=jnp.float32)
        out.append((off, piece if extra is None else piece + extra))
    return out
