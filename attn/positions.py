"""Position encodings applied by position ids: RoPE (full, partial, YaRN) and ALiBi.

RoPE rotates pairs of head dims by an angle proportional to the token's *position id*
(never its array index), so decode, packed documents and context-parallel shards need
no special cases: ``q·k`` after rotation depends only on ``pos_q - pos_k``.

* Pairing is rotate-half (NeoX / Llama): dim ``i`` pairs with ``i + R/2`` inside the
  rotated block of ``R`` dims.
* Partial RoPE (``fraction < 1``) rotates the first ``R = round(fraction·H/2)·2`` dims
  and passes the rest through unchanged.
* YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension") interpolates
  each frequency by its wavelength ratio ``r = L_orig / λ``: ramp
  ``γ = clip((r - β_slow) / (β_fast - β_slow), 0, 1)``, ``θ' = (1-γ)·θ/s + γ·θ``
  (high frequencies kept, low frequencies divided by the factor ``s``), and the
  attention temperature ``√(1/t) = 0.1·ln(s) + 1`` multiplies cos and sin, i.e. both
  q and k, so the logits scale by ``1/t`` exactly as the paper does. With partial RoPE
  the pass-through dims are multiplied by the same factor so every logit term is
  tempered alike.

Math is done in float32; outputs keep the input dtype.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn.positions import RopeConfig, apply_rope
  >>> x = jnp.ones((1, 4, 2, 8))
  >>> pos = jnp.arange(4)[None]
  >>> apply_rope(x, pos, theta=10_000.0, fraction=0.5).shape
  (1, 4, 2, 8)
  >>> RopeConfig(theta=1e6).apply(x, pos).dtype
  dtype('float32')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

Array = Any


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN context extension settings (see module docstring for the math).

    Attributes:
      factor: context extension factor ``s >= 1`` (new length / original length).
      original_max_position: the training context length ``L_orig``.
      beta_fast: wavelength ratio above which a frequency is kept (paper: 32).
      beta_slow: wavelength ratio below which a frequency is fully interpolated (paper: 1).
      mscale: attention temperature multiplier ``√(1/t)``; None means the paper's
        ``0.1·ln(factor) + 1``.

    Example:
      >>> round(YarnScaling(factor=4.0, original_max_position=4096).attention_factor, 4)
      1.1386
    """

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None

    def __post_init__(self):
        if not self.factor >= 1.0:
            raise ValueError(f"YarnScaling.factor must be >= 1, got {self.factor!r}")
        if not (isinstance(self.original_max_position, int) and self.original_max_position > 0):
            raise ValueError(
                "YarnScaling.original_max_position must be a positive int, got "
                f"{self.original_max_position!r}"
            )
        if not self.beta_fast > self.beta_slow > 0:
            raise ValueError(
                f"YarnScaling needs beta_fast > beta_slow > 0, got beta_fast={self.beta_fast!r}, "
                f"beta_slow={self.beta_slow!r}"
            )

    @property
    def attention_factor(self) -> float:
        """``√(1/t)``, the multiplier applied to both q and k."""
        if self.mscale is not None:
            return float(self.mscale)
        return 0.1 * math.log(self.factor) + 1.0


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """How a layer applies RoPE; hashable so it can sit in a layer ``Config``.

    Attributes:
      theta: base wavelength (10_000 for Llama-2, 500_000 for Llama-3, ...).
      fraction: share of the head dim that is rotated, in ``(0, 1]``.
      scaling: ``YarnScaling`` (or a dict of its fields) or None.

    Example:
      >>> import jax.numpy as jnp
      >>> cfg = RopeConfig(theta=10_000.0, fraction=0.25)
      >>> cfg.rotary_dims(64)
      16
    """

    theta: float = 10_000.0
    fraction: float = 1.0
    scaling: YarnScaling | None = None

    def __post_init__(self):
        if isinstance(self.scaling, Mapping):
            object.__setattr__(self, "scaling", YarnScaling(**dict(self.scaling)))
        if not self.theta > 0:
            raise ValueError(f"RopeConfig.theta must be > 0, got {self.theta!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"RopeConfig.fraction must be in (0, 1], got {self.fraction!r}")
        if self.scaling is not None and not isinstance(self.scaling, YarnScaling):
            raise ValueError(
                f"RopeConfig.scaling must be a YarnScaling, a dict or None, got {self.scaling!r}"
            )

    @classmethod
    def from_any(cls, value) -> "RopeConfig | None":
        """Accept a RopeConfig, a dict of its fields, or None (configs pass dicts)."""
        if value is None or isinstance(value, RopeConfig):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"RopeConfig: unknown keys {sorted(unknown)}")
            return cls(**dict(value))
        raise ValueError(f"rope must be a RopeConfig, a dict or None, got {value!r}")

    def rotary_dims(self, head_dim: int) -> int:
        """Number of rotated dims ``R`` for a head of size ``head_dim``."""
        return rotary_dims(head_dim, self.fraction)

    def apply(self, x_BTNH: Array, positions_BT: Array) -> Array:
        """``apply_rope`` with this config's settings."""
        return apply_rope(
            x_BTNH, positions_BT, theta=self.theta, fraction=self.fraction, scaling=self.scaling
        )


# --------------------------------------------------------------------------- pure functions
def rotary_dims(head_dim: int, fraction: float = 1.0) -> int:
    """``R = round(fraction · H / 2) · 2``: the even number of dims that get rotated.

    Example:
      >>> rotary_dims(72, 0.5)
      36
    """
    r = int(round(fraction * head_dim / 2)) * 2
    if r <= 0:
        raise ValueError(
            f"RoPE fraction={fraction!r} rotates no dims of head_dim={head_dim}; raise the fraction"
        )
    return min(r, head_dim - head_dim % 2)


def rope_frequencies(
    head_dim: int,
    *,
    theta: float = 10_000.0,
    fraction: float = 1.0,
    scaling: YarnScaling | None = None,
) -> np.ndarray:
    """Inverse frequencies ``[R/2]`` (float32 numpy) for the rotated dims.

    ``inv_freq[i] = theta ** (-2i / R)`` with ``R = rotary_dims(head_dim, fraction)``;
    with ``scaling`` each one is YaRN-interpolated (see module docstring).

    Args:
      head_dim: H, the full per-head size.
      theta: RoPE base.
      fraction: rotated share of H.
      scaling: optional ``YarnScaling``.

    Example:
      >>> [round(float(f), 4) for f in rope_frequencies(8, theta=100.0)]
      [1.0, 0.3162, 0.1, 0.0316]
    """
    R = rotary_dims(head_dim, fraction)
    inv_freq = 1.0 / (theta ** (np.arange(0, R, 2, dtype=np.float64) / R))
    if scaling is not None:
        wavelength = 2.0 * np.pi / inv_freq
        ratio = scaling.original_max_position / wavelength  # r(d): rotations within L_orig
        gamma = np.clip(
            (ratio - scaling.beta_slow) / (scaling.beta_fast - scaling.beta_slow), 0.0, 1.0
        )
        inv_freq = (1.0 - gamma) * inv_freq / scaling.factor + gamma * inv_freq
    return inv_freq.astype(np.float32)


def apply_rope(
    x_BTNH: Array,
    positions_BT: Array,
    *,
    theta: float = 10_000.0,
    fraction: float = 1.0,
    scaling: YarnScaling | None = None,
) -> Array:
    """Rotate the first ``R`` dims of every head by angle ``position · inv_freq``.

    Args:
      x_BTNH: ``[B, T, N, H]`` queries or keys (any float dtype).
      positions_BT: ``[B, T]`` integer position ids.
      theta, fraction, scaling: see ``rope_frequencies``.

    Returns:
      ``[B, T, N, H]`` in ``x_BTNH.dtype``; dims ``R:`` are passed through (times the
      YaRN attention factor when ``scaling`` is set).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((1, 3, 1, 4))
      >>> y = apply_rope(x, jnp.array([[0, 1, 2]]))
      >>> bool(jnp.allclose(y[:, 0], x[:, 0]))   # position 0 is the identity
      True
    """
    if getattr(x_BTNH, "ndim", None) != 4:
        raise ValueError(f"apply_rope: x must be [B, T, N, H], got shape {getattr(x_BTNH, 'shape', None)}")
    B, T, N, H = x_BTNH.shape
    if tuple(positions_BT.shape) != (B, T):
        raise ValueError(
            f"apply_rope: positions must be [B, T]=({B}, {T}), got {tuple(positions_BT.shape)}"
        )
    inv_freq = jnp.asarray(rope_frequencies(H, theta=theta, fraction=fraction, scaling=scaling))
    R = 2 * inv_freq.shape[0]
    mscale = 1.0 if scaling is None else scaling.attention_factor
    angle_BTR = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    cos = (jnp.cos(angle_BTR) * mscale)[:, :, None, :]
    sin = (jnp.sin(angle_BTR) * mscale)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2, rest = x[..., : R // 2], x[..., R // 2 : R], x[..., R:]
    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if H > R:
        out.append(rest * mscale if mscale != 1.0 else rest)
    return jnp.concatenate(out, axis=-1).astype(x_BTNH.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes ``[N]`` (Press et al. 2022), float32 numpy.

    For a power of two ``n``: ``2 ** (-8 (i+1) / n)``; otherwise the slopes of the
    nearest lower power of two followed by every other slope of twice that size, as in
    the reference implementation. The bias is ``-slope[n] · (q_pos - k_pos)``.

    Example:
      >>> alibi_slopes(4).tolist()
      [0.25, 0.0625, 0.015625, 0.00390625]
    """
    if not (isinstance(num_heads, int) and num_heads > 0):
        raise ValueError(f"alibi_slopes: num_heads must be a positive int, got {num_heads!r}")

    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = pow2(closest)
    if closest != num_heads:
        slopes += pow2(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(slopes, np.float32)


def alibi_bias(slopes_N: Array, q_positions_BT: Array, kv_positions_BS: Array) -> Array:
    """ALiBi additive bias ``[B, N, T, S]`` float32 from positions (for ``attention(bias=)``).

    Example:
      >>> import jax.numpy as jnp
      >>> b = alibi_bias(jnp.asarray(alibi_slopes(2)), jnp.arange(3)[None], jnp.arange(3)[None])
      >>> b.shape
      (1, 2, 3, 3)
    """
    dist_BTS = (q_positions_BT[:, :, None] - kv_positions_BS[:, None, :]).astype(jnp.float32)
    return -jnp.asarray(slopes_N, jnp.float32)[None, :, None, None] * jnp.abs(dist_BTS)[:, None]
