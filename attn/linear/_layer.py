"""The shared layer of the linear family: projections, short conv, gates, output gate + norm.

As in FLA's layers: ``q, k, v = x W`` per head; an optional causal depthwise convolution
of width ``conv_size`` followed by SiLU (segment-aware, its last inputs kept in the
cache); the variant's feature map (L2-norm of q and k for the delta rules); the variant's
log-decay ``g`` and, for the delta rules, ``beta = sigmoid(x W_b)``; the recurrence
(``attn.linear._chunked``); then ``RMSNorm(o) * silu(x W_og)`` per head and ``W_o``.

Parameters (logical axes in brackets)::

    q_kernel [D, N, H], k_kernel [D, N, H], v_kernel [D, N, V], o_kernel [N, V, D]
    conv_q [conv, N, H], conv_k [conv, N, H], conv_v [conv, N, V]        (conv_size > 0)
    og_kernel [D, N, V], o_norm [V]                                     (output gate + norm)
    b_kernel [D, N]                                                     (delta rules)
    the variant's gate parameters (see its file)

The cache is the recurrent state (``LinearCache``): its size does not grow with T.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn import registry
  >>> mech = registry.get("gdn")
  >>> cfg = mech.make_config(dict(d_model=16, num_heads=2, dtype="float32"), {})
  >>> layer = mech.module(cfg); x = jnp.ones((1, 5, 16))
  >>> params = layer.init(jax.random.key(0), x)
  >>> y, _ = layer.apply(params, x)
  >>> c = mech.init_cache(cfg, batch=1, max_len=5)
  >>> y1, c = layer.apply(params, x[:, :3], cache=c); y2, c = layer.apply(params, x[:, 3:], cache=c)
  >>> bool(jnp.allclose(y, jnp.concatenate([y1, y2], 1), atol=1e-5)), int(c.length)
  (True, 5)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from attn import registry
from attn.axes import EMBED, HEAD_DIM, HEADS
from attn.config_checks import check_runtime_fields, positive_int
from attn.errors import UserError
from attn.linear import _chunked

Array = Any


@dataclasses.dataclass(frozen=True)
class Variant:
    """What distinguishes one member of the family inside the shared layer.

    Attributes:
      name: registry name.
      delta: delta rule (erase with beta) or plain gated accumulation.
      feature: ``(q, k) -> (q, k)`` applied after the conv (L2 norm, SiLU, identity).
      gate_params: ``(module, cfg) -> dict`` creating the gate's parameters.
      gate: ``(params, x_BTD, cfg) -> g`` log-decay ``[B,T,N]`` or ``[B,T,N,H]``, float32.
      gate_param_count: ``cfg -> int``.
      description: one line.
    """

    name: str
    delta: bool
    feature: Callable
    gate_params: Callable
    gate: Callable
    gate_param_count: Callable
    description: str
    conv_default: int = 4


VARIANTS: dict[str, Variant] = {}


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one linear-attention layer; validates itself on construction.

    Attributes:
      d_model: D. num_heads: N. head_dim: H (None = D // N). value_dim: V (None = H).
      variant: the registry name (pinned by each mechanism).
      conv_size: width of the short causal depthwise conv on q, k, v (0 = none;
        None = the variant's default).
      gate_rank: rank of the low-rank per-channel gate projection (gla, kda).
      chunk_size: C of the chunked form.
      impl: "auto" | "naive" | "chunked" (``attn.linear._chunked.IMPLS``); other names
        given for softmax attention (the model-wide ``impl``) mean "auto".
      dtype, param_dtype, norm_eps: as everywhere.
    """

    d_model: int
    num_heads: int
    variant: str = "gdn"
    head_dim: int | None = None
    value_dim: int | None = None
    conv_size: int | None = None
    gate_rank: int = 16
    chunk_size: int = 64
    impl: str = "auto"
    dtype: Any = "bfloat16"
    param_dtype: Any = "float32"
    norm_eps: float = 1e-6

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        positive_int("Config", "d_model", self.d_model)
        positive_int("Config", "num_heads", self.num_heads)
        if self.variant not in VARIANTS:
            raise UserError(f"Config.variant={self.variant!r}: not one of {sorted(VARIANTS)}")
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise UserError(f"Config.head_dim is None but d_model={self.d_model} is not a "
                                f"multiple of num_heads={self.num_heads}; set head_dim")
            set_("head_dim", self.d_model // self.num_heads)
        if self.value_dim is None:
            set_("value_dim", self.head_dim)
        if self.conv_size is None:
            set_("conv_size", VARIANTS[self.variant].conv_default)
        for f in ("head_dim", "value_dim", "gate_rank", "chunk_size"):
            positive_int("Config", f, getattr(self, f))
        if not (isinstance(self.conv_size, int) and self.conv_size >= 0):
            raise UserError(f"Config.conv_size must be an int >= 0, got {self.conv_size!r}")
        check_runtime_fields(self)

    @property
    def core_impl(self) -> str:
        return self.impl if self.impl in _chunked.IMPLS else "auto"


# --------------------------------------------------------------------------- cache
@struct.dataclass
class LinearCache:
    """Recurrent state of one layer; ``.length`` counts appended tokens.

    Attributes:
      state: ``[B, N, H, V]`` float32.
      conv: ``[B, conv_size - 1, N·(2H + V)]`` last conv inputs (q, k, v concatenated).
      conv_seg: ``[B, conv_size - 1]`` int32 their segment ids (0 = none).
      last_seg: ``[B]`` int32 segment id of the last real token (0 = none yet).
      length: ``[]`` int32.
    """

    state: Array
    conv: Array
    conv_seg: Array
    last_seg: Array
    length: Array


def init_cache(config: Config, batch: int, max_len: int = 0, dtype=None) -> LinearCache:
    """An empty cache (``max_len`` is ignored: the state has a fixed size).

    Example:
      >>> c = init_cache(Config(d_model=16, num_heads=2, variant="gdn"), batch=3)
      >>> c.state.shape, c.conv.shape
      ((3, 2, 8, 8), (3, 3, 48))
    """
    cfg = config
    dt = cfg.dtype if dtype is None else jnp.dtype(dtype)
    N, H, V, m = cfg.num_heads, cfg.head_dim, cfg.value_dim, max(cfg.conv_size - 1, 0)
    return LinearCache(
        state=jnp.zeros((batch, N, H, V), jnp.float32),
        conv=jnp.zeros((batch, m, N * (2 * H + V)), dt),
        conv_seg=jnp.zeros((batch, m), jnp.int32),
        last_seg=jnp.zeros((batch,), jnp.int32),
        length=jnp.zeros((), jnp.int32),
    )


def param_count(config: Config) -> int:
    """Parameters of one layer (matches ``make_params``)."""
    cfg = config
    D, N, H, V = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.value_dim
    n = D * N * (2 * H + V) + N * V * D + D * N * V + V
    n += cfg.conv_size * N * (2 * H + V)
    n += D * N if VARIANTS[cfg.variant].delta else 0
    return n + VARIANTS[cfg.variant].gate_param_count(cfg)


def stats(config: Config, seq_len: int) -> dict:
    """Size and cost figures of one layer.

    * ``kv_bytes_per_token``: 0 (nothing grows with T).
    * ``state_bytes``: bytes of ``LinearCache`` per sequence:
      ``4·N·H·V + (conv-1)·(N·(2H+V)·itemsize + 4) + 4`` (the shared int32 ``length``
      is not counted).
    * ``flops_per_token``: ``2·(matmul params) + 2·N·(c·(H+V) + m·H·V)`` with
      ``c = (min(C, T) + 1) / 2`` keys visible inside a chunk and ``m = 3`` (delta: state
      read, erase, write) or 2; gates, norms and the triangular solve are not counted.

    Example:
      >>> s = stats(Config(d_model=16, num_heads=2, variant="gdn", dtype="float32"), 64)
      >>> s["kv_bytes_per_token"], s["state_bytes"]
      (0, 1104)
    """
    cfg = config
    N, H, V, m = cfg.num_heads, cfg.head_dim, cfg.value_dim, max(cfg.conv_size - 1, 0)
    it = jnp.dtype(cfg.dtype).itemsize
    mm = cfg.d_model * N * (2 * H + V) + N * V * cfg.d_model + cfg.d_model * N * V
    c = (min(cfg.chunk_size, seq_len) + 1) / 2
    k = 3 if VARIANTS[cfg.variant].delta else 2
    return dict(
        params=param_count(cfg),
        kv_bytes_per_token=0,
        flops_per_token=2.0 * mm + 2.0 * N * (c * (H + V) + k * H * V),
        state_bytes=4 * N * H * V + m * (N * (2 * H + V) * it + 4) + 4,
    )


# --------------------------------------------------------------------------- layer
def fan_in(in_axis, out_axis):
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)


def make_params(module: nn.Module, cfg: Config) -> dict:
    D, N, H, V = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.value_dim
    var = VARIANTS[cfg.variant]

    def param(name, init, shape, axes):
        return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype)

    p = {
        "q_kernel": param("q_kernel", fan_in(0, (1, 2)), (D, N, H), (EMBED, HEADS, HEAD_DIM)),
        "k_kernel": param("k_kernel", fan_in(0, (1, 2)), (D, N, H), (EMBED, HEADS, HEAD_DIM)),
        "v_kernel": param("v_kernel", fan_in(0, (1, 2)), (D, N, V), (EMBED, HEADS, HEAD_DIM)),
        "o_kernel": param("o_kernel", fan_in((0, 1), 2), (N, V, D), (HEADS, HEAD_DIM, EMBED)),
        "og_kernel": param("og_kernel", fan_in(0, (1, 2)), (D, N, V), (EMBED, HEADS, HEAD_DIM)),
        "o_norm": param("o_norm", nn.initializers.ones, (V,), (HEAD_DIM,)),
    }
    if cfg.conv_size:
        # Depthwise taps; start near identity (last tap 1) so early training sees q, k, v.
        def conv_init(key, shape, dtype):
            w = 0.1 * jax.random.normal(key, shape, dtype) / shape[0]
            return w.at[-1].add(1.0)
        for nm, E in (("conv_q", H), ("conv_k", H), ("conv_v", V)):
            p[nm] = param(nm, conv_init, (cfg.conv_size, N, E), (None, HEADS, HEAD_DIM))
    if var.delta:
        p["b_kernel"] = param("b_kernel", fan_in(0, 1), (D, N), (EMBED, HEADS))
    p.update(var.gate_params(module, cfg))
    return p


def _causal_conv(x_BTC, w_KC, seg_BT, hist, hist_seg):
    """Depthwise causal conv whose taps only see tokens of the same segment.

    ``hist [B, K-1, C]`` / ``hist_seg [B, K-1]`` are the previous inputs (zeros / 0 at the
    start). Returns ``(y [B,T,C], new hist, new hist_seg)``.
    """
    Kc = w_KC.shape[0]
    T = x_BTC.shape[1]
    xe = jnp.concatenate([hist.astype(x_BTC.dtype), x_BTC], axis=1)
    se = jnp.concatenate([hist_seg, seg_BT], axis=1)
    y = jnp.zeros(x_BTC.shape, jnp.float32)
    for s in range(Kc):  # tap s looks s tokens back
        xs = jax.lax.dynamic_slice_in_dim(xe, Kc - 1 - s, T, axis=1)
        ss = jax.lax.dynamic_slice_in_dim(se, Kc - 1 - s, T, axis=1)
        y = y + jnp.where((ss == seg_BT)[..., None], xs, 0) * w_KC[Kc - 1 - s].astype(jnp.float32)
    return y.astype(x_BTC.dtype), xe[:, T:], se[:, T:]


def l2_norm(x, eps=1e-6):
    """``x / ||x||`` over the last axis (float32 inside)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


def linear_forward(params, x_BTD, *, config: Config, segment_ids_BT=None, cache=None):
    """The layer as a pure function of its parameter dict; returns ``(y_BTD, cache)``."""
    cfg = config
    var = VARIANTS[cfg.variant]
    if getattr(x_BTD, "ndim", None) != 3 or x_BTD.shape[-1] != cfg.d_model:
        raise UserError(f"{cfg.variant}: x must be [B, T, D] with D={cfg.d_model}, got "
                        f"{getattr(x_BTD, 'shape', x_BTD)}")
    B, T, _ = x_BTD.shape
    N, H, V, dt = cfg.num_heads, cfg.head_dim, cfg.value_dim, cfg.dtype
    seg = jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    if cache is None:
        cache0 = init_cache(cfg, B, dtype=dt)
    else:
        cache0 = cache
    x = x_BTD.astype(dt)
    q = jnp.einsum("BTD,DNH->BTNH", x, params["q_kernel"].astype(dt))
    k = jnp.einsum("BTD,DNH->BTNH", x, params["k_kernel"].astype(dt))
    v = jnp.einsum("BTD,DNV->BTNV", x, params["v_kernel"].astype(dt))
    conv_hist, conv_seg = cache0.conv, cache0.conv_seg
    if cfg.conv_size:
        qkv = jnp.concatenate([a.reshape(B, T, -1) for a in (q, k, v)], -1)
        w = jnp.concatenate([params[n].reshape(cfg.conv_size, -1) for n in ("conv_q", "conv_k", "conv_v")], -1)
        qkv, conv_hist, conv_seg = _causal_conv(qkv, w, seg, conv_hist, conv_seg)
        qkv = jax.nn.silu(qkv)
        q, k, v = (a.reshape(B, T, N, -1) for a in jnp.split(qkv, [N * H, 2 * N * H], -1))
    q, k = var.feature(q, k)
    g = var.gate(params, x, cfg)
    beta = jax.nn.sigmoid(jnp.einsum("BTD,DN->BTN", x.astype(jnp.float32),
                                     params["b_kernel"].astype(jnp.float32))) if var.delta else None
    S0 = cache0.state
    if cache is not None:
        # A new document at the first real token of this call starts from zero.
        first = jnp.take_along_axis(seg, jnp.argmax(seg != 0, axis=1)[:, None], 1)[:, 0]
        new_doc = (first != 0) & (cache0.last_seg != 0) & (first != cache0.last_seg)
        S0 = jnp.where(new_doc[:, None, None, None], 0.0, S0)
    o, S = _chunked.run(q, k, v, g, beta, name=cfg.variant, delta=var.delta, initial_state=S0,
                        output_final_state=True, segment_ids=seg, impl=cfg.core_impl,
                        chunk_size=cfg.chunk_size)
    # Output: per-head RMSNorm gated by silu(x W_og) (FLA's FusedRMSNormGated).
    o32 = o.astype(jnp.float32)
    o32 = o32 * jax.lax.rsqrt(jnp.mean(o32 * o32, -1, keepdims=True) + cfg.norm_eps)
    gate = jax.nn.silu(jnp.einsum("BTD,DNV->BTNV", x, params["og_kernel"].astype(dt)).astype(jnp.float32))
    o = (o32 * params["o_norm"].astype(jnp.float32) * gate).astype(dt)
    y = jnp.einsum("BTNV,NVD->BTD", o, params["o_kernel"].astype(dt))
    if cache is None:
        return y, None
    idx = jnp.where(seg != 0, jnp.arange(T)[None], -1).max(1)
    last_seg = jnp.where(idx >= 0, jnp.take_along_axis(seg, jnp.maximum(idx, 0)[:, None], 1)[:, 0],
                         cache0.last_seg)
    return y, LinearCache(state=S, conv=conv_hist.astype(cache0.conv.dtype), conv_seg=conv_seg,
                          last_seg=last_seg, length=cache0.length + T)


class LinearAttention(nn.Module):
    """Linear-attention layer (variant by ``config.variant``): a holder around ``linear_forward``.

    ``__call__(x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None) -> (y, cache)``;
    positions are accepted for the common interface and unused (no position encoding:
    the recurrence is ordered by itself). Segment id 0 marks padding (identity steps).
    """

    config: Config

    @nn.compact
    def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None):
        return linear_forward(make_params(self, self.config), x_BTD, config=self.config,
                              segment_ids_BT=segment_ids_BT, cache=cache)


def register_variant(variant: Variant) -> None:
    """Add ``variant`` to ``VARIANTS`` and register it as an attention mechanism."""
    VARIANTS[variant.name] = variant
    registry.register(registry.Mechanism(
        name=variant.name, module=LinearAttention, config_cls=Config, init_cache=init_cache,
        stats=stats, description=variant.description,
        make_config=registry.dataclass_config_factory(Config, variant.name, fixed={"variant": variant.name}),
        order_free=False,  # the conv and the recurrence itself run along T
        small_config=None,
    ))
