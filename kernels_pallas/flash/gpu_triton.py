"""Flash attention through Pallas Triton: the portable GPU path (plan + the shell's kernel ops).

For GPUs other than Hopper (the Mosaic GPU kernel in ``gpu.py`` serves Hopper), and
testable on CPU with ``interpret=True``. Operands stay in ``[B, T, N, H]``: a program
owns one (query block, batch, query head) and reads K/V of head ``n // G`` straight
from the un-transposed arrays. The wrapper pads T and S to block multiples and H, E
to powers of two (Triton tensor shapes), only when they are not already.

Block skipping comes from ``kernels_pallas.flash.masking``: each program loops over
its visit-table row only (skipped key blocks are never loaded), and partial blocks
take the masked branch of a ``lax.cond``. The backward is FlashAttention-2: a dQ
kernel over the same rows and a dK/dV kernel over the transposed table, looping over
the G query heads of its kv head (no atomics, deterministic). Padding, row prep,
mask extras, sinks, ``out_dtype`` and the custom VJP are the shell's
(``kernels_pallas.flash.shell``); this module supplies the plan and ``OPS``.

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
from typing import NamedTuple

from attn.masks import Mask
from kernels_pallas.flash import gpu_triton_kernels as kern
from kernels_pallas.flash import masking, shell
from kernels_pallas.flash._common import gpu_cfg_fields
from kernels_pallas.flash.shell import fit


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
    til_b: masking.Tiling  # dQ and dK/dV share one backward tiling

    @property
    def til_dq(self) -> masking.Tiling:
        return self.til_b

    @property
    def til_dkv(self) -> masking.Tiling:
        return self.til_b


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


# The kernel's part of the shell contract: its three pallas_calls (layout: the public one).
def _forward(plan: Plan, til, table, q, k, v, extras, sinks2, *, out_dtype, debug):
    return kern.forward(plan.cfg, til, _pad_table(table), q, k, v, extras, sinks2,
                        out_dtype=out_dtype, debug=debug)


def _backward_dq(plan: Plan, til, table, q, k, v, do, lse2, d, extras):
    return kern.backward_dq(plan.cfg, til, _pad_table(table), q, k, v, do, lse2, d, extras)


def _backward_dkv(plan: Plan, til, table_t, q, k, v, do, lse2, d, extras):
    return kern.backward_dkv(plan.cfg, til, _pad_table(table_t), q, k, v, do, lse2, d, extras)


OPS = shell.KernelOps(name="triton", forward=_forward, backward_dq=_backward_dq,
                      backward_dkv=_backward_dkv,
                      debug_counts=lambda dbg, plan: {"visited": dbg[..., 0], "partial": dbg[..., 1]})


def flash_attention_triton(q, k, v, *, mask: Mask | None = None, scale: float | None = None,
                           softcap: float | None = None, sinks=None,
                           block_sizes: BlockSizes | None = None, interpret: bool = False,
                           out_dtype=None, debug: bool = False):
    """Flash attention through Pallas Triton; differentiable in q, k, v and sinks.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, E]`` (N % K == 0).
      mask: ``attn.masks.Mask`` (no ``dense``); None = no mask.
      scale: default ``H ** -0.5``. softcap: ``c · tanh(logits / c)``.
      sinks: ``[N]`` sink logits.
      block_sizes: ``BlockSizes`` overrides (default: ``default_blocks``).
      interpret: run the kernels with ``interpret=True`` on any platform (CPU tests).
      out_dtype: dtype of ``o``; default the input dtype. ``jnp.float32`` writes the
        float32 accumulator out unrounded (for callers that merge partial results).
      debug: forward only; also return ``{"visited", "partial"}``, each ``[B, N, nQ]``
        int32: key blocks the kernel processed per query block (counted in-kernel).

    Returns:
      ``(o [B, T, N, E] in out_dtype, lse [B, N, T] float32)`` (+ the debug dict).

    Example:
      >>> import jax
      >>> from kernels_pallas.flash.gpu_triton import flash_attention_triton
      >>> x = jax.random.normal(jax.random.key(0), (1, 8, 2, 16))
      >>> flash_attention_triton(x, x, x, interpret=True)[0].shape
      (1, 8, 2, 16)
    """
    mask, scale = shell.defaults(q, mask, scale)
    plan = make_plan(q.shape, k.shape, v.shape, mask, scale=scale, softcap=softcap,
                     has_sinks=sinks is not None, block_sizes=block_sizes, interpret=interpret)
    return shell.run(OPS, plan, q, k, v, mask=mask, sinks=sinks, out_dtype=out_dtype, debug=debug)
