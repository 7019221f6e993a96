"""``xla_chunked``: online-softmax attention over key blocks with ``lax.scan``.

Memory is linear in S in both passes: the forward keeps running (max, sum, acc) per
query and never forms ``[T, S]`` logits, only ``[T, C]`` per block; the backward is a
``custom_vjp`` that recomputes each block's probabilities from the saved lse
(FlashAttention-2 recurrences):

    p      = exp(logits - lse)
    D      = rowsum(dO ∘ O) - dlse
    dV_c   = pᵀ dO              dP = dO V_cᵀ
    dlogit = p ∘ (dP - D)       (then through softcap: ∘ (1 - (capped / c)²))
    dQ    += scale · dlogit K_c   dK_c = scale · dlogitᵀ Q
    dsink  = -Σ_t exp(sink - lse) · D

This is the CPU path for long context and the reference for kernel backward tests.

Example:
  >>> import jax
  >>> from attn.chunked import chunked_attention
  >>> from attn.masks import Mask
  >>> q = jax.random.normal(jax.random.key(0), (1, 100, 4, 8))
  >>> kv = jax.random.normal(jax.random.key(1), (1, 100, 2, 8))
  >>> o, lse = chunked_attention(q, kv, kv, mask=Mask(causal=True), chunk_size=32)
  >>> o.shape, lse.shape
  ((1, 100, 4, 8), (1, 4, 100))
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attn import core
from attn.masks import Mask

DEFAULT_CHUNK = 512


def _blocks(x, nc, c, axis=1):
    """Split ``axis`` (padded length nc·c) into a leading block axis: ``[nc, ..., c, ...]``."""
    shape = x.shape[:axis] + (nc, c) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _pad_to(x, length, axis, value=0):
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _prepare(k, v, mask: Mask, bias, B, T, N, S, C):
    """Block the key side: padded keys get segment -1 so nothing can see them."""
    K = k.shape[2]
    nc = -(-S // C)
    Sp = nc * C
    qp, kp = mask.positions(B, T, S)
    # Padded keys must be invisible even without segments: give every real key
    # segment 1 and padding segment -1 when the caller gave no segments.
    if mask.has_segments:
        qs, ks = mask.q_segment_ids, mask.kv_segment_ids
    else:
        qs = None
        ks = jnp.ones((B, S), jnp.int32)
    ks = _pad_to(ks.astype(jnp.int32), Sp, 1, value=-1)
    xs = dict(
        k=_blocks(_pad_to(k, Sp, 1), nc, C),
        v=_blocks(_pad_to(v, Sp, 1), nc, C),
        kp=_blocks(_pad_to(kp, Sp, 1), nc, C),
        ks=_blocks(ks, nc, C),
        kidx=jnp.arange(Sp).reshape(nc, C),
    )
    if bias is not None:
        bg = core._bias_grouped(bias, B, N, T, S, K)
        if bg.shape[-1] != 1:
            xs["bias"] = _blocks(_pad_to(bg, Sp, 4), nc, C, axis=4)
    return qp, qs, xs, nc


def _block_logits(qg, x, mask: Mask, qp, qs, T, K, scale, softcap, bias, acc, static_bias):
    """Logits of one key block ``[B,K,G,T,C]`` (hidden = -inf), and the capped part."""
    s = jnp.einsum("BTKGH,BCKH->BKGTC", qg, x["k"], preferred_element_type=acc) * scale
    capped = core._softcap(s, softcap)
    s = capped
    if "bias" in x:
        s = s + x["bias"].astype(acc)
    elif static_bias is not None:
        s = s + static_bias.astype(acc)
    # Real-vs-padding is carried by segments: with user segments, padding keys (-1)
    # never equal a query segment; without, queries pass segment 1 implicitly.
    q_seg = qs if qs is not None else jnp.ones(qp.shape, jnp.int32)
    vis = mask.tile(qp, x["kp"], q_seg, x["ks"], jnp.arange(T), x["kidx"])
    s = jnp.where(core._mask_grouped(vis, K), s, -jnp.inf)
    return s, capped


def _static_bias(bias, B, N, T, S, K):
    """A bias with a broadcast key axis is added whole to every block."""
    if bias is None:
        return None
    bg = core._bias_grouped(bias, B, N, T, S, K)
    return bg if bg.shape[-1] == 1 else None


def _forward(q, k, v, sinks, bias, mask, scale, softcap, C, out_dtype):
    B, T, N, H = q.shape
    S, K, E = k.shape[1], k.shape[2], v.shape[3]
    G = N // K
    acc = core._acc_dtype(q.dtype)
    qg = q.reshape(B, T, K, G, H)
    qp, qs, xs, _ = _prepare(k, v, mask, bias, B, T, N, S, C)
    sb = _static_bias(bias, B, N, T, S, K)

    def step(carry, x):
        m, l, o = carry
        s, _ = _block_logits(qg, x, mask, qp, qs, T, K, scale, softcap, bias, acc, sb)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[..., None])
        l = l * alpha + jnp.sum(p, axis=-1)
        o = o * alpha[..., None] + jnp.einsum(
            "BKGTC,BCKE->BKGTE", p, x["v"].astype(acc)
        )
        return (m_new, l, o), None

    init = (
        jnp.full((B, K, G, T), -jnp.inf, acc),
        jnp.zeros((B, K, G, T), acc),
        jnp.zeros((B, K, G, T, E), acc),
    )
    (m, l, o), _ = jax.lax.scan(step, init, xs)
    sinks_KG = None if sinks is None else sinks.reshape(K, G)
    o, lse = core._finalize(m, l, o, sinks_KG, q.dtype if out_dtype is None else out_dtype)
    # lse stays at accumulator precision here: it is the residual the backward pass
    # recomputes p from, so a float32 lse would cap float64 gradients at ~1e-7.
    return core._to_public(o, lse, lse_dtype=acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _chunked(q, k, v, sinks, bias, mask, scale, softcap, C, out_dtype):
    return _forward(q, k, v, sinks, bias, mask, scale, softcap, C, out_dtype)


def _chunked_fwd(q, k, v, sinks, bias, mask, scale, softcap, C, out_dtype):
    o, lse = _forward(q, k, v, sinks, bias, mask, scale, softcap, C, out_dtype)
    return (o, lse), (q, k, v, sinks, bias, mask, o, lse)


def _chunked_bwd(scale, softcap, C, out_dtype, res, cts):
    q, k, v, sinks, bias, mask, o, lse = res
    do, dlse = cts
    B, T, N, H = q.shape
    S, K, E = k.shape[1], k.shape[2], v.shape[3]
    G = N // K
    acc = core._acc_dtype(q.dtype)
    qg = q.reshape(B, T, K, G, H)
    dog = do.reshape(B, T, K, G, E).astype(acc)
    lse_g = lse.reshape(B, K, G, T).astype(acc)
    lse_safe = jnp.where(jnp.isfinite(lse_g), lse_g, 0.0)
    # D = rowsum(dO ∘ O) - dlse: the lse cotangent enters exactly like a row shift.
    D = jnp.einsum("BTKGE,BTKGE->BKGT", dog, o.reshape(B, T, K, G, E).astype(acc))
    if dlse is not None:
        D = D - dlse.reshape(B, K, G, T).astype(acc)
    qp, qs, xs, nc = _prepare(k, v, mask, bias, B, T, N, S, C)
    sb = _static_bias(bias, B, N, T, S, K)
    reduce_static_bias = sb is not None

    def step(carry, x):
        dq, dsb = carry
        s, capped = _block_logits(qg, x, mask, qp, qs, T, K, scale, softcap, bias, acc, sb)
        p = jnp.exp(s - lse_safe[..., None])  # hidden logits are -inf, so p = 0 there
        dv = jnp.einsum("BKGTC,BTKGE->BCKE", p, dog)
        dp = jnp.einsum("BTKGE,BCKE->BKGTC", dog, x["v"].astype(acc))
        ds = p * (dp - D[..., None])  # d(logits after bias)
        out = {"dv": dv}
        if "bias" in x:
            out["dbias"] = ds
        if reduce_static_bias:
            dsb = dsb + jnp.sum(ds, axis=-1, keepdims=True)
        if softcap is not None:
            ds = ds * (1.0 - jnp.square(capped / softcap))
        dq = dq + jnp.einsum("BKGTC,BCKH->BTKGH", ds, x["k"].astype(acc)) * scale
        out["dk"] = jnp.einsum("BKGTC,BTKGH->BCKH", ds, qg.astype(acc)) * scale
        return (dq, dsb), out

    dsb0 = jnp.zeros((B, K, G, T, 1), acc) if reduce_static_bias else jnp.zeros((), acc)
    (dq, dsb), outs = jax.lax.scan(step, (jnp.zeros((B, T, K, G, H), acc), dsb0), xs)

    def unblock(x):  # [nc, B, C, ...] -> [B, S, ...]
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape((x.shape[0], nc * C) + x.shape[3:])[:, :S]

    dq = dq.reshape(B, T, N, H).astype(q.dtype)
    dk = unblock(outs["dk"]).astype(k.dtype)
    dv = unblock(outs["dv"]).astype(v.dtype)

    dsinks = None
    if sinks is not None:
        sink = sinks.reshape(K, G).astype(acc)[None, :, :, None]
        p_sink = jnp.where(jnp.isfinite(lse_g), jnp.exp(sink - lse_safe), 0.0)
        dsinks = jnp.sum(-p_sink * D, axis=(0, 3)).reshape(N).astype(sinks.dtype)

    dbias = None
    if bias is not None:
        if "dbias" in outs:  # [nc, B, K, G, T, C] -> [B, K, G, T, S]
            g = jnp.moveaxis(outs["dbias"], 0, 4)
            g = g.reshape(g.shape[:4] + (nc * C,))[..., :S]
        else:
            g = dsb
        g = g.reshape(B, N, T, g.shape[-1])
        dbias = _sum_to_shape(g, bias.shape).astype(bias.dtype)
    return dq, dk, dv, dsinks, dbias, None


def _sum_to_shape(g, shape):
    """Reduce a ``[B,N,T,S]`` gradient onto a bias of broadcastable ``shape``."""
    shape4 = (1,) * (4 - len(shape)) + tuple(shape)
    axes = tuple(i for i, (a, b) in enumerate(zip(shape4, g.shape)) if a == 1 and b != 1)
    g = jnp.sum(g, axis=axes, keepdims=True)
    return g.reshape(shape)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(q, k, v, *, mask: Mask | None = None, scale=None, softcap=None,
                      sinks=None, bias=None, return_lse=False, chunk_size: int = DEFAULT_CHUNK,
                      out_dtype=None):
    """Online-softmax attention over key blocks of ``chunk_size``; returns ``(o, lse)``.

    Same arguments and shapes as ``attn.core.attention`` (``o`` in ``out_dtype``,
    default the input dtype); any S (keys are padded
    internally to a multiple of ``chunk_size``). Memory is O(T·chunk_size) forward and
    backward. ``dense`` masks are refused (they are already O(T·S)).

    Example:
      >>> import jax
      >>> from attn.chunked import chunked_attention
      >>> x = jax.random.normal(jax.random.key(0), (1, 10, 2, 4))
      >>> chunked_attention(x, x, x, chunk_size=4)[0].shape
      (1, 10, 2, 4)
    """
    mask = Mask() if mask is None else mask
    if mask.dense is not None:
        raise NotImplementedError("xla_chunked does not take Mask.dense; use impl='xla'")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    C = int(min(chunk_size, max(k.shape[1], 1)))
    o, lse = _chunked(q, k, v, sinks, bias, mask, scale, softcap, C,
                      None if out_dtype is None else jnp.dtype(out_dtype))
    return o, lse.astype(jnp.float32)  # the op contract's lse dtype, outside the VJP


def _impl(q, k, v, *, mask, scale, softcap, sinks, bias, return_lse, out_dtype=None):
    return chunked_attention(q, k, v, mask=mask, scale=scale, softcap=softcap, sinks=sinks,
                             bias=bias, out_dtype=out_dtype)


def _supports(call: core.AttentionCall) -> str | None:
    if call.mask.dense is not None:
        return "Mask.dense is only accepted by the reference implementation 'xla'"
    return None


core.register_impl("xla_chunked", _impl, _supports, float32_out=True)
