"""Mixture-of-Head attention (MoH): attention heads as experts, routed per token.

Jin et al. 2024, "MoH: Multi-Head Attention as Mixture-of-Head Attention" (arXiv
2410.11842), §3. Multi-head attention is a sum over heads, ``Σ_i H^i W_O^i`` (§3.1); MoH
weights that sum per token and lets each token use only some heads (§3.2)::

    y_t = Σ_i g_i(x_t) · H^i_t W_O^i

    g_i = α1 · softmax(W_s x_t)_i                 shared heads i < h_s (always active)
        = α2 · softmax(W_r x_t)_i                 routed heads in top-k of W_r x_t
        = 0                                       other routed heads
    [α1, α2] = softmax(W_h x_t)                   (two-stage routing, W_h: D -> 2)

``gate_scaling="official"`` instead follows the released code (SkyworkAI/MoH): the
routed weights are renormalised over the top-k and multiplied by k, the shared ones by
h_s and α by 2, so a uniform router gives every active head weight 1, as in MHA.

``router="query_norm"`` is the parameter-free router of the released MoH-LLaMA3-8B
(continue-tuned from a pretrained LLaMA3, §4.4; ``MoH-LLaMA3/Inference_code``): a routed
head's logit is the L2 norm of its query, ``|q_i(x_t)|``, divided by the standard
deviation of those norms over the routed heads (unbiased, as ``torch.std``); softmax,
top-k, and the gates are binary: 1 for the shared heads and the chosen routed heads, 0
otherwise. It has no parameters, so a pretrained model converts to it exactly up to the
heads it drops (``models/conversion/moh.py``), and continued training adapts the
projections to the routing. (The norm is taken after RoPE, which is a rotation and does
not change it.) Its load-balance value is reported but carries no gradient (the
released code has no balance loss for it).

Load balance (§3.2, Eq. 6), over the non-padding tokens of the batch, on the routed
heads: ``L_b = Σ_i f_i P_i`` with ``f_i`` the fraction of tokens whose top-k holds head
i and ``P_i`` the mean router probability of head i. The layer sows it as
``aux_loss/moh_load_balance``; the trainer adds ``train.aux_loss_weight · Σ aux`` to the
loss (the paper's β = 0.01 is that key's default). (The released code's loss is
``R·L_b`` with R routed heads.)

**Which heads are computed.** ``head_selection``:

* ``"dense"``: every head attends, unselected heads are multiplied by 0. Training
  default: one big attention call, no gathers.
* ``"gather"``: each token attends with its ``A = h_s + top_k`` active heads only (the
  query heads and their K/V are gathered per token, batch and tokens folded together).
  It saves ``(N - A)/N`` of the attention FLOPs, but materialises ``[B·T, S, A, H]`` keys
  and values, so it pays off at decode (T = 1 per step) where the cost is reading K/V.
* ``"auto"`` (default): ``"gather"`` when decoding with a cache, T == 1 and
  ``A < K`` (fewer gathered heads than cached kv heads, so fewer K/V bytes are read);
  ``"dense"`` otherwise. The choice is logged once per kind.

Both give the same outputs (tests check it). Projections (q, k, v, o) are always dense:
they do not grow with the context and at decode cost less than the attention.

**Cache.** Routing is per *query* token, so a later token may pick any head and needs its
keys and values: MoH keeps the full K/V of every kv head (``attn.cache.KVCache``, or the
ring buffer with a window), exactly as MHA; the saving is in compute, not memory.

Parameters: those of ``attn.mha`` (``q_kernel [D,N,H]``, ``k_kernel, v_kernel [D,K,H]``,
``o_kernel [N,E,D]``, optional biases and qk-norm) plus
``router_kernel [D, N-h_s]`` (W_r), ``shared_router_kernel [D, h_s]`` (W_s, when h_s > 1)
and ``mix_router_kernel [D, 2]`` (W_h, when h_s > 0); none with ``router="query_norm"``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn.moh import MoH, Config, init_cache
  >>> cfg = Config(d_model=32, num_heads=4, num_shared_heads=2, top_k=1, dtype="float32")
  >>> x = jnp.ones((1, 5, 32)); pos = jnp.arange(5)[None]
  >>> layer = MoH(cfg)
  >>> params = layer.init(jax.random.key(0), x, positions_BT=pos)
  >>> (y, _), aux = layer.apply(params, x, positions_BT=pos, mutable=["aux_loss"])
  >>> cache = init_cache(cfg, batch=1, max_len=8)
  >>> y1, cache = layer.apply(params, x[:, :1], positions_BT=pos[:, :1], cache=cache)
  >>> y.shape, int(cache.length), sorted(aux["aux_loss"])
  ((1, 5, 32), 1, ['moh_load_balance'])
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn import mha, registry
from attn.axes import EMBED
from attn.cache import SLOT_META_BYTES, RingKVCache
from attn.core import attention
from attn.masks import Mask

Array = Any
log = logging.getLogger(__name__)

GATE_SCALINGS = ("paper", "official")
ROUTERS = ("learned", "query_norm")
HEAD_SELECTIONS = ("auto", "dense", "gather")
_AUTO_LOGGED: set[str] = set()


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Config(mha.Config):
    """Settings of one MoH layer: the ``attn.mha.Config`` fields plus the routing ones.

    Attributes (besides those of ``attn.mha.Config``; ``sinks`` is not supported):
      num_shared_heads: h_s heads every token uses (None = N // 2), ``0 <= h_s < N``.
      top_k: routed heads each token picks among the ``N - h_s`` routed ones
        (None = max(1, (N - h_s) // 2)).
      gate_scaling: "paper" (§3.2 equations) or "official" (released code's rescaling).
      head_selection: "auto", "dense" or "gather" (see the module docstring).
      router: "learned" (§3.2's W_r, W_s, W_h) or "query_norm" (MoH-LLaMA3's
        parameter-free router with binary gates; ``gate_scaling`` is then unused).

    Example:
      >>> c = Config(d_model=64, num_heads=8)
      >>> c.num_shared_heads, c.num_routed_heads, c.top_k, c.active_heads
      (4, 4, 2, 6)
    """

    num_shared_heads: int | None = None
    top_k: int | None = None
    gate_scaling: str = "paper"
    head_selection: str = "auto"
    router: str = "learned"

    def __post_init__(self):
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)
        N = self.num_heads
        if self.num_shared_heads is None:
            set_("num_shared_heads", N // 2)
        if not (_is_int(self.num_shared_heads) and 0 <= self.num_shared_heads < N):
            raise ValueError(f"Config.num_shared_heads must be an int in [0, num_heads={N}), "
                             f"got {self.num_shared_heads!r} (at least one head must be routed)")
        routed = N - self.num_shared_heads
        if self.top_k is None:
            set_("top_k", max(1, routed // 2))
        if not (_is_int(self.top_k) and 1 <= self.top_k <= routed):
            raise ValueError(
                f"Config.top_k={self.top_k!r} must be an int in [1, {routed}], the routed heads "
                f"num_heads - num_shared_heads = {N} - {self.num_shared_heads}")
        if self.sinks:
            raise ValueError("Config.sinks=True is not supported by MoH (per-token head subsets "
                             "cannot carry per-head sinks through the gather path)")
        if self.gate_scaling not in GATE_SCALINGS:
            raise ValueError(f"Config.gate_scaling must be one of {GATE_SCALINGS}, got {self.gate_scaling!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"Config.router must be one of {ROUTERS}, got {self.router!r}")
        if self.head_selection not in HEAD_SELECTIONS:
            raise ValueError(
                f"Config.head_selection must be one of {HEAD_SELECTIONS}, got {self.head_selection!r}")

    @property
    def num_routed_heads(self) -> int:
        return self.num_heads - self.num_shared_heads

    @property
    def active_heads(self) -> int:
        """A = h_s + top_k heads each token computes."""
        return self.num_shared_heads + self.top_k


# --------------------------------------------------------------------------- module
class MoH(nn.Module):
    """MoH layer: a parameter holder around ``moh_forward`` that sows the load-balance loss.

    ``__call__(x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None,
    extra_range_BT2=None) -> (y_BTD, cache)``; arguments as ``attn.mha.MHA``. Sows ``aux_loss/moh_load_balance`` (a float32 scalar),
    kept when applied with ``mutable=["aux_loss"]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = MoH(Config(d_model=16, num_heads=4, dtype="float32"))
      >>> x = jnp.ones((2, 3, 16))
      >>> layer.apply(layer.init(jax.random.key(0), x), x)[0].shape
      (2, 3, 16)
    """

    config: Config

    @nn.compact
    def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, cache=None,
                 extra_range_BT2=None):
        y, cache, load_balance = moh_forward(
            make_params(self, self.config), x_BTD, config=self.config, positions_BT=positions_BT,
            segment_ids_BT=segment_ids_BT, cache=cache, extra_range_BT2=extra_range_BT2)
        self.sow("aux_loss", "moh_load_balance", load_balance)
        return y, cache


def make_params(module: nn.Module, cfg: Config) -> dict[str, Array]:
    """The MHA parameters plus the routers; returns a plain dict."""
    p = mha.make_params(module, cfg)
    if cfg.router == "query_norm":
        return p
    D, hs, R = cfg.d_model, cfg.num_shared_heads, cfg.num_routed_heads
    # Routers are tiny and read by every token: replicated over heads (only D is sharded).
    init = nn.initializers.lecun_normal()

    def param(name, n):
        return module.param(name, nn.with_logical_partitioning(init, (EMBED, None)), (D, n),
                            cfg.param_dtype)

    p["router_kernel"] = param("router_kernel", R)
    if hs > 1:  # with one shared head its softmax is 1: no parameters (as the released code)
        p["shared_router_kernel"] = param("shared_router_kernel", hs)
    if hs > 0:
        p["mix_router_kernel"] = param("mix_router_kernel", 2)
    return p


# --------------------------------------------------------------------------- cache / stats
def init_cache(config: Config, batch: int, max_len: int, dtype=None):
    """The full KV cache of all heads (routing is per query token; see the module docstring).

    Example:
      >>> init_cache(Config(d_model=16, num_heads=4), batch=1, max_len=6).k.shape
      (1, 6, 4, 4)
    """
    return mha.init_cache(config, batch, max_len, dtype)


def param_count(config: Config) -> int:
    """Parameters of one layer (matches ``make_params``)."""
    hs = config.num_shared_heads
    router = config.num_routed_heads + (hs if hs > 1 else 0) + (2 if hs > 0 else 0)
    if config.router == "query_norm":
        router = 0
    return mha.param_count(config) + config.d_model * router


def stats(config: Config, seq_len: int) -> dict:
    """Size and cost figures of one layer at sequence length ``seq_len``.

    * ``params``: MHA's plus the routers, ``D·(R + h_s·[h_s>1] + 2·[h_s>0])``.
    * ``kv_bytes_per_token``: as MHA, ``K·(H+E)·itemsize + 8`` (every head is cached).
    * ``flops_per_token``: ``2·(D·N·H + 2·D·K·H + N·E·D)`` (dense projections)
      ``+ 2·D·(router outputs)`` ``+ 2·A·(H+E)·ctx`` with ``A = h_s + top_k`` active heads
      and the mean visible context ``ctx``: the cost when only active heads attend
      (``"gather"``); the dense path spends ``N/A`` times that attention term.
    * ``state_bytes``: 0.

    Example:
      >>> s = stats(Config(d_model=64, num_heads=4, dtype="bfloat16"), 4096)
      >>> s["params"], s["kv_bytes_per_token"]
      (16768, 264)
    """
    cfg = config
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    E = H
    ctx = mha.mean_context(seq_len, causal=cfg.causal, window=cfg.window)
    router_out = (param_count(cfg) - mha.param_count(cfg)) // D
    return dict(
        params=param_count(cfg),
        kv_bytes_per_token=K * (H + E) * jnp.dtype(cfg.dtype).itemsize + SLOT_META_BYTES,
        flops_per_token=2.0 * (D * N * H + D * K * H + D * K * E + N * E * D)
        + 2.0 * D * router_out + 2.0 * cfg.active_heads * (H + E) * ctx,
        state_bytes=0,
    )


# --------------------------------------------------------------------------- pure functions
class Routing(NamedTuple):
    """Per-token routing (float32). Letters: N counts heads -- all of them in ``gates_BTN``,
    only the routed ones in ``probs_BTN`` / ``chosen_BTN``, the active ones in ``heads_BTN``."""

    gates_BTN: Array    # [B, T, N] g_i for every head, 0 for unselected routed heads
    heads_BTN: Array    # [B, T, A] int indices of the active heads (shared first, then top-k)
    probs_BTN: Array    # [B, T, R] softmax(W_r x) over the routed heads
    chosen_BTN: Array   # [B, T, R] 1 where the routed head is in the token's top-k


def route(params, x_BTD, config: Config, q_BTNH=None) -> Routing:
    """The two-stage routing of §3.2: α from a 2-way softmax, softmax within each group.

    Args:
      params: dict with ``router_kernel [D, R]`` and, as the config needs them,
        ``shared_router_kernel [D, h_s]``, ``mix_router_kernel [D, 2]`` (none for
        ``router="query_norm"``).
      x_BTD: ``[B, T, D]`` the layer input.
      config: the ``Config``.
      q_BTNH: ``[B, T, N, H]`` the queries; required by ``router="query_norm"`` only.

    Returns:
      a ``Routing``. Ties in the top-k go to the lower head index (``lax.top_k``).

    Example:
      >>> import jax.numpy as jnp
      >>> cfg = Config(d_model=2, num_heads=3, head_dim=2, num_shared_heads=1, top_k=1)
      >>> p = {"router_kernel": jnp.array([[1.0, 0.0], [0.0, 0.0]]),
      ...      "mix_router_kernel": jnp.zeros((2, 2))}
      >>> r = route(p, jnp.array([[[1.0, 0.0]]]), cfg)
      >>> r.heads_BTN.tolist(), [round(g, 3) for g in r.gates_BTN[0, 0].tolist()]
      ([[[0, 1]]], [0.5, 0.366, 0.0])
    """
    cfg = config
    if cfg.router == "query_norm":
        return _route_query_norm(q_BTNH, cfg)
    hs, k = cfg.num_shared_heads, cfg.top_k
    x = x_BTD.astype(jnp.float32)
    logits = lambda name: jnp.einsum("BTD,DN->BTN", x, params[name].astype(jnp.float32))
    probs = jax.nn.softmax(logits("router_kernel"), axis=-1)
    _, top_BTN = jax.lax.top_k(probs, k)
    chosen = jnp.sum(jax.nn.one_hot(top_BTN, cfg.num_routed_heads, dtype=jnp.float32), axis=-2)
    routed = probs * chosen
    official = cfg.gate_scaling == "official"
    if official:  # released code: renormalise over the top-k, weight k
        routed = routed / jnp.maximum(jnp.sum(routed, -1, keepdims=True), jnp.finfo(jnp.float32).eps) * k
    if hs == 0:
        gates = routed
    else:
        shared = (jax.nn.softmax(logits("shared_router_kernel"), axis=-1) if hs > 1
                  else jnp.ones(x.shape[:2] + (1,), jnp.float32))
        alpha = jax.nn.softmax(logits("mix_router_kernel"), axis=-1)
        if official:
            shared, alpha = shared * hs, alpha * 2
        gates = jnp.concatenate([alpha[..., :1] * shared, alpha[..., 1:] * routed], axis=-1)
    B, T = x.shape[:2]
    shared_idx = jnp.broadcast_to(jnp.arange(hs, dtype=jnp.int32), (B, T, hs))
    heads = jnp.concatenate([shared_idx, hs + top_BTN.astype(jnp.int32)], axis=-1)
    return Routing(gates, heads, probs, chosen)


def _route_query_norm(q_BTNH, cfg: Config) -> Routing:
    """MoH-LLaMA3's router: softmax of routed query norms / their std, top-k, binary gates.

    Example:
      >>> import jax.numpy as jnp
      >>> cfg = Config(d_model=4, num_heads=4, head_dim=1, num_shared_heads=1, top_k=1,
      ...              router="query_norm", rope=None)
      >>> r = route({}, None, cfg, q_BTNH=jnp.array([[[[9.0], [1.0], [-3.0], [2.0]]]]))
      >>> r.heads_BTN.tolist(), r.gates_BTN.tolist()
      ([[[0, 2]]], [[[1.0, 0.0, 1.0, 0.0]]])
    """
    if q_BTNH is None:
        raise ValueError("MoH: router='query_norm' routes on the queries; pass q_BTNH")
    hs, k, R = cfg.num_shared_heads, cfg.top_k, cfg.num_routed_heads
    norms = jnp.linalg.norm(q_BTNH[:, :, hs:].astype(jnp.float32), axis=-1)       # [B, T, R]
    std = jnp.std(norms, axis=-1, keepdims=True, ddof=1) if R > 1 else jnp.ones_like(norms)
    # Equal norms (std 0) would divide by zero; any logits then rank the same.
    probs = jax.nn.softmax(norms / jnp.maximum(std, jnp.finfo(jnp.float32).tiny), axis=-1)
    _, top_BTN = jax.lax.top_k(probs, k)
    chosen = jnp.sum(jax.nn.one_hot(top_BTN, R, dtype=jnp.float32), axis=-2)
    B, T = norms.shape[:2]
    gates = jnp.concatenate([jnp.ones((B, T, hs), jnp.float32), chosen], axis=-1)
    shared_idx = jnp.broadcast_to(jnp.arange(hs, dtype=jnp.int32), (B, T, hs))
    heads = jnp.concatenate([shared_idx, hs + top_BTN.astype(jnp.int32)], axis=-1)
    # Parameter-free: the balance value is a statistic, not a training signal.
    return Routing(gates, heads, jax.lax.stop_gradient(probs), chosen)


def load_balance_loss(routing: Routing, segment_ids_BT=None) -> Array:
    """§3.2 Eq. 6: ``Σ_i f_i P_i`` over routed heads, averaged over non-padding tokens.

    ``f_i`` (fraction of tokens that picked head i) carries no gradient; ``P_i`` (mean
    router probability) does, which is what pushes the router towards balance. Uniform
    routing gives ``top_k / R``.

    Example:
      >>> import jax.numpy as jnp
      >>> r = Routing(None, None, jnp.full((1, 2, 2), 0.5), jnp.array([[[1.0, 0.0], [0.0, 1.0]]]))
      >>> float(load_balance_loss(r))
      0.5
    """
    w_BT = (jnp.ones(routing.probs_BTN.shape[:2], jnp.float32) if segment_ids_BT is None
            else (segment_ids_BT != 0).astype(jnp.float32))
    n = jnp.maximum(jnp.sum(w_BT), 1.0)
    f_N = jnp.einsum("BT,BTN->N", w_BT, routing.chosen_BTN) / n
    p_N = jnp.einsum("BT,BTN->N", w_BT, routing.probs_BTN) / n
    return jnp.sum(f_N * p_N)


def _use_gather(cfg: Config, T: int, cache) -> bool:
    """Resolve ``head_selection``; "auto" follows the rule in the module docstring."""
    if cfg.head_selection != "auto":
        return cfg.head_selection == "gather"
    gather = cache is not None and T == 1 and cfg.active_heads < cfg.num_kv_heads
    choice = "gather" if gather else "dense"
    key = f"{choice}:{'decode' if cache is not None and T == 1 else 'other'}"
    if key not in _AUTO_LOGGED:
        _AUTO_LOGGED.add(key)
        log.info("MoH head_selection='auto' chose %r (cache=%s, T=%d, active heads A=%d, kv heads K=%d)",
                 choice, cache is not None, T, cfg.active_heads, cfg.num_kv_heads)
    return gather


def gathered_attention(q_BTNH, k_BSKH, v_BSKE, heads_BTN, *, q_positions_BT, kv_positions_BS,
                       q_segment_ids_BT, kv_segment_ids_BS, causal=True, window=None, softcap=None,
                       impl="auto", q_extra_range_BT2=None):
    """Attention of the selected query heads only, per token.

    Args:
      q_BTNH: ``[B, T, N, H]`` queries of all N heads.
      k_BSKH, v_BSKE: ``[B, S, K, H|E]`` keys and values of all K kv heads.
      heads_BTN: ``[B, T, A]`` int query heads each token uses (query head n reads kv
        head ``n // (N/K)``).
      q_positions_BT, kv_positions_BS: int positions (the causal mask); required.
      q_segment_ids_BT, kv_segment_ids_BS: int segments, or both None.
      causal, window: as ``Mask``; softcap, impl: as ``attention``.
      q_extra_range_BT2: ``[B, T, 2]`` int or None (``Mask.q_extra_range``).

    Returns:
      ``[B, T, A, E]``: head ``heads_BTN[b, t, a]``'s output for token t.

    Tokens are folded into the batch (``[B·T, 1, A, H]`` queries against ``[B·T, S, A, H]``
    gathered keys), which is why this is for short T (decode).

    Example:
      >>> import jax.numpy as jnp
      >>> q = jnp.ones((1, 2, 4, 8)); kv = jnp.ones((1, 2, 2, 8)); pos = jnp.arange(2)[None]
      >>> gathered_attention(q, kv, kv, jnp.array([[[0, 3], [1, 2]]]), q_positions_BT=pos,
      ...     kv_positions_BS=pos, q_segment_ids_BT=None, kv_segment_ids_BS=None).shape
      (1, 2, 2, 8)
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    A = heads_BTN.shape[-1]
    q = jnp.take_along_axis(q_BTNH, heads_BTN[..., None], axis=2).reshape(B * T, 1, A, H)
    kv_heads_BTN = heads_BTN // (N // K)

    def gather(x_BSKH):  # -> [B·T, S, A, H]: per token, the kv head of each active head
        x_BSTN = jax.vmap(lambda x_SKH, i_TN: jnp.take(x_SKH, i_TN, axis=1))(x_BSKH, kv_heads_BTN)
        return jnp.swapaxes(x_BSTN, 1, 2).reshape(B * T, S, A, x_BSKH.shape[-1])

    fold_q = lambda a_BT: None if a_BT is None else a_BT.reshape(B * T, 1)
    fold_kv = lambda a_BS: None if a_BS is None else jnp.repeat(a_BS, T, axis=0)
    mask = Mask(causal=causal, window=window,
                q_positions=fold_q(q_positions_BT), kv_positions=fold_kv(kv_positions_BS),
                q_segment_ids=fold_q(q_segment_ids_BT), kv_segment_ids=fold_kv(kv_segment_ids_BS),
                q_extra_range=None if q_extra_range_BT2 is None else q_extra_range_BT2.reshape(B * T, 1, 2))
    # Folded to one query per row: never the sequence-split self-attention a router shards.
    o = attention(q, gather(k_BSKH), gather(v_BSKE), mask=mask, softcap=softcap, impl=impl,
                  self_attention=False)
    return o.reshape(B, T, A, -1)


def _check_call(cfg: Config, x_BTD, positions_BT, segment_ids_BT, cache) -> None:
    """Input validation with messages that name the argument and its shape."""
    if getattr(x_BTD, "ndim", None) != 3 or x_BTD.shape[-1] != cfg.d_model:
        raise ValueError(f"MoH: x must be [B, T, D] with D=d_model={cfg.d_model}, got shape "
                         f"{getattr(x_BTD, 'shape', type(x_BTD))}")
    BT = tuple(x_BTD.shape[:2])
    for name, a in (("positions_BT", positions_BT), ("segment_ids_BT", segment_ids_BT)):
        if a is not None and tuple(getattr(a, "shape", ())) != BT:
            raise ValueError(f"MoH: {name} must have shape [B, T]={BT}, got {getattr(a, 'shape', a)}")
    if cache is not None:
        if not cfg.causal:
            raise ValueError("MoH: a KV cache needs causal=True (decode cannot see future tokens)")
        if positions_BT is None:
            raise ValueError("MoH: positions_BT is required with a cache (the mask uses positions)")
        if isinstance(cache, RingKVCache) and (cfg.window is None or cache.capacity < cfg.window):
            raise ValueError(
                f"MoH: a ring-buffer cache of {cache.capacity} slots cannot serve window={cfg.window}")


def moh_forward(params: Mapping[str, Array], x_BTD, *, config: Config, positions_BT=None,
                segment_ids_BT=None, cache=None, extra_range_BT2=None):
    """The layer as a pure function of its parameter dict.

    Args:
      params: ``attn.mha`` parameters plus the routers (``make_params``).
      x_BTD: ``[B, T, D]``.
      config: the ``Config``.
      positions_BT: ``[B, T]`` int, or None for ``arange(T)`` (not with a cache).
      segment_ids_BT: ``[B, T]`` int (0 = padding) or None.
      cache: None, ``KVCache`` or ``RingKVCache`` (from ``init_cache``).
      extra_range_BT2: ``[B, T, 2]`` int or None (``Mask.q_extra_range``).

    Returns:
      ``(y_BTD in config.dtype, cache, load_balance float32 scalar)``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> cfg = Config(d_model=16, num_heads=4, dtype="float32", head_selection="gather")
      >>> x = jnp.ones((1, 3, 16))
      >>> p = nn.unbox(MoH(cfg).init(jax.random.key(0), x))["params"]
      >>> y, _, lb = moh_forward(p, x, config=cfg)
      >>> y.shape, bool(lb > 0)
      ((1, 3, 16), True)
    """
    cfg = config
    _check_call(cfg, x_BTD, positions_BT, segment_ids_BT, cache)
    B, T, _ = x_BTD.shape
    pos = positions_BT
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    q, k, v = mha.project_qkv(params, x_BTD, pos, cfg)
    routing = route(params, x_BTD, cfg, q_BTNH=q)
    if cache is None:
        kv_pos, q_seg, kv_seg = positions_BT, segment_ids_BT, segment_ids_BT
    else:
        q_seg = (jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT).astype(jnp.int32)
        k, v, kv_pos, kv_seg, cache = cache.append(k, v, positions_BT, q_seg)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    if _use_gather(cfg, T, cache):
        # Only the A active heads attend (N in o_BTNE / gates_BTN counts those A heads).
        o_BTNE = gathered_attention(
            q, k, v, routing.heads_BTN, q_positions_BT=pos,
            kv_positions_BS=pos if kv_pos is None else kv_pos, q_segment_ids_BT=q_seg,
            kv_segment_ids_BS=kv_seg, causal=cfg.causal, window=cfg.mask_window, softcap=cfg.softcap,
            impl=cfg.impl, q_extra_range_BT2=extra_range_BT2)
        gates_BTN = jnp.take_along_axis(routing.gates_BTN, routing.heads_BTN, axis=-1)
        # Scatter the active heads back (indices are distinct per token); the rest stay 0.
        b = jnp.arange(B)[:, None, None]
        t = jnp.arange(T)[None, :, None]
        o = jnp.zeros(q.shape[:3] + (o_BTNE.shape[-1],), o_BTNE.dtype).at[b, t, routing.heads_BTN].set(
            o_BTNE * gates_BTN[..., None].astype(o_BTNE.dtype))
    else:
        mask = Mask(causal=cfg.causal, window=cfg.mask_window, q_positions=positions_BT,
                    kv_positions=kv_pos, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                    q_extra_range=extra_range_BT2)
        o = attention(q, k, v, mask=mask, softcap=cfg.softcap, impl=cfg.impl,
                      self_attention=cache is None)
        o = o * routing.gates_BTN[..., None].astype(o.dtype)  # §3.2: weighted sum over heads
    return mha.project_out(params, o, cfg), cache, load_balance_loss(routing, segment_ids_BT)


# --------------------------------------------------------------------------- registration
registry.register(registry.Mechanism(
    name="moh", module=MoH, config_cls=Config, init_cache=init_cache, stats=stats,
    make_config=registry.dataclass_config_factory(Config, "moh"),
    # The paper's gates shrink every head's output ~3x at init and a small MoH then stalls
    # on MQAR; the released code's rescaling (each active head starts at weight 1) learns.
    small_config=lambda width: {"gate_scaling": "official"},
    description="mixture-of-head attention: h_s shared + top-k routed heads per token",
))
