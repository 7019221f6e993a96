"""The one float64 oracle: naive attention from a dense boolean mask, in numpy.

Every implementation (XLA, chunked, Pallas kernels, context-parallel strategies) is
compared with this. It shares no code with ``attn``: the forward is the textbook
softmax, the backward is written out by hand from the same definition:

    logits = softcap(scale · q kᵀ) + bias      (hidden: -inf)
    lse    = log(Σ exp(logits) + exp(sink))
    p      = exp(logits - lse),  o = p v
    D      = rowsum(dO ∘ o) - dlse,  dlogits = p ∘ (dO vᵀ - D)
    dsink  = -Σ_t exp(sink - lse) D

Shapes follow the op contract: q [B,T,N,H], k [B,S,K,H], v [B,S,K,E],
dense_mask [B|1, N|1, T, S] bool, lse [B,N,T].
"""

from __future__ import annotations

import numpy as np


def mask_from_definition(mask, batch, q_len, kv_len, num_heads=1):
    """The dense bool mask ``[B, N|1, T, S]`` of an ``attn.masks.Mask``, from its definition.

    Written in numpy from the rules of the Mask docstring, one (b, n, t, s) pair at a
    time and without calling any Mask method, so a bug in ``attn/masks.py`` shows up
    as a disagreement instead of passing every kernel test. Fields: causal, window
    (left, right), q/kv positions (default arange), segments (0 = padding),
    q_extra_range (OR-ed with causal/window only), block_mask + block_size, dense.
    """
    def arr(x):
        return None if x is None else np.asarray(x)

    B, T, S = batch, q_len, kv_len
    qp = arr(mask.q_positions)
    kp = arr(mask.kv_positions)
    qp = np.tile(np.arange(T), (B, 1)) if qp is None else qp
    kp = np.tile(np.arange(S), (B, 1)) if kp is None else kp
    qs, ks, extra = arr(mask.q_segment_ids), arr(mask.kv_segment_ids), arr(mask.q_extra_range)
    bm, dense = arr(mask.block_mask), arr(mask.dense)
    heads = num_heads if (bm is not None and bm.shape[0] > 1) or (
        dense is not None and dense.shape[1] > 1) else 1
    left, right = (None, None) if mask.window is None else mask.window
    out = np.zeros((B, heads, T, S), bool)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                d = int(kp[b, s]) - int(qp[b, t])  # key position minus query position
                ok = True
                if mask.causal and d > 0:
                    ok = False
                if left is not None and d < -left:
                    ok = False
                if right is not None and d > right:
                    ok = False
                ruled = mask.causal or mask.window is not None
                if extra is not None and ruled and extra[b, t, 0] <= kp[b, s] <= extra[b, t, 1]:
                    ok = True
                if qs is not None and (qs[b, t] != ks[b, s] or qs[b, t] == 0):
                    ok = False
                for n in range(heads):
                    v = ok
                    if bm is not None:
                        cq, ck = mask.block_size
                        v = v and bool(bm[min(n, bm.shape[0] - 1), t // cq, s // ck])
                    if dense is not None:
                        v = v and bool(dense[min(b, dense.shape[0] - 1),
                                             min(n, dense.shape[1] - 1), t, s])
                    out[b, n, t, s] = v
    return out


def _expand(q, k, v, dense_mask, bias):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    q = np.asarray(q, np.float64)
    k = np.repeat(np.asarray(k, np.float64), G, axis=2)  # [B,S,N,H]: naive on purpose
    v = np.repeat(np.asarray(v, np.float64), G, axis=2)
    m = np.ones((B, N, T, S), bool) if dense_mask is None else np.broadcast_to(
        np.asarray(dense_mask, bool), (B, N, T, S))
    b = np.zeros((B, N, T, S)) if bias is None else np.broadcast_to(
        np.asarray(bias, np.float64).reshape((1,) * (4 - np.ndim(bias)) + np.shape(bias)),
        (B, N, T, S))
    return q, k, v, m, b


def _probs(q, k, m, b, scale, softcap, sinks):
    raw = np.einsum("btnh,bsnh->bnts", q, k) * scale
    capped = raw if softcap is None else softcap * np.tanh(raw / softcap)
    logits = np.where(m, capped + b, -np.inf)
    terms = [logits]
    if sinks is not None:
        terms.append(np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None],
                                     logits.shape[:3] + (1,)))
    allv = np.concatenate(terms, axis=-1)
    mx = np.max(allv, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    tot = np.sum(np.exp(allv - mx), axis=-1)
    with np.errstate(divide="ignore"):
        lse = np.where(tot > 0, np.log(np.where(tot > 0, tot, 1.0)) + mx[..., 0], -np.inf)
    lse_safe = np.where(np.isfinite(lse), lse, 0.0)
    p = np.where(m, np.exp(logits - lse_safe[..., None]), 0.0)
    return raw, p, lse, lse_safe


def reference_attention(q, k, v, *, dense_mask=None, scale=None, softcap=None, sinks=None,
                        bias=None):
    """float64 ``(o [B,T,N,E], lse [B,N,T])``; fully masked rows give o = 0, lse = -inf."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qe, ke, ve, m, b = _expand(q, k, v, dense_mask, bias)
    _, p, lse, _ = _probs(qe, ke, m, b, scale, softcap, sinks)
    o = np.einsum("bnts,bsne->btne", p, ve)
    return o, lse


def reference_grads(q, k, v, do, dlse=None, *, dense_mask=None, scale=None, softcap=None,
                    sinks=None, bias=None):
    """float64 gradients of ``<o, do> + <lse, dlse>``: dict of dq, dk, dv, dsinks, dbias.

    ``dbias`` is the full ``[B,N,T,S]`` gradient (sum it onto a broadcast bias).
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    scale = H ** -0.5 if scale is None else scale
    qe, ke, ve, m, b = _expand(q, k, v, dense_mask, bias)
    raw, p, lse, lse_safe = _probs(qe, ke, m, b, scale, softcap, sinks)
    o = np.einsum("bnts,bsne->btne", p, ve)
    do = np.asarray(do, np.float64)
    D = np.einsum("btne,btne->bnt", do, o)
    if dlse is not None:
        D = D - np.where(np.isfinite(lse), np.asarray(dlse, np.float64), 0.0)
    dp = np.einsum("btne,bsne->bnts", do, ve)
    dlogits = p * (dp - D[..., None])
    draw = dlogits if softcap is None else dlogits * (1 - np.tanh(raw / softcap) ** 2)
    dq = np.einsum("bnts,bsnh->btnh", draw, ke) * scale
    dk = (np.einsum("bnts,btnh->bsnh", draw, qe) * scale).reshape(B, S, K, G, H).sum(3)
    dv = np.einsum("bnts,btne->bsne", p, do).reshape(B, S, K, G, -1).sum(3)
    out = dict(dq=dq, dk=dk, dv=dv, dbias=dlogits)
    if sinks is not None:
        p_sink = np.where(np.isfinite(lse), np.exp(np.asarray(sinks, np.float64)[None, :, None]
                                                    - lse_safe), 0.0)
        out["dsinks"] = -np.sum(p_sink * D, axis=(0, 2))
    return out
