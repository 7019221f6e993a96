"""What the kernel bodies share: in-kernel math (pure jnp, traced inside the TPU, Triton
and Mosaic GPU kernels) and the static call description of the two GPU kernels.

The XLA side around the kernels (padding, row prep, sinks, the custom VJP) is
``kernels_pallas.flash.shell``.

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
