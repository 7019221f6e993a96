"""Math shared by the TPU and Triton kernel bodies (pure jnp, traced inside kernels).

Logits are kept in base 2: ``s2 = log2(e) · softcap(scale · q·k)`` so the softmax
uses ``exp2`` (one multiply folded into the scale that is applied anyway); the lse
leaves the kernels in natural units.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def logits2(s_raw, scale: float, softcap: float | None):
    """Base-2 logits from raw ``q·k`` (float32), and ``tanh`` values for the softcap VJP.

    Returns ``(s2, t)``: ``s2 = log2e · c · tanh(scale · s / c)`` (or ``log2e · scale · s``)
    and ``t = tanh(scale · s / c)`` (None without softcap).
    """
    if softcap is None:
        return s_raw * (scale * LOG2E), None
    t = jnp.tanh(s_raw * (scale / softcap))
    return t * (softcap * LOG2E), t


def visibility(qp, kp, qs, ks, kidx, *, left, right, kv_len, kv_padded):
    """Element visibility of one partial block, or None when nothing needs masking.

    ``qp``/``kp`` positions and ``qs``/``ks`` segments broadcast against each other
    (row/column vectors or full tiles, in either orientation); ``kidx`` is the key
    index (to hide internal padding). ``right`` has causality folded in.
    """
    vis = None

    def both(a, b):
        return b if a is None else a & b

    if right is not None:
        vis = both(vis, kp - qp <= right)
    if left is not None:
        vis = both(vis, qp - kp <= left)
    if qs is not None:
        vis = both(vis, (qs == ks) & (qs != 0))
    if kv_padded > kv_len:
        vis = both(vis, kidx < kv_len)
    return vis


def clip_window(w):
    """Window sides as int32-safe Python ints (None stays None)."""
    return None if w is None else int(min(w, 2**30))


def fit(x, axis: int, n: int):
    """Pad with zeros or slice ``axis`` of ``x`` to length ``n`` (no-op when equal)."""
    cur = x.shape[axis]
    if cur == n:
        return x
    if cur > n:
        return x[(slice(None),) * axis + (slice(0, n),)]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - cur)
    return jnp.pad(x, widths)


def sink_grad(sinks, lse_BNT, D_BNT):
    """``dsinks[n] = -Σ_{b,t} exp(sink[n] - lse[b,n,t]) · D[b,n,t]`` (None without sinks).

    ``D = rowsum(dO ∘ O) - dlse``; rows with lse = -inf (nothing visible, no sink)
    contribute 0.
    """
    if sinks is None:
        return None
    ok = jnp.isfinite(lse_BNT)
    lse = jnp.where(ok, lse_BNT, 0.0)
    p = jnp.where(ok, jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse), 0.0)
    return jnp.sum(-p * D_BNT, axis=(0, 2)).astype(sinks.dtype)


def row_delta(do_BTNE, o_BTNE, dlse_BNT):
    """``D [B, N, T] = rowsum(dO ∘ O) - dlse`` in float32 (the lse cotangent is a row shift)."""
    D = jnp.einsum("BTNE,BTNE->BNT", do_BTNE.astype(jnp.float32), o_BTNE.astype(jnp.float32))
    return D - dlse_BNT.astype(jnp.float32)


def backward_rows(do_BTNE, o_BTNE, lse_BNT, dlse_BNT, q_padded: int):
    """Per-row backward inputs, padded to ``q_padded`` rows: ``(D, D_p, lse2_p)``.

    ``D`` is unpadded (for ``sink_grad``); ``lse2_p`` is the lse in base 2 with 0 for
    fully masked rows and +inf for padded rows, so ``exp2(s - lse2)`` is 0 there
    whatever ``s`` is.
    """
    D = row_delta(do_BTNE, o_BTNE, dlse_BNT)
    lse2 = jnp.where(jnp.isfinite(lse_BNT), lse_BNT * LOG2E, 0.0)
    pad = q_padded - lse_BNT.shape[-1]
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, pad)), constant_values=jnp.inf)
    return D, fit(D, 2, q_padded), lse2


@dataclasses.dataclass(frozen=True)
class GpuKernelCfg:
    """Static description of one attention call for the GPU kernels (hashable).

    The Mosaic GPU kernels use it as is; the Triton kernels extend it with their
    launch parameters.
    """

    B: int
    T: int
    S: int
    N: int
    K: int
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

    @property
    def G(self) -> int:
        return self.N // self.K


def gpu_cfg_fields(B, T, S, N, K, Hp, Ep, mask, *, scale, softcap, has_sinks, interpret) -> dict:
    """The ``GpuKernelCfg`` fields of one call (the mask's statics folded in)."""
    return dict(B=B, T=T, S=S, N=N, K=K, Hp=Hp, Ep=Ep, scale=float(scale),
                softcap=None if softcap is None else float(softcap),
                left=clip_window(mask.window_left), right=clip_window(mask.window_right),
                has_qpos=mask.q_positions is not None, has_kvpos=mask.kv_positions is not None,
                has_seg=mask.has_segments, has_sinks=has_sinks, interpret=bool(interpret))
