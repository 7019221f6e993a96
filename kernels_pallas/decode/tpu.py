"""Split-K paged decode as a Pallas Mosaic TPU kernel (flash-decoding, GQA rows packed).

Grid ``(B, X, pps)``: batch row, split, step within the split. The live page list of
row b (``common.live_pages``) and its count are scalar-prefetched into SMEM; step j of
split x reads list entry ``e = x·pps + j``. The K/V ``index_map`` returns that page, so

* only live pages are DMA'd (empty and out-of-window pages never leave HBM),
* steps past the count repeat the previous page index (no new DMA) and run no math.

One program holds **all K kv heads** of a page (the pool is viewed as ``[P, C, K·H]``:
a free reshape, one contiguous ``C × K·H`` DMA per page, a legal Mosaic tile since the
last two block dims are full) and, per kv head, one ``[Mp, H] × [H, C]`` matmul whose
``Mp = round_up(G·T, 8)`` rows are the G query heads × T tokens of the group: each
K/V byte is read once for all its G query heads. MLA mode reads values as the first
E columns of the latent tile already in VMEM (no second DMA, no concatenation).

Per (row, split) the online softmax state lives in VMEM scratch (``m``, ``l``
lane-replicated ``[K, Mp, 128]``, ``acc [K, Mp, E]``, float32); the split writes its
normalised ``o_s`` and ``lse_s`` and XLA merges the splits (``common.merge_splits``).
Sinks enter in the merge.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from kernels_pallas.decode.common import from_dense
  >>> from kernels_pallas.decode.tpu import decode_tpu
  >>> k = jax.random.normal(jax.random.key(0), (1, 32, 2, 8))
  >>> pos = jnp.arange(32)[None]
  >>> kv = from_dense(k, k, pos, jnp.ones_like(pos), page_size=8)
  >>> q = jax.random.normal(jax.random.key(1), (1, 1, 4, 8))
  >>> o, lse = decode_tpu(q, kv, q_positions=jnp.array([[31]]), num_splits=2, interpret=True)
  >>> o.shape, lse.shape
  ((1, 1, 4, 8), (1, 4, 1))
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.decode import common
from kernels_pallas.decode.common import LN2, DecodeCfg, PagedKV
from kernels_pallas.flash import _compat

LANES = 128
NT = (((1,), (1,)), ((), ()))
NN = (((1,), (0,)), ((), ()))


def _sublanes(dtype) -> int:
    """Rows per sublane tile: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit dtypes."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _kernel(pages_ref, count_ref, *refs, cfg: DecodeCfg, names):
    r = dict(zip(names, refs))
    m_sc, l_sc, acc_sc = r["m"], r["l"], r["acc"]
    b, x, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pps, H, E = cfg.pages_per_split, cfg.H, cfg.E
    Hc, Ec = cfg.code_dims
    e = x * pps + j

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, m_sc.dtype)
        l_sc[...] = jnp.zeros(l_sc.shape, l_sc.dtype)
        acc_sc[...] = jnp.zeros(acc_sc.shape, acc_sc.dtype)

    def row(name, kh):  # one kv head's scale / zero row [1, H | C], or None
        return r[name][kh:kh + 1, :] if name in r else None

    @pl.when(e < count_ref[b])
    def _step():
        vis = common.visible(r["qpos"][:, :1], r["qseg"][:, :1], r["kpos"][...], r["kseg"][...],
                             cfg)
        for kh in range(cfg.K):  # static: every kv head of the page, from one DMA
            q = r["q"][kh]  # [Mp, H]
            if cfg.quant is None:
                kk = r["k"][:, pl.ds(kh * H, H)]  # [C, H]
                s = lax.dot_general(q, kk, NT, preferred_element_type=acc_sc.dtype)
            else:  # codes straight from the pool; scales fold into q / the logits
                s = common.quant_logits(q, r["k"][:, pl.ds(kh * Hc, Hc)], row("ks", kh),
                                        row("kz", kh), cfg)
            s = jnp.where(vis, common.logits2(s, cfg), -jnp.inf)
            m_prev = m_sc[kh]  # [Mp, 128], lane-replicated
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            # Nothing visible yet: shift by 0 so exp2(-inf) = 0 instead of NaN.
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp2(s - m_safe[:, :1])
            alpha = jnp.exp2(m_prev - m_safe)
            l_sc[kh] = alpha * l_sc[kh] + jnp.sum(p, axis=1, keepdims=True)
            if cfg.quant is not None:
                pieces = common.quant_pv(p, r["v"][:, pl.ds(kh * Ec, Ec)], row("vs", kh),
                                         row("vz", kh), cfg)
            else:
                if cfg.mla:
                    vv = r["k"][:, pl.ds(0, E)]  # the latent itself: already in VMEM
                else:
                    vv = r["v"][:, pl.ds(kh * E, E)]
                pieces = [(0, lax.dot_general(p.astype(vv.dtype), vv, NN,
                                              preferred_element_type=acc_sc.dtype))]
            for off, pv in pieces:
                w = pv.shape[1]
                acc_sc[kh, :, off:off + w] = acc_sc[kh, :, off:off + w] * alpha[:, :1] + pv
            m_sc[kh] = m_new

    @pl.when(j == pps - 1)
    def _finish():
        l, m = l_sc[...], m_sc[...]
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        r["o"][...] = (acc_sc[...] / l_safe[..., :1]).astype(r["o"].dtype)
        m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
        r["lse"][...] = jnp.where(seen, (m_safe + jnp.log2(l_safe)) * LN2, -jnp.inf).astype(
            r["lse"].dtype)


def split_partials(q, kv: PagedKV, q_pos_BT, q_seg_BT, cfg: DecodeCfg):
    """Run the kernel: ``o_s [B, K, X, M, E]`` and ``lse_s [B, K, X, M]`` (float32)."""
    B, K, M, H, E, C = cfg.B, cfg.K, cfg.M, cfg.H, cfg.E, cfg.page_size
    X, pps, maxP = cfg.num_splits, cfg.pages_per_split, cfg.max_pages
    Hc, Ec = cfg.code_dims
    acc = jnp.promote_types(q.dtype, jnp.float32)
    Mp = -(-M // _sublanes(q.dtype)) * _sublanes(q.dtype)
    pages, count = common.live_pages(kv, q_pos_BT, q_seg_BT, cfg)
    qr = jnp.pad(common.q_rows(q, cfg), ((0, 0), (0, 0), (0, Mp - M), (0, 0)))
    qpos, qseg = common.row_meta(q_pos_BT, q_seg_BT, cfg)
    lanes = lambda a: jnp.broadcast_to(jnp.pad(a, ((0, 0), (0, Mp - M)))[..., None], (B, Mp, LANES))
    P = kv.positions.shape[0]

    def page(b, x, j, pages_ref, count_ref):
        return pages_ref[b * maxP + jnp.minimum(x * pps + j, maxP - 1)]

    paged = lambda shape: pl.BlockSpec((None,) + shape, lambda b, x, j, *t: (page(b, x, j, *t), 0, 0))
    whole = lambda shape: pl.BlockSpec((None,) + shape, lambda b, x, j, *_: (b,) + (0,) * len(shape))
    # (name, spec, array): the pool is viewed [P, C, K·D] (a free reshape, one DMA per page).
    ins = [("q", whole((K, Mp, H)), qr.astype(q.dtype))]
    if cfg.quant is None:
        ins.append(("k", paged((C, K * H)), kv.k.reshape(P, C, K * H)))
        if not cfg.mla:
            ins.append(("v", paged((C, K * E)), kv.v.reshape(P, C, K * E)))
    else:
        ins += [("k", paged((C, K * Hc)), kv.k_q.reshape(P, C, K * Hc)),
                ("v", paged((C, K * Ec)), kv.v_q.reshape(P, C, K * Ec))]
        for name, a in (("ks", kv.k_scale), ("kz", kv.k_zero), ("vs", kv.v_scale),
                        ("vz", kv.v_zero)):
            if a is not None:
                ins.append((name, paged(tuple(a.shape[1:])), a.astype(jnp.float32)))
    ins += [("kpos", paged((1, C)), kv.positions.reshape(P, 1, C)),
            ("kseg", paged((1, C)), kv.segment_ids.reshape(P, 1, C)),
            ("qpos", whole((Mp, LANES)), lanes(qpos)), ("qseg", whole((Mp, LANES)), lanes(qseg))]
    outs = [("o", pl.BlockSpec((None, None, K, Mp, E), lambda b, x, j, *_: (b, x, 0, 0, 0)),
             jax.ShapeDtypeStruct((B, X, K, Mp, E), acc)),
            ("lse", pl.BlockSpec((None, None, K, Mp, LANES), lambda b, x, j, *_: (b, x, 0, 0, 0)),
             jax.ShapeDtypeStruct((B, X, K, Mp, LANES), acc))]
    scratch = [("m", (K, Mp, LANES)), ("l", (K, Mp, LANES)), ("acc", (K, Mp, E))]
    names = [n for n, *_ in ins] + [n for n, *_ in outs] + [n for n, _ in scratch]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(B, X, pps), in_specs=[s for _, s, _ in ins],
        out_specs=[s for _, s, _ in outs],
        scratch_shapes=[_compat.tpu_vmem(shape, acc) for _, shape in scratch])
    if cfg.interpret:
        params = dict(interpret=_compat.tpu_interpret_params())
    else:
        params = dict(compiler_params=_compat.tpu_compiler_params(
            dimension_semantics=("parallel", "parallel", "arbitrary")))
    o_s, lse_s = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, names=names), grid_spec=grid_spec,
        out_shape=[sh for *_, sh in outs], name="decode_tpu", **params,
    )(pages.reshape(-1), count, *[a for *_, a in ins])
    o_s = o_s[:, :, :, :M].transpose(0, 2, 1, 3, 4)  # [B, K, X, M, E]
    lse_s = lse_s[:, :, :, :M, 0].transpose(0, 2, 1, 3)
    return o_s, lse_s


def decode_tpu(q, kv: PagedKV, *, q_positions, q_segment_ids=None, causal: bool = True,
               window=None, scale=None, softcap=None, sinks=None, num_splits=None,
               interpret: bool = False):
    """Paged split-K decode on TPU (Pallas Mosaic); returns ``(o [B,T,N,E], lse [B,N,T])``.

    Same arguments as ``kernels_pallas.decode.reference.decode_reference``;
    ``interpret=True`` runs the kernel with ``pltpu.InterpretParams()`` on any platform.
    Forward only (decode needs no gradients).

    Example:
      >>> import jax.numpy as jnp
      >>> from kernels_pallas.decode.common import from_dense
      >>> kv = from_dense(jnp.ones((1, 8, 1, 4)), jnp.ones((1, 8, 1, 4)),
      ...                 jnp.arange(8)[None], jnp.ones((1, 8), jnp.int32), page_size=8)
      >>> decode_tpu(jnp.ones((1, 1, 2, 4)), kv, q_positions=jnp.array([[7]]),
      ...            interpret=True)[0].shape
      (1, 1, 2, 4)
    """
    cfg = common.make_cfg(q.shape, kv, causal=causal, window=window, scale=scale,
                          softcap=softcap, num_splits=num_splits, interpret=interpret)
    return common.run_split_k(split_partials, q, kv, q_positions, q_segment_ids, sinks, cfg)
