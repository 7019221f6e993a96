"""Split-K paged decode as a Pallas Triton kernel (the portable GPU path).

Grid ``(B, K, X)``: one program per (batch row, kv head, split). It loads the
``[Mp, H]`` query rows of its group once (``Mp = next_pow2(G·T)``, at least 16: the G
query heads × T tokens that share the kv head, so a K/V byte is read once for all G
heads) and loops (``fori_loop``) over its range of the row's live page list
(``common.live_pages``; the count rides in element 0 of the list row), loading one
``[C, H]`` K tile and one ``[C, E]`` V tile per page straight from the pool
``[P, C, K, ·]`` by the page id: no gather, no copy. MLA mode reads the latent tile
``[C, L + Hr]`` once as two power-of-two parts (``L`` and ``Hr``) and uses the ``L``
part as the value. The split writes ``o_s`` and ``lse_s``; XLA merges the splits.

Triton tensors need power-of-two sizes: page sizes must be powers of two; head dims
that are not are zero-padded by the wrapper (a copy of the pool: refused on hardware,
allowed in interpret mode for tests) except in MLA mode with power-of-two ``L`` and
``Hr`` (576 = 512 + 64).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from kernels_pallas.decode.common import from_dense
  >>> from kernels_pallas.decode.triton import decode_triton
  >>> k = jax.random.normal(jax.random.key(0), (1, 32, 2, 8))
  >>> pos = jnp.arange(32)[None]
  >>> kv = from_dense(k, k, pos, jnp.ones_like(pos), page_size=8)
  >>> q = jax.random.normal(jax.random.key(1), (1, 1, 4, 8))
  >>> o, lse = decode_triton(q, kv, q_positions=jnp.array([[31]]), num_splits=2, interpret=True)
  >>> o.shape
  (1, 1, 4, 8)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.decode import common
from kernels_pallas.decode.common import LN2, DecodeCfg, PagedKV
from kernels_pallas.flash import _compat

NT = (((1,), (1,)), ((), ()))
NN = (((1,), (0,)), ((), ()))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def head_split(cfg: DecodeCfg) -> tuple[int, ...]:
    """Column parts of the key tile that are loaded separately (each a power of two)."""
    if cfg.mla and cfg.E < cfg.H and _pow2(cfg.E) == cfg.E and _pow2(cfg.H - cfg.E) == cfg.H - cfg.E:
        return (cfg.E, cfg.H - cfg.E)
    return (_pow2(cfg.H),)


def hardware_reason(cfg: DecodeCfg) -> str | None:
    """Why the kernel cannot run this call on a GPU without copying the pool, or None."""
    if _pow2(cfg.page_size) != cfg.page_size:
        return f"page size {cfg.page_size} is not a power of two (Triton tiles need one)"
    if sum(head_split(cfg)) != cfg.H or (not cfg.mla and _pow2(cfg.E) != cfg.E):
        return (f"head dims H={cfg.H}, E={cfg.E} are not powers of two (MLA: L and Hr each a "
                "power of two); the pool would be padded, a full copy per step")
    return None


def _kernel(*refs, cfg: DecodeCfg, parts, Ep: int, names):
    r = dict(zip(names, refs))
    tab_ref, k_ref = r["tab"], r["k"]
    x = pl.program_id(2)
    pps = cfg.pages_per_split
    acc_t = r["o"].dtype
    offs = [sum(parts[:i]) for i in range(len(parts))]
    qs = [r["q"][:, pl.ds(off, w)] for off, w in zip(offs, parts)]  # [Mp, w] each
    qpos, qseg = r["qpos"][...][:, None], r["qseg"][...][:, None]
    Mp = qs[0].shape[0]
    start = x * pps
    stop = jnp.minimum(start + pps, tab_ref[0])
    Hc, Ec = cfg.code_dims
    row = lambda name, pid: r[name][pid][None, :] if name in r else None
    # Output column pieces: int4 values come as two halves (low / high nibbles).
    widths = [Ec, Ec] if cfg.quant == "int4" else [Ep]

    def body(e, carry):
        m, l, accs = carry
        pid = tab_ref[1 + e]
        if cfg.quant is None:
            s = None
            for q, off, w in zip(qs, offs, parts):  # the key tile in power-of-two parts
                kk = k_ref[pid, :, pl.ds(off, w)]  # [C, w]
                part = lax.dot_general(q, kk, NT, preferred_element_type=acc_t)
                s = part if s is None else s + part
        else:  # codes straight from the pool; scales fold into q / the logits
            s = common.quant_logits(
                qs[0], k_ref[pid], row("ks", pid), row("kz", pid), cfg,
                q_cols=lambda off, w: r["q"][:, pl.ds(off, w)],
                scale_cols=lambda off, w: r["ks"][pid, pl.ds(off, w)][None, :])
        vis = common.visible(qpos, qseg, r["kpos"][pid][None, :], r["kseg"][pid][None, :], cfg)
        s = jnp.where(vis, common.logits2(s, cfg), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # exp2(-inf) = 0, not NaN
        p = jnp.exp2(s - m_safe[:, None])
        alpha = jnp.exp2(m - m_safe)
        if cfg.quant is not None:
            pvs = [pv for _, pv in common.quant_pv(p, r["v"][pid], row("vs", pid),
                                                   row("vz", pid), cfg)]
        else:
            vv = k_ref[pid, :, pl.ds(0, Ep)] if cfg.mla else r["v"][pid]
            pvs = [lax.dot_general(p.astype(vv.dtype), vv, NN, preferred_element_type=acc_t)]
        accs = tuple(a * alpha[:, None] + pv for a, pv in zip(accs, pvs))
        return m_new, alpha * l + jnp.sum(p, axis=1), accs

    init = (jnp.full((Mp,), -jnp.inf, acc_t), jnp.zeros((Mp,), acc_t),
            tuple(jnp.zeros((Mp, w), acc_t) for w in widths))
    m, l, accs = lax.fori_loop(start, jnp.maximum(stop, start), body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    off = 0
    for a, w in zip(accs, widths):
        r["o"][:, pl.ds(off, w)] = a / l_safe[:, None]
        off += w
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    r["lse"][...] = jnp.where(seen, (m_safe + jnp.log2(l_safe)) * LN2, -jnp.inf)


def split_partials(q, kv: PagedKV, q_pos_BT, q_seg_BT, cfg: DecodeCfg, *, num_warps=4,
                   num_stages=2):
    """Run the kernel: ``o_s [B, K, X, M, E]`` and ``lse_s [B, K, X, M]`` (float32)."""
    B, K, M, H, E, C = cfg.B, cfg.K, cfg.M, cfg.H, cfg.E, cfg.page_size
    X, maxP = cfg.num_splits, cfg.max_pages
    acc = jnp.promote_types(q.dtype, jnp.float32)
    if cfg.quant is not None:  # codes are loaded whole: head dims must be powers of two
        parts, Ep = (H,), E
    else:
        parts = head_split(cfg)
        Ep = E if cfg.mla else _pow2(E)
    Hp = sum(parts)
    Mp = max(16, _pow2(M))  # tl.dot needs at least 16 rows
    pages, count = common.live_pages(kv, q_pos_BT, q_seg_BT, cfg)
    W = _pow2(maxP + 1)
    tab = jnp.pad(jnp.concatenate([count[:, None], pages], axis=1), ((0, 0), (0, W - maxP - 1)))
    qr = common.fit_last(jnp.pad(common.q_rows(q, cfg), ((0, 0), (0, 0), (0, Mp - M), (0, 0))), Hp)
    qpos, qseg = (jnp.pad(a, ((0, 0), (0, Mp - M))) for a in common.row_meta(q_pos_BT, q_seg_BT, cfg))
    P = kv.positions.shape[0]
    pool = lambda D: pl.BlockSpec((P, C, None, D), lambda b, h, x: (0, 0, h, 0))
    ins = [("tab", pl.BlockSpec((None, W), lambda b, h, x: (b, 0)), tab),
           ("q", pl.BlockSpec((None, None, Mp, Hp), lambda b, h, x: (b, h, 0, 0)), qr)]
    if cfg.quant is None:
        ins.append(("k", pool(Hp), common.fit_last(kv.k, Hp)))
        if not cfg.mla:
            ins.append(("v", pool(Ep), common.fit_last(kv.v, Ep)))
    else:
        Hc, Ec = cfg.code_dims
        ins += [("k", pool(Hc), kv.k_q), ("v", pool(Ec), kv.v_q)]
        for name, a in (("ks", kv.k_scale), ("kz", kv.k_zero), ("vs", kv.v_scale),
                        ("vz", kv.v_zero)):
            if a is not None:  # [P, K, D | C]: one kv head's rows for every page
                ins.append((name, pl.BlockSpec((P, None, a.shape[2]), lambda b, h, x: (0, h, 0)),
                            a.astype(jnp.float32)))
    ins += [("kpos", pl.BlockSpec((P, C), lambda b, h, x: (0, 0)), kv.positions),
            ("kseg", pl.BlockSpec((P, C), lambda b, h, x: (0, 0)), kv.segment_ids),
            ("qpos", pl.BlockSpec((None, Mp), lambda b, h, x: (b, 0)), qpos),
            ("qseg", pl.BlockSpec((None, Mp), lambda b, h, x: (b, 0)), qseg)]
    outs = [("o", pl.BlockSpec((None, None, None, Mp, Ep), lambda b, h, x: (b, h, x, 0, 0)),
             jax.ShapeDtypeStruct((B, K, X, Mp, Ep), acc)),
            ("lse", pl.BlockSpec((None, None, None, Mp), lambda b, h, x: (b, h, x, 0)),
             jax.ShapeDtypeStruct((B, K, X, Mp), acc))]
    names = [n for n, *_ in ins] + [n for n, *_ in outs]
    if cfg.interpret:
        params = dict(interpret=True)
    else:
        params = dict(compiler_params=_compat.triton_compiler_params(num_warps=num_warps,
                                                                     num_stages=num_stages))
    o_s, lse_s = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, parts=parts, Ep=Ep, names=names), grid=(B, K, X),
        in_specs=[s for _, s, _ in ins], out_specs=[s for _, s, _ in outs],
        out_shape=[sh for *_, sh in outs], name="decode_triton", **params,
    )(*[a for *_, a in ins])
    return o_s[:, :, :, :M, :E], lse_s[:, :, :, :M]


def decode_triton(q, kv: PagedKV, *, q_positions, q_segment_ids=None, causal: bool = True,
                  window=None, scale=None, softcap=None, sinks=None, num_splits=None,
                  interpret: bool = False):
    """Paged split-K decode on GPU (Pallas Triton); returns ``(o [B,T,N,E], lse [B,N,T])``.

    Same arguments as ``kernels_pallas.decode.reference.decode_reference``;
    ``interpret=True`` runs the kernel in the Pallas interpreter on any platform.

    Example:
      >>> import jax.numpy as jnp
      >>> from kernels_pallas.decode.common import from_dense
      >>> kv = from_dense(jnp.ones((1, 8, 1, 4)), jnp.ones((1, 8, 1, 4)),
      ...                 jnp.arange(8)[None], jnp.ones((1, 8), jnp.int32), page_size=8)
      >>> decode_triton(jnp.ones((1, 1, 2, 4)), kv, q_positions=jnp.array([[7]]),
      ...               interpret=True)[0].shape
      (1, 1, 2, 4)
    """
    cfg = common.make_cfg(q.shape, kv, causal=causal, window=window, scale=scale,
                          softcap=softcap, num_splits=num_splits, interpret=interpret)
    if not interpret:
        reason = hardware_reason(cfg)
        if reason:
            raise NotImplementedError(f"decode_triton: {reason}")
    return common.run_split_k(split_partials, q, kv, q_positions, q_segment_ids, sinks, cfg)
