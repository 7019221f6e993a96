"""Position encodings applied by position ids: RoPE (full, partial, YaRN) and ALiBi.

RoPE rotates pairs of head dims by an angle proportional to the token's *position id*
(never its array index), so decode, packed documents and context-parallel shards need
no special cases: ``q·k`` after rotation depends only on ``pos_q - pos_k``.

* Pairing is rotate-half (NeoX / Llama): dim ``i`` pairs with ``i + R/2`` inside the
  rotated block of ``R`` dims.
* Partial RoPE (``fraction < 1``) rotates the first ``R = round(fraction·H/2)·2`` dims
  and passes the rest through unchanged.
* Scalings (``RopeConfig.scaling``): ``YarnScaling`` (the default "yarn": Hugging Face's
  and the YaRN reference code's ramp over the dimension index), ``Llama3Scaling``,
  ``LinearScaling``, ``DynamicNTKScaling`` and ``YarnWavelengthScaling``, described next.
* ``YarnWavelengthScaling`` (Peng et al. 2023, "YaRN", the equations as written) interpolates
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
    """YaRN as Hugging Face and the YaRN reference code compute it (the default "yarn").

    The ramp runs over the *dimension index*: ``d(β) = R·ln(L_orig / (2π β)) / (2 ln θ)``
    is the pair index whose frequency turns β times within ``L_orig``;
    ``low = floor(d(β_fast))``, ``high = ceil(d(β_slow))`` (unrounded with
    ``truncate=False``), clipped to ``[0, R-1]``; ``γ_i = 1 - clip((i - low)/(high - low), 0, 1)``
    and ``θ'_i = γ_i·θ_i + (1-γ_i)·θ_i/s``. The attention factor multiplies cos and sin
    (so q·k scales by its square).

    Attributes:
      factor: s >= 1.
      original_max_position: ``L_orig``.
      beta_fast, beta_slow: rotation counts bounding the ramp (32, 1).
      mscale: the attention factor itself (HF ``attention_factor``); None = derived.
      mscale_num, mscale_den: HF's ``mscale`` / ``mscale_all_dim`` (DeepSeek): when both set,
        the factor is ``m(s, mscale_num) / m(s, mscale_den)`` with ``m(s, a) = 0.1·a·ln s + 1``.
      truncate: round the ramp ends to integers (HF default True).

    Example:
      >>> round(YarnScaling(factor=4.0, original_max_position=4096).attention_factor, 4)
      1.1386
    """

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_num: float | None = None
    mscale_den: float | None = None
    truncate: bool = True

    # Unrotated dims (partial RoPE) get the factor too, as attnlab's MLA/TransMLA expect;
    # HF leaves them alone, but none of the imported families has partial RoPE with YaRN.
    scales_passthrough = True

    def __post_init__(self):
        _check_factor(self, self.factor, self.original_max_position)
        if not self.beta_fast > self.beta_slow > 0:
            raise ValueError(f"YarnScaling needs beta_fast > beta_slow > 0, got beta_fast={self.beta_fast!r}, "
                             f"beta_slow={self.beta_slow!r}")

    @property
    def attention_factor(self) -> float:
        if self.mscale is not None:
            return float(self.mscale)
        m = lambda a: 1.0 if self.factor <= 1 else 0.1 * a * math.log(self.factor) + 1.0
        if self.mscale_num and self.mscale_den:
            return m(self.mscale_num) / m(self.mscale_den)
        return m(1.0)

    def inv_freq(self, inv_freq, *, theta: float, rotary_dims: int, positions_BT=None):
        R = rotary_dims
        dim = lambda rot: R * math.log(self.original_max_position / (rot * 2 * math.pi)) / (2 * math.log(theta))
        low, high = dim(self.beta_fast), dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, R - 1)
        if low == high:
            high += 0.001  # HF's guard against a zero-width ramp
        ramp = np.clip((np.arange(R // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        keep = 1.0 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate by s
        return inv_freq / self.factor * (1.0 - keep) + inv_freq * keep

    def to_hf(self) -> dict:
        d = dict(rope_type="yarn", factor=self.factor, original_max_position_embeddings=self.original_max_position,
                 beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
        if self.mscale is not None:
            d["attention_factor"] = self.mscale
        if self.mscale_num and self.mscale_den:
            d.update(mscale=self.mscale_num, mscale_all_dim=self.mscale_den)
        return d


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
    """Llama-3.1 ``rope_type="llama3"``: wavelengths above ``L_orig / low_freq_factor`` are
    divided by ``factor``, below ``L_orig / high_freq_factor`` kept, smoothly in between
    (``γ = (L_orig/λ - low) / (high - low)``); no attention factor.

    Example:
      >>> Llama3Scaling(8.0, 8192).attention_factor
      1.0
    """

    factor: float
    original_max_position: int
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    scales_passthrough = False
    attention_factor = 1.0

    def __post_init__(self):
        _check_factor(self, self.factor, self.original_max_position)
        if not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(f"Llama3Scaling needs high_freq_factor > low_freq_factor > 0, got "
                             f"{self.high_freq_factor!r}, {self.low_freq_factor!r}")

    def inv_freq(self, inv_freq, *, theta: float, rotary_dims: int, positions_BT=None):
        wavelen = 2 * np.pi / inv_freq
        L = self.original_max_position
        out = np.where(wavelen > L / self.low_freq_factor, inv_freq / self.factor, inv_freq)
        smooth = (L / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * out / self.factor + smooth * out
        medium = (wavelen >= L / self.high_freq_factor) & (wavelen <= L / self.low_freq_factor)
        return np.where(medium, smoothed, out)

    def to_hf(self) -> dict:
        return dict(rope_type="llama3", factor=self.factor, original_max_position_embeddings=self.original_max_position,
                    low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)


@dataclasses.dataclass(frozen=True)
class LinearScaling:
    """Position interpolation (``rope_type="linear"``): every frequency divided by ``factor``.

    Example:
      >>> LinearScaling(2.0).inv_freq(np.array([1.0]), theta=1e4, rotary_dims=2).tolist()
      [0.5]
    """

    factor: float
    scales_passthrough = False
    attention_factor = 1.0

    def __post_init__(self):
        _check_factor(self, self.factor, 1)

    def inv_freq(self, inv_freq, *, theta: float, rotary_dims: int, positions_BT=None):
        return inv_freq / self.factor

    def to_hf(self) -> dict:
        return dict(rope_type="linear", factor=self.factor)


@dataclasses.dataclass(frozen=True)
class DynamicNTKScaling:
    """Dynamic NTK (``rope_type="dynamic"``): the base grows with the sequence length
    ``L = max(max(position) + 1, L_orig)`` of the call: ``θ' = θ·(s·L/L_orig - (s-1))^(R/(R-2))``.

    As in HF, ``L`` is the largest position of this call (over the whole batch); keys
    already in a cache keep the angles they were rotated with.

    Example:
      >>> DynamicNTKScaling(2.0, 16).inv_freq(np.array([1.0, 0.1]), theta=100.0, rotary_dims=4).tolist()
      [1.0, 0.1]
    """

    factor: float
    original_max_position: int
    scales_passthrough = False
    attention_factor = 1.0

    def __post_init__(self):
        _check_factor(self, self.factor, self.original_max_position)

    def inv_freq(self, inv_freq, *, theta: float, rotary_dims: int, positions_BT=None):
        if positions_BT is None:
            return inv_freq  # within L_orig the frequencies are the plain ones
        R, L0 = rotary_dims, self.original_max_position
        L = jnp.maximum(jnp.max(positions_BT).astype(jnp.float32) + 1.0, float(L0))
        base = theta * (self.factor * L / L0 - (self.factor - 1.0)) ** (R / (R - 2))
        return 1.0 / base ** (jnp.arange(0, R, 2, dtype=jnp.float32) / R)

    def to_hf(self) -> dict:
        return dict(rope_type="dynamic", factor=self.factor)


def _check_factor(obj, factor, original_max_position):
    name = type(obj).__name__
    if not factor >= 1.0:
        raise ValueError(f"{name}.factor must be >= 1, got {factor!r}")
    if not (isinstance(original_max_position, int) and original_max_position > 0):
        raise ValueError(f"{name}.original_max_position must be a positive int, got {original_max_position!r}")


@dataclasses.dataclass(frozen=True)
class YarnWavelengthScaling:
    """YaRN with the ramp over the wavelength ratio ``r`` (the paper's equations as written).

    attnlab's YaRN before checkpoints were imported; kept for models trained with it.
    Hugging Face and the YaRN reference code ramp over the dimension index instead:
    that is ``YarnScaling``.

    Attributes:
      factor: context extension factor ``s >= 1`` (new length / original length).
      original_max_position: the training context length ``L_orig``.
      beta_fast: wavelength ratio above which a frequency is kept (paper: 32).
      beta_slow: wavelength ratio below which a frequency is fully interpolated (paper: 1).
      mscale: attention temperature multiplier ``√(1/t)``; None means the paper's
        ``0.1·ln(factor) + 1``.

    Example:
      >>> round(YarnWavelengthScaling(factor=4.0, original_max_position=4096).attention_factor, 4)
      1.1386
    """

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None

    def __post_init__(self):
        if not self.factor >= 1.0:
            raise ValueError(f"YarnWavelengthScaling.factor must be >= 1, got {self.factor!r}")
        if not (isinstance(self.original_max_position, int) and self.original_max_position > 0):
            raise ValueError(
                "YarnWavelengthScaling.original_max_position must be a positive int, got "
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

    scales_passthrough = True  # partial RoPE: the unrotated dims get the factor too

    def inv_freq(self, inv_freq, *, theta: float, rotary_dims: int, positions_BT=None):
        wavelength = 2.0 * np.pi / inv_freq
        ratio = self.original_max_position / wavelength  # r(d): rotations within L_orig
        gamma = np.clip((ratio - self.beta_slow) / (self.beta_fast - self.beta_slow), 0.0, 1.0)
        return (1.0 - gamma) * inv_freq / self.factor + gamma * inv_freq

    def to_hf(self) -> dict:
        raise ValueError("YarnWavelengthScaling has no Hugging Face rope_type (HF's yarn is YarnScaling)")


# "type" of a scaling given as a dict -> class. "yarn" is HF's (dimension-index ramp).
SCALINGS = {"yarn": YarnScaling, "yarn_wavelength": YarnWavelengthScaling, "llama3": Llama3Scaling,
            "linear": LinearScaling, "dynamic": DynamicNTKScaling}


def scaling_from_any(value):
    """A scaling object from itself, None, or a dict (``{"type": "yarn"|..., **fields}``; no
    "type" means "yarn")."""
    if value is None or isinstance(value, tuple(SCALINGS.values())):
        return value
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        d = dict(value)
        kind = d.pop("type", "yarn")
        if kind not in SCALINGS:
            raise ValueError(f"RoPE scaling: unknown type {kind!r}; known: {sorted(SCALINGS)}")
        return SCALINGS[kind](**d)
    raise ValueError(f"RoPE scaling must be one of {sorted(SCALINGS)} (object or dict) or None, got {value!r}")


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
        object.__setattr__(self, "scaling", scaling_from_any(self.scaling))
        if not self.theta > 0:
            raise ValueError(f"RopeConfig.theta must be > 0, got {self.theta!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"RopeConfig.fraction must be in (0, 1], got {self.fraction!r}")

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
        inv_freq = scaling.inv_freq(inv_freq, theta=theta, rotary_dims=R)
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
    if getattr(scaling, "dynamic", False) or isinstance(scaling, DynamicNTKScaling):
        inv_freq = scaling.inv_freq(inv_freq, theta=theta, rotary_dims=R, positions_BT=positions_BT)
    mscale = 1.0 if scaling is None else scaling.attention_factor
    angle_BTR = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    cos = (jnp.cos(angle_BTR) * mscale)[:, :, None, :]
    sin = (jnp.sin(angle_BTR) * mscale)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2, rest = x[..., : R // 2], x[..., R // 2 : R], x[..., R:]
    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if H > R:
        passthrough = scaling is not None and scaling.scales_passthrough and mscale != 1.0
        out.append(rest * mscale if passthrough else rest)
    return jnp.concatenate(out, axis=-1).astype(x_BTNH.dtype)


def interleaved_to_half(w, num_heads: int, head_dim: int):
    """Permute rows ``[num_heads·head_dim, ...]`` from interleaved RoPE pairing to rotate-half.

    Interleaved RoPE (GPT-J, ggml/llama.cpp "llama" files, DeepSeek-V2/V3) rotates pairs
    ``(2i, 2i+1)`` of a head; rotate-half pairs ``(i, i + H/2)``. Moving row ``2i`` to ``i``
    and ``2i+1`` to ``i + H/2`` in each head of the q and k projections (weights or biases)
    makes ``apply_rope`` give the interleaved model's scores, since q·k is unchanged when
    q and k are permuted alike. This undoes llama.cpp's ``permute`` of Q/K.

    Example:
      >>> import numpy as np
      >>> interleaved_to_half(np.arange(4), 1, 4).tolist()
      [0, 2, 1, 3]
    """
    w = np.asarray(w)
    if w.shape[0] != num_heads * head_dim or head_dim % 2:
        raise ValueError(f"interleaved_to_half: {w.shape[0]} rows are not num_heads={num_heads} x "
                         f"even head_dim={head_dim}")
    rest = w.shape[1:]
    return w.reshape(num_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


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
