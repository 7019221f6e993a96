"""Flash attention through Pallas Mosaic GPU: the Hopper (sm90) path (plan + kernel ops).

FlashAttention-3 structure (``gpu_kernels.py``): per CTA, one producer warpgroup
TMA-loads the visited K/V (or Q/dO) blocks into a multi-stage SMEM ring while one or
two compute warpgroups run ``wgmma`` on them (operands in swizzled SMEM, float32
accumulators), the two ping-ponging so one's softmax overlaps the other's matmuls.
The backward is a dQ kernel and a dK/dV kernel (no atomics, deterministic). Padding,
row prep, mask extras, sinks, ``out_dtype`` and the custom VJP are the shell's
(``kernels_pallas.flash.shell``); this module supplies the plan and ``OPS``.

Masks go through ``kernels_pallas.flash.masking`` like every other backend: skipped
blocks are never loaded, PARTIAL blocks are masked element by element from positions
and segment ids, FULL blocks run without mask code. Every feature of the Triton path
is served: causal, windows, documents, explicit positions, per-head block sparsity,
GQA without repeating K/V, E != H, softcap, sinks, lse, fully masked rows.

``register.py`` consumes this module through ``name``, ``supports`` and ``attention``;
``pallas_gpu`` resolves here on sm90 and to Triton elsewhere.

Interpret mode: JAX 0.10's GPU interpreter cannot run these kernels (it has no
rule for transposed wgmma operands, dynamic slices, ``run_state`` or
``layout_cast``), so ``supports(interpret=True)`` refuses and CPU users get the
Triton kernel; CPU tests check the plan and lower all three kernels to Mosaic GPU.

Example (on an H100 / H200):
  >>> import jax, jax.numpy as jnp
  >>> from attn.masks import Mask
  >>> from kernels_pallas.flash.gpu import flash_attention_mosaic
  >>> q = jax.random.normal(jax.random.key(0), (1, 256, 4, 128), jnp.bfloat16)
  >>> kv = jax.random.normal(jax.random.key(1), (1, 256, 2, 128), jnp.bfloat16)
  >>> o, lse = flash_attention_mosaic(q, kv, kv, mask=Mask(causal=True))  # doctest: +SKIP
  >>> o.shape, lse.shape  # doctest: +SKIP
  ((1, 256, 4, 128), (1, 4, 256))
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attn.masks import Mask
from kernels_pallas.flash import _compat, masking, shell
from kernels_pallas.flash._common import gpu_cfg_fields

name = "mosaic"

SMEM_BUDGET = 200 * 1024  # of sm90's 227 KiB per CTA; the rest is barriers and slack
MAX_HEAD_DIM = 256
WG_ROWS = 64  # rows per compute warpgroup (the wgmma M); gpu_kernels.WG
INTERPRET_REASON = (
    "Pallas' GPU interpret mode (JAX 0.10) cannot run the Mosaic GPU kernel: it has no rule "
    "for transposed wgmma operands (TransposeTransform), dynamic-slice reads, run_state or "
    "layout_cast; the Triton kernel serves interpret calls")
_HW_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Optional overrides. ``block_kv``: forward / dQ key block; ``block_q_dkv``: the
    dK/dV query block (multiples of 64); ``warpgroups``: compute warpgroups per CTA
    (1 or 2, each owning 64 rows); ``stages``: SMEM ring depth (>= 2)."""

    block_kv: int | None = None
    block_kv_dq: int | None = None
    block_q_dkv: int | None = None
    warpgroups: int | None = None
    stages: int | None = None


@dataclasses.dataclass(frozen=True)
class Plan(masking.PlanBase):
    cfg: object  # gpu_kernels.KernelCfg
    out_dtype: object  # o's dtype (SMEM was sized for it)
    til_f: masking.Tiling
    til_dq: masking.Tiling
    til_dkv: masking.Tiling
    launch_f: object  # gpu_kernels.Launch
    launch_dq: object
    launch_dkv: object


def _round64(x: int) -> int:
    return -(-max(x, 1) // 64) * 64


def _fits(fixed_bytes, stage_bytes) -> int:
    return (SMEM_BUDGET - fixed_bytes) // stage_bytes


def _stages(user, fixed_bytes, stage_bytes, interpret, what="the Mosaic GPU blocks"):
    """Deepest ring (2..4) that fits the SMEM budget next to the fixed tiles."""
    if user is not None:
        return user
    fit_n = _fits(fixed_bytes, stage_bytes)
    if fit_n < 2 and not interpret:
        raise NotImplementedError(
            f"{what} do not fit in shared memory ({fixed_bytes + 2 * stage_bytes} "
            f"bytes for 2 stages > {SMEM_BUDGET})")
    return int(max(2, min(4, fit_n)))


def make_plan(q_shape, k_shape, v_shape, mask: Mask, *, scale: float, softcap, has_sinks: bool,
              dtype=jnp.bfloat16, block_sizes: BlockSizes | None = None,
              interpret: bool = False, out_dtype=None) -> Plan:
    """Static plan for a call; raises ``NotImplementedError`` with the reason if none fits.

    Shapes: ``q_shape [B, T, N, H]``, ``k_shape [B, S, K, H]``, ``v_shape [B, S, K, E]``.
    Head dims are padded to multiples of 64 (128-byte swizzled tiles); forward and dQ
    CTAs own ``64·warpgroups`` query rows, dK/dV CTAs ``64·warpgroups`` keys. A float32
    ``out_dtype`` stages O in its own float32 SMEM tile; when the K/V ring then no longer
    fits two stages, the forward key block halves to 64, then the forward drops to one
    compute warpgroup (what still does not fit is refused with the reason).

    Example:
      >>> from attn.masks import Mask
      >>> p = make_plan((1, 1000, 8, 72), (1, 1000, 2, 72), (1, 1000, 2, 40), Mask(causal=True),
      ...               scale=0.1, softcap=None, has_sinks=False)
      >>> p.cfg.Hp, p.cfg.Ep, p.til_f.block_q, p.til_f.block_kv, p.launch_f.stages
      (128, 64, 128, 128, 3)
    """
    from kernels_pallas.flash import gpu_kernels as kern

    B, T, N, H = q_shape
    S, K, E = k_shape[1], k_shape[2], v_shape[3]
    if mask.dense is not None:
        raise NotImplementedError("Mask.dense is only accepted by the reference implementations")
    if max(H, E) > MAX_HEAD_DIM:
        raise NotImplementedError(f"head dims above {MAX_HEAD_DIM} are not supported (H={H}, E={E})")
    Hp, Ep = _round64(H), _round64(E)
    item = jnp.dtype(dtype).itemsize
    bs = block_sizes or BlockSizes()
    wide = max(Hp, Ep) > 128
    ck = bs.block_kv or (64 if wide else 128)
    ck_dq = bs.block_kv_dq or bs.block_kv or (128 if max(Hp, Ep) <= 64 else 64)
    cq_dkv = bs.block_q_dkv or (128 if max(Hp, Ep) <= 64 else 64)
    for c in (ck, ck_dq, cq_dkv):
        if c % 64:
            raise NotImplementedError(f"Mosaic GPU blocks must be multiples of 64 (got {c})")
    nwg_q = bs.warpgroups or (1 if T <= WG_ROWS else 2)
    nwg_k = bs.warpgroups or (1 if S <= WG_ROWS else 2)
    row_bytes = (Hp + Ep) * item
    odt = jnp.dtype(out_dtype or dtype)
    cfg = kern.KernelCfg(**gpu_cfg_fields(B, T, S, N, K, Hp, Ep, mask, scale=scale, softcap=softcap,
                                          has_sinks=has_sinks, interpret=interpret))
    # The forward stages O in SMEM for its TMA store: in Q's tile when shape and dtype
    # agree, else (E != H, or a float32 O from bf16 inputs) in a tile of its own, which
    # leaves less room for the K/V ring: then the key block halves to 64 and, if that is
    # not enough, the forward runs one compute warpgroup per CTA (its own tiling).
    o_item = 0 if kern.o_reuses_q_tile(cfg, dtype, odt) else odt.itemsize
    nwg_f = nwg_q
    fwd_fixed = lambda nwg: nwg * WG_ROWS * (Hp * item + Ep * o_item)  # noqa: E731
    tight = lambda: bs.stages is None and _fits(fwd_fixed(nwg_f), ck * row_bytes) < 2  # noqa: E731
    if bs.block_kv is None and ck > 64 and tight():
        ck = 64
    if bs.warpgroups is None and nwg_f == 2 and tight():
        nwg_f = 1
    launch_f = kern.Launch(nwg_f, _stages(bs.stages, fwd_fixed(nwg_f), ck * row_bytes, interpret,
                                          what=f"the Mosaic GPU forward blocks with a {odt} O tile"))
    launch_dq = kern.Launch(nwg_q, _stages(bs.stages, nwg_q * WG_ROWS * row_bytes,
                                           ck_dq * row_bytes, interpret))
    launch_dkv = kern.Launch(nwg_k, _stages(bs.stages, nwg_k * WG_ROWS * row_bytes,
                                            cq_dkv * row_bytes, interpret))
    tils = []
    for cq, cki in ((nwg_f * WG_ROWS, ck), (nwg_q * WG_ROWS, ck_dq), (cq_dkv, nwg_k * WG_ROWS)):
        reason = masking.block_mask_fits(mask, T, S, cq, cki)
        if reason:
            raise NotImplementedError(reason)
        tils.append(masking.make_tiling(mask, batch=B, q_len=T, kv_len=S, num_heads=N,
                                        block_q=cq, block_kv=cki))
    return Plan(H=H, E=E, causal=mask.causal, window=mask.window,
                mask_block_size=mask.block_size if mask.block_mask is not None else None,
                cfg=cfg, out_dtype=odt, til_f=tils[0], til_dq=tils[1], til_dkv=tils[2],
                launch_f=launch_f, launch_dq=launch_dq, launch_dkv=launch_dkv)


def _interpret_params(plan: Plan):
    return _compat.mgpu_interpret_params() if plan.cfg.interpret else None


# The kernel's part of the shell contract: its three pallas_calls (layout: the public one).
def _forward(plan: Plan, til, table, q, k, v, extras, sinks2, *, out_dtype, debug):
    from kernels_pallas.flash import gpu_kernels as kern

    if jnp.dtype(out_dtype) != plan.out_dtype:
        raise ValueError(f"planned for o in {plan.out_dtype}, asked for {out_dtype}")
    o, lse = kern.forward(plan.cfg, til, plan.launch_f, table, q, k, v, extras, sinks2,
                          out_dtype=out_dtype, interpret=_interpret_params(plan))
    return o, lse, None


def _backward_dq(plan: Plan, til, table, q, k, v, do, lse2, d, extras):
    from kernels_pallas.flash import gpu_kernels as kern

    (dq,) = kern.backward_dq(plan.cfg, til, plan.launch_dq, table, q, k, v, do, lse2, d, extras,
                             interpret=_interpret_params(plan))
    return dq


def _backward_dkv(plan: Plan, til, table_t, q, k, v, do, lse2, d, extras):
    from kernels_pallas.flash import gpu_kernels as kern

    return kern.backward_dkv(plan.cfg, til, plan.launch_dkv, table_t, q, k, v, do, lse2, d,
                             extras, interpret=_interpret_params(plan))


OPS = shell.KernelOps(name="mosaic", forward=_forward, backward_dq=_backward_dq,
                      backward_dkv=_backward_dkv)


def flash_attention_mosaic(q, k, v, *, mask: Mask | None = None, scale: float | None = None,
                           softcap: float | None = None, sinks=None,
                           block_sizes: BlockSizes | None = None, interpret: bool = False,
                           out_dtype=None):
    """Flash attention through Pallas Mosaic GPU (Hopper); differentiable in q, k, v, sinks.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, E]`` (N % K == 0), bf16 or
        fp16 on hardware (interpret mode also takes float32).
      mask: ``attn.masks.Mask`` (no ``dense``); None = no mask.
      scale: default ``H ** -0.5``. softcap: ``c · tanh(logits / c)``.
      sinks: ``[N]`` sink logits.
      block_sizes: ``BlockSizes`` overrides (default: ``make_plan``'s choice).
      interpret: run the kernels in Pallas' GPU interpret mode on any platform (CPU tests).
      out_dtype: dtype of ``o``; default the input dtype. ``jnp.float32`` writes the
        float32 accumulator out unrounded (for callers that merge partial results).

    Returns:
      ``(o [B, T, N, E] in out_dtype, lse [B, N, T] float32)``.

    Example (sm90 GPU):
      >>> import jax, jax.numpy as jnp
      >>> from kernels_pallas.flash.gpu import flash_attention_mosaic
      >>> x = jax.random.normal(jax.random.key(0), (1, 8, 2, 64), jnp.bfloat16)
      >>> flash_attention_mosaic(x, x, x)[0].shape  # doctest: +SKIP
      (1, 8, 2, 64)
    """
    mask, scale = shell.defaults(q, mask, scale)
    out_dtype = shell.resolve_out_dtype(q.dtype, out_dtype)
    plan = make_plan(q.shape, k.shape, v.shape, mask, scale=scale, softcap=softcap,
                     has_sinks=sinks is not None, dtype=q.dtype, block_sizes=block_sizes,
                     interpret=interpret, out_dtype=out_dtype)
    return shell.run(OPS, plan, q, k, v, mask=mask, sinks=sinks, out_dtype=out_dtype)


# --------------------------------------------------------------------------- plug-in
def device_reason() -> str | None:
    """None on an sm90 (Hopper) GPU, else why the Mosaic GPU kernel cannot run here.

    wgmma and the TMA pipeline are sm90 instructions: Ampere lacks them and Blackwell
    (sm100) replaced wgmma with tcgen05, so both go to the Triton kernel.

    Example:
      >>> device_reason() is not None  # on a CPU host
      True
    """
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        return "no GPU device is visible to JAX"
    cc = str(getattr(dev, "compute_capability", ""))
    if not cc.startswith("9."):
        return (f"needs an sm90 (Hopper) GPU for wgmma/TMA; {dev.device_kind} is "
                f"compute capability {cc or 'unknown'}")
    return None


def supports(call, *, interpret: bool, out_dtype=None) -> str | None:
    """None if the Mosaic GPU kernel serves ``call`` (an ``attn.core.AttentionCall``)
    with ``o`` in ``out_dtype`` (default the input dtype).

    Refuses with the reason: no Mosaic GPU in this JAX, a non-sm90 device, interpret
    mode (``INTERPRET_REASON``), dtypes other than bf16/fp16, bias, ``Mask.dense``, head
    dims above 256, block masks whose blocks are not multiples of the kernel's 64-row
    tiles, and blocks that do not fit in shared memory (with a float32 ``o``: head dims
    256/256).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from attn.core import make_call
      >>> x = jax.ShapeDtypeStruct((1, 128, 4, 64), jnp.bfloat16)
      >>> supports(make_call(x, x, x, platform="gpu"), interpret=False)[:18]  # CPU host
      'no GPU device is v'
    """
    from kernels_pallas.flash import register

    if not _compat.mgpu_available():
        return "this JAX has no Pallas Mosaic GPU backend"
    reason = register._common_reason(call, interpret=interpret, max_head_dim=MAX_HEAD_DIM)
    if reason:
        return reason
    dt = jnp.dtype(call.dtype)
    if dt not in _HW_DTYPES and not (interpret and dt == jnp.dtype(jnp.float32)):
        return (f"{dt} inputs: wgmma runs bf16/fp16 operands here (float32 only in interpret "
                "mode); the Triton kernel serves other dtypes")
    if interpret:
        return INTERPRET_REASON
    if call.platform != "gpu":
        return f"needs a GPU (platform is {call.platform})"
    reason = device_reason()
    if reason:
        return reason
    try:
        make_plan(call.q_shape, call.k_shape, call.v_shape, call.mask, scale=call.scale,
                  softcap=call.softcap, has_sinks=call.has_sinks, dtype=dt, interpret=interpret,
                  out_dtype=out_dtype)
    except NotImplementedError as e:
        return str(e)
    return None


def attention(q, k, v, *, mask, scale, softcap, sinks, interpret, out_dtype=None):
    """The ``register.py`` entry: ``(o [B, T, N, E] in out_dtype, lse [B, N, T] float32)``.

    Example (sm90 GPU):
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (1, 8, 2, 64), jnp.bfloat16)
      >>> attention(x, x, x, mask=None, scale=None, softcap=None, sinks=None,
      ...           interpret=False)[1].shape  # doctest: +SKIP
      (1, 2, 8)
    """
    return flash_attention_mosaic(q, k, v, mask=mask, scale=scale, softcap=softcap, sinks=sinks,
                                  interpret=interpret, out_dtype=out_dtype)
