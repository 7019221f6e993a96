"""TPLA: Tensor-Parallel Latent Attention for MLA decode (Tang et al., arXiv 2508.15881).

Under ordinary tensor parallelism every device holds all of MLA's latent cache, because
every head reads all of it. TPLA splits the latent ``L`` (and the decoupled RoPE key
``Hr``) over the ``tensor`` axis instead: device ``i`` caches only ``c_kv[..., L_i]`` and
``k_rope[..., Hr_i]`` — ``(L + Hr) / Tp`` numbers per token — and every head attends
to its local slice with its own softmax; the per-slice outputs are summed:

    MLA:   o_n = softmax(Σ_i s_{n,i}) [C_1 .. C_Tp] W_uv,n        s_{n,i} = q_{n,i}·[C_i, K_i]^T · scale
    TPLA:  o_n = Σ_i softmax(s_{n,i}) C_i W_uv,n[L_i]

**This is an approximation**: each shard normalises its *partial* logits, so TPLA equals
MLA only when every shard's partial logits induce the same attention distribution. An
orthogonal transform ``Q`` of the latent before slicing (``c' = c Q``, ``W_uk' = Q^T
W_uk``, ``W_uv' = Q^T W_uv``; the full-rank math is unchanged because ``Q Q^T = I``)
spreads every latent direction over all shards (paper: "the Hadamard transform or PCA
before TP slicing mitigates cross-shard interference"). What we measured
(``tests/test_tpla.py``, tiny random layers, so the errors are large in absolute terms):

* dominant latent channels scattered over the shards (each shard would otherwise attend
  by a different subset of them): the Hadamard transform halves the RMS error;
* dominant channels already inside one shard (or a PCA-ordered latent, e.g. after
  TransMLA): no transform is better, since that shard sees nearly the full logits;
* ``logit_multiplier="tp"`` (softmax scale times Tp, matching a shard's ~1/Tp share
  of a balanced logit) did not help there; in a separate numpy study it helped only for
  peaky retrieval-like attention at L = 512 (RMS error 0.74 -> 0.08 at Tp = 2).

Layout of one decode step (``jax.shard_map`` over the ``tensor`` axis, Tp devices):

1. queries for the device's own N/Tp heads (head-sharded ``W_q``, ``W_uk``: ordinary TP),
   absorbed into latent space ``[B,T,N/Tp,L+Hr]``;
2. ``all_to_all``: heads-split -> latent-split, ``[B,T,N,(L+Hr)/Tp]``;
3. the new token's ``c_kv``/``k_rope`` are computed in full (the down-projection is
   replicated; it is small and keeps the RMSNorm over the full latent exact), transformed,
   and the local slice is appended to the local cache (``attn/cache.py`` rules);
4. per-shard attention over the local slice (``combine="tpla"``: ``attn.core.attention``,
   one shared KV head); ``combine="exact"`` instead all-reduces the partial logits before
   one softmax, which reproduces MLA exactly and checks the plumbing;
5. ``all_to_all`` back to heads-split with the full latent, ``W_uv`` and ``W_o`` per
   head, and a ``psum`` (the all-reduce) over the tensor axis.

Prefill is plain MLA (the paper's disaggregated prefill); ``prepare`` transforms the
prefilled cache and weights once, ``shard`` places them on the mesh.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, numpy as np
  >>> from jax.sharding import Mesh
  >>> from attn import mla, tpla
  >>> cfg = mla.Config(d_model=16, num_heads=2, kv_lora_rank=8, qk_nope_head_dim=4,
  ...                  qk_rope_head_dim=4, v_head_dim=4, dtype="float32")
  >>> x = jax.random.normal(jax.random.key(0), (1, 4, 16)); pos = jnp.arange(4)[None]
  >>> p = nn.unbox(mla.MLA(cfg).init(jax.random.key(1), x))["params"]
  >>> _, cache = mla.mla_forward(p, x[:, :3], config=cfg, positions_BT=pos[:, :3],
  ...                            cache=mla.init_cache(cfg, 1, 8))
  >>> mesh = Mesh(np.array(jax.devices()[:1]), ("tensor",))
  >>> tp, tc = tpla.shard(*tpla.prepare(p, cache, cfg), mesh)
  >>> y, tc = tpla.tpla_decode(tp, x[:, 3:], config=cfg, mesh=mesh, positions_BT=pos[:, 3:], cache=tc)
  >>> y.shape, int(tc.length)
  ((1, 1, 16), 4)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attn import mla
from attn.core import attention
from attn.masks import Mask

Array = Any

COMBINES = ("tpla", "exact")
# Per-head weights are sharded over heads (ordinary TP); the rest is replicated.
_HEAD_SHARDED = {"q_nope_kernel": 1, "q_rope_kernel": 1, "k_up_kernel": 1, "v_up_kernel": 1,
                 "o_kernel": 0}


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester-Hadamard matrix ``[n, n]`` (n a power of two).

    Example:
      >>> (hadamard(2) * 2 ** 0.5).round().tolist()
      [[1.0, 1.0], [1.0, -1.0]]
    """
    if not (isinstance(n, int) and n > 0 and n & (n - 1) == 0):
        raise ValueError(f"hadamard: size must be a power of two, got {n!r}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def _transform(kind: str, n: int, field: str) -> np.ndarray:
    if kind == "none":
        return np.eye(n)
    if kind == "hadamard":
        if n & (n - 1):
            raise ValueError(f"tpla: transform='hadamard' needs {field}={n} to be a power of two; "
                             "use transform='none'")
        return hadamard(n)
    raise ValueError(f"tpla: transform must be 'hadamard' or 'none', got {kind!r}")


def prepare(params, cache, config: mla.Config, *, transform: str = "hadamard"):
    """Apply the orthogonal transform to the MLA weights and a (prefilled) latent cache.

    Args:
      params: the MLA layer's parameter dict.
      cache: an ``mla.LatentCache`` (e.g. after an MLA prefill).
      config: the ``mla.Config``.
      transform: "hadamard" (``L`` and ``Hr`` powers of two) or "none".

    Returns:
      ``(tpla_params, tpla_cache)``: ``k_up_kernel``/``v_up_kernel`` become ``Q^T W``, the
      cache holds ``c_kv Q_L`` and ``k_rope Q_R``, and the params gain
      ``latent_transform [L, L]`` and ``rope_transform [Hr, Hr]`` for new tokens.

    Example:
      >>> import jax.numpy as jnp
      >>> cfg = mla.Config(d_model=4, num_heads=2, kv_lora_rank=4, qk_nope_head_dim=2,
      ...                  qk_rope_head_dim=2, v_head_dim=2)
      >>> p = dict(k_up_kernel=jnp.ones((4, 2, 2)), v_up_kernel=jnp.ones((4, 2, 2)))
      >>> tp, _ = prepare(p, mla.init_cache(cfg, 1, 3), cfg)
      >>> tp["latent_transform"].shape, float(tp["k_up_kernel"][0, 0, 0])
      ((4, 4), 2.0)
    """
    QL = jnp.asarray(_transform(transform, config.kv_lora_rank, "kv_lora_rank"), jnp.float32)
    QR = jnp.asarray(_transform(transform, config.qk_rope_head_dim, "qk_rope_head_dim"), jnp.float32)
    tp = dict(params)
    for name in ("k_up_kernel", "v_up_kernel"):
        w = params[name]
        tp[name] = jnp.einsum("ML,MNH->LNH", QL, w.astype(jnp.float32)).astype(w.dtype)
    tp["latent_transform"], tp["rope_transform"] = QL, QR
    tcache = cache.replace(
        k=jnp.einsum("BSKM,ML->BSKL", cache.k.astype(jnp.float32), QL).astype(cache.k.dtype),
        v=jnp.einsum("BSKM,ML->BSKL", cache.v.astype(jnp.float32), QR).astype(cache.v.dtype))
    return tp, tcache


def param_specs(params, axis: str = "tensor") -> dict:
    """PartitionSpecs: per-head weights split over heads on ``axis``, the rest replicated."""
    def spec(name, a):
        if name not in _HEAD_SHARDED:
            return P()
        dims = [None] * a.ndim
        dims[_HEAD_SHARDED[name]] = axis
        return P(*dims)

    return {n: spec(n, a) for n, a in params.items()}


def cache_specs(cache, axis: str = "tensor"):
    """PartitionSpecs: the latent and RoPE key split on their last axis, bookkeeping replicated."""
    return cache.replace(k=P(None, None, None, axis), v=P(None, None, None, axis),
                         positions=P(), segment_ids=P(), length=P())


def shard(tpla_params, tpla_cache, mesh, axis: str = "tensor"):
    """Place prepared params and cache on ``mesh`` with ``param_specs`` / ``cache_specs``."""
    put = lambda tree, specs: jax.tree_util.tree_map(
        lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)
    return put(tpla_params, param_specs(tpla_params, axis)), put(tpla_cache, cache_specs(tpla_cache, axis))


def check_shardable(config: mla.Config, tp_size: int) -> None:
    """ValueError naming the field when N, L or Hr do not split into ``tp_size`` parts."""
    for field in ("num_heads", "kv_lora_rank", "qk_rope_head_dim"):
        if getattr(config, field) % tp_size:
            raise ValueError(f"tpla: mla.Config.{field}={getattr(config, field)} is not divisible "
                             f"by the tensor-parallel size {tp_size}")


# --------------------------------------------------------------------------- decode
@functools.partial(jax.jit, static_argnames=("config", "mesh", "combine", "logit_multiplier", "axis"))
def tpla_decode(tpla_params, x_BTD, *, config: mla.Config, mesh, positions_BT, cache,
                segment_ids_BT=None, combine: str = "tpla", logit_multiplier: float | str = 1.0,
                axis: str = "tensor"):
    """One TPLA decode call: append T tokens to the sharded latent cache and attend.

    Args:
      tpla_params: from ``prepare`` (then ``shard``).
      x_BTD: ``[B, T, D]`` new tokens (replicated).
      config: the ``mla.Config`` (causal).
      mesh: a ``jax.sharding.Mesh`` with axis ``axis``; N, L and Hr divide by its size.
      positions_BT: ``[B, T]`` int positions.
      cache: the prepared, sharded latent cache.
      segment_ids_BT: ``[B, T]`` (0 = padding) or None.
      combine: "tpla" (per-shard softmax, the paper) or "exact" (all-reduced logits).
      logit_multiplier: multiplies MLA's softmax scale inside each shard's softmax
        ("tpla" only): 1.0 (default) keeps MLA's scale; "tp" uses Tp, which puts a
        shard's partial logit (about 1/Tp of the full one once the transform has
        balanced the shards) back on the full logits' scale.
      axis: the tensor-parallel mesh axis.

    Returns:
      ``(y_BTD, cache)``.

    Example: see the module docstring.
    """
    if combine not in COMBINES:
        raise ValueError(f"tpla_decode: combine must be one of {COMBINES}, got {combine!r}")
    tp = mesh.shape[axis]
    mult = float(tp) if logit_multiplier == "tp" else logit_multiplier
    if not (isinstance(mult, (int, float)) and mult > 0):
        raise ValueError(f"tpla_decode: logit_multiplier must be > 0 or 'tp', got {logit_multiplier!r}")
    if not config.causal:
        raise ValueError("tpla_decode: a cache needs mla.Config.causal=True")
    check_shardable(config, tp)
    seg = jnp.ones(x_BTD.shape[:2], jnp.int32) if segment_ids_BT is None else segment_ids_BT
    local = functools.partial(_decode_local, config=config, axis=axis, tp=tp, combine=combine,
                              mult=float(mult))
    cspec = cache_specs(cache, axis)
    fn = jax.shard_map(local, mesh=mesh, out_specs=(P(), cspec),
                       in_specs=(param_specs(tpla_params, axis), P(), P(), P(), cspec))
    return fn(tpla_params, x_BTD, positions_BT.astype(jnp.int32), seg.astype(jnp.int32), cache)


def _decode_local(p, x_BTD, pos_BT, seg_BT, cache, *, config: mla.Config, axis: str, tp: int,
                  combine: str, mult: float):
    """The per-device body of ``tpla_decode`` (steps 1-5 of the module docstring)."""
    cfg, dt = config, config.dtype
    Lt, Rt = cfg.kv_lora_rank // tp, cfg.qk_rope_head_dim // tp
    QL, QR = p["latent_transform"].astype(dt), p["rope_transform"].astype(dt)
    # 1. queries of the local heads, in (transformed) latent space.
    q_nope, q_rope = mla.project_queries(p, x_BTD, pos_BT, cfg)
    q_lat = jnp.einsum("BTNH,LNH->BTNL", q_nope, p["k_up_kernel"].astype(dt))
    B, T, Nl, _ = q_lat.shape
    q = jnp.concatenate([q_lat.reshape(B, T, Nl, tp, Lt),
                         (q_rope @ QR).reshape(B, T, Nl, tp, Rt)], axis=-1)
    # 2. heads-split -> latent-split: shard i gets slice i of every head's query.
    q_i = jax.lax.all_to_all(q, axis, split_axis=3, concat_axis=2, tiled=True)[:, :, :, 0]
    # 3. the new tokens' latent in full (exact RMSNorm), transformed, local slice cached.
    c_new, kr_new = mla.project_latent(p, x_BTD, pos_BT, cfg)
    i = jax.lax.axis_index(axis)
    c_loc = jax.lax.dynamic_slice_in_dim(c_new @ QL, i * Lt, Lt, axis=-1)
    kr_loc = jax.lax.dynamic_slice_in_dim(kr_new @ QR, i * Rt, Rt, axis=-1)
    c_all, kr_all, kv_pos, kv_seg, cache = cache.append(c_loc[:, :, None], kr_loc[:, :, None],
                                                        pos_BT, seg_BT)
    c_i, k_i = c_all[:, :, 0].astype(dt), jnp.concatenate([c_all, kr_all], -1)[:, :, 0].astype(dt)
    mask = Mask(causal=True, window=cfg.mask_window, q_positions=pos_BT, kv_positions=kv_pos,
                q_segment_ids=seg_BT, kv_segment_ids=kv_seg)
    # 4. attention over the local slice.
    if combine == "tpla":
        o_i = attention(q_i, k_i[:, :, None], c_i[:, :, None], mask=mask,
                        scale=cfg.softmax_scale * mult, softcap=cfg.softcap, impl=cfg.impl,
                        self_attention=False)  # decode over a cache, already inside shard_map
    else:
        o_i = _exact_partial(q_i, k_i, c_i, mask, cfg, axis)
    # 5. latent-split -> heads-split with the full latent; W_uv, W_o; all-reduce.
    o = jax.lax.all_to_all(o_i.reshape(B, T, tp, Nl, Lt), axis, split_axis=2, concat_axis=4,
                           tiled=True)[:, :, 0]
    o = jnp.einsum("BTNL,LNE->BTNE", o, p["v_up_kernel"].astype(dt))
    y = jnp.einsum("BTNE,NED->BTD", o, p["o_kernel"].astype(dt))
    return jax.lax.psum(y, axis), cache


def _exact_partial(q_BTNC, k_BSC, c_BSL, mask: Mask, cfg: mla.Config, axis: str):
    """``softmax(psum of partial logits) · C_i``: the exact latent-parallel result ``[B,T,N,L/Tp]``."""
    B, T, _, _ = q_BTNC.shape
    S = k_BSC.shape[1]
    s = jnp.einsum("BTNC,BSC->BNTS", q_BTNC, k_BSC, preferred_element_type=jnp.float32)
    s = jax.lax.psum(s, axis) * cfg.softmax_scale
    if cfg.softcap is not None:
        s = cfg.softcap * jnp.tanh(s / cfg.softcap)
    s = jnp.where(mask.materialize(B, T, S), s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(e, axis=-1, keepdims=True)
    prob = e / jnp.where(l > 0, l, 1.0)   # a fully masked row gives 0, not NaN
    return jnp.einsum("BNTS,BSL->BTNL", prob, c_BSL.astype(jnp.float32)).astype(q_BTNC.dtype)
