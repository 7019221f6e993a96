"""Pallas Mosaic TPU kernel bodies and ``pallas_call`` builders (forward, dQ, dK/dV).

Internal module: ``kernels_pallas.flash.tpu`` owns the public API, plan and layouts,
``kernels_pallas.flash.shell`` the custom VJP. Layout seen here (head-major, padded by
the caller):

    q [B, K, G, Tp, Hp]   k [B, K, Sp, Hp]   v [B, K, Sp, Ep]   o / dO like q with Ep
    per-row stats (lse, D) as rows [B, K, G, 1, Tp]: one lane-dense (1, Cq) row per
    head and query block (no 128-lane replication in HBM)

A query block stacks the ``Gb`` heads of one GQA group along rows, ``[R, H]``, so each
K/V block fetched from HBM feeds ``R`` query rows. The grid's last axis walks the
visit table (scalar-prefetched into SMEM): the K/V index_map reads the visited block
id, and steps past the row's count repeat the last id (no DMA) and do no math.

Forward and dQ compute logits as ``[R, Ck]`` (keys on lanes); dK/dV computes them
per head transposed, ``[Ck, Cq]`` (queries on lanes), so the lse/D rows broadcast
over sublanes and ``dV = Pᵀ dO``, ``dK = dSᵀ Q`` are plain NN matmuls with no
in-kernel transpose. Per-row stats change orientation (row <-> column) only once per
query block, with a diagonal select + reduction.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.flash import _compat
from kernels_pallas.flash._common import LN2, logits2, visibility
from kernels_pallas.flash.masking import Tiling

NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
NN = (((1,), (0,)), ((), ()))
LANES, SUBLANES = 128, 8


@dataclasses.dataclass(frozen=True)
class KernelCfg:
    """Static description of one attention call (hashable)."""

    B: int
    T: int
    S: int
    K: int
    G: int
    Gb: int  # heads stacked per block (divides G)
    Hp: int
    Ep: int
    scale: float
    softcap: float | None
    left: int | None
    right: int | None  # causality folded in
    has_qpos: bool
    has_kvpos: bool
    has_seg: bool
    has_sinks: bool
    interpret: bool
    vmem_limit: int | None

    @property
    def nGb(self) -> int:
        return self.G // self.Gb


def _params(cfg: KernelCfg, semantics):
    if cfg.interpret:
        return dict(interpret=_compat.tpu_interpret_params())
    kw = dict(dimension_semantics=semantics)
    if cfg.vmem_limit:
        kw["vmem_limit_bytes"] = cfg.vmem_limit
    return dict(compiler_params=_compat.tpu_compiler_params(**kw))


def _eye(c):
    return lax.broadcasted_iota(jnp.int32, (c, c), 0) == lax.broadcasted_iota(jnp.int32, (c, c), 1)


def _col_to_row(col):
    """``(R, 1)`` -> ``(1, R)`` with a diagonal select + sublane sum (no relayout op)."""
    R = col.shape[0]
    c = LANES if R % LANES == 0 else R
    parts = [jnp.sum(jnp.where(_eye(c), col[i:i + c], 0.0), axis=0, keepdims=True)
             for i in range(0, R, c)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _row_to_col(row):
    """``(1, R)`` -> ``(R, 1)``, the mirror of ``_col_to_row``."""
    R = row.shape[1]
    c = LANES if R % LANES == 0 else R
    parts = [jnp.sum(jnp.where(_eye(c), row[:, i:i + c], 0.0), axis=1, keepdims=True)
             for i in range(0, R, c)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def _table_row(b, nm, i, *, n_rows, nm_total, width):
    return ((b * nm_total + nm) * n_rows + i) * width


def _vis(cfg, til, r, qi, kj, *, transposed):
    """Visibility of a partial block: ``[Cq, Ck]`` (or ``[Ck, Cq]`` transposed)."""
    Cq, Ck = til.block_q, til.block_kv
    shape = (Ck, Cq) if transposed else (Cq, Ck)
    qdim, kdim = (1, 0) if transposed else (0, 1)
    iq = lax.broadcasted_iota(jnp.int32, shape, qdim) + qi * Cq
    ik = lax.broadcasted_iota(jnp.int32, shape, kdim) + kj * Ck
    # Column inputs are [C, 128] lane-replicated, row inputs [8, C] sublane-replicated.
    take_q = (lambda x: x[:1, :]) if transposed else (lambda x: x[:, :1])
    take_k = (lambda x: x[:, :1]) if transposed else (lambda x: x[:1, :])
    qp = take_q(r["qpos"][...]) if cfg.has_qpos else iq
    kp = take_k(r["kvpos"][...]) if cfg.has_kvpos else ik
    qs = take_q(r["qseg"][...]) if cfg.has_seg else None
    ks = take_k(r["kvseg"][...]) if cfg.has_seg else None
    vis = visibility(qp, kp, qs, ks, ik, left=cfg.left, right=cfg.right,
                     kv_len=til.kv_len, kv_padded=til.kv_padded)
    return None if vis is None else jnp.broadcast_to(vis, shape)


def _mask_rows(s, vis, Gb, Cq):
    """Apply a per-head ``[Cq, Ck]`` mask to ``Gb`` stacked heads ``[Gb·Cq, Ck]``."""
    if vis is None:
        return s
    if Gb == 1:
        return jnp.where(vis, s, -jnp.inf)
    R, Ck = s.shape
    return jnp.where(vis[None], s.reshape(Gb, Cq, Ck), -jnp.inf).reshape(R, Ck)


def _mask_specs(cfg, til, qmap, kmap, *, transposed):
    """BlockSpecs and names of the optional position / segment inputs."""
    Cq, Ck = til.block_q, til.block_kv
    if transposed:  # queries on lanes: q side rows [8, Cq], key side columns [Ck, 128]
        q_spec = pl.BlockSpec((None, SUBLANES, Cq), lambda *a: (a[0], 0, qmap(*a)))
        k_spec = pl.BlockSpec((None, Ck, LANES), lambda *a: (a[0], kmap(*a), 0))
    else:
        q_spec = pl.BlockSpec((None, Cq, LANES), lambda *a: (a[0], qmap(*a), 0))
        k_spec = pl.BlockSpec((None, SUBLANES, Ck), lambda *a: (a[0], 0, kmap(*a)))
    out = []
    if cfg.has_qpos:
        out.append(("qpos", q_spec))
    if cfg.has_kvpos:
        out.append(("kvpos", k_spec))
    if cfg.has_seg:
        out += [("qseg", q_spec), ("kvseg", k_spec)]
    return out


# --------------------------------------------------------------------------- forward
def _fwd_kernel(tab_ref, *refs, cfg: KernelCfg, til: Tiling, names, debug):
    r = dict(zip(names, refs))
    b, kh, gi, qi, j = (pl.program_id(i) for i in range(5))
    Gb, Cq, Ck, V = cfg.Gb, til.block_q, til.block_kv, til.max_kv_visits
    R = Gb * Cq
    nm = kh * cfg.G + gi * Gb if til.mask_heads > 1 else 0
    base = _table_row(b, nm, qi, n_rows=til.num_q_blocks, nm_total=til.mask_heads, width=V + 1)
    count = tab_ref[base]
    entry = tab_ref[base + 1 + j]
    kj, partial = entry // 2, entry % 2 == 1
    m_ref, l_ref, acc_ref = r["m"], r["l"], r["acc"]

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        if cfg.has_sinks:  # the sink is a key seen first: max = sink, sum = exp(0) = 1
            n0 = kh * cfg.G + gi * Gb
            for g in range(Gb):
                m_ref[g * Cq:(g + 1) * Cq, :] = jnp.full((Cq, LANES), r["sinks"][n0 + g], jnp.float32)
            l_ref[...] = jnp.ones_like(l_ref)
        else:
            m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
            l_ref[...] = jnp.zeros_like(l_ref)
        if debug:
            r["cnt"][...] = jnp.zeros_like(r["cnt"])

    def step(masked):
        q = r["q"][...].reshape(R, cfg.Hp)
        s = lax.dot_general(q, r["k"][...], NT, preferred_element_type=jnp.float32)
        s, _ = logits2(s, cfg.scale, cfg.softcap)
        if masked:
            s = _mask_rows(s, _vis(cfg, til, r, qi, kj, transposed=False), Gb, Cq)
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        # A row with nothing visible yet has max -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next) if masked else m_next
        p = jnp.exp2(s - m_safe[:, :1])
        alpha = jnp.exp2(m_prev - m_safe)
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        v = r["v"][...]
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
        acc_ref[...] = acc_ref[...] * alpha[:, :1] + pv
        if debug:
            row = lax.broadcasted_iota(jnp.int32, (SUBLANES, LANES), 0)
            r["cnt"][...] += jnp.where((row == 0) | ((row == 1) & masked), 1, 0)

    @pl.when((j < count) & partial)
    def _partial():
        step(True)

    @pl.when((j < count) & jnp.logical_not(partial))
    def _full():
        step(False)

    @pl.when(j == V - 1)
    def _finalize():
        l, m = l_ref[:, :1], m_ref[:, :1]
        seen = l > 0.0
        l_safe = jnp.where(seen, l, 1.0)
        o = acc_ref[...] * (1.0 / l_safe)
        r["o"][...] = o.reshape(Gb, Cq, cfg.Ep).astype(r["o"].dtype)
        lse = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)
        for g in range(Gb):
            r["lse"][g] = _col_to_row(lse[g * Cq:(g + 1) * Cq])
        if debug:
            r["dbg"][...] = r["cnt"][...]


def forward(cfg: KernelCfg, til: Tiling, table, q, k, v, extras, sinks2, *, out_dtype=None,
            debug=False):
    """Run the forward kernel: ``o [B,K,G,Tp,Ep]`` in ``out_dtype`` (default q's), lse
    rows, debug counts or None."""
    B, K, nGb, Gb = cfg.B, cfg.K, cfg.nGb, cfg.Gb
    Cq, Ck, V, nQ = til.block_q, til.block_kv, til.max_kv_visits, til.num_q_blocks
    R = Gb * Cq
    W = V + 1

    def kv_block(b, kh, gi, qi, j, tab):
        nm = kh * cfg.G + gi * Gb if til.mask_heads > 1 else 0
        return tab[_table_row(b, nm, qi, n_rows=nQ, nm_total=til.mask_heads, width=W) + 1 + j] // 2

    qmap = lambda b, kh, gi, qi, j, tab: qi
    specs = [
        ("q", pl.BlockSpec((None, None, Gb, Cq, cfg.Hp), lambda b, kh, gi, qi, j, t: (b, kh, gi, qi, 0))),
        ("k", pl.BlockSpec((None, None, Ck, cfg.Hp), lambda *a: (a[0], a[1], kv_block(*a), 0))),
        ("v", pl.BlockSpec((None, None, Ck, cfg.Ep), lambda *a: (a[0], a[1], kv_block(*a), 0))),
    ] + _mask_specs(cfg, til, qmap, kv_block, transposed=False)
    args = [q, k, v] + [extras[name] for name, _ in specs[3:]]
    if cfg.has_sinks:
        specs.append(("sinks", pl.BlockSpec(memory_space=_compat.tpu_smem())))
        args.append(sinks2)
    out_specs = [
        ("o", pl.BlockSpec((None, None, Gb, Cq, cfg.Ep), lambda b, kh, gi, qi, j, t: (b, kh, gi, qi, 0))),
        ("lse", pl.BlockSpec((None, None, Gb, 1, Cq), lambda b, kh, gi, qi, j, t: (b, kh, gi, 0, qi))),
    ]
    out_shape = [jax.ShapeDtypeStruct((B, K, cfg.G, til.q_padded, cfg.Ep), out_dtype or q.dtype),
                 jax.ShapeDtypeStruct((B, K, cfg.G, 1, til.q_padded), jnp.float32)]
    if debug:
        out_specs.append(("dbg", pl.BlockSpec((None, None, None, None, SUBLANES, LANES),
                                              lambda b, kh, gi, qi, j, t: (b, kh, gi, qi, 0, 0))))
        out_shape.append(jax.ShapeDtypeStruct((B, K, nGb, nQ, SUBLANES, LANES), jnp.int32))
    scratch = [("m", (R, LANES), jnp.float32), ("l", (R, LANES), jnp.float32),
               ("acc", (R, cfg.Ep), jnp.float32)]
    if debug:
        scratch.append(("cnt", (SUBLANES, LANES), jnp.int32))
    names = [n for n, _ in specs] + [n for n, _ in out_specs] + [n for n, *_ in scratch]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, til=til, names=names, debug=debug)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(B, K, nGb, nQ, V),
        in_specs=[s for _, s in specs], out_specs=[s for _, s in out_specs],
        scratch_shapes=[_compat.tpu_vmem(shape, dt) for _, shape, dt in scratch])
    outs = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shape, name="flash_fwd_tpu",
        **_params(cfg, ("parallel", "parallel", "parallel", "parallel", "arbitrary")),
    )(table.reshape(-1), *args)
    return outs if debug else (*outs, None)


# --------------------------------------------------------------------------- dQ
def _dq_kernel(tab_ref, *refs, cfg: KernelCfg, til: Tiling, names):
    r = dict(zip(names, refs))
    b, kh, gi, qi, j = (pl.program_id(i) for i in range(5))
    Gb, Cq, V = cfg.Gb, til.block_q, til.max_kv_visits
    R = Gb * Cq
    nm = kh * cfg.G + gi * Gb if til.mask_heads > 1 else 0
    base = _table_row(b, nm, qi, n_rows=til.num_q_blocks, nm_total=til.mask_heads, width=V + 1)
    count = tab_ref[base]
    entry = tab_ref[base + 1 + j]
    kj, partial = entry // 2, entry % 2 == 1

    @pl.when(j == 0)
    def _init():
        r["acc"][...] = jnp.zeros_like(r["acc"])
        # lse / D arrive lane-dense as rows; turn them into columns once per q block.
        for g in range(Gb):
            rows = slice(g * Cq, (g + 1) * Cq)
            r["lse_col"][rows, :] = jnp.broadcast_to(_row_to_col(r["lse"][g]), (Cq, LANES))
            r["d_col"][rows, :] = jnp.broadcast_to(_row_to_col(r["d"][g]), (Cq, LANES))

    def step(masked):
        q = r["q"][...].reshape(R, cfg.Hp)
        k = r["k"][...]
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32)
        s, t = logits2(s, cfg.scale, cfg.softcap)
        if masked:
            s = _mask_rows(s, _vis(cfg, til, r, qi, kj, transposed=False), Gb, Cq)
        p = jnp.exp2(s - r["lse_col"][:, :1])
        do = r["do"][...].reshape(R, cfg.Ep)
        dp = lax.dot_general(do, r["v"][...], NT, preferred_element_type=jnp.float32)
        ds = p * (dp - r["d_col"][:, :1])
        if t is not None:
            ds = ds * (1.0 - t * t)
        r["acc"][...] += lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=jnp.float32)

    @pl.when((j < count) & partial)
    def _partial():
        step(True)

    @pl.when((j < count) & jnp.logical_not(partial))
    def _full():
        step(False)

    @pl.when(j == V - 1)
    def _finalize():
        dq = r["acc"][...] * cfg.scale
        r["dq"][...] = dq.reshape(Gb, Cq, cfg.Hp).astype(r["dq"].dtype)


def backward_dq(cfg: KernelCfg, til: Tiling, table, q, k, v, do, lse2_rows, d_rows, extras):
    """dQ kernel: returns ``dq [B, K, G, Tp, Hp]``."""
    B, K, nGb, Gb = cfg.B, cfg.K, cfg.nGb, cfg.Gb
    Cq, Ck, V, nQ = til.block_q, til.block_kv, til.max_kv_visits, til.num_q_blocks
    R = Gb * Cq

    def kv_block(b, kh, gi, qi, j, tab):
        nm = kh * cfg.G + gi * Gb if til.mask_heads > 1 else 0
        return tab[_table_row(b, nm, qi, n_rows=nQ, nm_total=til.mask_heads, width=V + 1) + 1 + j] // 2

    qmap = lambda b, kh, gi, qi, j, tab: qi
    qblock = lambda b, kh, gi, qi, j, t: (b, kh, gi, qi, 0)
    rowblock = lambda b, kh, gi, qi, j, t: (b, kh, gi, 0, qi)  # [B, K, G, 1, Tp] rows
    specs = [
        ("q", pl.BlockSpec((None, None, Gb, Cq, cfg.Hp), qblock)),
        ("k", pl.BlockSpec((None, None, Ck, cfg.Hp), lambda *a: (a[0], a[1], kv_block(*a), 0))),
        ("v", pl.BlockSpec((None, None, Ck, cfg.Ep), lambda *a: (a[0], a[1], kv_block(*a), 0))),
        ("do", pl.BlockSpec((None, None, Gb, Cq, cfg.Ep), qblock)),
        ("lse", pl.BlockSpec((None, None, Gb, 1, Cq), rowblock)),
        ("d", pl.BlockSpec((None, None, Gb, 1, Cq), rowblock)),
    ]
    mspecs = _mask_specs(cfg, til, qmap, kv_block, transposed=False)
    args = [q, k, v, do, lse2_rows, d_rows] + [extras[n] for n, _ in mspecs]
    specs += mspecs
    out_specs = [("dq", pl.BlockSpec((None, None, Gb, Cq, cfg.Hp), qblock))]
    scratch = [("acc", (R, cfg.Hp), jnp.float32), ("lse_col", (R, LANES), jnp.float32),
               ("d_col", (R, LANES), jnp.float32)]
    names = [n for n, _ in specs] + ["dq"] + [n for n, *_ in scratch]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(B, K, nGb, nQ, V),
        in_specs=[s for _, s in specs], out_specs=[s for _, s in out_specs],
        scratch_shapes=[_compat.tpu_vmem(shape, dt) for _, shape, dt in scratch])
    (dq,) = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, til=til, names=names),
        grid_spec=grid_spec, name="flash_dq_tpu",
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        **_params(cfg, ("parallel", "parallel", "parallel", "parallel", "arbitrary")),
    )(table.reshape(-1), *args)
    return dq


# --------------------------------------------------------------------------- dK / dV
def _dkv_kernel(tab_ref, *refs, cfg: KernelCfg, til: Tiling, names):
    r = dict(zip(names, refs))
    b, kh, kj, gi, j = (pl.program_id(i) for i in range(5))
    Gb, Cq, V = cfg.Gb, til.block_q, til.max_q_visits
    R = Gb * Cq
    nm = kh * cfg.G + gi * Gb if til.mask_heads > 1 else 0
    base = _table_row(b, nm, kj, n_rows=til.num_kv_blocks, nm_total=til.mask_heads, width=V + 1)
    count = tab_ref[base]
    entry = tab_ref[base + 1 + j]
    qi, partial = entry // 2, entry % 2 == 1

    @pl.when((gi == 0) & (j == 0))
    def _init():
        r["dk_acc"][...] = jnp.zeros_like(r["dk_acc"])
        r["dv_acc"][...] = jnp.zeros_like(r["dv_acc"])

    def step(masked):
        k, v = r["k"][...], r["v"][...]
        vis = _vis(cfg, til, r, qi, kj, transposed=True) if masked else None

        # One head at a time: no lane concatenation / unaligned lane slices needed.
        def head(g, carry):
            dk, dv = carry
            q, do = r["q"][g], r["do"][g]
            sT = lax.dot_general(k, q, NT, preferred_element_type=jnp.float32)  # [Ck, Cq]
            sT, tT = logits2(sT, cfg.scale, cfg.softcap)
            if vis is not None:
                sT = jnp.where(vis, sT, -jnp.inf)
            pT = jnp.exp2(sT - r["lse"][g])
            dv = dv + lax.dot_general(pT.astype(do.dtype), do, NN, preferred_element_type=jnp.float32)
            dpT = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)
            dsT = pT * (dpT - r["d"][g])
            if tT is not None:
                dsT = dsT * (1.0 - tT * tT)
            dk = dk + lax.dot_general(dsT.astype(q.dtype), q, NN, preferred_element_type=jnp.float32)
            return dk, dv

        # Unrolled on hardware (static head slices); rolled when interpreted, which
        # only shrinks the CPU program.
        dk, dv = lax.fori_loop(0, Gb, head, (jnp.zeros_like(r["dk_acc"]), jnp.zeros_like(r["dv_acc"])),
                               unroll=not cfg.interpret)
        r["dv_acc"][...] += dv
        r["dk_acc"][...] += dk

    @pl.when((j < count) & partial)
    def _partial():
        step(True)

    @pl.when((j < count) & jnp.logical_not(partial))
    def _full():
        step(False)

    @pl.when((gi == cfg.nGb - 1) & (j == V - 1))
    def _finalize():
        r["dk"][...] = (r["dk_acc"][...] * cfg.scale).astype(r["dk"].dtype)
        r["dv"][...] = r["dv_acc"][...].astype(r["dv"].dtype)


def backward_dkv(cfg: KernelCfg, til: Tiling, table_t, q, k, v, do, lse2_rows, d_rows, extras):
    """dK/dV kernel over the transposed visit table: returns ``dk, dv [B, K, Sp, ·]``."""
    B, K, nGb, Gb = cfg.B, cfg.K, cfg.nGb, cfg.Gb
    Cq, Ck, V, nK = til.block_q, til.block_kv, til.max_q_visits, til.num_kv_blocks
    R = Gb * Cq

    def q_block(b, kh, kj, gi, j, tab):
        nm = kh * cfg.G + gi * Gb if til.mask_heads > 1 else 0
        return tab[_table_row(b, nm, kj, n_rows=nK, nm_total=til.mask_heads, width=V + 1) + 1 + j] // 2

    kmap = lambda b, kh, kj, gi, j, tab: kj
    kblock = lambda b, kh, kj, gi, j, t: (b, kh, kj, 0)
    specs = [
        ("k", pl.BlockSpec((None, None, Ck, cfg.Hp), kblock)),
        ("v", pl.BlockSpec((None, None, Ck, cfg.Ep), kblock)),
        ("q", pl.BlockSpec((None, None, Gb, Cq, cfg.Hp), lambda *a: (a[0], a[1], a[3], q_block(*a), 0))),
        ("do", pl.BlockSpec((None, None, Gb, Cq, cfg.Ep), lambda *a: (a[0], a[1], a[3], q_block(*a), 0))),
        ("lse", pl.BlockSpec((None, None, Gb, 1, Cq), lambda *a: (a[0], a[1], a[3], 0, q_block(*a)))),
        ("d", pl.BlockSpec((None, None, Gb, 1, Cq), lambda *a: (a[0], a[1], a[3], 0, q_block(*a)))),
    ]
    mspecs = _mask_specs(cfg, til, q_block, kmap, transposed=True)
    args = [k, v, q, do, lse2_rows, d_rows] + [extras[n] for n, _ in mspecs]
    specs += mspecs
    out_specs = [("dk", pl.BlockSpec((None, None, Ck, cfg.Hp), kblock)),
                 ("dv", pl.BlockSpec((None, None, Ck, cfg.Ep), kblock))]
    scratch = [("dk_acc", (Ck, cfg.Hp), jnp.float32), ("dv_acc", (Ck, cfg.Ep), jnp.float32)]
    names = [n for n, _ in specs] + ["dk", "dv"] + [n for n, *_ in scratch]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(B, K, nK, nGb, V),
        in_specs=[s for _, s in specs], out_specs=[s for _, s in out_specs],
        scratch_shapes=[_compat.tpu_vmem(shape, dt) for _, shape, dt in scratch])
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, til=til, names=names),
        grid_spec=grid_spec, name="flash_dkv_tpu",
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
    )(table_t.reshape(-1), *args)
    return dk, dv
