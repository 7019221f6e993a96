"""Compressed Convolutional Attention (CCA) and its grouped variant (CCGQA).

Figliolia et al. 2025, "Compressed Convolutional Attention: Efficient Attention in a
Compressed Latent Space" (arXiv 2510.04476), §III. Queries, keys and values are
down-projected by the compression factor C, mixed by two causal convolutions, and the
*whole* attention runs in that latent space, so parameters, KV cache and attention FLOPs
all shrink by C. Orthogonal head sharing (K < N/C latent kv heads) gives CCGQA.

Per token t, with latent query heads ``N' = N / C`` (head dim H, value dim E = H) and K
latent kv heads (``G = N' / K``)::

    q0 = x Wq [N',H]      k0 = x Wk [K,H]      v0 = x Wv [K,E]              (down-projection)
    q1 = conv2(conv1(q0)) k1 = conv2(conv1(k0))                            (convolutional mixing)
         conv1: causal, depthwise along T (width ``seq_kernel``)
         conv2: causal along T, dense over the H channels of each head (width ``seq_channel_kernel``)
    m  = (q0 + repeat_G(k0)) / 2                                           (q-k mean)
    q  = q1 + m           k  = k1 + mean_G(m)
    v  = [first half of v0(x_t) ; second half of v0(x_{t-1})]             (value shift)
    q  = √H · q/‖q‖       k  = √H · τ_k · k/‖k‖                            (qk L2-norm, temperature)
    q, k = RoPE(q), RoPE(k)                                                (after the convs)
    o  = attention(q, k, v, causal, scale H^-1/2)     y = o Wo [N',E,D]   (all in the latent)

Where the paper's text leaves a detail open, this file follows Zyphra's released
reference (the ``CCA`` module of ZAYA in HF transformers ``modeling_zaya.py``): the
conv padding, the exact q-k mean, the value-shift channel split, the ``√H`` scaling and a
per-kv-head key temperature. Conv weights use PyTorch's ``Conv1d`` tap order, so that
reference's weights port directly (``w[i]`` multiplies ``x[t - width + 1 + i]``).

**Documents.** The convolutions and the value shift are causal along T, so they are
restarted at every document boundary: each document behaves as if it were preceded by
zero *inputs* (the reference left-pads the latent stream with zeros once, so conv2 sees
``conv1(0) = conv1 bias`` before a document starts; padding tokens, segment 0, never
leak). This holds in the full forward with ``segment_ids_BT`` and across cache appends.

**Cache** (``CCACache``): the latent K/V (``KVCache``: ``K·(H+E)`` values a token) plus
the convolution state ``ConvState``: the last ``seq_kernel - 1`` conv1 inputs and
``seq_channel_kernel - 1`` conv2 inputs of q and k, the previous token's shifted half
value, and the segment ids of those tokens. Decode over any chunking equals the full
forward.

Parameters (logical axes in brackets)::

    q_kernel [D, N', H] (embed, heads, head_dim)      k_kernel, v_kernel [D, K, H] (embed, kv_heads, head_dim)
    o_kernel [N', E, D] (heads, head_dim, embed)       temperature [K] (kv_heads)
    q_conv1 [w1, N', H]   k_conv1 [w1, K, H]           q_conv2 [w2, N', H, H]   k_conv2 [w2, K, H, H]
    q_conv1_bias, q_conv2_bias [N', H]   k_conv1_bias, k_conv2_bias [K, H]      (conv_bias)

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn.cca import CCA, Config, init_cache
  >>> cfg = Config(d_model=32, num_heads=4, compression=2, dtype="float32")
  >>> x = jnp.ones((1, 5, 32)); pos = jnp.arange(5)[None]
  >>> layer = CCA(cfg)
  >>> params = layer.init(jax.random.key(0), x, positions_BT=pos)
  >>> y, _ = layer.apply(params, x, positions_BT=pos)
  >>> cache = init_cache(cfg, batch=1, max_len=8)
  >>> y1, cache = layer.apply(params, x[:, :1], positions_BT=pos[:, :1], cache=cache)
  >>> y.shape, int(cache.length), cfg.latent_heads, cfg.num_kv_heads
  ((1, 5, 32), 1, 2, 2)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from attn import registry
from attn.axes import EMBED, HEAD_DIM, HEADS, KV_HEADS
from attn.cache import SLOT_META_BYTES, KVCache
from attn.config_checks import check_runtime_fields, positive_int
from attn.core import attention
from attn.masks import Mask
from attn.mha import mean_context
from attn.positions import RopeConfig

Array = Any


def _positive_int(field: str, value) -> None:
    positive_int("Config", field, value)


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one CCA / CCGQA layer; validates itself on construction.

    Attributes:
      d_model: D.
      num_heads: N, the heads of the uncompressed MHA this layer replaces.
      head_dim: H (= E) of every latent head (None = D // N).
      compression: C; the layer has ``N' = N / C`` latent query heads, i.e. a latent
        width ``N'·H = D / C`` when ``N·H = D`` (paper §III: ẽ = E / C).
      num_kv_heads: K latent kv heads (None = N', plain CCA); ``N' % K == 0`` (CCGQA).
      seq_kernel: width of conv1, the depthwise causal conv along T.
      seq_channel_kernel: width of conv2, the causal conv along T that mixes the H
        channels within each head (the reference uses 2 and 2).
      conv_bias: biases on both convs (PyTorch ``Conv1d``'s default, as in the reference).
      qk_mean: add ``(q0 + k0) / 2`` of the pre-conv latents after the convs.
      value_shift: take the second half of the value channels from the previous token.
      temperature_init: initial per-kv-head key temperature τ. The reference module
        starts it at 0 (its weights come from checkpoints); 1 lets gradients reach q and
        k from the first step when training from scratch.
      rope: ``RopeConfig`` (or dict) applied to the latent q/k after the convs, or None.
      impl: attention implementation for ``attn.core.attention``.
      dtype, param_dtype: compute and parameter dtypes.
      norm_eps: epsilon inside the q/k L2 norms.

    Example:
      >>> c = Config(d_model=64, num_heads=4, compression=2, num_kv_heads=1)
      >>> c.latent_heads, c.head_dim, c.num_kv_heads
      (2, 16, 1)
    """

    d_model: int
    num_heads: int
    head_dim: int | None = None
    compression: int = 2
    num_kv_heads: int | None = None
    seq_kernel: int = 2
    seq_channel_kernel: int = 2
    conv_bias: bool = True
    qk_mean: bool = True
    value_shift: bool = True
    temperature_init: float = 1.0
    rope: RopeConfig | None = RopeConfig()
    impl: str = "auto"
    dtype: Any = "bfloat16"
    param_dtype: Any = "float32"
    norm_eps: float = 1e-6

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        for f in ("d_model", "num_heads", "compression", "seq_kernel", "seq_channel_kernel"):
            _positive_int(f, getattr(self, f))
        for f, why in (("d_model", "the latent width is D / C"), ("num_heads", "N / C latent heads")):
            if getattr(self, f) % self.compression:
                raise ValueError(f"Config.compression={self.compression} must divide "
                                 f"{f}={getattr(self, f)} ({why})")
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"Config.head_dim is None but d_model={self.d_model} is not a multiple of "
                    f"num_heads={self.num_heads}; set head_dim explicitly")
            set_("head_dim", self.d_model // self.num_heads)
        _positive_int("head_dim", self.head_dim)
        latent = self.num_heads // self.compression
        if self.num_kv_heads is None:
            set_("num_kv_heads", latent)
        _positive_int("num_kv_heads", self.num_kv_heads)
        if latent % self.num_kv_heads:
            raise ValueError(
                f"Config.num_kv_heads={self.num_kv_heads} must divide the latent query heads "
                f"num_heads / compression = {latent}")
        if self.value_shift and (self.num_kv_heads * self.head_dim) % 2:
            raise ValueError(
                f"Config.value_shift=True splits the K·E={self.num_kv_heads * self.head_dim} value "
                "channels in two halves; it must be even")
        set_("rope", RopeConfig.from_any(self.rope))
        if self.rope is not None:
            self.rope.rotary_dims(self.head_dim)
        check_runtime_fields(self)

    def replace(self, **changes) -> "Config":
        """``dataclasses.replace`` (pass num_kv_heads / head_dim again when changing N or D)."""
        return dataclasses.replace(self, **changes)

    @property
    def latent_heads(self) -> int:
        """N' = N / C latent query heads."""
        return self.num_heads // self.compression

    @property
    def value_dim(self) -> int:
        """E = H, as in the paper's latent heads."""
        return self.head_dim

    @property
    def shift_width(self) -> int:
        """Value channels taken from the previous token (half of K·E, or 0)."""
        return self.num_kv_heads * self.value_dim // 2 if self.value_shift else 0

    @property
    def history(self) -> int:
        """Tokens of segment-id history the conv state keeps (at least 1, for the value shift)."""
        return max(self.seq_kernel - 1, self.seq_channel_kernel - 1, 1)


# --------------------------------------------------------------------------- module
def _scaled_init(in_axis, out_axis, batch_axis=()):
    """LeCun-normal over the contracted axes (unit-scale outputs at init)."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                            out_axis=out_axis, batch_axis=batch_axis)


class CCA(nn.Module):
    """CCA / CCGQA layer: a parameter holder around ``cca_forward``.

    ``__call__(x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None,
    extra_range_BT2=None) -> (y_BTD, cache)``

    Args (of ``__call__``):
      x_BTD: ``[B, T, D]``.
      positions_BT: ``[B, T]`` int position ids (RoPE and the causal mask); None means
        ``arange(T)`` (not with a cache).
      segment_ids_BT: ``[B, T]`` int document ids, 0 = padding; convs restart per document.
      cache: None, or the ``CCACache`` from ``init_cache`` (returned updated).
      extra_range_BT2: ``[B, T, 2]`` int or None: extra visible key positions per token
        in the attention (``Mask.q_extra_range``); the convolutions stay causal.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = CCA(Config(d_model=16, num_heads=4, dtype="float32"))
      >>> x = jnp.ones((2, 3, 16))
      >>> layer.apply(layer.init(jax.random.key(0), x), x)[0].shape
      (2, 3, 16)
    """

    config: Config

    @nn.compact
    def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None,
                 extra_range_BT2=None):
        return cca_forward(make_params(self, self.config), x_BTD, config=self.config,
                           positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, cache=cache,
                           extra_range_BT2=extra_range_BT2)


def make_params(module: nn.Module, cfg: Config) -> dict[str, Array]:
    """Create (or fetch) the layer's parameters inside ``module``; returns a plain dict."""
    D, N, K, H, E = cfg.d_model, cfg.latent_heads, cfg.num_kv_heads, cfg.head_dim, cfg.value_dim
    w1, w2 = cfg.seq_kernel, cfg.seq_channel_kernel

    def param(name, init, shape, axes):
        return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype)

    p = {
        "q_kernel": param("q_kernel", _scaled_init(0, (1, 2)), (D, N, H), (EMBED, HEADS, HEAD_DIM)),
        "k_kernel": param("k_kernel", _scaled_init(0, (1, 2)), (D, K, H), (EMBED, KV_HEADS, HEAD_DIM)),
        "v_kernel": param("v_kernel", _scaled_init(0, (1, 2)), (D, K, E), (EMBED, KV_HEADS, HEAD_DIM)),
        "o_kernel": param("o_kernel", _scaled_init((0, 1), 2), (N, E, D), (HEADS, HEAD_DIM, EMBED)),
        "temperature": param("temperature", nn.initializers.constant(cfg.temperature_init), (K,),
                             (KV_HEADS,)),
    }
    for s, heads, axis in (("q", N, HEADS), ("k", K, KV_HEADS)):
        # conv1 is depthwise (fan-in = its width); conv2 mixes the H channels of a head.
        p[f"{s}_conv1"] = param(f"{s}_conv1", _scaled_init(0, (1, 2)), (w1, heads, H), (None, axis, HEAD_DIM))
        p[f"{s}_conv2"] = param(f"{s}_conv2", _scaled_init((0, 2), 3, batch_axis=(1,)),
                                (w2, heads, H, H), (None, axis, HEAD_DIM, None))
        if cfg.conv_bias:
            for c in ("conv1", "conv2"):
                p[f"{s}_{c}_bias"] = param(f"{s}_{c}_bias", nn.initializers.zeros, (heads, H),
                                           (axis, HEAD_DIM))
    return p


# --------------------------------------------------------------------------- cache / stats
@struct.dataclass
class ConvState:
    """What the causal convs and the value shift need from earlier tokens.

    Attributes:
      q_conv1: ``[B, seq_kernel-1, N', H]`` last conv1 inputs (pre-conv latent q).
      k_conv1: ``[B, seq_kernel-1, K, H]``.
      q_conv2: ``[B, seq_channel_kernel-1, N', H]`` last conv1 outputs (conv2 inputs).
      k_conv2: ``[B, seq_channel_kernel-1, K, H]``.
      v_prev: ``[B, K·E/2]`` the last token's shifted value half (``[B, 0]`` without value_shift).
      segment_ids: ``[B, history]`` int32 segment ids of the last tokens (0 = none yet).

    Example:
      >>> s = ConvState.zeros(Config(d_model=16, num_heads=4), batch=1)
      >>> s.q_conv1.shape, s.v_prev.shape, s.segment_ids.shape
      ((1, 1, 2, 4), (1, 4), (1, 1))
    """

    q_conv1: Array
    k_conv1: Array
    q_conv2: Array
    k_conv2: Array
    v_prev: Array
    segment_ids: Array

    @classmethod
    def zeros(cls, config: Config, batch: int, dtype=None) -> "ConvState":
        """The state before any token: as if preceded by zero inputs (segment 0)."""
        cfg = config
        dt = cfg.dtype if dtype is None else jnp.dtype(dtype)
        N, K, H = cfg.latent_heads, cfg.num_kv_heads, cfg.head_dim
        m1, m2 = cfg.seq_kernel - 1, cfg.seq_channel_kernel - 1
        return cls(
            q_conv1=jnp.zeros((batch, m1, N, H), dt), k_conv1=jnp.zeros((batch, m1, K, H), dt),
            q_conv2=jnp.zeros((batch, m2, N, H), dt), k_conv2=jnp.zeros((batch, m2, K, H), dt),
            v_prev=jnp.zeros((batch, cfg.shift_width), dt),
            segment_ids=jnp.zeros((batch, cfg.history), jnp.int32),
        )


@struct.dataclass
class CCACache:
    """Latent KV cache plus convolution state; ``.length`` counts appended tokens.

    Example:
      >>> c = init_cache(Config(d_model=16, num_heads=4, num_kv_heads=1), batch=2, max_len=8)
      >>> c.kv.k.shape, int(c.length)
      ((2, 8, 1, 4), 0)
    """

    kv: KVCache
    conv: ConvState

    @property
    def length(self) -> Array:
        return self.kv.length


def init_cache(config: Config, batch: int, max_len: int, dtype=None) -> CCACache:
    """An empty cache for one layer: latent K/V of ``max_len`` slots and a zero conv state.

    Example:
      >>> c = init_cache(Config(d_model=16, num_heads=4), batch=1, max_len=4, dtype="float32")
      >>> c.kv.v.shape, c.conv.k_conv2.shape
      ((1, 4, 2, 4), (1, 1, 2, 4))
    """
    dtype = config.dtype if dtype is None else jnp.dtype(dtype)
    kv = KVCache.create(batch=batch, max_len=max_len, num_kv_heads=config.num_kv_heads,
                        head_dim=config.head_dim, value_dim=config.value_dim, dtype=dtype)
    return CCACache(kv=kv, conv=ConvState.zeros(config, batch, dtype))


def param_count(config: Config) -> int:
    """Number of parameters of one layer (matches ``make_params``)."""
    cfg = config
    D, N, K, H, E = cfg.d_model, cfg.latent_heads, cfg.num_kv_heads, cfg.head_dim, cfg.value_dim
    n = D * N * H + D * K * H + D * K * E + N * E * D + K
    n += (N + K) * H * (cfg.seq_kernel + cfg.seq_channel_kernel * H)
    n += 2 * (N + K) * H if cfg.conv_bias else 0
    return n


def stats(config: Config, seq_len: int) -> dict:
    """Size and cost figures of one layer at sequence length ``seq_len``.

    * ``params``: as ``param_count``.
    * ``kv_bytes_per_token``: ``K·(H+E)·itemsize + 8`` (latent K/V, int32 position and segment).
    * ``flops_per_token``: forward FLOPs,
      ``2·(D·N'·H + D·K·H + D·K·E + N'·E·D)`` (projections, 2 per multiply-add)
      ``+ 2·(N'+K)·H·(w1 + w2·H)`` (conv1 depthwise, conv2 dense within a head)
      ``+ 2·N'·(H+E)·ctx`` (``q·k`` and ``p·v`` over the mean causal context
      ``ctx = (T+1)/2``): the attention term is ``1/C`` of MHA's (paper §III). Norms, the
      q-k mean, softmax and RoPE are not counted.
    * ``state_bytes``: the per-sequence conv state, independent of length:
      ``itemsize·((w1-1 + w2-1)·(N'+K)·H + K·E/2) + 4·history``.

    Example:
      >>> s = stats(Config(d_model=64, num_heads=4, dtype="bfloat16"), 4096)
      >>> s["params"], s["kv_bytes_per_token"], s["state_bytes"]
      (10498, 136, 292)
    """
    cfg = config
    D, N, K, H, E = cfg.d_model, cfg.latent_heads, cfg.num_kv_heads, cfg.head_dim, cfg.value_dim
    w1, w2 = cfg.seq_kernel, cfg.seq_channel_kernel
    itemsize = jnp.dtype(cfg.dtype).itemsize
    ctx = mean_context(seq_len, causal=True, window=None)
    return dict(
        params=param_count(cfg),
        kv_bytes_per_token=K * (H + E) * itemsize + SLOT_META_BYTES,
        flops_per_token=2.0 * (D * N * H + D * K * H + D * K * E + N * E * D)
        + 2.0 * (N + K) * H * (w1 + w2 * H) + 2.0 * N * (H + E) * ctx,
        state_bytes=itemsize * ((w1 - 1 + w2 - 1) * (N + K) * H + cfg.shift_width) + 4 * cfg.history,
    )


# --------------------------------------------------------------------------- pure functions
def _tail(a, n: int):
    """The last ``n`` entries along axis 1 (``a[:, -0:]`` would be everything)."""
    return a[:, a.shape[1] - n:]


def causal_conv(x_BTNH, history_BMNH, weight, bias_NH, segment_ids_BT, history_segments_BM, *,
                fill_NH=None):
    """A causal conv along T, per head, restarted at document boundaries.

    ``out[t] = bias + Σ_i w[i] · x̂[t - (W-1) + i]`` with ``W = weight.shape[0]`` and
    ``x̂[s] = x[s]`` if token s is in token t's segment, else ``fill`` (0 by default).

    Args:
      x_BTNH: ``[B, T, N, H]`` new inputs.
      history_BMNH: ``[B, W-1, N, H]`` the inputs just before them (from ``ConvState``).
      weight: ``[W, N, H]`` depthwise (conv1), or ``[W, N, H, H]`` mixing the channels of
        each head (conv2: ``[tap, head, in, out]``).
      bias_NH: ``[N, H]`` or None.
      segment_ids_BT: ``[B, T]`` int; history_segments_BM: ``[B, W-1]`` int.
      fill_NH: what an input from another document counts as (``[N, H]`` or None = 0).

    Returns:
      ``[B, T, N, H]`` in ``x_BTNH.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((1, 3, 1, 1)); seg = jnp.array([[1, 1, 2]])
      >>> w = jnp.ones((2, 1, 1))
      >>> causal_conv(x, jnp.zeros((1, 1, 1, 1)), w, None, seg, jnp.zeros((1, 1), int))[0, :, 0, 0].tolist()
      [1.0, 2.0, 1.0]
    """
    W, M = weight.shape[0], history_BMNH.shape[1]
    if M != W - 1:
        raise ValueError(f"causal_conv: history has {M} tokens, a width-{W} conv needs {W - 1}")
    T = x_BTNH.shape[1]
    dt = x_BTNH.dtype
    xe = jnp.concatenate([history_BMNH.astype(dt), x_BTNH], axis=1)
    se = jnp.concatenate([history_segments_BM.astype(jnp.int32), segment_ids_BT.astype(jnp.int32)], 1)
    fill = jnp.zeros((), dt) if fill_NH is None else fill_NH.astype(dt)
    out = jnp.zeros(x_BTNH.shape, jnp.promote_types(dt, jnp.float32))
    for i in range(W):
        lag = W - 1 - i
        x_i = xe[:, M - lag: M - lag + T]
        same = (se[:, M - lag: M - lag + T] == segment_ids_BT)[:, :, None, None]
        x_i = jnp.where(same, x_i, fill)
        w = weight[i].astype(dt)
        if weight.ndim == 3:
            out = out + x_i * w
        else:  # E indexes a head's input channels here (E = H)
            out = out + jnp.einsum("BTNE,NEH->BTNH", x_i, w, preferred_element_type=out.dtype)
    if bias_NH is not None:
        out = out + bias_NH.astype(out.dtype)
    return out.astype(dt)


def _two_stage_conv(params, s: str, x0_BTNH, hist1, hist2, seg_BT, hist_seg_BM, cfg: Config):
    """conv2_seq+ch(conv1_seq(x0)) (paper §III, convolutional mixing) and the new histories."""
    m1, m2 = cfg.seq_kernel - 1, cfg.seq_channel_kernel - 1
    b1 = params.get(f"{s}_conv1_bias")
    x1 = causal_conv(x0_BTNH, hist1, params[f"{s}_conv1"], b1, seg_BT, _tail(hist_seg_BM, m1))
    # Before a document conv2 sees conv1 applied to zero inputs, i.e. conv1's bias, as in
    # the reference, which zero-pads the latent stream once in front of both convs.
    x2 = causal_conv(x1, hist2, params[f"{s}_conv2"], params.get(f"{s}_conv2_bias"), seg_BT,
                     _tail(hist_seg_BM, m2), fill_NH=b1)
    new1 = _tail(jnp.concatenate([hist1.astype(x0_BTNH.dtype), x0_BTNH], 1), m1)
    new2 = _tail(jnp.concatenate([hist2.astype(x1.dtype), x1], 1), m2)
    return x2, new1, new2


def value_shift(v0_BTKE, v_prev, segment_ids_BT, prev_segment_B1):
    """Second half of the K·E value channels from the previous token of the same document.

    Paper §III (value shift): half of the value heads see the current token, half the
    previous one. Split over the flattened channels as the reference does (whole heads
    when K is even). Returns ``(v [B,T,K,E], new v_prev [B, K·E/2])``.

    Example:
      >>> import jax.numpy as jnp
      >>> v = jnp.arange(4.0).reshape(1, 2, 1, 2)       # tokens [0, 1] and [2, 3]
      >>> out, prev = value_shift(v, jnp.zeros((1, 1)), jnp.ones((1, 2), int), jnp.zeros((1, 1), int))
      >>> out[0, :, 0].tolist(), prev.tolist()
      ([[0.0, 0.0], [2.0, 1.0]], [[3.0]])
    """
    B, T, K, E = v0_BTKE.shape
    half = v_prev.shape[-1]
    flat = v0_BTKE.reshape(B, T, K * E)
    cur, nxt = flat[..., : K * E - half], flat[..., K * E - half:]
    prev = jnp.concatenate([v_prev[:, None].astype(flat.dtype), nxt], axis=1)[:, :T]
    prev_seg = jnp.concatenate([prev_segment_B1.astype(jnp.int32), segment_ids_BT.astype(jnp.int32)], 1)
    prev = jnp.where((prev_seg[:, :T] == segment_ids_BT)[..., None], prev, 0)
    return jnp.concatenate([cur, prev], -1).reshape(B, T, K, E), nxt[:, -1]


def _l2_to_sqrt_h(x, eps):
    """``√H · x / ‖x‖`` over the head dim (float32 math; the reference's qk-norm)."""
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32 * inv * np.sqrt(x.shape[-1])


def cca_qkv(params, x_BTD, positions_BT, segment_ids_BT, state: ConvState, config: Config):
    """Latent ``q [B,T,N',H]``, ``k [B,T,K,H]``, ``v [B,T,K,E]`` and the updated ``ConvState``.

    Everything before the attention: down-projection, the two convs, q-k mean, value
    shift, L2 norm with temperature, RoPE. ``segment_ids_BT`` must not be None here.
    """
    cfg, dt = config, config.dtype
    G = cfg.latent_heads // cfg.num_kv_heads
    x = x_BTD.astype(dt)
    q0 = jnp.einsum("BTD,DNH->BTNH", x, params["q_kernel"].astype(dt))
    k0 = jnp.einsum("BTD,DKH->BTKH", x, params["k_kernel"].astype(dt))
    v0 = jnp.einsum("BTD,DKE->BTKE", x, params["v_kernel"].astype(dt))
    seg = segment_ids_BT.astype(jnp.int32)
    q, q_h1, q_h2 = _two_stage_conv(params, "q", q0, state.q_conv1, state.q_conv2, seg,
                                    state.segment_ids, cfg)
    k, k_h1, k_h2 = _two_stage_conv(params, "k", k0, state.k_conv1, state.k_conv2, seg,
                                    state.segment_ids, cfg)
    if cfg.qk_mean:
        # Paper §III (q-k mean): share information between q and k and keep a skip path
        # around the convs. Query head n pairs with kv head n // G; a kv head gets the
        # mean over its G query heads.
        B, T, N, H = q0.shape
        mean_BTKGH = (q0.reshape(B, T, -1, G, H) + k0[:, :, :, None]) / 2
        q = q + mean_BTKGH.reshape(B, T, N, H)
        k = k + jnp.mean(mean_BTKGH, axis=3)
    if cfg.value_shift:
        v, v_prev = value_shift(v0, state.v_prev, seg, _tail(state.segment_ids, 1))
    else:
        v, v_prev = v0, state.v_prev
    # Paper §III: L2-normalised q and k scaled to √H, keys times a learned temperature
    # per kv head, so the logits are √H·τ·cos(q, k) under the usual H^-1/2 scale.
    q = _l2_to_sqrt_h(q, cfg.norm_eps).astype(dt)
    k = (_l2_to_sqrt_h(k, cfg.norm_eps) * params["temperature"].astype(jnp.float32)[:, None]).astype(dt)
    if cfg.rope is not None:  # RoPE on the latent heads, after the convs (paper §III)
        q, k = cfg.rope.apply(q, positions_BT), cfg.rope.apply(k, positions_BT)
    new_state = ConvState(q_conv1=q_h1, k_conv1=k_h1, q_conv2=q_h2, k_conv2=k_h2,
                          v_prev=v_prev.astype(state.v_prev.dtype),
                          segment_ids=_tail(jnp.concatenate([state.segment_ids, seg], 1), cfg.history))
    return q, k, v, new_state


def _check_call(cfg: Config, x_BTD, positions_BT, segment_ids_BT, cache) -> None:
    """Input validation with messages that name the argument and its shape."""
    if getattr(x_BTD, "ndim", None) != 3 or x_BTD.shape[-1] != cfg.d_model:
        raise ValueError(f"CCA: x must be [B, T, D] with D=d_model={cfg.d_model}, got shape "
                         f"{getattr(x_BTD, 'shape', type(x_BTD))}")
    BT = tuple(x_BTD.shape[:2])
    for name, a in (("positions_BT", positions_BT), ("segment_ids_BT", segment_ids_BT)):
        if a is not None and tuple(getattr(a, "shape", ())) != BT:
            raise ValueError(f"CCA: {name} must have shape [B, T]={BT}, got {getattr(a, 'shape', a)}")
    if cache is not None and not isinstance(cache, CCACache):
        raise ValueError(f"CCA: cache must be a CCACache (attn.cca.init_cache), got {type(cache).__name__}")
    if cache is not None and positions_BT is None:
        raise ValueError("CCA: positions_BT is required with a cache (the mask uses positions)")


def cca_forward(params: Mapping[str, Array], x_BTD, *, config: Config, positions_BT=None,
                segment_ids_BT=None, cache: CCACache | None = None, extra_range_BT2=None):
    """The layer as a pure function of its parameter dict.

    Args:
      params: the dict of ``make_params`` (see the module docstring for shapes).
      x_BTD: ``[B, T, D]``.
      config: the layer ``Config``.
      positions_BT: ``[B, T]`` int, or None for ``arange(T)`` (not with a cache).
      segment_ids_BT: ``[B, T]`` int (0 = padding) or None (one document).
      cache: None or a ``CCACache``; the T tokens are appended to it.
      extra_range_BT2: ``[B, T, 2]`` int or None (``Mask.q_extra_range``).

    Returns:
      ``(y_BTD in config.dtype, cache)`` -- the updated cache, or None.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> cfg = Config(d_model=16, num_heads=4, dtype="float32")
      >>> x = jnp.ones((1, 3, 16))
      >>> p = nn.unbox(CCA(cfg).init(jax.random.key(0), x))["params"]
      >>> cca_forward(p, x, config=cfg)[0].shape
      (1, 3, 16)
    """
    cfg = config
    _check_call(cfg, x_BTD, positions_BT, segment_ids_BT, cache)
    B, T, _ = x_BTD.shape
    seg = jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    rope_pos = positions_BT
    if rope_pos is None:
        rope_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    state = ConvState.zeros(cfg, B) if cache is None else cache.conv
    q, k, v, state = cca_qkv(params, x_BTD, rope_pos, seg, state, cfg)
    if cache is None:
        mask = Mask(causal=True, q_positions=positions_BT, kv_positions=positions_BT,
                    q_segment_ids=segment_ids_BT, kv_segment_ids=segment_ids_BT,
                    q_extra_range=extra_range_BT2)
    else:
        k, v, kv_pos, kv_seg, kv = cache.kv.append(k, v, positions_BT, seg)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        mask = Mask(causal=True, q_positions=positions_BT.astype(jnp.int32), kv_positions=kv_pos,
                    q_segment_ids=seg, kv_segment_ids=kv_seg, q_extra_range=extra_range_BT2)
        cache = CCACache(kv=kv, conv=jax.tree_util.tree_map(
            lambda new, old: new.astype(old.dtype), state, cache.conv))
    # Entirely in the latent (paper §III); with a cache, k/v are the cache's slots.
    o = attention(q, k, v, mask=mask, impl=cfg.impl, self_attention=cache is None)
    y = jnp.einsum("BTNE,NED->BTD", o, params["o_kernel"].astype(cfg.dtype))
    return y, cache


# --------------------------------------------------------------------------- registration
def _latent_heads(kw: Mapping) -> int | None:
    """N / C from the fields so far (None when they are not valid ints; Config says why)."""
    N, C = kw.get("num_heads"), kw.get("compression", Config.compression)
    if not (isinstance(N, int) and isinstance(C, int) and C > 0 and N % C == 0):
        return None
    return N // C


def _ccgqa_kv_heads(kw: dict) -> dict:
    """CCGQA default: the largest divisor of N' that is at most max(1, N' // 2)."""
    latent = _latent_heads(kw)
    if not latent:
        return {}
    return {"num_kv_heads": max(k for k in range(1, max(1, latent // 2) + 1) if latent % k == 0)}


def _register(name: str, description: str, **factory_kw) -> None:
    registry.register(registry.Mechanism(
        name=name, module=CCA, config_cls=Config, init_cache=init_cache, stats=stats,
        make_config=registry.dataclass_config_factory(Config, name, **factory_kw),
        description=description,
        # C = 2 divides a small model's 4 heads and keeps 2 latent heads (the paper's C is
        # up to 8, which 4 heads cannot take); pinned so small sweeps do not follow the default.
        small_config=lambda width: {"compression": 2},
        order_free=False,  # the causal convolutions need neighbouring tokens in order
    ))


_register("cca", "compressed convolutional attention: attention in a D/C latent, K = N/C",
          fixed={"num_kv_heads": _latent_heads})
_register("ccgqa", "compressed convolutional GQA: CCA with K = N/(2C) latent kv heads by default",
          defaults=_ccgqa_kv_heads)
