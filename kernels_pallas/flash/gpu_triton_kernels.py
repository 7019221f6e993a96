"""Pallas Triton kernel bodies and ``pallas_call`` builders (forward, dQ, dK/dV).

Internal module: ``kernels_pallas.flash.gpu_triton`` owns the public API and the plan,
``kernels_pallas.flash.shell`` the padding and the VJP.
Operands stay in the public ``[B, T, N, H]`` layout (padded by the caller to block
multiples and power-of-two head dims, which Triton tensors need); a program owns one
(query block, batch, head) and loops over its visit-table row with a ``fori_loop``,
so skipped key blocks are never loaded. K/V are indexed with head ``n // G``: one
K/V head serves its G query heads without repetition. Partial blocks take a
``lax.cond`` branch that builds the element mask; full blocks take the branch
without it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.flash import _compat
from kernels_pallas.flash._common import LN2, GpuKernelCfg, logits2, visibility
from kernels_pallas.flash.masking import Tiling

NT = (((1,), (1,)), ((), ()))
NN = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class KernelCfg(GpuKernelCfg):
    """The shared GPU call description plus the Triton launch parameters."""

    num_warps: int
    num_stages: int


def _params(cfg: KernelCfg):
    if cfg.interpret:
        return dict(interpret=True)
    return dict(compiler_params=_compat.triton_compiler_params(
        num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def _vis(cfg, til, r, qs_start, ks_start, qsl, ksl, *, transposed):
    """Visibility ``[Cq, Ck]`` (``[Ck, Cq]`` transposed) of a partial block, or None."""
    Cq, Ck = til.block_q, til.block_kv
    iq = qs_start + jnp.arange(Cq, dtype=jnp.int32)
    ik = ks_start + jnp.arange(Ck, dtype=jnp.int32)
    qp = r["qpos"][qsl] if cfg.has_qpos else iq
    kp = r["kvpos"][ksl] if cfg.has_kvpos else ik
    qs = r["qseg"][qsl] if cfg.has_seg else None
    ks = r["kvseg"][ksl] if cfg.has_seg else None
    if transposed:
        q2 = lambda x: None if x is None else x[None, :]
        k2 = lambda x: None if x is None else x[:, None]
    else:
        q2 = lambda x: None if x is None else x[:, None]
        k2 = lambda x: None if x is None else x[None, :]
    vis = visibility(q2(qp), k2(kp), q2(qs), k2(ks), k2(ik), left=cfg.left, right=cfg.right,
                     kv_len=til.kv_len, kv_padded=til.kv_padded)
    shape = (Ck, Cq) if transposed else (Cq, Ck)
    return None if vis is None else jnp.broadcast_to(vis, shape)


def _masked(s, vis):
    return s if vis is None else jnp.where(vis, s, -jnp.inf)


def _mask_inputs(cfg, til, *, q_full, k_full):
    """Specs for the optional positions / segments: ``[B, Tp]`` and ``[B, Sp]``."""
    Cq, Ck = til.block_q, til.block_kv
    if q_full:
        q_spec = pl.BlockSpec((None, til.q_padded), lambda i, b, h: (b, 0))
    else:
        q_spec = pl.BlockSpec((None, Cq), lambda i, b, h: (b, i))
    if k_full:
        k_spec = pl.BlockSpec((None, til.kv_padded), lambda i, b, h: (b, 0))
    else:
        k_spec = pl.BlockSpec((None, Ck), lambda i, b, h: (b, i))
    out = []
    if cfg.has_qpos:
        out.append(("qpos", q_spec))
    if cfg.has_kvpos:
        out.append(("kvpos", k_spec))
    if cfg.has_seg:
        out += [("qseg", q_spec), ("kvseg", k_spec)]
    return out


def _table_spec(til, width, *, per_head_group, G):
    nm = (lambda h: h) if til.mask_heads > 1 else (lambda h: 0)
    if per_head_group:  # dK/dV: the rows of all G heads of kv head h
        if til.mask_heads > 1:
            return pl.BlockSpec((None, G, None, width), lambda i, b, h: (b, h, i, 0))
        return pl.BlockSpec((None, None, None, width), lambda i, b, h: (b, 0, i, 0))
    return pl.BlockSpec((None, None, None, width), lambda i, b, h: (b, nm(h), i, 0))


# --------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, cfg: KernelCfg, til: Tiling, names, debug):
    r = dict(zip(names, refs))
    qi, n = pl.program_id(0), pl.program_id(2)
    Cq, Ck = til.block_q, til.block_kv
    tab = r["tab"]
    q = r["q"][...]
    if cfg.has_sinks:  # the sink is a key seen first: max = sink, sum = exp(0) = 1
        m0 = jnp.full((Cq,), r["sinks"][n], jnp.float32)
        l0 = jnp.ones((Cq,), jnp.float32)
    else:
        m0 = jnp.full((Cq,), -jnp.inf, jnp.float32)
        l0 = jnp.zeros((Cq,), jnp.float32)
    acc0 = jnp.zeros((Cq, cfg.Ep), jnp.float32)
    qsl = pl.ds(0, Cq)

    def body(jj, carry):
        m, l, acc, cnt, pcnt = carry
        entry = tab[1 + jj]
        kj, partial = entry // 2, entry % 2
        start = pl.multiple_of(kj * Ck, Ck)
        ksl = pl.ds(start, Ck)
        s = lax.dot_general(q, r["k"][ksl, :], NT, preferred_element_type=jnp.float32)
        s, _ = logits2(s, cfg.scale, cfg.softcap)
        s = lax.cond(partial == 1,
                     lambda x: _masked(x, _vis(cfg, til, r, qi * Cq, start, qsl, ksl,
                                               transposed=False)),
                     lambda x: x, s)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # Nothing visible yet: shift by 0 so exp2(-inf) = 0 instead of NaN.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp2(s - m_safe[:, None])
        alpha = jnp.exp2(m - m_safe)
        v = r["v"][ksl, :]
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
        return m_new, alpha * l + jnp.sum(p, axis=1), acc * alpha[:, None] + pv, cnt + 1, pcnt + partial

    zero = jnp.int32(0)
    m, l, acc, cnt, pcnt = lax.fori_loop(0, tab[0], body, (m0, l0, acc0, zero, zero))
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    r["o"][...] = (acc / l_safe[:, None]).astype(r["o"].dtype)
    r["lse"][...] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)
    if debug:
        r["dbg"][...] = jnp.where(jnp.arange(2) == 0, cnt, pcnt)


def forward(cfg: KernelCfg, til: Tiling, table, q, k, v, extras, sinks2, *, out_dtype=None,
            debug=False):
    """Forward kernel: ``o [B, Tp, N, Ep]`` in ``out_dtype`` (default q's), ``lse [B, N, Tp]``
    (natural log), debug counts or None."""
    B, N, G = cfg.B, cfg.N, cfg.G
    Cq, Sp, nQ, W = til.block_q, til.kv_padded, til.num_q_blocks, table.shape[-1]
    specs = [
        ("tab", _table_spec(til, W, per_head_group=False, G=G)),
        ("q", pl.BlockSpec((None, Cq, None, cfg.Hp), lambda i, b, h: (b, i, h, 0))),
        ("k", pl.BlockSpec((None, Sp, None, cfg.Hp), lambda i, b, h: (b, 0, h // G, 0))),
        ("v", pl.BlockSpec((None, Sp, None, cfg.Ep), lambda i, b, h: (b, 0, h // G, 0))),
    ] + _mask_inputs(cfg, til, q_full=False, k_full=True)
    args = [table, q, k, v] + [extras[n] for n, _ in specs[4:]]
    if cfg.has_sinks:
        specs.append(("sinks", pl.BlockSpec((N,), lambda i, b, h: (0,))))
        args.append(sinks2)
    out_specs = [("o", pl.BlockSpec((None, Cq, None, cfg.Ep), lambda i, b, h: (b, i, h, 0))),
                 ("lse", pl.BlockSpec((None, None, Cq), lambda i, b, h: (b, h, i)))]
    out_shape = [jax.ShapeDtypeStruct((B, til.q_padded, N, cfg.Ep), out_dtype or q.dtype),
                 jax.ShapeDtypeStruct((B, N, til.q_padded), jnp.float32)]
    if debug:
        out_specs.append(("dbg", pl.BlockSpec((None, None, None, 2), lambda i, b, h: (b, h, i, 0))))
        out_shape.append(jax.ShapeDtypeStruct((B, N, nQ, 2), jnp.int32))
    names = [n for n, _ in specs] + [n for n, _ in out_specs]
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, til=til, names=names, debug=debug),
        grid=(nQ, B, N), in_specs=[s for _, s in specs], out_specs=[s for _, s in out_specs],
        out_shape=out_shape, name="flash_fwd_triton", **_params(cfg),
    )(*args)
    return outs if debug else (*outs, None)


# --------------------------------------------------------------------------- dQ
def _dq_kernel(*refs, cfg: KernelCfg, til: Tiling, names):
    r = dict(zip(names, refs))
    qi = pl.program_id(0)
    Cq, Ck = til.block_q, til.block_kv
    tab = r["tab"]
    q, do = r["q"][...], r["do"][...]
    lse2, d = r["lse"][...], r["d"][...]
    qsl = pl.ds(0, Cq)

    def body(jj, dq):
        entry = tab[1 + jj]
        kj, partial = entry // 2, entry % 2
        start = pl.multiple_of(kj * Ck, Ck)
        ksl = pl.ds(start, Ck)
        k = r["k"][ksl, :]
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32)
        s, t = logits2(s, cfg.scale, cfg.softcap)
        s = lax.cond(partial == 1,
                     lambda x: _masked(x, _vis(cfg, til, r, qi * Cq, start, qsl, ksl,
                                               transposed=False)),
                     lambda x: x, s)
        p = jnp.exp2(s - lse2[:, None])
        dp = lax.dot_general(do, r["v"][ksl, :], NT, preferred_element_type=jnp.float32)
        ds = p * (dp - d[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, tab[0], body, jnp.zeros((Cq, cfg.Hp), jnp.float32))
    r["dq"][...] = (dq * cfg.scale).astype(r["dq"].dtype)


def backward_dq(cfg: KernelCfg, til: Tiling, table, q, k, v, do, lse2, d, extras):
    """dQ kernel: ``dq [B, Tp, N, Hp]``; ``lse2`` is base-2, +inf on padded rows."""
    B, N, G = cfg.B, cfg.N, cfg.G
    Cq, Sp, nQ, W = til.block_q, til.kv_padded, til.num_q_blocks, table.shape[-1]
    qb = lambda i, b, h: (b, i, h, 0)
    specs = [
        ("tab", _table_spec(til, W, per_head_group=False, G=G)),
        ("q", pl.BlockSpec((None, Cq, None, cfg.Hp), qb)),
        ("k", pl.BlockSpec((None, Sp, None, cfg.Hp), lambda i, b, h: (b, 0, h // G, 0))),
        ("v", pl.BlockSpec((None, Sp, None, cfg.Ep), lambda i, b, h: (b, 0, h // G, 0))),
        ("do", pl.BlockSpec((None, Cq, None, cfg.Ep), qb)),
        ("lse", pl.BlockSpec((None, None, Cq), lambda i, b, h: (b, h, i))),
        ("d", pl.BlockSpec((None, None, Cq), lambda i, b, h: (b, h, i))),
    ] + _mask_inputs(cfg, til, q_full=False, k_full=True)
    args = [table, q, k, v, do, lse2, d] + [extras[n] for n, _ in specs[7:]]
    names = [n for n, _ in specs] + ["dq"]
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, til=til, names=names),
        grid=(nQ, B, N), in_specs=[s for _, s in specs],
        out_specs=pl.BlockSpec((None, Cq, None, cfg.Hp), qb),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), name="flash_dq_triton", **_params(cfg),
    )(*args)


# --------------------------------------------------------------------------- dK / dV
def _dkv_kernel(*refs, cfg: KernelCfg, til: Tiling, names):
    r = dict(zip(names, refs))
    kj = pl.program_id(0)
    Cq, Ck, G = til.block_q, til.block_kv, cfg.G
    per_head = til.mask_heads > 1
    tab = r["tab"]
    k, v = r["k"][...], r["v"][...]
    ksl = pl.ds(0, Ck)

    def head(g, carry):
        row = (lambda i: tab[g, i]) if per_head else (lambda i: tab[i])

        def body(jj, carry):
            dk, dv = carry
            entry = row(1 + jj)
            qi, partial = entry // 2, entry % 2
            start = pl.multiple_of(qi * Cq, Cq)
            qsl = pl.ds(start, Cq)
            q = r["q"][qsl, g, :]
            do = r["do"][qsl, g, :]
            sT = lax.dot_general(k, q, NT, preferred_element_type=jnp.float32)  # [Ck, Cq]
            sT, tT = logits2(sT, cfg.scale, cfg.softcap)
            sT = lax.cond(partial == 1,
                          lambda x: _masked(x, _vis(cfg, til, r, start, kj * Ck, qsl, ksl,
                                                    transposed=True)),
                          lambda x: x, sT)
            pT = jnp.exp2(sT - r["lse"][g, qsl][None, :])
            dv = dv + lax.dot_general(pT.astype(do.dtype), do, NN, preferred_element_type=jnp.float32)
            dpT = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)
            dsT = pT * (dpT - r["d"][g, qsl][None, :])
            if tT is not None:
                dsT = dsT * (1.0 - tT * tT)
            dk = dk + lax.dot_general(dsT.astype(q.dtype), q, NN, preferred_element_type=jnp.float32)
            return dk, dv

        return lax.fori_loop(0, row(0), body, carry)

    init = (jnp.zeros((Ck, cfg.Hp), jnp.float32), jnp.zeros((Ck, cfg.Ep), jnp.float32))
    dk, dv = lax.fori_loop(0, G, head, init)
    r["dk"][...] = (dk * cfg.scale).astype(r["dk"].dtype)
    r["dv"][...] = dv.astype(r["dv"].dtype)


def backward_dkv(cfg: KernelCfg, til: Tiling, table_t, q, k, v, do, lse2, d, extras):
    """dK/dV kernel over the transposed table: ``dk [B, Sp, K, Hp]``, ``dv [B, Sp, K, Ep]``.

    A program owns one (key block, batch, kv head) and loops over its G query heads
    and, per head, the query blocks that visit the key block.
    """
    B, K, G = cfg.B, cfg.K, cfg.G
    Ck, Tp, nK, W = til.block_kv, til.q_padded, til.num_kv_blocks, table_t.shape[-1]
    kb = lambda i, b, h: (b, i, h, 0)
    specs = [
        ("tab", _table_spec(til, W, per_head_group=True, G=G)),
        ("k", pl.BlockSpec((None, Ck, None, cfg.Hp), kb)),
        ("v", pl.BlockSpec((None, Ck, None, cfg.Ep), kb)),
        ("q", pl.BlockSpec((None, Tp, G, cfg.Hp), lambda i, b, h: (b, 0, h, 0))),
        ("do", pl.BlockSpec((None, Tp, G, cfg.Ep), lambda i, b, h: (b, 0, h, 0))),
        ("lse", pl.BlockSpec((None, G, Tp), lambda i, b, h: (b, h, 0))),
        ("d", pl.BlockSpec((None, G, Tp), lambda i, b, h: (b, h, 0))),
    ] + _mask_inputs(cfg, til, q_full=True, k_full=False)
    args = [table_t, k, v, q, do, lse2, d] + [extras[n] for n, _ in specs[7:]]
    names = [n for n, _ in specs] + ["dk", "dv"]
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, til=til, names=names),
        grid=(nK, B, K), in_specs=[s for _, s in specs],
        out_specs=[pl.BlockSpec((None, Ck, None, cfg.Hp), kb), pl.BlockSpec((None, Ck, None, cfg.Ep), kb)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="flash_dkv_triton", **_params(cfg),
    )(*args)
