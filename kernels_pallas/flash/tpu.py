"""Flash attention as a Pallas Mosaic TPU kernel: the plan, layouts and kernel ops.

The public boundary is ``[B, T, N, H]``; inside, operands are head-major
(``q [B, K, G, Tp, Hp]``, ``k/v [B, K, Sp, ·]``) because a TPU block must be a
``(sublane, lane)`` tile of one head: XLA fuses the pad and the transpose into one
copy per operand. Block skipping, the visit tables and the partial/full split come
from ``kernels_pallas.flash.masking``; the kernel bodies live in ``tpu_kernels``, and
the custom VJP, padding, row prep, sinks and ``out_dtype`` in ``kernels_pallas.flash.shell``
(this module supplies ``OPS``: the head-major layouts and the three pallas_calls).

Design choices (details and the algorithm in README.md):

* **GQA without repeating K/V:** the ``Gb`` query heads of a group (all ``G`` when
  the mask is head-independent) are stacked into one ``[Gb·Cq, H]`` query block, so
  one K/V block fetched from HBM feeds ``Gb·Cq`` rows of one MXU matmul.
* **Head dim 64:** kept at 64 (full-dim block, never zero-padded in HBM). A
  64-deep contraction costs one MXU pass, exactly like a 128-deep one, so padding
  would only add HBM traffic; what can be won back is the M dimension, which the
  GQA stacking fills. Head dims above 128 that are not multiples of 128 (MLA's 192)
  are padded to the next multiple of 128.
* **Block sizes per generation** (``TPU_BLOCK_DEFAULTS``): rows = ``Gb·Cq``.

Example:
  >>> import jax
  >>> from attn.masks import Mask
  >>> from kernels_pallas.flash.tpu import flash_attention_tpu
  >>> q = jax.random.normal(jax.random.key(0), (1, 40, 4, 64))
  >>> kv = jax.random.normal(jax.random.key(1), (1, 40, 2, 64))
  >>> o, lse = flash_attention_tpu(q, kv, kv, mask=Mask(causal=True), interpret=True)
  >>> o.shape, lse.shape
  ((1, 40, 4, 64), (1, 4, 40))
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from attn.masks import Mask
from kernels_pallas.flash import masking, shell, tpu_kernels
from kernels_pallas.flash._common import clip_window
from kernels_pallas.flash.shell import fit
from kernels_pallas.flash.tpu_kernels import KernelCfg

Array = Any
MiB = 1 << 20


class BlockDefaults(NamedTuple):
    rows: int  # query rows per block, Gb·Cq (forward)
    kv: int  # keys per block (forward)
    rows_bwd: int
    kv_bwd: int
    vmem_limit: int | None  # None: the compiler's default scoped VMEM


# Starting points sized from the VMEM budget (logit temporaries are rows x kv x 4 B)
# and the MXU width (v6e's 256-wide MXU wants multiples of 256); they are not yet
# measured on hardware: benchmarks/ owns the tuned numbers.
TPU_BLOCK_DEFAULTS: dict[str, BlockDefaults] = {
    "v4": BlockDefaults(512, 512, 256, 512, None),
    "v5e": BlockDefaults(512, 1024, 512, 512, 64 * MiB),
    "v5p": BlockDefaults(1024, 512, 512, 512, 64 * MiB),
    "v6e": BlockDefaults(1024, 1024, 512, 1024, 64 * MiB),
    "default": BlockDefaults(512, 512, 256, 512, None),
}


def tpu_generation() -> str:
    """Key into ``TPU_BLOCK_DEFAULTS`` for the local device ("default" off TPU).

    Example:
      >>> tpu_generation() in TPU_BLOCK_DEFAULTS
      True
    """
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return "default"
    if dev.platform != "tpu":
        return "default"
    kind = dev.device_kind.lower().replace(" ", "")
    if "v6" in kind:
        return "v6e"
    if "v5lite" in kind or "v5e" in kind:
        return "v5e"
    if "v5" in kind:
        return "v5p"
    if "v4" in kind:
        return "v4"
    return "default"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Optional overrides; None fields come from ``TPU_BLOCK_DEFAULTS``.

    ``block_q`` is the query rows per head (Cq); a block holds ``heads_per_block``
    heads of one GQA group, so ``heads_per_block · block_q`` rows in all.
    """

    block_q: int | None = None
    block_kv: int | None = None
    block_q_bwd: int | None = None
    block_kv_bwd: int | None = None
    heads_per_block: int | None = None


@dataclasses.dataclass(frozen=True)
class Plan(masking.PlanBase):
    """Everything static about one call: shapes, tilings, kernel config."""

    N: int
    cfg: KernelCfg
    til_f: masking.Tiling
    til_b: masking.Tiling  # dQ and dK/dV share one backward tiling

    @property
    def til_dq(self) -> masking.Tiling:
        return self.til_b

    @property
    def til_dkv(self) -> masking.Tiling:
        return self.til_b


def _round(x, m):
    return -(-x // m) * m


def _pad_dim(d: int) -> int:
    # Full-dim blocks up to 128 lanes are legal; wider heads go to whole lane tiles.
    return d if d <= 128 else _round(d, 128)


def _pick(target, length, mask_block, *, user, interpret, kv):
    """Block size along one axis (None if no legal size fits the block mask)."""
    if user is not None and interpret:
        # Interpret mode has no (8, 128) tiling rule: tests use small blocks.
        return min(user, _round(length, 8))
    return masking.choose_block(user or target, length, multiple=128,
                                single_multiple=128 if kv else 16, mask_block=mask_block)


def make_plan(q_shape, k_shape, v_shape, mask: Mask, *, scale: float, softcap, has_sinks: bool,
              block_sizes: BlockSizes | None = None, interpret: bool = False) -> Plan:
    """Static plan for a call; raises ``NotImplementedError`` with the reason if none fits.

    Shapes: ``q_shape [B, T, N, H]``, ``k_shape [B, S, K, H]``, ``v_shape [B, S, K, E]``.

    Example:
      >>> from attn.masks import Mask
      >>> p = make_plan((1, 1000, 8, 64), (1, 1000, 2, 64), (1, 1000, 2, 64), Mask(causal=True),
      ...               scale=0.125, softcap=None, has_sinks=False)
      >>> p.cfg.Gb, p.til_f.block_q, p.til_f.block_kv
      (4, 128, 512)
    """
    B, T, N, H = q_shape
    S, K, E = k_shape[1], k_shape[2], v_shape[3]
    G = N // K
    if mask.dense is not None:
        raise NotImplementedError("Mask.dense is only accepted by the reference implementations")
    bs = block_sizes or BlockSizes()
    d = TPU_BLOCK_DEFAULTS[tpu_generation()]
    Nm = masking.mask_heads(mask, N)
    mq, mk = mask.block_size if mask.block_mask is not None else (None, None)
    # Stack the whole GQA group unless the mask differs per head (then lists differ).
    Gb = bs.heads_per_block or (1 if Nm > 1 else G)
    if Nm > 1 and Gb != 1:
        raise NotImplementedError("a per-head block_mask needs heads_per_block=1")
    if G % Gb:
        raise NotImplementedError(f"heads_per_block={Gb} must divide G={G}")
    while bs.heads_per_block is None and Gb > 1 and Gb * min(_round(T, 16), 128) > 2 * d.rows:
        Gb = max(g for g in range(1, Gb) if G % g == 0)
    tils = []
    for rows, kv, uq, uk in ((d.rows, d.kv, bs.block_q, bs.block_kv),
                             (d.rows_bwd, d.kv_bwd, bs.block_q_bwd or bs.block_q,
                              bs.block_kv_bwd or bs.block_kv)):
        cq = _pick(max(rows // Gb, 128), T, mq, user=uq, interpret=interpret, kv=False)
        ck = _pick(kv, S, mk, user=uk, interpret=interpret, kv=True)
        if cq is None or ck is None:
            raise NotImplementedError(
                f"Mask.block_size {mask.block_size} is not a multiple of any legal TPU kernel "
                "block (multiples of 128, or one block covering the sequence)")
        reason = masking.block_mask_fits(mask, T, S, cq, ck)
        if reason:
            raise NotImplementedError(reason)
        tils.append(masking.make_tiling(mask, batch=B, q_len=T, kv_len=S, num_heads=N,
                                        block_q=cq, block_kv=ck))
    cfg = KernelCfg(
        B=B, T=T, S=S, K=K, G=G, Gb=Gb, Hp=_pad_dim(H), Ep=_pad_dim(E), scale=float(scale),
        softcap=None if softcap is None else float(softcap), left=clip_window(mask.window_left),
        right=clip_window(mask.window_right), has_qpos=mask.q_positions is not None,
        has_kvpos=mask.kv_positions is not None, has_seg=mask.has_segments,
        has_sinks=has_sinks, interpret=bool(interpret), vmem_limit=d.vmem_limit)
    return Plan(N=N, H=H, E=E, causal=mask.causal, window=mask.window,
                mask_block_size=mask.block_size if mask.block_mask is not None else None,
                cfg=cfg, til_f=tils[0], til_b=tils[1])


# --------------------------------------------------------------------------- layouts
# The kernel's part of the shell contract: head-major layouts, row stats, extras, calls.
def _q_layout(x, plan: Plan, Tp: int, Dp: int):
    """``[B, T, N, D]`` -> ``[B, K, G, Tp, Dp]``."""
    B, _, N, _ = x.shape
    K = plan.cfg.K
    x = fit(fit(x, 1, Tp), 3, Dp)
    return x.reshape(B, Tp, K, N // K, Dp).transpose(0, 2, 3, 1, 4)


def _from_q_layout(x, plan: Plan, T: int, D: int):
    B, K, G, Tp, Dp = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(B, Tp, K * G, Dp)[:, :T, :, :D]


def _kv_layout(x, plan: Plan, Sp: int, Dp: int):
    """``[B, S, K, D]`` -> ``[B, K, Sp, Dp]``."""
    return fit(fit(x, 1, Sp), 3, Dp).transpose(0, 2, 1, 3)


def _from_kv_layout(x, plan: Plan, S: int, D: int):
    return x.transpose(0, 2, 1, 3)[:, :S, :, :D]


def _to_rows(x, plan: Plan):
    """``[B, N, Tp]`` -> rows ``[B, K, G, 1, Tp]`` (a free reshape)."""
    cfg = plan.cfg
    return x.reshape(cfg.B, cfg.K, cfg.G, 1, x.shape[-1])


def _lse_from_rows(x, plan: Plan):
    """Kernel lse rows ``[B, K, G, 1, Tp]`` -> ``[B, N, Tp]``."""
    return x.reshape(plan.cfg.B, plan.N, x.shape[-1])


def _extras(extras: dict, til: masking.Tiling, *, transposed: bool) -> dict:
    """Per-token mask inputs ``[B, L]`` as Mosaic tiles: columns ``[B, L, 128]``
    (lane-replicated), rows ``[B, 8, L]`` (sublane-replicated); queries are rows in the
    transposed (dK/dV) orientation, columns otherwise."""
    col = lambda x: jnp.broadcast_to(x[:, :, None], x.shape + (tpu_kernels.LANES,))  # noqa: E731
    row = lambda x: jnp.broadcast_to(x[:, None, :],  # noqa: E731
                                     (x.shape[0], tpu_kernels.SUBLANES, x.shape[1]))
    qf, kf = (row, col) if transposed else (col, row)
    return {n: (qf if n.startswith("q") else kf)(x) for n, x in extras.items()}


def _forward(plan: Plan, til, table, q, k, v, extras, sinks2, *, out_dtype, debug):
    return tpu_kernels.forward(plan.cfg, til, table, q, k, v, extras, sinks2, out_dtype=out_dtype,
                               debug=debug)


def _backward_dq(plan: Plan, til, table, q, k, v, do, lse2, d, extras):
    return tpu_kernels.backward_dq(plan.cfg, til, table, q, k, v, do, lse2, d, extras)


def _backward_dkv(plan: Plan, til, table_t, q, k, v, do, lse2, d, extras):
    return tpu_kernels.backward_dkv(plan.cfg, til, table_t, q, k, v, do, lse2, d, extras)


def _debug_counts(dbg, plan: Plan):
    cfg = plan.cfg
    counts = jnp.repeat(dbg[..., :2, 0], cfg.Gb, axis=2)  # [B, K, G, nQ, 2]
    counts = counts.reshape(cfg.B, plan.N, plan.til_f.num_q_blocks, 2)
    return {"visited": counts[..., 0], "partial": counts[..., 1]}


OPS = shell.KernelOps(name="tpu", forward=_forward, backward_dq=_backward_dq,
                      backward_dkv=_backward_dkv, to_q=_q_layout, from_q=_from_q_layout,
                      to_kv=_kv_layout, from_kv=_from_kv_layout, q_row_axis=3, kv_row_axis=2,
                      lse_from_kernel=_lse_from_rows, rows=_to_rows, extras=_extras,
                      debug_counts=_debug_counts)


def flash_attention_tpu(q, k, v, *, mask: Mask | None = None, scale: float | None = None,
                        softcap: float | None = None, sinks=None,
                        block_sizes: BlockSizes | None = None, interpret: bool = False,
                        out_dtype=None, debug: bool = False):
    """Flash attention on TPU (Pallas Mosaic); differentiable in q, k, v and sinks.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, E]`` (N % K == 0).
      mask: ``attn.masks.Mask`` (no ``dense``); None = no mask.
      scale: default ``H ** -0.5``. softcap: ``c · tanh(logits / c)``.
      sinks: ``[N]`` sink logits.
      block_sizes: ``BlockSizes`` overrides (default: per TPU generation).
      interpret: run with ``pltpu.InterpretParams()`` on any platform (CPU tests).
      out_dtype: dtype of ``o``; default the input dtype. ``jnp.float32`` writes the
        float32 accumulator out unrounded (for callers that merge partial results).
      debug: forward only; also return ``{"visited", "partial"}``, each ``[B, N, nQ]``
        int32: key blocks the kernel processed per query block (counted in-kernel).

    Returns:
      ``(o [B, T, N, E] in out_dtype, lse [B, N, T] float32)`` (+ the debug dict).

    Example:
      >>> import jax
      >>> from kernels_pallas.flash.tpu import flash_attention_tpu
      >>> x = jax.random.normal(jax.random.key(0), (1, 8, 2, 16))
      >>> flash_attention_tpu(x, x, x, interpret=True)[0].shape
      (1, 8, 2, 16)
    """
    mask, scale = shell.defaults(q, mask, scale)
    plan = make_plan(q.shape, k.shape, v.shape, mask, scale=scale, softcap=softcap,
                     has_sinks=sinks is not None, block_sizes=block_sizes, interpret=interpret)
    return shell.run(OPS, plan, q, k, v, mask=mask, sinks=sinks, out_dtype=out_dtype, debug=debug)
