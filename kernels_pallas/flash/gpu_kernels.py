"""Pallas Mosaic GPU (Hopper, sm90) kernel bodies: forward, dQ and dK/dV.

Internal module: ``kernels_pallas.flash.gpu`` owns the public API and the plan,
``kernels_pallas.flash.shell`` the padding and the VJP.

Every kernel is warp specialised in the FlashAttention-3 way. A CTA runs
``nwg`` compute warpgroups (each owns 64 rows, the wgmma M) plus one producer
warpgroup that walks the CTA's visit-table row and TMA-copies the visited blocks
into a ring of ``stages`` SMEM slots. Each slot has a "full" barrier (TMA bytes
landed) and a "free" barrier (every compute warpgroup is done with it), so loads
for the next blocks run while the tensor cores work on this one. Matmuls are
``wgmma`` with both operands in SMEM (or the probabilities straight from
registers), accumulating in float32. With two compute warpgroups a schedule
barrier ping-pongs them, so one warpgroup's softmax overlaps the other's matmuls.

Skipped blocks are never loaded (they are not in the row); PARTIAL blocks take the
masked branch of a ``lax.cond`` built from the block's positions and segment ids
(``_common.visibility``); FULL blocks run without mask code.

Operands stay in ``[B, T, N, H]`` (TMA copies one head's ``[C, H]`` slab; K/V head
``n // G`` serves its G query heads). The wrapper pads T and S to block multiples
and H, E to multiples of 64 (128-byte swizzled SMEM tiles) only when needed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.flash._common import LN2, GpuKernelCfg, logits2, visibility
from kernels_pallas.flash._compat import mgpu_layout, mgpu_load_vec
from kernels_pallas.flash.masking import Tiling

WG = 64  # rows per compute warpgroup: the M of one wgmma


KernelCfg = GpuKernelCfg  # no launch parameters beyond the shared ones


@dataclasses.dataclass(frozen=True)
class Launch:
    """Per-kernel geometry: compute warpgroups per CTA and pipeline depth."""

    nwg: int
    stages: int


def _transforms(dtype, minor: int):
    """Tiling + swizzle for a ``[rows, minor]`` SMEM tile (what wgmma and TMA want)."""
    item = jnp.dtype(dtype).itemsize
    swz = next(s for s in (128, 64, 32) if (minor * item) % s == 0)
    return (plgpu.TilingTransform((8, swz // item)), plgpu.SwizzleTransform(swz))


def _smem(shape, dtype):
    return plgpu.SMEM(tuple(shape), dtype, transforms=_transforms(dtype, shape[-1]))


def _params(cfg: KernelCfg, interpret):
    if cfg.interpret:
        return dict(interpret=interpret)
    return dict(compiler_params=plgpu.CompilerParams(approx_math=True))


def _mm(a, b, shape):
    """``a @ b`` on the tensor cores into a fresh float32 accumulator."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _mm_acc(acc, a, b, *, interpret: bool):
    """``acc + a @ b``: wgmma accumulates in place in the accumulator registers.

    The 0.10 GPU interpreter has no rule for ``run_state`` (a pre-initialised
    accumulator), so interpret mode adds a fresh product instead: same math.
    """
    if interpret:
        return acc + _mm(a, b, acc.shape)

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(body)(plgpu.ACC.init(acc))


def _row(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def _col(x, shape):
    return lax.broadcast_in_dim(x, shape, [1])


def _zeros(cfg, shape):
    return mgpu_layout(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA, interpret=cfg.interpret)


def _tile_vis(cfg: KernelCfg, til: Tiling, vecs, *, row0, col0, shape, transposed):
    """Visibility ``[rows, cols]`` of a PARTIAL tile (rows = queries unless ``transposed``).

    ``vecs`` maps the mask inputs present (qpos, kvpos, qseg, kvseg) to 1-D SMEM refs
    holding this tile's rows or columns (Mosaic GPU loads WGMMA-layout vectors from
    SMEM only, so they arrive by TMA like the operands).
    """
    L = plgpu.Layout.WGMMA
    iota = lambda ax: mgpu_layout(lax.broadcasted_iota(jnp.int32, shape, ax), L,
                                  interpret=cfg.interpret)
    ri, ci = row0 + iota(0), col0 + iota(1)
    (q_idx, q_ax), (k_idx, k_ax) = ((ci, 1), (ri, 0)) if transposed else ((ri, 0), (ci, 1))

    def vec(name, axis):
        # A per-token vector of this tile's rows (axis 0) or columns (axis 1).
        v = mgpu_load_vec(vecs[name], L.reduce(1 - axis), interpret=cfg.interpret)
        return lax.broadcast_in_dim(v, shape, [axis])

    qp = vec("qpos", q_ax) if cfg.has_qpos else q_idx
    kp = vec("kvpos", k_ax) if cfg.has_kvpos else k_idx
    qs = vec("qseg", q_ax) if cfg.has_seg else None
    ks = vec("kvseg", k_ax) if cfg.has_seg else None
    return visibility(qp, kp, qs, ks, k_idx, left=cfg.left, right=cfg.right,
                      kv_len=til.kv_len, kv_padded=til.kv_padded)


def _masked_logits(cfg, til, vecs, s, partial, **where):
    """``s`` with hidden elements at -inf when the block is PARTIAL (FULL: untouched)."""
    def mask(x):
        vis = _tile_vis(cfg, til, vecs, shape=x.shape, **where)
        return x if vis is None else jnp.where(vis, x, -jnp.inf)
    if _tile_vis_is_trivial(cfg, til):
        return s
    return lax.cond(partial == 1, mask, lambda x: x, s)


def _tile_vis_is_trivial(cfg, til):
    """No rule can hide an element (no mask at all, no padded keys)."""
    return (cfg.left is None and cfg.right is None and not cfg.has_seg
            and til.kv_padded == til.kv_len)


def _extras(cfg: KernelCfg):
    """Names of the optional per-token mask inputs, in call order."""
    return ((["qpos"] if cfg.has_qpos else []) + (["kvpos"] if cfg.has_kvpos else [])
            + (["qseg", "kvseg"] if cfg.has_seg else []))


def _side(cfg: KernelCfg, side: str):
    """The mask inputs indexed by queries (``"q"``) or by keys (``"kv"``)."""
    return [n for n in _extras(cfg) if n.startswith(side)]


_VEC_DTYPE = {"qpos": jnp.int32, "kvpos": jnp.int32, "qseg": jnp.int32, "kvseg": jnp.int32,
              "lse": jnp.float32, "d": jnp.float32}


def _once_scratch(names, nwg):
    """Per-warpgroup SMEM rows + barriers for vectors loaded once per CTA."""
    return ([(n + "_s", plgpu.SMEM((nwg, WG), _VEC_DTYPE[n])) for n in names]
            + [(n + "_b", plgpu.Barrier(num_barriers=nwg)) for n in names])


def _load_once(r, names, src, wg):
    """TMA the warpgroup's row of each vector in ``names`` (``src(name)``) and wait."""
    for n in names:
        plgpu.copy_gmem_to_smem(src(n), r[n + "_s"].at[wg], r[n + "_b"].at[wg])
    for n in names:
        plgpu.barrier_wait(r[n + "_b"].at[wg])
    return {n: r[n + "_s"].at[wg] for n in names}


def _ring_scratch(names, launch, block):
    """SMEM ring slots for vectors streamed with the operands (``[stages, block]``)."""
    return [(n + "_smem", plgpu.SMEM((launch.stages, block), _VEC_DTYPE[n])) for n in names]


def _ring(names):
    return [(n + "_smem", n + "_full", n + "_free") for n in names]


def _producer(cfg, launch, r, *, rows, copies):
    """The TMA warpgroup: walk the visit rows and fill the SMEM ring.

    ``rows`` is a list of ``(count, entry(j) -> block, slab(block) -> (src, ...))``
    walked in order with one running step counter (the dK/dV kernel has G rows);
    ``copies`` names the ``(smem ring, full, free)`` triples in ``slab`` order.
    """
    if not cfg.interpret:
        plgpu.set_max_registers(40, action="decrease")
    st = launch.stages

    def row(g, t):
        count, entry, slab = rows(g)

        def body(j, t):
            slot = lax.rem(t, st)
            for src, (buf, full, free) in zip(slab(entry(j) // 2), copies):
                @pl.when(t >= st)  # the slot's previous block must be consumed first
                def _():
                    plgpu.barrier_wait(r[free].at[slot])
                plgpu.copy_gmem_to_smem(src, r[buf].at[slot], r[full].at[slot])
            return t + 1
        return lax.fori_loop(0, count, body, t)
    return row


def _pingpong(r, launch):
    """Arrive + wait on the schedule barrier (two compute warpgroups take turns)."""
    if launch.nwg == 2:
        plgpu.barrier_arrive(r["sched"])
        plgpu.barrier_wait(r["sched"])


def _kernel_call(body, cfg, launch, grid, names_in, out_types, scratch, interpret):
    """``plgpu.kernel`` with named refs: ``body(r)`` sees inputs, outputs and scratch."""
    out_names = [n for n, _ in out_types]
    scr_names = [n for n, _ in scratch]

    def entry(*refs):
        body(dict(zip(list(names_in) + out_names + scr_names, refs)))

    return plgpu.kernel(
        entry, out_type=[t for _, t in out_types], scratch_types=[s for _, s in scratch],
        grid=grid, grid_names=("i", "h", "b"), num_threads=launch.nwg + 1, thread_name="wg",
        **_params(cfg, interpret))


def _barriers(launch, *ring, sched=False):
    out = []
    for nm in ring:
        out += [(nm + "_full", plgpu.Barrier(num_barriers=launch.stages)),
                (nm + "_free", plgpu.Barrier(num_arrivals=launch.nwg, num_barriers=launch.stages))]
    if sched and launch.nwg == 2:
        out.append(("sched", plgpu.Barrier(num_arrivals=2)))
    return out


# --------------------------------------------------------------------------- forward
def o_reuses_q_tile(cfg: KernelCfg, dtype, out_dtype) -> bool:
    """O is staged in Q's SMEM tile when shape and dtype agree (Q is dead after the loop)."""
    return cfg.Ep == cfg.Hp and jnp.dtype(out_dtype) == jnp.dtype(dtype)


def forward(cfg: KernelCfg, til: Tiling, launch: Launch, table, q, k, v, extras, sinks2,
            *, out_dtype=None, interpret=None):
    """Forward kernel: ``o [B, Tp, N, Ep]`` in ``out_dtype`` (default q's: a float32 ``o``
    is the accumulator unrounded, staged in its own SMEM tile), ``lse [B, N, Tp]``."""
    nwg, st, Ck, G = launch.nwg, launch.stages, til.block_kv, cfg.G
    assert til.block_q == nwg * WG
    dt = q.dtype
    odt = jnp.dtype(out_dtype or dt)
    names = ["tab", "q", "k", "v"] + _extras(cfg) + (["sinks"] if cfg.has_sinks else [])
    args = [table, q, k, v] + [extras[n] for n in _extras(cfg)] + (
        [sinks2] if cfg.has_sinks else [])
    out_types = [("o", jax.ShapeDtypeStruct((cfg.B, til.q_padded, cfg.N, cfg.Ep), odt)),
                 ("lse", jax.ShapeDtypeStruct((cfg.B, cfg.N, til.q_padded), jnp.float32))]
    scratch = [("q_smem", _smem((nwg, WG, cfg.Hp), dt))] + (
        [] if o_reuses_q_tile(cfg, dt, odt) else [("o_smem", _smem((nwg, WG, cfg.Ep), odt))]) + [
               ("lse_smem", plgpu.SMEM((nwg, WG), jnp.float32)),
               ("k_smem", _smem((st, Ck, cfg.Hp), dt)),
               ("v_smem", _smem((st, Ck, cfg.Ep), dt)),
               ("q_bar", plgpu.Barrier(num_barriers=nwg))]
    qside, kside = _side(cfg, "q"), _side(cfg, "kv")
    scratch += (_once_scratch(qside, nwg) + _ring_scratch(kside, launch, Ck)
                + _barriers(launch, "k", "v", *kside, sched=True))

    def body(r):
        qi, n, b = lax.axis_index("i"), lax.axis_index("h"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        nm = n if til.mask_heads > 1 else 0
        count = r["tab"][b, nm, qi, 0]
        entry = lambda j: r["tab"][b, nm, qi, 1 + j]

        @pl.when(wg < nwg)
        def _compute():
            if not cfg.interpret:
                plgpu.set_max_registers(232 if nwg == 2 else 240, action="increase")
            q0 = qi * til.block_q + wg * WG
            q_smem = r["q_smem"].at[wg]
            plgpu.copy_gmem_to_smem(r["q"].at[b, pl.ds(q0, WG), n], q_smem, r["q_bar"].at[wg])
            qvecs = _load_once(r, qside, lambda nm_: r[nm_].at[b, pl.ds(q0, WG)], wg)
            plgpu.barrier_wait(r["q_bar"].at[wg])
            row_l = plgpu.Layout.WGMMA.reduce(1)
            if cfg.has_sinks:  # the sink is a key seen first: max = sink, sum = exp2(0)
                m0 = jnp.full((WG,), r["sinks"][n], jnp.float32)
                l0 = jnp.ones((WG,), jnp.float32)
            else:
                m0 = jnp.full((WG,), -jnp.inf, jnp.float32)
                l0 = jnp.zeros((WG,), jnp.float32)
            carry0 = (mgpu_layout(m0, row_l, interpret=cfg.interpret),
                      mgpu_layout(l0, row_l, interpret=cfg.interpret), _zeros(cfg, (WG, cfg.Ep)))

            @pl.when(wg == 1)
            def _():
                _pingpong(r, launch)  # warpgroup 1 starts half a turn behind

            def step(j, carry):
                m, l, acc = carry
                e = entry(j)
                slot = lax.rem(j, st)
                plgpu.barrier_wait(r["k_full"].at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(r["k_smem"].at[slot], (1, 0)))
                    _pingpong(r, launch)  # let the other warpgroup issue while this one waits
                    return acc_ref[...]
                s = pl.run_scoped(qk, plgpu.ACC((WG, Ck), jnp.float32))
                plgpu.barrier_arrive(r["k_free"].at[slot])
                s, _ = logits2(s, cfg.scale, cfg.softcap)
                for nm_ in kside:
                    plgpu.barrier_wait(r[nm_ + "_full"].at[slot])
                vecs = dict(qvecs, **{nm_: r[nm_ + "_smem"].at[slot] for nm_ in kside})
                s = _masked_logits(cfg, til, vecs, s, e % 2, row0=q0, col0=(e // 2) * Ck,
                                   transposed=False)
                for nm_ in kside:
                    plgpu.barrier_arrive(r[nm_ + "_free"].at[slot])
                m_new = jnp.maximum(m, jnp.max(s, axis=1))
                # Nothing visible yet: shift by 0 so exp2(-inf) = 0 instead of NaN.
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp2(s - _row(m_safe, s.shape))
                alpha = jnp.exp2(m - m_safe)
                l = alpha * l + jnp.sum(p, axis=1)
                acc = acc * _row(alpha, acc.shape)
                p16 = p.astype(dt)
                _pingpong(r, launch)  # softmax done: hand the tensor cores over
                plgpu.barrier_wait(r["v_full"].at[slot])
                acc = _mm_acc(acc, p16, r["v_smem"].at[slot], interpret=cfg.interpret)
                plgpu.barrier_arrive(r["v_free"].at[slot])
                return m_new, l, acc

            m, l, acc = lax.fori_loop(0, count, step, carry0)

            @pl.when(wg == 0)
            def _():
                _pingpong(r, launch)  # balance warpgroup 1's head start

            seen = l > 0.0
            l_safe = jnp.where(seen, l, 1.0)
            o_smem = r.get("o_smem", r["q_smem"]).at[wg]
            lse_smem = r["lse_smem"].at[wg]
            o_smem[...] = (acc / _row(l_safe, acc.shape)).astype(odt)
            lse_smem[...] = jnp.where(seen, m * LN2 + jnp.log(l_safe), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, r["o"].at[b, pl.ds(q0, WG), n])
            plgpu.copy_smem_to_gmem(lse_smem, r["lse"].at[b, n, pl.ds(q0, WG)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == nwg)
        def _memory():
            kvh = n // G
            rows = lambda g: (count, entry, lambda kj: (
                r["k"].at[b, pl.ds(kj * Ck, Ck), kvh], r["v"].at[b, pl.ds(kj * Ck, Ck), kvh],
                *(r[nm_].at[b, pl.ds(kj * Ck, Ck)] for nm_ in kside)))
            _producer(cfg, launch, r, rows=rows, copies=_ring(["k", "v", *kside]))(0, 0)

    call = _kernel_call(body, cfg, launch, (til.num_q_blocks, cfg.N, cfg.B), names, out_types,
                        scratch, interpret)
    return call(*args)


# --------------------------------------------------------------------------- dQ
def backward_dq(cfg: KernelCfg, til: Tiling, launch: Launch, table, q, k, v, do, lse2, d,
                extras, *, interpret=None):
    """dQ kernel: ``dq [B, Tp, N, Hp]``; ``lse2`` is base 2, +inf on padded rows."""
    nwg, st, Ck, G = launch.nwg, launch.stages, til.block_kv, cfg.G
    assert til.block_q == nwg * WG
    dt = q.dtype
    names = ["tab", "q", "k", "v", "do", "lse", "d"] + _extras(cfg)
    args = [table, q, k, v, do, lse2, d] + [extras[n] for n in _extras(cfg)]
    out_types = [("dq", jax.ShapeDtypeStruct(q.shape, dt))]
    scratch = [("q_smem", _smem((nwg, WG, cfg.Hp), dt)),
               ("do_smem", _smem((nwg, WG, cfg.Ep), dt)),
               ("k_smem", _smem((st, Ck, cfg.Hp), dt)),
               ("v_smem", _smem((st, Ck, cfg.Ep), dt)),
               ("q_bar", plgpu.Barrier(num_barriers=nwg)),
               ("do_bar", plgpu.Barrier(num_barriers=nwg))]
    qside, kside = _side(cfg, "q") + ["lse", "d"], _side(cfg, "kv")
    scratch += (_once_scratch(qside, nwg) + _ring_scratch(kside, launch, Ck)
                + _barriers(launch, "k", "v", *kside))

    def body(r):
        qi, n, b = lax.axis_index("i"), lax.axis_index("h"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        nm = n if til.mask_heads > 1 else 0
        count = r["tab"][b, nm, qi, 0]
        entry = lambda j: r["tab"][b, nm, qi, 1 + j]

        @pl.when(wg < nwg)
        def _compute():
            if not cfg.interpret:
                plgpu.set_max_registers(232 if nwg == 2 else 240, action="increase")
            q0 = qi * til.block_q + wg * WG
            q_smem, do_smem = r["q_smem"].at[wg], r["do_smem"].at[wg]
            rows = (b, pl.ds(q0, WG), n)
            plgpu.copy_gmem_to_smem(r["q"].at[rows], q_smem, r["q_bar"].at[wg])
            plgpu.copy_gmem_to_smem(r["do"].at[rows], do_smem, r["do_bar"].at[wg])
            row_l = plgpu.Layout.WGMMA.reduce(1)
            qvecs = _load_once(r, qside, lambda nm_: (r[nm_].at[b, n, pl.ds(q0, WG)] if nm_ in
                                                       ("lse", "d") else r[nm_].at[b, pl.ds(q0, WG)]), wg)
            lse2 = mgpu_load_vec(qvecs["lse"], row_l, interpret=cfg.interpret)
            dd = mgpu_load_vec(qvecs["d"], row_l, interpret=cfg.interpret)
            plgpu.barrier_wait(r["q_bar"].at[wg])
            plgpu.barrier_wait(r["do_bar"].at[wg])

            def step(j, dq):
                e = entry(j)
                slot = lax.rem(j, st)
                plgpu.barrier_wait(r["k_full"].at[slot])
                k_smem = r["k_smem"].at[slot]
                s = _mm(q_smem, plgpu.transpose_ref(k_smem, (1, 0)), (WG, Ck))
                s, t = logits2(s, cfg.scale, cfg.softcap)
                for nm_ in kside:
                    plgpu.barrier_wait(r[nm_ + "_full"].at[slot])
                vecs = dict(qvecs, **{nm_: r[nm_ + "_smem"].at[slot] for nm_ in kside})
                s = _masked_logits(cfg, til, vecs, s, e % 2, row0=q0, col0=(e // 2) * Ck,
                                   transposed=False)
                for nm_ in kside:
                    plgpu.barrier_arrive(r[nm_ + "_free"].at[slot])
                p = jnp.exp2(s - _row(lse2, s.shape))
                plgpu.barrier_wait(r["v_full"].at[slot])
                dp = _mm(do_smem, plgpu.transpose_ref(r["v_smem"].at[slot], (1, 0)), (WG, Ck))
                plgpu.barrier_arrive(r["v_free"].at[slot])
                ds = p * (dp - _row(dd, dp.shape))
                if t is not None:
                    ds = ds * (1.0 - t * t)
                dq = _mm_acc(dq, ds.astype(dt), k_smem, interpret=cfg.interpret)
                plgpu.barrier_arrive(r["k_free"].at[slot])
                return dq

            dq = lax.fori_loop(0, count, step, _zeros(cfg, (WG, cfg.Hp)))
            q_smem[...] = (dq * cfg.scale).astype(dt)  # Q is no longer needed: reuse its tile
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, r["dq"].at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == nwg)
        def _memory():
            kvh = n // G
            rows = lambda g: (count, entry, lambda kj: (
                r["k"].at[b, pl.ds(kj * Ck, Ck), kvh], r["v"].at[b, pl.ds(kj * Ck, Ck), kvh],
                *(r[nm_].at[b, pl.ds(kj * Ck, Ck)] for nm_ in kside)))
            _producer(cfg, launch, r, rows=rows, copies=_ring(["k", "v", *kside]))(0, 0)

    call = _kernel_call(body, cfg, launch, (til.num_q_blocks, cfg.N, cfg.B), names, out_types,
                        scratch, interpret)
    return call(*args)


# --------------------------------------------------------------------------- dK / dV
def backward_dkv(cfg: KernelCfg, til: Tiling, launch: Launch, table_t, q, k, v, do, lse2, d,
                 extras, *, interpret=None):
    """dK/dV kernel over the transposed table: ``dk [B, Sp, K, Hp]``, ``dv [B, Sp, K, Ep]``.

    A CTA owns ``nwg·64`` keys of one kv head and streams, for each of the G query
    heads, the query blocks that see them (Q, dO through the SMEM ring; lse and D
    rows straight from global memory).
    """
    nwg, st, Cq, G = launch.nwg, launch.stages, til.block_q, cfg.G
    assert til.block_kv == nwg * WG
    dt = q.dtype
    per_head = til.mask_heads > 1
    names = ["tab", "q", "k", "v", "do", "lse", "d"] + _extras(cfg)
    args = [table_t, q, k, v, do, lse2, d] + [extras[n] for n in _extras(cfg)]
    out_types = [("dk", jax.ShapeDtypeStruct(k.shape, dt)),
                 ("dv", jax.ShapeDtypeStruct(v.shape, dt))]
    scratch = [("k_smem", _smem((nwg, WG, cfg.Hp), dt)),
               ("v_smem", _smem((nwg, WG, cfg.Ep), dt)),
               ("q_smem", _smem((st, Cq, cfg.Hp), dt)),
               ("do_smem", _smem((st, Cq, cfg.Ep), dt)),
               ("k_bar", plgpu.Barrier(num_barriers=nwg)),
               ("v_bar", plgpu.Barrier(num_barriers=nwg))]
    kside, qside = _side(cfg, "kv"), _side(cfg, "q") + ["lse", "d"]
    scratch += (_once_scratch(kside, nwg) + _ring_scratch(qside, launch, Cq)
                + _barriers(launch, "q", "do", *qside))

    def body(r):
        kj, kvh, b = lax.axis_index("i"), lax.axis_index("h"), lax.axis_index("b")
        wg = lax.axis_index("wg")

        def rows(g):
            h = kvh * G + g
            nm = h if per_head else 0
            slab = lambda qi: (
                r["q"].at[b, pl.ds(qi * Cq, Cq), h], r["do"].at[b, pl.ds(qi * Cq, Cq), h],
                *(r[nm_].at[b, h, pl.ds(qi * Cq, Cq)] if nm_ in ("lse", "d")
                  else r[nm_].at[b, pl.ds(qi * Cq, Cq)] for nm_ in qside))
            return r["tab"][b, nm, kj, 0], (lambda j: r["tab"][b, nm, kj, 1 + j]), slab

        @pl.when(wg < nwg)
        def _compute():
            if not cfg.interpret:
                plgpu.set_max_registers(232 if nwg == 2 else 240, action="increase")
            k0 = kj * til.block_kv + wg * WG
            k_smem, v_smem = r["k_smem"].at[wg], r["v_smem"].at[wg]
            keys = (b, pl.ds(k0, WG), kvh)
            plgpu.copy_gmem_to_smem(r["k"].at[keys], k_smem, r["k_bar"].at[wg])
            plgpu.copy_gmem_to_smem(r["v"].at[keys], v_smem, r["v_bar"].at[wg])
            kvecs = _load_once(r, kside, lambda nm_: r[nm_].at[b, pl.ds(k0, WG)], wg)
            plgpu.barrier_wait(r["k_bar"].at[wg])
            plgpu.barrier_wait(r["v_bar"].at[wg])
            col_l = plgpu.Layout.WGMMA.reduce(0)

            def head(g, carry):
                count, entry, _ = rows(g)

                def step(j, carry):
                    t_step, dk, dv = carry
                    e = entry(j)
                    q0 = (e // 2) * Cq
                    slot = lax.rem(t_step, st)
                    plgpu.barrier_wait(r["q_full"].at[slot])
                    q_smem = r["q_smem"].at[slot]
                    sT = _mm(k_smem, plgpu.transpose_ref(q_smem, (1, 0)), (WG, Cq))
                    sT, tT = logits2(sT, cfg.scale, cfg.softcap)
                    for nm_ in qside:
                        plgpu.barrier_wait(r[nm_ + "_full"].at[slot])
                    vecs = dict(kvecs, **{nm_: r[nm_ + "_smem"].at[slot] for nm_ in qside})
                    sT = _masked_logits(cfg, til, vecs, sT, e % 2, row0=k0, col0=q0,
                                        transposed=True)
                    lse2 = mgpu_load_vec(vecs["lse"], col_l, interpret=cfg.interpret)
                    dd = mgpu_load_vec(vecs["d"], col_l, interpret=cfg.interpret)
                    for nm_ in qside:
                        plgpu.barrier_arrive(r[nm_ + "_free"].at[slot])
                    pT = jnp.exp2(sT - _col(lse2, sT.shape))
                    plgpu.barrier_wait(r["do_full"].at[slot])
                    do_smem = r["do_smem"].at[slot]
                    dv = _mm_acc(dv, pT.astype(dt), do_smem, interpret=cfg.interpret)
                    dpT = _mm(v_smem, plgpu.transpose_ref(do_smem, (1, 0)), (WG, Cq))
                    plgpu.barrier_arrive(r["do_free"].at[slot])
                    dsT = pT * (dpT - _col(dd, dpT.shape))
                    if tT is not None:
                        dsT = dsT * (1.0 - tT * tT)
                    dk = _mm_acc(dk, dsT.astype(dt), q_smem, interpret=cfg.interpret)
                    plgpu.barrier_arrive(r["q_free"].at[slot])
                    return t_step + 1, dk, dv

                return lax.fori_loop(0, count, step, carry)

            _, dk, dv = lax.fori_loop(0, G, head, (jnp.int32(0), _zeros(cfg, (WG, cfg.Hp)),
                                                   _zeros(cfg, (WG, cfg.Ep))))
            k_smem[...] = (dk * cfg.scale).astype(dt)  # K and V are done: reuse their tiles
            v_smem[...] = dv.astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, r["dk"].at[keys])
            plgpu.copy_smem_to_gmem(v_smem, r["dv"].at[keys])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == nwg)
        def _memory():
            walk = _producer(cfg, launch, r, rows=rows,
                             copies=_ring(["q", "do", *qside]))
            lax.fori_loop(0, G, walk, jnp.int32(0))

    call = _kernel_call(body, cfg, launch, (til.num_kv_blocks, cfg.K, cfg.B), names, out_types,
                        scratch, interpret)
    return call(*args)
