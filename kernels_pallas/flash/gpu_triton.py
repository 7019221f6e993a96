"""Flash attention through Pallas Triton: the portable GPU path (forward + custom VJP).

For GPUs other than Hopper (the Mosaic GPU kernel in ``gpu.py`` serves Hopper), and
testable on CPU with ``interpret=True``. Operands stay in ``[B, T, N, H]``: a program
owns one (query block, batch, query head) and reads K/V of head ``n // G`` straight
from the un-transposed arrays. The wrapper pads T and S to block multiples and H, E
to powers of two (Triton tensor shapes), only when they are not already.

Block skipping comes from ``kernels_pallas.flash.masking``: each program loops over
its visit-table row only (skipped key blocks are never loaded), and partial blocks
take the masked branch of a ``lax.cond``. The backward is FlashAttention-2: a dQ
kernel over the same rows and a dK/dV kernel over the transposed table, looping over
the G query heads of its kv head (no atomics, deterministic).

Example:
  >>> import jax
  >>> from attn.masks import Mask
  >>> from kernels_pallas.flash.gpu_triton import flash_attention_triton
  >>> q = jax.random.normal(jax.random.key(0), (1, 40, 4, 64))
  >>> kv = jax.random.normal(jax.random.key(1), (1, 40, 2, 64))
  >>> o, lse = flash_attention_triton(q, kv, kv, mask=Mask(causal=True), interpret=True)
  >>> o.shape, lse.shape
  ((1, 40, 4, 64), (1, 4, 40))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attn.masks import Mask
from kernels_pallas.flash import gpu_triton_kernels as kern
from kernels_pallas.flash import masking
from kernels_pallas.flash._common import LOG2E, backward_rows, fit, gpu_cfg_fields, sink_grad


class TritonBlocks(NamedTuple):
    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    num_warps: int
    num_stages: int


def default_blocks(head_dim_padded: int) -> TritonBlocks:
    """Defaults by padded head dim (FlashAttention-2 Triton practice; see README).

    Example:
      >>> default_blocks(128).block_q, default_blocks(128).num_warps
      (128, 8)
    """
    if head_dim_padded <= 64:
        return TritonBlocks(128, 128, 64, 64, num_warps=4, num_stages=3)
    if head_dim_padded <= 128:
        return TritonBlocks(128, 64, 64, 64, num_warps=8, num_stages=3)
    return TritonBlocks(64, 32, 32, 32, num_warps=8, num_stages=2)  # MLA 192 -> 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Optional overrides (powers of two >= 16 on GPU; any multiple of 8 interpreted)."""

    block_q: int | None = None
    block_kv: int | None = None
    block_q_bwd: int | None = None
    block_kv_bwd: int | None = None


@dataclasses.dataclass(frozen=True)
class Plan(masking.PlanBase):
    cfg: kern.KernelCfg
    til_f: masking.Tiling
    til_b: masking.Tiling


def _pow2(x: int) -> int:
    return 1 << (max(x, 1) - 1).bit_length()


def _pick(target, length, mask_block, *, user, interpret):
    if user is not None and interpret:
        return min(user, -(-length // 8) * 8)
    return masking.choose_block(user or target, length, multiple=16, single_multiple=16,
                                mask_block=mask_block, pow2=True)


def make_plan(q_shape, k_shape, v_shape, mask: Mask, *, scale: float, softcap, has_sinks: bool,
              block_sizes: BlockSizes | None = None, interpret: bool = False) -> Plan:
    """Static plan for a call; raises ``NotImplementedError`` with the reason if none fits.

    Shapes: ``q_shape [B, T, N, H]``, ``k_shape [B, S, K, H]``, ``v_shape [B, S, K, E]``.

    Example:
      >>> from attn.masks import Mask
      >>> p = make_plan((1, 100, 8, 72), (1, 100, 2, 72), (1, 100, 2, 40), Mask(causal=True),
      ...               scale=0.1, softcap=None, has_sinks=False)
      >>> p.cfg.Hp, p.cfg.Ep, p.til_f.block_q
      (128, 64, 128)
    """
    B, T, N, H = q_shape
    S, K, E = k_shape[1], k_shape[2], v_shape[3]
    if mask.dense is not None:
        raise NotImplementedError("Mask.dense is only accepted by the reference implementations")
    Hp, Ep = _pow2(max(H, 16)), _pow2(max(E, 16))
    d = default_blocks(max(Hp, Ep))
    bs = block_sizes or BlockSizes()
    mq, mk = mask.block_size if mask.block_mask is not None else (None, None)
    tils = []
    for tq, tk, uq, uk in ((d.block_q, d.block_kv, bs.block_q, bs.block_kv),
                           (d.block_q_bwd, d.block_kv_bwd, bs.block_q_bwd or bs.block_q,
                            bs.block_kv_bwd or bs.block_kv)):
        cq = _pick(tq, T, mq, user=uq, interpret=interpret)
        ck = _pick(tk, S, mk, user=uk, interpret=interpret)
        if cq is None or ck is None:
            raise NotImplementedError(
                f"Mask.block_size {mask.block_size} is not a multiple of any power-of-two "
                "Triton block >= 16")
        reason = masking.block_mask_fits(mask, T, S, cq, ck)
        if reason:
            raise NotImplementedError(reason)
        tils.append(masking.make_tiling(mask, batch=B, q_len=T, kv_len=S, num_heads=N,
                                        block_q=cq, block_kv=ck))
    cfg = kern.KernelCfg(**gpu_cfg_fields(B, T, S, N, K, Hp, Ep, mask, scale=scale, softcap=softcap,
                                          has_sinks=has_sinks, interpret=interpret),
                         num_warps=d.num_warps, num_stages=d.num_stages)
    return Plan(H=H, E=E, causal=mask.causal, window=mask.window,
                mask_block_size=mask.block_size if mask.block_mask is not None else None,
                cfg=cfg, til_f=tils[0], til_b=tils[1])


def _pad_table(table):
    """Widen a visit table to a power of two (Triton block shapes)."""
    return fit(table, table.ndim - 1, _pow2(table.shape[-1]))


def _extras(mask: Mask, til: masking.Tiling):
    toks = masking.tokens(mask, til)
    out = {}
    if mask.q_positions is not None:
        out["qpos"] = toks.q_pos
    if mask.kv_positions is not None:
        out["kvpos"] = toks.kv_pos
    if mask.has_segments:
        out["qseg"], out["kvseg"] = toks.q_seg, toks.kv_seg
    return out


def _forward(q, k, v, sinks, aux, plan: Plan, debug: bool):
    cfg, til = plan.cfg, plan.til_f
    mask = plan.mask(aux)
    table, _ = masking.tables(masking.classify(mask, til), til, transposed=False)
    qp = fit(fit(q, 1, til.q_padded), 3, cfg.Hp)
    kp = fit(fit(k, 1, til.kv_padded), 3, cfg.Hp)
    vp = fit(fit(v, 1, til.kv_padded), 3, cfg.Ep)
    sinks2 = None if sinks is None else sinks.astype(jnp.float32) * LOG2E
    o, lse, dbg = kern.forward(cfg, til, _pad_table(table), qp, kp, vp, _extras(mask, til),
                               sinks2, debug=debug)
    return o[:, :cfg.T, :, :plan.E], lse[:, :, :cfg.T], (qp, kp, vp), dbg


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, sinks, aux, plan):
    o, lse, _, _ = _forward(q, k, v, sinks, aux, plan, False)
    return o, lse


def _flash_fwd(q, k, v, sinks, aux, plan):
    o, lse, padded, _ = _forward(q, k, v, sinks, aux, plan, False)
    return (o, lse), (padded, o, lse, sinks, aux)


def _flash_bwd(plan: Plan, res, cts):
    (qp, kp, vp), o, lse, sinks, aux = res
    do, dlse = cts
    cfg, til = plan.cfg, plan.til_b
    mask = plan.mask(aux)
    table, table_t = masking.tables(masking.classify(mask, til), til)
    qp = fit(qp, 1, til.q_padded)
    kp, vp = fit(kp, 1, til.kv_padded), fit(vp, 1, til.kv_padded)
    do_p = fit(fit(do, 1, til.q_padded), 3, cfg.Ep)
    D, D_p, lse2 = backward_rows(do, o, lse, dlse, til.q_padded)
    extras = _extras(mask, til)
    dq = kern.backward_dq(cfg, til, _pad_table(table), qp, kp, vp, do_p, lse2, D_p, extras)
    dk, dv = kern.backward_dkv(cfg, til, _pad_table(table_t), qp, kp, vp, do_p, lse2, D_p, extras)
    return (dq[:, :cfg.T, :, :plan.H], dk[:, :cfg.S, :, :plan.H], dv[:, :cfg.S, :, :plan.E],
            sink_grad(sinks, lse, D), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("plan", "debug"))
def _run(q, k, v, sinks, aux, plan, debug):
    if not debug:
        return _flash(q, k, v, sinks, aux, plan)
    o, lse, _, dbg = _forward(q, k, v, sinks, aux, plan, True)
    return o, lse, {"visited": dbg[..., 0], "partial": dbg[..., 1]}


def flash_attention_triton(q, k, v, *, mask: Mask | None = None, scale: float | None = None,
                           softcap: float | None = None, sinks=None,
                           block_sizes: BlockSizes | None = None, interpret: bool = False,
                           debug: bool = False):
    """Flash attention through Pallas Triton; differentiable in q, k, v and sinks.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, E]`` (N % K == 0).
      mask: ``attn.masks.Mask`` (no ``dense``); None = no mask.
      scale: default ``H ** -0.5``. softcap: ``c · tanh(logits / c)``.
      sinks: ``[N]`` sink logits.
      block_sizes: ``BlockSizes`` overrides (default: ``default_blocks``).
      interpret: run the kernels with ``interpret=True`` on any platform (CPU tests).
      debug: forward only; also return ``{"visited", "partial"}``, each ``[B, N, nQ]``
        int32: key blocks the kernel processed per query block (counted in-kernel).

    Returns:
      ``(o [B, T, N, E] in q.dtype, lse [B, N, T] float32)`` (+ the debug dict).

    Example:
      >>> import jax
      >>> from kernels_pallas.flash.gpu_triton import flash_attention_triton
      >>> x = jax.random.normal(jax.random.key(0), (1, 8, 2, 16))
      >>> flash_attention_triton(x, x, x, interpret=True)[0].shape
      (1, 8, 2, 16)
    """
    mask = Mask() if mask is None else mask
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    plan = make_plan(q.shape, k.shape, v.shape, mask, scale=scale, softcap=softcap,
                     has_sinks=sinks is not None, block_sizes=block_sizes, interpret=interpret)
    return _run(q, k, v, sinks, masking.mask_aux(mask), plan, debug)
