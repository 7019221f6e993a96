"""Multi-head attention with grouped K/V heads: MHA (K = N), GQA (1 < K < N), MQA (K = 1).

One layer, ``MHA``, covers the family; the registry names "mha", "gqa" and "mqa" only
differ in how ``num_kv_heads`` is chosen. Options: per-head RMSNorm on q and k
(``qk_norm``), RoPE by position ids (full, partial, YaRN), a causal sliding window
(served from a ring-buffer cache when decoding), learned attention sinks, logit
softcapping and projection biases.

Parameters (logical axes in brackets, for ``nn.with_logical_partitioning``)::

    q_kernel [D, N, H]  (embed, heads, head_dim)       'BTD,DNH->BTNH'
    k_kernel [D, K, H]  (embed, kv_heads, head_dim)    'BTD,DKH->BTKH'
    v_kernel [D, K, E]  (embed, kv_heads, head_dim)    'BTD,DKE->BTKE'
    o_kernel [N, E, D]  (heads, head_dim, embed)       'BTNE,NED->BTD'
    q_bias [N, H], k_bias [K, H], v_bias [K, E], o_bias [D]       (use_bias)
    q_norm [H], k_norm [H]                                         (qk_norm)
    sinks [N]                                                      (sinks)

E = H in this family. The module is a thin holder of these parameters around the pure
``mha_forward(params, x_BTD, config=..., ...)`` at the bottom of the file, which other
JAX projects can call with their own parameter dicts.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn.mha import Config, MHA, init_cache
  >>> cfg = Config(d_model=32, num_heads=4, num_kv_heads=2, dtype="float32")
  >>> x = jnp.ones((1, 5, 32)); pos = jnp.arange(5)[None]
  >>> layer = MHA(cfg)
  >>> params = layer.init(jax.random.key(0), x, positions_BT=pos)
  >>> y, _ = layer.apply(params, x, positions_BT=pos)
  >>> cache = init_cache(cfg, batch=1, max_len=8)
  >>> y_dec, cache = layer.apply(params, x[:, :1], positions_BT=pos[:, :1], cache=cache)
  >>> y.shape, int(cache.length)
  ((1, 5, 32), 1)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn import registry
from attn.axes import EMBED, HEAD_DIM, HEADS, KV_HEADS
from attn.cache import SLOT_META_BYTES, KVCache, RingKVCache
from attn.config_checks import check_runtime_fields, positive_int as _positive_int
from attn.core import attention
from attn.masks import Mask
from attn.positions import RopeConfig

Array = Any


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one MHA/GQA/MQA layer; validates itself on construction.

    Attributes:
      d_model: D, model width.
      num_heads: N, query heads.
      num_kv_heads: K, key/value heads (None = N); ``N % K == 0``. Resolved on construction.
      head_dim: H (= E) per head (None = D // N). Resolved on construction.
      qk_norm: RMSNorm over H on q and k (per head, shared scale), before RoPE.
      rope: ``RopeConfig`` (or a dict of its fields), or None for no position encoding.
      window: left reach W of a causal sliding window (keys at ``pos - W .. pos``), or None.
      causal: hide keys at later positions (a cache needs causal=True).
      sinks: learn ``[N]`` sink logits (an extra softmax term with a zero value).
      softcap: ``c · tanh(logits / c)`` when set.
      use_bias: biases on the q/k/v/o projections.
      impl: attention implementation for ``attn.core.attention`` ("auto", "xla", ...).
      dtype: compute dtype (string or jnp dtype), e.g. "bfloat16".
      param_dtype: parameter dtype, normally "float32".
      norm_eps: epsilon of the qk RMSNorm.

    Example:
      >>> Config(d_model=64, num_heads=8, num_kv_heads=2).head_dim
      8
    """

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    qk_norm: bool = False
    rope: RopeConfig | None = RopeConfig()
    window: int | None = None
    causal: bool = True
    sinks: bool = False
    softcap: float | None = None
    use_bias: bool = False
    impl: str = "auto"
    dtype: Any = "bfloat16"
    param_dtype: Any = "float32"
    norm_eps: float = 1e-6

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        _positive_int("Config", "d_model", self.d_model)
        _positive_int("Config", "num_heads", self.num_heads)
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        _positive_int("Config", "num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"Config.num_kv_heads={self.num_kv_heads} must divide "
                f"num_heads={self.num_heads} (N % K == 0)"
            )
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"Config.head_dim is None but d_model={self.d_model} is not a multiple of "
                    f"num_heads={self.num_heads}; set head_dim explicitly"
                )
            set_("head_dim", self.d_model // self.num_heads)
        _positive_int("Config", "head_dim", self.head_dim)
        set_("rope", RopeConfig.from_any(self.rope))
        if self.rope is not None:
            self.rope.rotary_dims(self.head_dim)  # raises if the fraction rotates nothing
        if self.window is not None and not (
            isinstance(self.window, (int, np.integer)) and not isinstance(self.window, bool)
            and self.window >= 0
        ):
            raise ValueError(f"Config.window must be a non-negative int or None, got {self.window!r}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"Config.softcap must be > 0 or None, got {self.softcap!r}")
        check_runtime_fields(self)

    def replace(self, **changes) -> "Config":
        """``dataclasses.replace``; num_kv_heads / head_dim were resolved at construction,
        so pass them again when changing num_heads or d_model."""
        return dataclasses.replace(self, **changes)

    @property
    def mask_window(self) -> tuple[int, int | None] | None:
        """The ``Mask.window`` of this layer: ``(W, 0)`` causal, ``(W, W)`` otherwise."""
        if self.window is None:
            return None
        return (int(self.window), 0 if self.causal else int(self.window))


# --------------------------------------------------------------------------- module
def _fan_in_init(in_axis, out_axis):
    """LeCun-normal over the contracted axes, so q/k/v/o outputs start at unit scale."""
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
    )


class MHA(nn.Module):
    """MHA / GQA / MQA layer: a parameter holder around ``mha_forward``.

    ``__call__(x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None,
    extra_range_BT2=None) -> (y_BTD, cache)``

    Args (of ``__call__``):
      x_BTD: ``[B, T, D]`` inputs.
      positions_BT: ``[B, T]`` int position ids; None means ``arange(T)`` (no cache only;
        leaving them out lets "auto" pick kernels that cannot take positions).
      segment_ids_BT: ``[B, T]`` int document ids, 0 = padding; None = one document.
      cache: None (train / prefill without a cache) or the pytree from ``init_cache``;
        the T tokens are appended and attend over everything cached.
      extra_range_BT2: ``[B, T, 2]`` int, or None: per token an inclusive range of key
        positions it may see on top of the causal rule (``Mask.q_extra_range``; e.g. image
        tokens seeing the question after them, ``models/vlm.py``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = MHA(Config(d_model=16, num_heads=2, dtype="float32"))
      >>> x = jnp.ones((2, 3, 16))
      >>> params = layer.init(jax.random.key(0), x)
      >>> layer.apply(params, x)[0].shape
      (2, 3, 16)
    """

    config: Config

    @nn.compact
    def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None,
                 extra_range_BT2=None):
        return mha_forward(
            make_params(self, self.config), x_BTD, config=self.config,
            positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, cache=cache,
            extra_range_BT2=extra_range_BT2,
        )


def make_params(module: nn.Module, cfg: Config) -> dict[str, Array]:
    """Create (or fetch) the layer's parameters inside ``module``; returns a plain dict."""
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = cfg.param_dtype

    def param(name, init, shape, axes):
        return module.param(name, nn.with_logical_partitioning(init, axes), shape, pd)

    p = {
        "q_kernel": param("q_kernel", _fan_in_init(0, (1, 2)), (D, N, H), (EMBED, HEADS, HEAD_DIM)),
        "k_kernel": param("k_kernel", _fan_in_init(0, (1, 2)), (D, K, H), (EMBED, KV_HEADS, HEAD_DIM)),
        "v_kernel": param("v_kernel", _fan_in_init(0, (1, 2)), (D, K, H), (EMBED, KV_HEADS, HEAD_DIM)),
        "o_kernel": param("o_kernel", _fan_in_init((0, 1), 2), (N, H, D), (HEADS, HEAD_DIM, EMBED)),
    }
    if cfg.use_bias:
        zeros = nn.initializers.zeros
        p["q_bias"] = param("q_bias", zeros, (N, H), (HEADS, HEAD_DIM))
        p["k_bias"] = param("k_bias", zeros, (K, H), (KV_HEADS, HEAD_DIM))
        p["v_bias"] = param("v_bias", zeros, (K, H), (KV_HEADS, HEAD_DIM))
        p["o_bias"] = param("o_bias", zeros, (D,), (EMBED,))
    if cfg.qk_norm:
        p["q_norm"] = param("q_norm", nn.initializers.ones, (H,), (HEAD_DIM,))
        p["k_norm"] = param("k_norm", nn.initializers.ones, (H,), (HEAD_DIM,))
    if cfg.sinks:
        p["sinks"] = param("sinks", nn.initializers.zeros, (N,), (HEADS,))
    return p


# --------------------------------------------------------------------------- cache / stats
def init_cache(config: Config, batch: int, max_len: int, dtype=None):
    """An empty cache for one layer: a ring of ``window`` slots when windowed, else full.

    Args:
      config: the layer ``Config``.
      batch: B.
      max_len: total tokens the full cache can hold (prompt + generated); ignored by
        the ring buffer, which holds ``window`` slots for any length.
      dtype: cache dtype (default ``config.dtype``).

    Example:
      >>> c = init_cache(Config(d_model=16, num_heads=2, window=4), batch=1, max_len=100)
      >>> type(c).__name__, c.k.shape
      ('RingKVCache', (1, 4, 2, 8))
    """
    dtype = config.dtype if dtype is None else jnp.dtype(dtype)
    kw = dict(batch=batch, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=dtype)
    if config.window is not None:
        return RingKVCache.create(window=config.window, **kw)
    return KVCache.create(max_len=max_len, **kw)


def param_count(config: Config) -> int:
    """Number of parameters of one layer (matches ``make_params``)."""
    D, N, K, H = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    n = D * N * H + 2 * D * K * H + N * H * D
    n += (N * H + 2 * K * H + D) if config.use_bias else 0
    n += 2 * H if config.qk_norm else 0
    n += N if config.sinks else 0
    return n


def mean_context(seq_len: int, *, causal: bool, window: int | None) -> float:
    """Average number of keys a query sees in a length-``seq_len`` sequence.

    Causal: ``(T + 1) / 2``; causal window W: ``mean_t min(t + 1, W + 1)``; non-causal:
    T, or the clipped ``2W + 1`` band with a window.

    Example:
      >>> mean_context(4, causal=True, window=None), mean_context(4, causal=True, window=1)
      (2.5, 1.75)
    """
    t = np.arange(seq_len)
    lo = np.zeros_like(t) if window is None else np.maximum(t - window, 0)
    hi = t if causal else (np.full_like(t, seq_len - 1) if window is None else np.minimum(t + window, seq_len - 1))
    return float(np.mean(hi - lo + 1))


def stats(config: Config, seq_len: int) -> dict:
    """Size and cost figures of one layer at sequence length ``seq_len``.

    * ``params``: parameter count (kernels, biases, norms, sinks).
    * ``kv_bytes_per_token``: bytes one cached token takes per sequence:
      ``K·(H+E)·itemsize(dtype) + 8`` (the 8 are its int32 position and segment id).
      The full cache holds ``max_len`` tokens; the ring buffer of a windowed layer holds
      ``window`` tokens however long the sequence, so its total is bounded at
      ``window · kv_bytes_per_token`` per sequence.
    * ``flops_per_token``: forward FLOPs per token,
      ``2·(D·N·H + 2·D·K·H + N·E·D) + 2·N·(H+E)·ctx``, where the first term is the four
      projections (2 per multiply-add) and the second is ``q·k`` plus ``p·v`` over the
      mean visible context ``ctx = mean_context(seq_len, causal, window)`` (causal
      averaging: ``(T+1)/2``). With E = H it is ``4·N·H·ctx``. Norms, softmax and
      RoPE are not counted; a training step costs about 3x.
    * ``state_bytes``: 0 (no recurrent state).

    Example:
      >>> s = stats(Config(d_model=64, num_heads=4, num_kv_heads=2, dtype="bfloat16"), 128)
      >>> s["params"], s["kv_bytes_per_token"]
      (12288, 136)
    """
    D, N, K, H = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    E = H
    ctx = mean_context(seq_len, causal=config.causal, window=config.window)
    itemsize = jnp.dtype(config.dtype).itemsize
    return dict(
        params=param_count(config),
        kv_bytes_per_token=K * (H + E) * itemsize + SLOT_META_BYTES,
        flops_per_token=2.0 * (D * N * H + D * K * H + D * K * E + N * E * D)
        + 2.0 * N * (H + E) * ctx,
        state_bytes=0,
    )


# --------------------------------------------------------------------------- pure functions
def rms_norm(x, scale, eps: float = 1e-6):
    """RMSNorm over the last axis, computed in float32, returned in ``x.dtype``.

    Args:
      x: ``[..., D]`` (or ``[..., H]`` for a per-head norm).
      scale: ``[D]`` learned gain.

    Example:
      >>> import jax.numpy as jnp
      >>> rms_norm(jnp.full((1, 4), 3.0), jnp.ones(4)).tolist()
      [[0.9999999403953552, 0.9999999403953552, 0.9999999403953552, 0.9999999403953552]]
    """
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inv * scale.astype(jnp.float32)).astype(x.dtype)


def _check_call(cfg: Config, x_BTD, positions_BT, segment_ids_BT, cache) -> None:
    """Input validation with messages that name the argument and its shape."""
    if getattr(x_BTD, "ndim", None) != 3 or x_BTD.shape[-1] != cfg.d_model:
        raise ValueError(
            f"MHA: x must be [B, T, D] with D=d_model={cfg.d_model}, got shape "
            f"{getattr(x_BTD, 'shape', type(x_BTD))}"
        )
    BT = tuple(x_BTD.shape[:2])
    for name, a in (("positions_BT", positions_BT), ("segment_ids_BT", segment_ids_BT)):
        if a is not None and tuple(getattr(a, "shape", ())) != BT:
            raise ValueError(f"MHA: {name} must have shape [B, T]={BT}, got {getattr(a, 'shape', a)}")
    if cache is not None:
        if not cfg.causal:
            raise ValueError("MHA: a KV cache needs causal=True (decode cannot see future tokens)")
        if positions_BT is None:
            raise ValueError("MHA: positions_BT is required with a cache (the mask uses positions)")
        if isinstance(cache, RingKVCache) and (cfg.window is None or cache.capacity < cfg.window):
            raise ValueError(
                f"MHA: a ring-buffer cache of {cache.capacity} slots cannot serve window={cfg.window}"
            )


def project_unrotated(params, x_BTD, config: Config):
    """Projections (and biases, qk-norm) before RoPE: ``q [B,T,N,H]``, ``k [B,T,K,H]``, ``v [B,T,K,E]``."""
    cfg, dt = config, config.dtype
    x = x_BTD.astype(dt)
    q = jnp.einsum("BTD,DNH->BTNH", x, params["q_kernel"].astype(dt))
    k = jnp.einsum("BTD,DKH->BTKH", x, params["k_kernel"].astype(dt))
    v = jnp.einsum("BTD,DKE->BTKE", x, params["v_kernel"].astype(dt))
    if cfg.use_bias:
        q, k, v = (a + params[n].astype(dt) for a, n in ((q, "q_bias"), (k, "k_bias"), (v, "v_bias")))
    if cfg.qk_norm:
        q = rms_norm(q, params["q_norm"], cfg.norm_eps)
        k = rms_norm(k, params["k_norm"], cfg.norm_eps)
    return q, k, v


def project_qkv(params, x_BTD, positions_BT, config: Config):
    """Projections, qk-norm and RoPE: ``q [B,T,N,H]``, ``k [B,T,K,H]``, ``v [B,T,K,E]``."""
    cfg = config
    q, k, v = project_unrotated(params, x_BTD, cfg)
    if cfg.rope is not None:
        q, k = cfg.rope.apply(q, positions_BT), cfg.rope.apply(k, positions_BT)
    return q, k, v


def mha_forward(params: Mapping[str, Array], x_BTD, *, config: Config, positions_BT=None,
                segment_ids_BT=None, cache=None, extra_range_BT2=None):
    """The layer as a pure function of its parameter dict.

    Args:
      params: dict with ``q_kernel [D,N,H]``, ``k_kernel [D,K,H]``, ``v_kernel [D,K,E]``,
        ``o_kernel [N,E,D]`` and the optional entries of ``make_params``.
      x_BTD: ``[B, T, D]``.
      config: the layer ``Config``.
      positions_BT: ``[B, T]`` int, or None for ``arange(T)`` (not with a cache).
      segment_ids_BT: ``[B, T]`` int (0 = padding) or None.
      cache: None, a ``KVCache``, a ``RingKVCache``, or a cache with an ``attend``
        method (``attn.kv.head_cache``: per-head KV policies), which then attends.
      extra_range_BT2: ``[B, T, 2]`` int or None (``Mask.q_extra_range``).

    Returns:
      ``(y_BTD in config.dtype, cache)`` — the updated cache, or None.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = Config(d_model=8, num_heads=2, num_kv_heads=1, dtype="float32")
      >>> p = {n: jnp.ones(s) * 0.1 for n, s in dict(q_kernel=(8, 2, 4), k_kernel=(8, 1, 4),
      ...      v_kernel=(8, 1, 4), o_kernel=(2, 4, 8)).items()}
      >>> mha_forward(p, jnp.ones((1, 3, 8)), config=cfg)[0].shape
      (1, 3, 8)
    """
    cfg = config
    _check_call(cfg, x_BTD, positions_BT, segment_ids_BT, cache)
    B, T, _ = x_BTD.shape
    rope_pos = positions_BT
    if rope_pos is None:
        rope_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    q, k, v = project_qkv(params, x_BTD, rope_pos, cfg)
    if cache is None:
        mask = Mask(causal=cfg.causal, window=cfg.mask_window,
                    q_positions=positions_BT, kv_positions=positions_BT,
                    q_segment_ids=segment_ids_BT, kv_segment_ids=segment_ids_BT,
                    q_extra_range=extra_range_BT2)
    elif hasattr(cache, "attend"):
        # A cache that attends over itself (attn.kv: per-head policy caches, whose kv
        # heads hold different tokens, which one [B, S] mask cannot describe).
        if extra_range_BT2 is not None:
            raise NotImplementedError("MHA: extra_range_BT2 is not served by per-head policy caches")
        seg = jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT
        sinks = params["sinks"].astype(jnp.float32) if cfg.sinks else None
        o, cache = cache.attend(q, k, v, positions_BT, seg, window=cfg.mask_window,
                                softcap=cfg.softcap, sinks=sinks, impl=cfg.impl)
        return project_out(params, o, cfg), cache
    else:
        seg = jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT
        # The cache decides what we attend over (full buffer, or ring ++ new tokens);
        # the mask is built from the positions and segments it returns.
        k, v, kv_pos, kv_seg, cache = cache.append(k, v, positions_BT, seg)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        mask = Mask(causal=True, window=cfg.mask_window,
                    q_positions=positions_BT.astype(jnp.int32), kv_positions=kv_pos,
                    q_segment_ids=seg.astype(jnp.int32), kv_segment_ids=kv_seg,
                    q_extra_range=extra_range_BT2)
    sinks = params["sinks"].astype(jnp.float32) if cfg.sinks else None
    o = attention(q, k, v, mask=mask, softcap=cfg.softcap, sinks=sinks, impl=cfg.impl,
                  self_attention=cache is None)  # with a cache, k/v are the cache's slots
    return project_out(params, o, cfg), cache


def project_out(params, o_BTNE, cfg: Config):
    """``o [B,T,N,E] -> [B,T,D]`` through ``o_kernel`` (and ``o_bias``)."""
    y = jnp.einsum("BTNE,NED->BTD", o_BTNE, params["o_kernel"].astype(cfg.dtype))
    if cfg.use_bias:
        y = y + params["o_bias"].astype(cfg.dtype)
    return y


# --------------------------------------------------------------------------- registration
def _gqa_kv_heads(kw: dict) -> dict:
    """GQA default: the largest divisor of N that is at most max(1, N // 4)."""
    N = kw.get("num_heads")
    if not isinstance(N, int) or N <= 0:
        return {}
    target = max(1, N // 4)
    return {"num_kv_heads": max(k for k in range(1, target + 1) if N % k == 0)}


def _register(name: str, description: str, small_config=None, **factory_kw) -> None:
    registry.register(registry.Mechanism(
        name=name, module=MHA, config_cls=Config, init_cache=init_cache, stats=stats,
        make_config=registry.dataclass_config_factory(Config, name, **factory_kw),
        description=description, small_config=small_config,
    ))


_register("mha", "multi-head attention: K = N", fixed={"num_kv_heads": lambda kw: kw.get("num_heads")})
# Small models have 4 heads, where the default K = N // 4 = 1 would equal mqa; 2 keeps
# gqa distinct.
_register("gqa", "grouped-query attention: K = N // 4 by default", defaults=_gqa_kv_heads,
          small_config=lambda width: {"num_kv_heads": 2})
_register("mqa", "multi-query attention: one shared K/V head", fixed={"num_kv_heads": 1})
