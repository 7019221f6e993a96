"""Multi-head Latent Attention (MLA): DeepSeek-V2 (arXiv 2405.04434 §2.1) and V3.

Keys and values of every head are rebuilt from one small per-token latent, so the cache
holds only that latent and one shared RoPE key (§2.1.2-2.1.3):

    c_kv   = RMSNorm(x W_dkv)                          [B, S, L]      (cached)
    k_rope = RoPE(x W_kr)                              [B, S, Hr]     (cached, shared by heads)
    k_nope = c_kv W_uk,   v = c_kv W_uv                [B, S, N, Hn], [B, S, N, E]
    q      = x W_q  (or RMSNorm(x W_dq) W_uq)          q_nope [B,T,N,Hn], q_rope = RoPE(.) [B,T,N,Hr]
    o      = softmax([q_nope, q_rope]·[k_nope, k_rope] / sqrt(Hn + Hr)) v,   y = o W_o

Two ways to evaluate the same math, chosen by ``Config.absorb``:

* **expanded** (training / prefill): up-project the latent to per-head ``k_nope`` and
  ``v`` and call ``attention`` with qk dim ``Hn + Hr`` and value dim ``E``.
* **absorbed** (decode, §2.1.2 "we can absorb W_uk into W_q and W_uv into W_o"): the query
  is moved into latent space, ``q_lat = q_nope W_uk^T [B,T,N,L]``, and attention runs
  directly over the cache as a single shared KV head (MQA, K = 1) with key
  ``[c_kv, k_rope]`` (dim L + Hr) and value ``c_kv`` (dim L); the output ``[B,T,N,L]``
  is multiplied by ``W_uv`` per head. The logit scale stays ``1/sqrt(Hn + Hr)``: the
  dot products are the same numbers, only computed in another basis.

``"auto"`` uses the absorbed path exactly when a cache is given.

Extensions, both off by default so the layer is the paper's MLA:

* ``rope_heads = r > 1`` splits the decoupled RoPE key into ``r`` blocks of ``Hr / r``
  dims, each rotated with the same frequencies (TransMLA's multi-head RoPE key,
  ``attn/transmla.py``), which lets a converted GQA layer keep its RoPE exactly.
* ``kv_norm=False`` drops the RMSNorm on ``c_kv`` (DeepSeek-V2 §3.1.2 adds it; a
  converted GQA layer must be linear in x to be exact); ``q_norm=False`` likewise drops
  the one on the query latent (X-EcoMLA's SVD-initialised layers have neither).

With YaRN scaling, ``apply_rope`` multiplies the rotated q and k by the attention factor
``m``; ``q_nope`` is multiplied by ``m²`` so every logit term is tempered alike, as
DeepSeek-V3 does by scaling the whole softmax scale by ``m²``.

Parameters (logical axes)::

    q_nope_kernel [D|Lq, N, Hn], q_rope_kernel [D|Lq, N, Hr]   (embed|latent, heads, head_dim)
    q_down_kernel [D, Lq], q_norm [Lq]                          (q_lora_rank set; q_norm)
    kv_down_kernel [D, L] (embed, latent)   kv_norm [L] (latent)   k_rope_kernel [D, Hr]
    k_up_kernel [L, N, Hn], v_up_kernel [L, N, E]  (latent, heads, head_dim)
    o_kernel [N, E, D]  (heads, head_dim, embed)

The cache (``init_cache``) is an ``attn.cache.KVCache`` (or ``RingKVCache`` with a
window) whose "k" is ``c_kv [B,S,1,L]`` and "v" is ``k_rope [B,S,1,Hr]``, so its update
rules, positions and segment ids (0 = empty) are exactly those of ``attn/cache.py``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn.mla import Config, MLA, init_cache
  >>> cfg = Config(d_model=32, num_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
  ...              qk_rope_head_dim=4, v_head_dim=8, dtype="float32")
  >>> x = jnp.ones((1, 5, 32)); pos = jnp.arange(5)[None]
  >>> params = MLA(cfg).init(jax.random.key(0), x, positions_BT=pos)
  >>> y, _ = MLA(cfg).apply(params, x, positions_BT=pos)
  >>> cache = init_cache(cfg, batch=1, max_len=8)
  >>> y1, cache = MLA(cfg).apply(params, x[:, :1], positions_BT=pos[:, :1], cache=cache)
  >>> y.shape, cache.c_kv.shape, int(cache.length)
  ((1, 5, 32), (1, 8, 16), 1)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import struct

from attn import registry
from attn.axes import EMBED, HEAD_DIM, HEADS, LATENT
from attn.cache import SLOT_META_BYTES, KVCache, RingKVCache
from attn.config_checks import check_runtime_fields, positive_int
from attn.core import attention
from attn.masks import Mask
from attn.mha import mean_context, rms_norm
from attn.positions import RopeConfig

Array = Any


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _positive(field: str, value) -> None:
    positive_int("mla.Config", field, value)


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one MLA layer; validates itself on construction.

    Attributes:
      d_model: D.
      num_heads: N.
      kv_lora_rank: L, the cached latent (DeepSeek-V2: 512).
      q_lora_rank: Lq of the low-rank query (RMSNorm on the compressed query), or None
        for a full-rank query projection (DeepSeek-V2-Lite).
      qk_nope_head_dim: Hn, per-head query/key dims without position (128).
      qk_rope_head_dim: Hr, dims of the decoupled RoPE query/key (64).
      v_head_dim: E (128).
      rope: ``RopeConfig`` (or dict) applied to the Hr dims only, or None.
      rope_heads: RoPE key blocks r (``Hr % r == 0``); 1 is the paper, see module doc.
      kv_norm: RMSNorm on ``c_kv`` (paper: True).
      q_norm: RMSNorm on the query latent when ``q_lora_rank`` is set (paper: True).
      causal: hide later positions (a cache needs causal=True).
      window: left reach W of a causal sliding window, or None.
      softcap: ``c · tanh(logits / c)`` when set.
      absorb: "auto" (absorbed iff decoding with a cache), True or False.
      impl: ``attn.core.attention`` implementation.
      dtype, param_dtype: compute and parameter dtypes.
      norm_eps: RMSNorm epsilon.

    Example:
      >>> Config(d_model=64, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
      ...        qk_rope_head_dim=8, v_head_dim=16).softmax_scale
      0.2041241452319315
    """

    d_model: int
    num_heads: int
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope: RopeConfig | None = RopeConfig()
    rope_heads: int = 1
    kv_norm: bool = True
    q_norm: bool = True
    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    absorb: Any = "auto"
    impl: str = "auto"
    dtype: Any = "bfloat16"
    param_dtype: Any = "float32"
    norm_eps: float = 1e-6

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        for f in ("d_model", "num_heads", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "rope_heads"):
            _positive(f, getattr(self, f))
        if self.q_lora_rank is not None:
            _positive("q_lora_rank", self.q_lora_rank)
        set_("rope", RopeConfig.from_any(self.rope))
        if self.qk_rope_head_dim % self.rope_heads:
            raise ValueError(
                f"mla.Config.rope_heads={self.rope_heads} must divide "
                f"qk_rope_head_dim={self.qk_rope_head_dim}")
        if self.rope is not None and (self.qk_rope_head_dim // self.rope_heads) % 2:
            raise ValueError(
                f"mla.Config.qk_rope_head_dim={self.qk_rope_head_dim}: each of the "
                f"rope_heads={self.rope_heads} RoPE blocks needs an even number of dims")
        if self.window is not None and not (_is_int(self.window) and self.window >= 0):
            raise ValueError(f"mla.Config.window must be a non-negative int or None, got {self.window!r}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"mla.Config.softcap must be > 0 or None, got {self.softcap!r}")
        if not (self.absorb == "auto" or isinstance(self.absorb, bool)):
            raise ValueError(f"mla.Config.absorb must be 'auto', True or False, got {self.absorb!r}")
        check_runtime_fields(self, "mla.Config")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    @property
    def softmax_scale(self) -> float:
        """``1/sqrt(Hn + Hr)``: the query/key dim of the expanded heads (§2.1.3)."""
        return float((self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5)

    @property
    def mask_window(self) -> tuple[int, int | None] | None:
        if self.window is None:
            return None
        return (int(self.window), 0 if self.causal else int(self.window))


# --------------------------------------------------------------------------- cache
@struct.dataclass
class LatentCache(KVCache):
    """``KVCache`` holding ``c_kv`` as its k ``[B,S,1,L]`` and ``k_rope`` as its v ``[B,S,1,Hr]``.

    Example:
      >>> c = LatentCache.create(batch=2, max_len=8, num_kv_heads=1, head_dim=16, value_dim=4)
      >>> c.c_kv.shape, c.k_rope.shape
      ((2, 8, 16), (2, 8, 4))
    """

    @property
    def c_kv(self) -> Array:
        return self.k[..., 0, :]

    @property
    def k_rope(self) -> Array:
        return self.v[..., 0, :]


@struct.dataclass
class LatentRingCache(RingKVCache):
    """Ring-buffer ``LatentCache`` for a sliding window (same fields and properties)."""

    c_kv = LatentCache.c_kv
    k_rope = LatentCache.k_rope


def init_cache(config: Config, batch: int, max_len: int, dtype=None):
    """An empty latent cache: ``LatentRingCache`` of ``window`` slots when windowed, else full.

    Args:
      config: the layer ``Config``.
      batch: B.
      max_len: tokens a full cache holds (ignored by the ring).
      dtype: cache dtype, default ``config.dtype``.

    Example:
      >>> cfg = Config(d_model=16, num_heads=2, kv_lora_rank=8, qk_nope_head_dim=4,
      ...              qk_rope_head_dim=2, v_head_dim=4)
      >>> c = init_cache(cfg, batch=1, max_len=10)
      >>> c.k.shape, c.v.shape
      ((1, 10, 1, 8), (1, 10, 1, 2))
    """
    dtype = config.dtype if dtype is None else jnp.dtype(dtype)
    kw = dict(batch=batch, num_kv_heads=1, head_dim=config.kv_lora_rank,
              value_dim=config.qk_rope_head_dim, dtype=dtype)
    if config.window is not None:
        return LatentRingCache.create(window=config.window, **kw)
    return LatentCache.create(max_len=max_len, **kw)


# --------------------------------------------------------------------------- module
def _fan_in(in_axis, out_axis):
    """LeCun-normal over the contracted axes (outputs start at unit scale)."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)


class MLA(nn.Module):
    """MLA layer: a parameter holder around ``mla_forward``.

    ``__call__(x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None,
    extra_range_BT2=None) -> (y_BTD, cache)`` with the same meaning as ``attn.mha.MHA``
    (positions required with a cache).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = Config(d_model=16, num_heads=2, kv_lora_rank=8, qk_nope_head_dim=4,
      ...              qk_rope_head_dim=2, v_head_dim=4, q_lora_rank=8, dtype="float32")
      >>> x = jnp.ones((2, 3, 16))
      >>> params = MLA(cfg).init(jax.random.key(0), x)
      >>> MLA(cfg).apply(params, x)[0].shape
      (2, 3, 16)
    """

    config: Config

    @nn.compact
    def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None,
                 extra_range_BT2=None):
        return mla_forward(make_params(self, self.config), x_BTD, config=self.config,
                           positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, cache=cache,
                           extra_range_BT2=extra_range_BT2)


def make_params(module: nn.Module, cfg: Config) -> dict[str, Array]:
    """Create (or fetch) the layer's parameters inside ``module``; returns a plain dict."""
    D, N, L = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank
    Hn, Hr, E = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

    def param(name, init, shape, axes):
        return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype)

    ones = nn.initializers.ones
    p = {}
    q_in, q_axis = D, EMBED
    if cfg.q_lora_rank is not None:
        # §2.1.2 eq. (12): the query is also compressed, to cut training activations.
        q_in, q_axis = cfg.q_lora_rank, LATENT
        p["q_down_kernel"] = param("q_down_kernel", _fan_in(0, 1), (D, q_in), (EMBED, LATENT))
        if cfg.q_norm:
            p["q_norm"] = param("q_norm", ones, (q_in,), (LATENT,))
    p["q_nope_kernel"] = param("q_nope_kernel", _fan_in(0, (1, 2)), (q_in, N, Hn), (q_axis, HEADS, HEAD_DIM))
    p["q_rope_kernel"] = param("q_rope_kernel", _fan_in(0, (1, 2)), (q_in, N, Hr), (q_axis, HEADS, HEAD_DIM))
    p["kv_down_kernel"] = param("kv_down_kernel", _fan_in(0, 1), (D, L), (EMBED, LATENT))
    if cfg.kv_norm:
        p["kv_norm"] = param("kv_norm", ones, (L,), (LATENT,))
    p["k_rope_kernel"] = param("k_rope_kernel", _fan_in(0, 1), (D, Hr), (EMBED, HEAD_DIM))
    p["k_up_kernel"] = param("k_up_kernel", _fan_in(0, (1, 2)), (L, N, Hn), (LATENT, HEADS, HEAD_DIM))
    p["v_up_kernel"] = param("v_up_kernel", _fan_in(0, (1, 2)), (L, N, E), (LATENT, HEADS, HEAD_DIM))
    p["o_kernel"] = param("o_kernel", _fan_in((0, 1), 2), (N, E, D), (HEADS, HEAD_DIM, EMBED))
    return p


# --------------------------------------------------------------------------- stats
def param_count(config: Config) -> int:
    """Number of parameters of one layer (matches ``make_params``)."""
    c = config
    D, N, L = c.d_model, c.num_heads, c.kv_lora_rank
    Hn, Hr, E = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    q_in = D if c.q_lora_rank is None else c.q_lora_rank
    n = q_in * N * (Hn + Hr) + (0 if c.q_lora_rank is None else D * q_in + (q_in if c.q_norm else 0))
    n += D * L + (L if c.kv_norm else 0) + D * Hr + L * N * (Hn + E) + N * E * D
    return n


def stats(config: Config, seq_len: int) -> dict:
    """Size and cost figures of one layer at sequence length ``seq_len``.

    * ``params``: parameter count.
    * ``kv_bytes_per_token``: ``(L + Hr)·itemsize(dtype) + 8`` — the cached latent and
      shared RoPE key, plus the int32 position and segment id every cache slot stores
      (the ``attn.mha`` convention). A ring (window) holds ``window`` such slots.
    * ``flops_per_token``: forward FLOPs of the expanded (training / prefill) path,
      ``2·(Pq + D·L + D·Hr + L·N·(Hn+E) + N·E·D) + 2·N·(Hn+Hr+E)·ctx``, where ``Pq`` is
      ``D·N·(Hn+Hr)`` (or ``D·Lq + Lq·N·(Hn+Hr)`` with a low-rank query), the
      up-projection runs once per token, and ``ctx = mean_context(seq_len, ...)``.
    * ``flops_per_token_absorbed``: the absorbed (decode) path,
      ``2·(Pq + D·L + D·Hr + N·Hn·L + N·L·E + N·E·D) + 2·N·(2L+Hr)·ctx``: the per-key
      work grows from ``Hn+Hr+E`` to ``2L+Hr`` but nothing is up-projected per key.
    * ``state_bytes``: 0.

    Norms, softmax and RoPE are not counted.

    Example:
      >>> s = stats(Config(d_model=64, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
      ...                  qk_rope_head_dim=8, v_head_dim=16, dtype="bfloat16"), 128)
      >>> s["params"], s["kv_bytes_per_token"]
      (16928, 88)
    """
    c = config
    D, N, L = c.d_model, c.num_heads, c.kv_lora_rank
    Hn, Hr, E = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    ctx = mean_context(seq_len, causal=c.causal, window=c.window)
    q_in = D if c.q_lora_rank is None else c.q_lora_rank
    pq = q_in * N * (Hn + Hr) + (0 if c.q_lora_rank is None else D * q_in)
    shared = pq + D * L + D * Hr + N * E * D
    return dict(
        params=param_count(c),
        kv_bytes_per_token=(L + Hr) * jnp.dtype(c.dtype).itemsize + SLOT_META_BYTES,
        flops_per_token=2.0 * (shared + L * N * (Hn + E)) + 2.0 * N * (Hn + Hr + E) * ctx,
        flops_per_token_absorbed=2.0 * (shared + N * Hn * L + N * L * E) + 2.0 * N * (2 * L + Hr) * ctx,
        state_bytes=0,
    )


# --------------------------------------------------------------------------- pure functions
def apply_block_rope(x_BTNH, positions_BT, config: Config):
    """RoPE on the last axis split into ``rope_heads`` blocks (one block: plain RoPE)."""
    if config.rope is None:
        return x_BTNH
    B, T, N, H = x_BTNH.shape
    r = config.rope_heads
    y = config.rope.apply(x_BTNH.reshape(B, T, N * r, H // r), positions_BT)
    return y.reshape(B, T, N, H)


def project_queries(params, x_BTD, positions_BT, config: Config):
    """``q_nope [B,T,N,Hn]`` and RoPE'd ``q_rope [B,T,N,Hr]`` (§2.1.2 eq. 12-13, §2.1.3 eq. 14).

    Example:
      >>> import jax.numpy as jnp
      >>> cfg = Config(d_model=4, num_heads=2, kv_lora_rank=4, qk_nope_head_dim=2,
      ...              qk_rope_head_dim=2, v_head_dim=2, dtype="float32")
      >>> p = dict(q_nope_kernel=jnp.ones((4, 2, 2)), q_rope_kernel=jnp.ones((4, 2, 2)))
      >>> [a.shape for a in project_queries(p, jnp.ones((1, 3, 4)), jnp.arange(3)[None], cfg)]
      [(1, 3, 2, 2), (1, 3, 2, 2)]
    """
    cfg, dt = config, config.dtype
    h = x_BTD.astype(dt)
    eq = "BTD,DNH->BTNH"
    if cfg.q_lora_rank is not None:
        h = jnp.einsum("BTD,DL->BTL", h, params["q_down_kernel"].astype(dt))
        if cfg.q_norm:
            h = rms_norm(h, params["q_norm"], cfg.norm_eps)
        eq = "BTL,LNH->BTNH"
    q_nope = jnp.einsum(eq, h, params["q_nope_kernel"].astype(dt))
    q_rope = apply_block_rope(jnp.einsum(eq, h, params["q_rope_kernel"].astype(dt)), positions_BT, cfg)
    if cfg.rope is not None and cfg.rope.scaling is not None:
        # YaRN tempers every logit by m² (DeepSeek-V3 scales the softmax scale by m²);
        # apply_rope already put m on both rotated sides, so only the nope part is left.
        q_nope = q_nope * jnp.asarray(cfg.rope.scaling.attention_factor ** 2, dt)
    return q_nope, q_rope


def project_latent(params, x_BTD, positions_BT, config: Config):
    """The cached quantities: ``c_kv [B,T,L]`` (§2.1.2 eq. 9, RMSNormed), ``k_rope [B,T,Hr]`` (eq. 15, RoPE'd).

    Example:
      >>> import jax.numpy as jnp
      >>> cfg = Config(d_model=4, num_heads=2, kv_lora_rank=3, qk_nope_head_dim=2,
      ...              qk_rope_head_dim=2, v_head_dim=2, kv_norm=False, dtype="float32")
      >>> p = dict(kv_down_kernel=jnp.ones((4, 3)), k_rope_kernel=jnp.ones((4, 2)))
      >>> [a.shape for a in project_latent(p, jnp.ones((1, 5, 4)), jnp.arange(5)[None], cfg)]
      [(1, 5, 3), (1, 5, 2)]
    """
    cfg, dt = config, config.dtype
    x = x_BTD.astype(dt)
    c_kv = jnp.einsum("BTD,DL->BTL", x, params["kv_down_kernel"].astype(dt))
    if cfg.kv_norm:
        c_kv = rms_norm(c_kv, params["kv_norm"], cfg.norm_eps)
    k_rope = jnp.einsum("BTD,DH->BTH", x, params["k_rope_kernel"].astype(dt))
    k_rope = apply_block_rope(k_rope[:, :, None], positions_BT, cfg)[:, :, 0]
    return c_kv, k_rope


def attend_expanded(params, q_nope_BTNH, q_rope_BTNH, c_kv_BSL, k_rope_BSH, *, mask: Mask,
                    config: Config, self_attention: bool | None = None):
    """Training / prefill path: per-head keys and values from the latent; returns ``o [B,T,N,E]``.

    Calls ``attention`` with ``q [B,T,N,Hn+Hr]``, ``k [B,S,N,Hn+Hr]``, ``v [B,S,N,E]``;
    ``self_attention`` is handed on (True when the keys are this call's own tokens).
    """
    dt = q_nope_BTNH.dtype
    B, S, _ = c_kv_BSL.shape
    N = q_nope_BTNH.shape[2]
    k_nope = jnp.einsum("BSL,LNH->BSNH", c_kv_BSL, params["k_up_kernel"].astype(dt))
    v = jnp.einsum("BSL,LNE->BSNE", c_kv_BSL, params["v_up_kernel"].astype(dt))
    k_rope = jnp.broadcast_to(k_rope_BSH[:, :, None], (B, S, N, k_rope_BSH.shape[-1]))
    q = jnp.concatenate([q_nope_BTNH, q_rope_BTNH], axis=-1)
    k = jnp.concatenate([k_nope, k_rope], axis=-1)
    return attention(q, k, v, mask=mask, scale=config.softmax_scale, softcap=config.softcap,
                     impl=config.impl, self_attention=self_attention)


def absorbed_query(params, q_nope_BTNH, q_rope_BTNH):
    """``[q_nope W_uk^T, q_rope]``: the query in latent space ``[B,T,N,L+Hr]`` (§2.1.2)."""
    q_lat = jnp.einsum("BTNH,LNH->BTNL", q_nope_BTNH, params["k_up_kernel"].astype(q_nope_BTNH.dtype))
    return jnp.concatenate([q_lat, q_rope_BTNH], axis=-1)


def attend_absorbed(params, q_nope_BTNH, q_rope_BTNH, c_kv_BSL, k_rope_BSH, *, mask: Mask,
                    config: Config, self_attention: bool | None = None):
    """Decode path: attention over the latent as one shared KV head; returns ``o [B,T,N,E]``.

    ``attention(q [B,T,N,L+Hr], k [B,S,1,L+Hr], v [B,S,1,L], scale=1/sqrt(Hn+Hr))`` gives
    ``o_lat [B,T,N,L]``, then ``o = o_lat W_uv`` per head.
    """
    dt = q_nope_BTNH.dtype
    q = absorbed_query(params, q_nope_BTNH, q_rope_BTNH)
    k = jnp.concatenate([c_kv_BSL, k_rope_BSH], axis=-1)[:, :, None]
    o_lat = attention(q, k, c_kv_BSL[:, :, None], mask=mask, scale=config.softmax_scale,
                      softcap=config.softcap, impl=config.impl, self_attention=self_attention)
    return jnp.einsum("BTNL,LNE->BTNE", o_lat, params["v_up_kernel"].astype(dt))


def use_absorbed(absorb, has_cache: bool) -> bool:
    """Resolve ``Config.absorb``: "auto" means absorbed exactly when decoding with a cache."""
    return has_cache if absorb == "auto" else bool(absorb)


def _check_call(cfg: Config, x_BTD, positions_BT, segment_ids_BT, cache) -> None:
    """Input validation with messages naming the argument and its shape."""
    if getattr(x_BTD, "ndim", None) != 3 or x_BTD.shape[-1] != cfg.d_model:
        raise ValueError(f"MLA: x must be [B, T, D] with D=d_model={cfg.d_model}, got shape "
                         f"{getattr(x_BTD, 'shape', type(x_BTD))}")
    BT = tuple(x_BTD.shape[:2])
    for name, a in (("positions_BT", positions_BT), ("segment_ids_BT", segment_ids_BT)):
        if a is not None and tuple(getattr(a, "shape", ())) != BT:
            raise ValueError(f"MLA: {name} must have shape [B, T]={BT}, got {getattr(a, 'shape', a)}")
    if cache is not None:
        if not cfg.causal:
            raise ValueError("MLA: a cache needs causal=True (decode cannot see future tokens)")
        if positions_BT is None:
            raise ValueError("MLA: positions_BT is required with a cache (the mask uses positions)")
        want = (cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        if (cache.k.shape[-1], cache.v.shape[-1]) != want:
            raise ValueError(f"MLA: cache holds (L, Hr)={(cache.k.shape[-1], cache.v.shape[-1])}, "
                             f"config needs {want}; build it with mla.init_cache")
        if isinstance(cache, RingKVCache) and (cfg.window is None or cache.capacity < cfg.window):
            raise ValueError(f"MLA: a ring cache of {cache.capacity} slots cannot serve window={cfg.window}")


def mla_forward(params: Mapping[str, Array], x_BTD, *, config: Config, positions_BT=None,
                segment_ids_BT=None, cache=None, absorb=None, extra_range_BT2=None):
    """The layer as a pure function of its parameter dict.

    Args:
      params: the dict of ``make_params`` (see the module docstring for shapes).
      x_BTD: ``[B, T, D]``.
      config: the layer ``Config``.
      positions_BT: ``[B, T]`` int, or None for ``arange(T)`` (not with a cache).
      segment_ids_BT: ``[B, T]`` int (0 = padding) or None.
      cache: None, or a cache from ``init_cache``; the T tokens are appended first.
      absorb: overrides ``config.absorb`` (None: use the config).
      extra_range_BT2: ``[B, T, 2]`` int or None (``Mask.q_extra_range``).

    Returns:
      ``(y_BTD in config.dtype, cache)`` — the updated cache, or None.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> cfg = Config(d_model=8, num_heads=2, kv_lora_rank=4, qk_nope_head_dim=2,
      ...              qk_rope_head_dim=2, v_head_dim=2, dtype="float32")
      >>> p = nn.unbox(MLA(cfg).init(jax.random.key(0), jnp.ones((1, 3, 8))))["params"]
      >>> y0, _ = mla_forward(p, jnp.ones((1, 3, 8)), config=cfg, absorb=False)
      >>> y1, _ = mla_forward(p, jnp.ones((1, 3, 8)), config=cfg, absorb=True)
      >>> bool(jnp.allclose(y0, y1, atol=1e-5))
      True
    """
    cfg = config
    _check_call(cfg, x_BTD, positions_BT, segment_ids_BT, cache)
    B, T, _ = x_BTD.shape
    rope_pos = positions_BT
    if rope_pos is None:
        rope_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    q_nope, q_rope = project_queries(params, x_BTD, rope_pos, cfg)
    c_kv, k_rope = project_latent(params, x_BTD, rope_pos, cfg)
    if cache is None:
        mask = Mask(causal=cfg.causal, window=cfg.mask_window,
                    q_positions=positions_BT, kv_positions=positions_BT,
                    q_segment_ids=segment_ids_BT, kv_segment_ids=segment_ids_BT,
                    q_extra_range=extra_range_BT2)
    else:
        seg = jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT
        # Only c_kv and k_rope are cached (§2.1.2): (L + Hr) numbers per token.
        c_all, kr_all, kv_pos, kv_seg, cache = cache.append(c_kv[:, :, None], k_rope[:, :, None],
                                                            positions_BT, seg)
        c_kv, k_rope = c_all[:, :, 0].astype(cfg.dtype), kr_all[:, :, 0].astype(cfg.dtype)
        mask = Mask(causal=True, window=cfg.mask_window,
                    q_positions=positions_BT.astype(jnp.int32), kv_positions=kv_pos,
                    q_segment_ids=seg.astype(jnp.int32), kv_segment_ids=kv_seg,
                    q_extra_range=extra_range_BT2)
    absorbed = use_absorbed(cfg.absorb if absorb is None else absorb, cache is not None)
    attend = attend_absorbed if absorbed else attend_expanded
    o = attend(params, q_nope, q_rope, c_kv, k_rope, mask=mask, config=cfg,
               self_attention=cache is None)  # with a cache, keys are the cache's slots
    y = jnp.einsum("BTNE,NED->BTD", o, params["o_kernel"].astype(cfg.dtype))
    return y, cache


# --------------------------------------------------------------------------- registration
def small_config(width: int) -> dict:
    """Overrides for a small model (``d_model = width``, 4 heads).

    DeepSeek-V2's defaults (L 512, qk 128 + 64, v 128) are sized for d_model 5120; here
    they scale with the width: L = D/2, qk D/4 + 8, v D/4 (D = 64 caches 40 numbers per
    token, against gqa's 128 at K = 2, H = 32).

    Example:
      >>> small_config(64)
      {'kv_lora_rank': 32, 'qk_nope_head_dim': 16, 'qk_rope_head_dim': 8, 'v_head_dim': 16}
    """
    return {"kv_lora_rank": width // 2, "qk_nope_head_dim": max(8, width // 4),
            "qk_rope_head_dim": 8, "v_head_dim": max(8, width // 4)}


registry.register(registry.Mechanism(
    name="mla", module=MLA, config_cls=Config, init_cache=init_cache, stats=stats,
    make_config=registry.dataclass_config_factory(Config, "mla"), small_config=small_config,
    description="multi-head latent attention (DeepSeek-V2): cache = latent L + shared RoPE key",
))
