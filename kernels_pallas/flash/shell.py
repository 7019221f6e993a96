"""The one custom-VJP shell around the flash kernels (Mosaic TPU, Triton, Mosaic GPU).

A kernel module supplies only its ``pallas_call`` builders and its operand layout, as a
``KernelOps``; everything around them lives here, once:

* the public boundary ``[B, T, N, H]``: padding of T / S to the tiling and of H / E to
  the kernel's head dims (through the kernel's layout functions), and the slicing back;
* the mask: ``plan.mask(aux)`` rebuilt inside the VJP, block classification and visit
  tables per tiling (``masking``), the per-token extras (positions, segments) padded to
  the tiling;
* sinks: base-2 sink logits into the forward, ``dsinks`` from lse and D in XLA;
* row prep for the backward: ``D = rowsum(dO ∘ O) - dlse`` in float32 from the
  unpadded ``o`` and cotangent, the base-2 lse with 0 for fully masked rows and +inf
  for padded ones (so ``exp2(s - lse2) = 0`` there whatever ``s`` is), each refitted to
  every backward tiling (dQ and dK/dV may tile differently);
* ``out_dtype``: ``o`` in the input dtype (the default) or, when asked, float32 — the
  kernels' float32 accumulator written out unrounded (what the context-parallel ring
  merges; ``Impl.float32_out``). The cotangent of a float32 ``o`` is cast to the input
  dtype for the kernels' matmuls only after D has been computed from it in float32;
* ``jax.jit`` with the plan static, and the optional in-kernel visit counts (debug).

Kernel contract (``KernelOps``): ``forward(plan, til, table, q, k, v, extras, sinks2, *,
out_dtype, debug) -> (o, lse, dbg | None)``, ``backward_dq(plan, til, table, q, k, v,
do, lse2, d, extras) -> dq`` and ``backward_dkv(plan, til, table_t, q, k, v, do, lse2, d,
extras) -> (dk, dv)``, all in the kernel's layout. The plan provides ``cfg.T``,
``cfg.S``, ``cfg.Hp``, ``cfg.Ep``, ``H``, ``E``, ``mask(aux)`` (``masking.PlanBase``) and
the tilings ``til_f``, ``til_dq``, ``til_dkv``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn.masks import Mask
  >>> from kernels_pallas.flash.gpu_triton import flash_attention_triton
  >>> q = jax.random.normal(jax.random.key(0), (1, 12, 2, 16), jnp.bfloat16)
  >>> o, lse = flash_attention_triton(q, q, q, mask=Mask(causal=True), interpret=True,
  ...                                 out_dtype=jnp.float32)
  >>> o.dtype, lse.dtype
  (dtype('float32'), dtype('float32'))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from attn.errors import UserError
from attn.masks import Mask
from kernels_pallas.flash import masking
from kernels_pallas.flash._common import LOG2E

Array = Any


# --------------------------------------------------------------------------- helpers
def fit(x, axis: int, n: int):
    """Pad with zeros or slice ``axis`` of ``x`` to length ``n`` (no-op when equal).

    Example:
      >>> import jax.numpy as jnp
      >>> fit(jnp.ones((2, 3)), 1, 5).shape, fit(jnp.ones((2, 3)), 0, 1).shape
      ((2, 5), (1, 3))
    """
    cur = x.shape[axis]
    if cur == n:
        return x
    if cur > n:
        return x[(slice(None),) * axis + (slice(0, n),)]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - cur)
    return jnp.pad(x, widths)


def row_delta(do_BTNE, o_BTNE, dlse_BNT):
    """``D [B, N, T] = rowsum(dO ∘ O) - dlse`` in float32 (the lse cotangent is a row shift).

    Example:
      >>> import jax.numpy as jnp
      >>> row_delta(jnp.ones((1, 2, 1, 3)), jnp.ones((1, 2, 1, 3)), jnp.ones((1, 1, 2))).tolist()
      [[[2.0, 2.0]]]
    """
    D = jnp.einsum("BTNE,BTNE->BNT", do_BTNE.astype(jnp.float32), o_BTNE.astype(jnp.float32))
    return D - dlse_BNT.astype(jnp.float32)


def sink_grad(sinks, lse_BNT, D_BNT):
    """``dsinks[n] = -Σ_{b,t} exp(sink[n] - lse[b,n,t]) · D[b,n,t]`` (None without sinks).

    Rows with lse = -inf (nothing visible, no sink) contribute 0.

    Example:
      >>> import jax.numpy as jnp
      >>> sink_grad(jnp.zeros(1), jnp.zeros((1, 1, 2)), jnp.ones((1, 1, 2))).tolist()
      [-2.0]
    """
    if sinks is None:
        return None
    ok = jnp.isfinite(lse_BNT)
    lse = jnp.where(ok, lse_BNT, 0.0)
    p = jnp.where(ok, jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse), 0.0)
    return jnp.sum(-p * D_BNT, axis=(0, 2)).astype(sinks.dtype)


def lse2_rows(lse_BNT, q_padded: int):
    """The backward's base-2 lse ``[B, N, q_padded]``: 0 on fully masked rows, +inf on padding.

    A fully masked row has ``s = -inf`` everywhere, so ``exp2(s - 0) = 0``; a padded row
    may have finite logits (zero queries), and ``exp2(s - inf) = 0`` hides them.

    Example:
      >>> import jax.numpy as jnp
      >>> lse2_rows(jnp.array([[[0.0, -jnp.inf]]]), 3).tolist()
      [[[0.0, 0.0, inf]]]
    """
    lse2 = jnp.where(jnp.isfinite(lse_BNT), lse_BNT * LOG2E, 0.0)
    pad = q_padded - lse_BNT.shape[-1]
    return jnp.pad(lse2, ((0, 0), (0, 0), (0, pad)), constant_values=jnp.inf)


def mask_extras(mask: Mask, til: masking.Tiling) -> dict:
    """The per-token mask inputs a kernel needs, padded to ``til``: ``{name: [B, Tp|Sp]}``.

    Names: ``qpos`` / ``kvpos`` (only when the mask carries explicit positions; default
    positions are the kernels' own iota), ``qseg`` / ``kvseg`` (with segments).

    Example:
      >>> from attn.masks import Mask
      >>> til = masking.make_tiling(Mask(), batch=1, q_len=3, kv_len=3, num_heads=1,
      ...                           block_q=4, block_kv=4)
      >>> mask_extras(Mask(), til)
      {}
    """
    toks = masking.tokens(mask, til)
    out = {}
    if mask.q_positions is not None:
        out["qpos"] = toks.q_pos
    if mask.kv_positions is not None:
        out["kvpos"] = toks.kv_pos
    if mask.has_segments:
        out["qseg"], out["kvseg"] = toks.q_seg, toks.kv_seg
    return out


def resolve_out_dtype(in_dtype, out_dtype):
    """The dtype of ``o``: the input dtype by default, else a floating ``out_dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> resolve_out_dtype(jnp.bfloat16, None), resolve_out_dtype(jnp.bfloat16, jnp.float32)
      (dtype(bfloat16), dtype('float32'))
    """
    if out_dtype is None:
        return jnp.dtype(in_dtype)
    try:
        dt = jnp.dtype(out_dtype)
    except TypeError as e:
        raise UserError(f"flash attention out_dtype={out_dtype!r}: not a dtype") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise UserError(f"flash attention out_dtype={dt}: must be a floating dtype (float32 "
                        "for unrounded outputs, or the input dtype)")
    return dt


def defaults(q, mask: Mask | None, scale: float | None) -> tuple[Mask, float]:
    """``(mask, scale)`` with the op contract's defaults: no mask, ``H ** -0.5``."""
    return (Mask() if mask is None else mask,
            q.shape[-1] ** -0.5 if scale is None else float(scale))


# --------------------------------------------------------------------------- kernel ops
def _public_to_rows(x, plan, rows: int, dim: int):
    """``[B, L, heads, D]`` padded to ``[B, rows, heads, dim]``: the Triton / Mosaic GPU layout."""
    return fit(fit(x, 1, rows), 3, dim)


def _public_from_rows(x, plan, length: int, dim: int):
    return x[:, :length, :, :dim]


def _identity_rows(x_BNTp, plan):
    return x_BNTp


def _identity_extras(extras: dict, til: masking.Tiling, *, transposed: bool) -> dict:
    return extras


@dataclasses.dataclass(frozen=True)
class KernelOps:
    """What one kernel supplies to the shell (hashable: a jit static / custom_vjp nondiff).

    The layout fields default to the public layout padded in place (``[B, Tp, N, Hp]``,
    rows on axis 1), which the Triton and Mosaic GPU kernels use; the TPU kernel is
    head-major and supplies its own. ``q_row_axis`` / ``kv_row_axis``: the row axis of
    the kernel layouts, along which saved operands are refitted to a backward tiling.
    ``debug_counts(dbg, plan) -> {"visited", "partial"}`` (None: no debug output).
    """

    name: str
    forward: Callable
    backward_dq: Callable
    backward_dkv: Callable
    to_q: Callable = _public_to_rows  # (x [B,T,N,D], plan, rows, dim) -> kernel layout
    from_q: Callable = _public_from_rows  # (kernel layout, plan, T, D) -> [B,T,N,D]
    to_kv: Callable = _public_to_rows
    from_kv: Callable = _public_from_rows
    q_row_axis: int = 1
    kv_row_axis: int = 1
    lse_from_kernel: Callable = _identity_rows  # kernel lse -> [B, N, Tp]
    rows: Callable = _identity_rows  # [B, N, Tp] per-row stats -> kernel layout
    extras: Callable = _identity_extras  # (mask_extras, til, transposed=) -> kernel inputs
    debug_counts: Callable | None = None


# --------------------------------------------------------------------------- forward
def _forward(ops: KernelOps, plan, out_dtype, debug, q, k, v, sinks, aux):
    cfg, til = plan.cfg, plan.til_f
    mask = plan.mask(aux)
    table, _ = masking.tables(masking.classify(mask, til), til, transposed=False)
    qk = ops.to_q(q, plan, til.q_padded, cfg.Hp)
    kk = ops.to_kv(k, plan, til.kv_padded, cfg.Hp)
    vk = ops.to_kv(v, plan, til.kv_padded, cfg.Ep)
    sinks2 = None if sinks is None else sinks.astype(jnp.float32) * LOG2E
    extras = ops.extras(mask_extras(mask, til), til, transposed=False)
    o, lse, dbg = ops.forward(plan, til, table, qk, kk, vk, extras, sinks2, out_dtype=out_dtype,
                              debug=debug)
    o = ops.from_q(o, plan, cfg.T, plan.E)
    lse = ops.lse_from_kernel(lse, plan)[:, :, :cfg.T]
    return o, lse, (qk, kk, vk), dbg


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(ops, plan, out_dtype, q, k, v, sinks, aux):
    o, lse, _, _ = _forward(ops, plan, out_dtype, False, q, k, v, sinks, aux)
    return o, lse


def _flash_fwd(ops, plan, out_dtype, q, k, v, sinks, aux):
    o, lse, kernel_layout, _ = _forward(ops, plan, out_dtype, False, q, k, v, sinks, aux)
    return (o, lse), (kernel_layout, o, lse, sinks, aux)


# --------------------------------------------------------------------------- backward
def _flash_bwd(ops: KernelOps, plan, out_dtype, res, cts):
    (qk, kk, vk), o, lse, sinks, aux = res
    do, dlse = cts
    cfg = plan.cfg
    mask = plan.mask(aux)
    D = row_delta(do, o, dlse)  # float32, from the unrounded o and cotangent
    do = do.astype(qk.dtype)  # the kernels' matmul operand dtype
    prepared = {}

    def inputs(til):
        # Forward and backward tilings may pad differently: refit the saved layouts.
        if til not in prepared:
            prepared[til] = (
                fit(qk, ops.q_row_axis, til.q_padded), fit(kk, ops.kv_row_axis, til.kv_padded),
                fit(vk, ops.kv_row_axis, til.kv_padded), ops.to_q(do, plan, til.q_padded, cfg.Ep),
                ops.rows(lse2_rows(lse, til.q_padded), plan), ops.rows(fit(D, 2, til.q_padded), plan))
        return prepared[til]

    til_dq, til_dkv = plan.til_dq, plan.til_dkv
    kind = masking.classify(mask, til_dq)
    table, table_t = masking.tables(kind, til_dq, transposed=til_dkv == til_dq)
    if til_dkv != til_dq:
        _, table_t = masking.tables(masking.classify(mask, til_dkv), til_dkv)
    dq = ops.backward_dq(plan, til_dq, table, *inputs(til_dq),
                         ops.extras(mask_extras(mask, til_dq), til_dq, transposed=False))
    dk, dv = ops.backward_dkv(plan, til_dkv, table_t, *inputs(til_dkv),
                              ops.extras(mask_extras(mask, til_dkv), til_dkv, transposed=True))
    return (ops.from_q(dq, plan, cfg.T, plan.H), ops.from_kv(dk, plan, cfg.S, plan.H),
            ops.from_kv(dv, plan, cfg.S, plan.E), sink_grad(sinks, lse, D), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------- entry
@functools.partial(jax.jit, static_argnames=("ops", "plan", "out_dtype", "debug"))
def _run(q, k, v, sinks, aux, *, ops, plan, out_dtype, debug):
    if not debug:
        return _flash(ops, plan, out_dtype, q, k, v, sinks, aux)
    o, lse, _, dbg = _forward(ops, plan, out_dtype, True, q, k, v, sinks, aux)
    return o, lse, ops.debug_counts(dbg, plan)


def run(ops: KernelOps, plan, q, k, v, *, mask: Mask, sinks=None, out_dtype=None,
        debug: bool = False):
    """Run one planned call: ``(o [B, T, N, E] in out_dtype, lse [B, N, T] float32)``.

    Differentiable in ``q, k, v, sinks`` (the lse too). ``debug``: forward only, also
    return the kernel's ``{"visited", "partial"}`` block counts ``[B, N, nQ]``.
    """
    out_dtype = resolve_out_dtype(q.dtype, out_dtype)
    if debug and ops.debug_counts is None:
        raise UserError(f"debug=True: the {ops.name} kernel has no in-kernel visit counts")
    return _run(q, k, v, sinks, masking.mask_aux(mask), ops=ops, plan=plan, out_dtype=out_dtype,
                debug=debug)
