"""Liger: a pretrained softmax-attention layer as gated linear attention, reusing its weights.

Lan et al. 2025, "Liger: Linearizing Large Language Models to Gated Recurrent
Structures" (arXiv 2503.01496), as its released layer computes it
(``fla-org/distillation-fla``, ``liger/models/liger_gla``). No parameter is added: the
layer keeps an MHA/GQA layer's ``q_kernel [D,N,H]``, ``k_kernel, v_kernel [D,K,H]`` and
``o_kernel [N,H,D]``, and per head (kv heads repeated over their G query heads)::

    q̃ = softmax(x W_q),  k̃ = softmax(x W_k)             feature maps over H (no RoPE)
    g  = logsigmoid(x W_k) / 16                         per-channel log-decay: the gate
                                                        *is* the key projection
    S_t = Diag(exp g_t) S_{t-1} + k̃_t v_tᵀ,   o_lin = S_tᵀ q̃_t          (GLA, scale 1)

The released code pools the keys to the gate width (``AdaptiveAvgPool1d`` to the same
width, i.e. the identity) and recovers the model with LoRA on the projections.

**Liger attention** (``hybrid=True``, the default): the output mixes the GLA branch with
causal sliding-window softmax attention on the RoPE'd q, k of the same projections,
``o = mix · o_swa + (1 - mix) · o_lin`` (``mix = 0.5`` as released; ``window``
defaults to 64 here). ``hybrid=False`` is the pure recurrent layer.

Cache: ``LigerCache`` holds the GLA state ``[B, N, H, V]`` (float32) and, for the
hybrid, a ring buffer of the last ``window`` keys and values: its size does not grow
with the context.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn.linear.liger import Liger, Config, init_cache
  >>> cfg = Config(d_model=16, num_heads=2, num_kv_heads=1, window=4, dtype="float32")
  >>> x = jax.random.normal(jax.random.key(0), (1, 6, 16)); pos = jnp.arange(6)[None]
  >>> layer = Liger(cfg); params = layer.init(jax.random.key(1), x, positions_BT=pos)
  >>> y, c = jax.eval_shape(lambda p: layer.apply(p, x, positions_BT=pos, cache=init_cache(cfg, batch=1)),
  ...                       params)
  >>> y.shape, c.state.shape, c.swa.k.shape          # decode == forward: tests/test_liger.py
  ((1, 6, 16), (1, 2, 8, 8), (1, 4, 1, 8))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from attn import mha, registry
from attn.cache import RingKVCache
from attn.core import attention
from attn.linear import _chunked
from attn.masks import Mask
from attn.positions import RopeConfig

Array = Any
DEFAULT_WINDOW = 64


# The attn.mha.Config fields Liger shares (it has no ``causal``, ``qk_norm`` or ``sinks``:
# the recurrence is causal and its feature maps read the raw q and k).
MHA_FIELDS = ("d_model", "num_heads", "num_kv_heads", "head_dim", "rope", "window", "softcap",
              "use_bias", "impl", "dtype", "param_dtype", "norm_eps")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one Liger layer: the projections' fields of ``attn.mha.Config`` plus Liger's.

    Attributes:
      d_model, num_heads, num_kv_heads, head_dim, rope, softcap, use_bias, impl, dtype,
        param_dtype, norm_eps: as ``attn.mha.Config`` (the pretrained layer's).
      window: the sliding window of the hybrid's softmax branch (default 64; unused
        without ``hybrid``).
      hybrid: Liger attention (sliding-window softmax + GLA) or the pure GLA layer.
      mix: the softmax branch's weight in the hybrid.
      gate_normalizer: the log-decay is ``logsigmoid(x W_k) / gate_normalizer``.
      chunk_size: C of the chunked GLA.
      linear_impl: "auto" | "naive" | "chunked" for the recurrence.

    Example:
      >>> Config(d_model=16, num_heads=2).window, Config(d_model=16, num_heads=2, hybrid=False).window
      (64, None)
    """

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope: RopeConfig | None = RopeConfig()
    window: int | None = None
    softcap: float | None = None
    use_bias: bool = False
    hybrid: bool = True
    mix: float = 0.5
    gate_normalizer: float = 16.0
    chunk_size: int = 64
    linear_impl: str = "auto"
    impl: str = "auto"
    dtype: Any = "bfloat16"
    param_dtype: Any = "float32"
    norm_eps: float = 1e-6

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("window", (self.window or DEFAULT_WINDOW) if self.hybrid else None)
        # The projections are an MHA layer's: its config validates and resolves the shared fields.
        m = mha.Config(**{f: getattr(self, f) for f in MHA_FIELDS}, causal=True)
        for f in MHA_FIELDS:
            set_(f, getattr(m, f))
        set_("_mha", m)
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"liger: mix must be in [0, 1], got {self.mix!r}")
        if not self.gate_normalizer > 0:
            raise ValueError(f"liger: gate_normalizer must be > 0, got {self.gate_normalizer!r}")
        if not (isinstance(self.chunk_size, int) and self.chunk_size > 0):
            raise ValueError(f"liger: chunk_size must be a positive int, got {self.chunk_size!r}")
        if self.linear_impl != "auto" and self.linear_impl not in _chunked.IMPLS:
            raise ValueError(f"liger: linear_impl must be 'auto' or one of {sorted(_chunked.IMPLS)}, "
                             f"got {self.linear_impl!r}")

    @property
    def mha_config(self) -> mha.Config:
        """The MHA layer whose parameters this one uses (causal, no qk-norm, no sinks)."""
        return self._mha

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mha(cls, c: mha.Config, **liger_fields) -> "Config":
        """The Liger layer over an MHA/GQA layer's weights; ValueError for what it cannot keep."""
        for flag in ("qk_norm", "sinks"):
            if getattr(c, flag):
                raise ValueError(f"liger: {flag}=True is not supported (the feature maps read raw q, k)")
        if not c.causal:
            raise ValueError("liger: causal=False is not supported (the recurrence is causal)")
        return cls(**{**{f: getattr(c, f) for f in MHA_FIELDS}, **liger_fields})


@struct.dataclass
class LigerCache:
    """``state [B, N, H, V]`` float32, ``swa``: a ``RingKVCache`` (hybrid) or None, ``length``."""

    state: Array
    swa: Any
    length: Array


def init_cache(config: Config, batch: int, max_len: int = 0, dtype=None) -> LigerCache:
    """An empty cache; its size is fixed (``max_len`` is ignored).

    Example:
      >>> c = init_cache(Config(d_model=16, num_heads=2, num_kv_heads=1, window=8), batch=3)
      >>> c.state.shape, c.swa.k.shape
      ((3, 2, 8, 8), (3, 8, 1, 8))
    """
    cfg = config
    dt = cfg.dtype if dtype is None else jnp.dtype(dtype)
    swa = None
    if cfg.hybrid:
        swa = RingKVCache.create(window=cfg.window, batch=batch, num_kv_heads=cfg.num_kv_heads,
                                 head_dim=cfg.head_dim, dtype=dt)
    return LigerCache(state=jnp.zeros((batch, cfg.num_heads, cfg.head_dim, cfg.head_dim), jnp.float32),
                      swa=swa, length=jnp.zeros((), jnp.int32))


def stats(config: Config, seq_len: int) -> dict:
    """Size and cost of one layer: MHA's projections; no per-token KV growth.

    ``state_bytes``: the GLA state ``4·N·H·H`` plus, for the hybrid, the ring of ``window``
    keys and values (``2·W·K·H`` in the compute dtype, plus int32 positions and segments).
    """
    cfg = config
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    it = jnp.dtype(cfg.dtype).itemsize
    ring = cfg.window * (2 * K * H * it + 8) if cfg.hybrid else 0
    c = (min(cfg.chunk_size, seq_len) + 1) / 2
    swa = 2.0 * N * 2 * H * min(cfg.window or 0, seq_len) if cfg.hybrid else 0.0
    return dict(params=mha.param_count(cfg.mha_config), kv_bytes_per_token=0,
                flops_per_token=2.0 * (D * N * H + 2 * D * K * H + N * H * D)
                + 2.0 * N * (c * 2 * H + 2 * H * H) + swa,
                state_bytes=4 * N * H * H + ring)


def liger_forward(params, x_BTD, *, config: Config, positions_BT=None, segment_ids_BT=None, cache=None):
    """The layer as a pure function of the MHA parameter dict; returns ``(y_BTD, cache)``."""
    cfg, dt = config, config.dtype
    if getattr(x_BTD, "ndim", None) != 3 or x_BTD.shape[-1] != cfg.d_model:
        raise ValueError(f"liger: x must be [B, T, D] with D={cfg.d_model}, got {getattr(x_BTD, 'shape', x_BTD)}")
    B, T, _ = x_BTD.shape
    if cache is not None and positions_BT is None:
        raise ValueError("liger: positions_BT is required with a cache")
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if positions_BT is None else positions_BT
    seg = jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    q, k, v = mha.project_unrotated(params, x_BTD, cfg.mha_config)
    G = cfg.num_heads // cfg.num_kv_heads
    rep = lambda a: jnp.repeat(a, G, axis=2)          # kv head j serves query heads jG..jG+G-1
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    g = rep(jax.nn.log_sigmoid(k32) / cfg.gate_normalizer)
    S0 = None if cache is None else cache.state
    o_lin, S = _chunked.run(jax.nn.softmax(q32, -1).astype(dt), rep(jax.nn.softmax(k32, -1)).astype(dt),
                            rep(v), g, None, name="liger", delta=False, scale=1.0, initial_state=S0,
                            output_final_state=cache is not None, segment_ids=seg,
                            impl=cfg.linear_impl, chunk_size=cfg.chunk_size)
    o, swa = o_lin.astype(dt), None
    if cfg.hybrid:
        qr, kr = (cfg.rope.apply(a, pos) for a in (q, k)) if cfg.rope is not None else (q, k)
        if cache is None:
            mask = Mask(causal=True, window=cfg.mha_config.mask_window, q_positions=positions_BT,
                        kv_positions=positions_BT, q_segment_ids=segment_ids_BT, kv_segment_ids=segment_ids_BT)
            ks, vs = kr, v
        else:
            ks, vs, kv_pos, kv_seg, swa = cache.swa.append(kr, v, pos, seg)
            ks, vs = ks.astype(dt), vs.astype(dt)
            mask = Mask(causal=True, window=cfg.mha_config.mask_window, q_positions=pos.astype(jnp.int32),
                        kv_positions=kv_pos, q_segment_ids=seg, kv_segment_ids=kv_seg)
        o_swa = attention(qr, ks, vs, mask=mask, softcap=cfg.softcap, impl=cfg.impl,
                          self_attention=cache is None)
        o = (cfg.mix * o_swa.astype(jnp.float32) + (1 - cfg.mix) * o_lin.astype(jnp.float32)).astype(dt)
    y = mha.project_out(params, o, cfg.mha_config)
    if cache is None:
        return y, None
    return y, LigerCache(state=S, swa=swa, length=cache.length + T)


class Liger(nn.Module):
    """Liger layer: MHA's parameters around ``liger_forward``.

    ``__call__(x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None) -> (y, cache)``.
    """

    config: Config

    @nn.compact
    def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None):
        return liger_forward(mha.make_params(self, self.config.mha_config), x_BTD, config=self.config,
                             positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, cache=cache)


registry.register(registry.Mechanism(
    name="liger", module=Liger, config_cls=Config, init_cache=init_cache, stats=stats,
    make_config=registry.dataclass_config_factory(Config, "liger"),
    order_free=False,  # the recurrence runs along T
    small_config=None,
    description="Liger: GLA from a softmax layer's own q/k/v (key projection as gate) + sliding-window softmax",
))
