"""TidalDecode (Yang et al., 2024, arXiv:2410.05076): position-persistent sparse attention
at decode time.

The tokens that get the most attention overlap strongly from one layer to the next, so
selecting them once serves many layers. At each decode step:

* the layers before the first token-selection layer attend fully;
* a *token-selection* layer (``selection_layers``; the paper uses layer 2 and one
  re-selection layer near the middle, 13 of 32 for Llama-3-8B, which is the default
  ``default_selection_layers``) attends fully **and** picks the ``k`` cached positions with
  the largest attention (per kv head: probabilities summed over the head's G query heads;
  ties to the earlier slot);
* every later layer attends only to the positions picked by the last selection layer
  (the same slot indices: the cache of every layer is laid out alike).

It changes *which* cached keys are read, not which are stored: the full cache is kept,
so it saves reads (``reads_fraction``) and latency, not memory. It is cross-layer, so it
is not a per-layer cache policy: ``TidalRouter`` is an ``attn.core.route_attention``
router (layer = call order, so the model must be unscanned; prefill is declined: it runs
as usual); ``models.generate_tidal.generate_tidal`` is greedy generation with it. With
``k`` at least the cache length it equals ordinary greedy decoding.

Example:
  >>> default_selection_layers(30)
  (2, 12)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from attn.masks import Mask

Array = Any


def default_selection_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's placement scaled to depth: layer 2 and layer ``round(13/32 · L)``.

    Example:
      >>> default_selection_layers(32), default_selection_layers(30), default_selection_layers(2)
      ((2, 13), (2, 12), (0,))
    """
    if num_layers < 4:
        return (0,)
    return tuple(sorted({2, int(round(13 / 32 * num_layers))}))


class TidalRouter:
    """The router (see the module docstring). One instance per traced decode step.

    ``TidalRouter(num_layers, k=..., selection_layers=(...))``; it takes decode calls
    (one query per row, ``self_attention`` not True) and declines the others.
    """

    def __init__(self, num_layers: int, *, k: int, selection_layers: Sequence[int]):
        sel = tuple(sorted(set(int(l) for l in selection_layers)))
        if not sel or sel[0] < 0 or sel[-1] >= num_layers:
            raise ValueError(f"TidalDecode: selection_layers {selection_layers!r} must be a non-empty "
                             f"subset of [0, {num_layers})")
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"TidalDecode: k must be an int >= 1, got {k!r}")
        self.num_layers, self.k, self.selection = num_layers, k, sel
        self.calls = 0
        self.idx = None

    def __call__(self, call, q, k, v, *, mask, scale, softcap, sinks, bias, return_lse, impl,
                 self_attention=None):
        from attn.core import make_call, select_impl

        layer = self.calls
        self.calls += 1
        B, T, N, H = q.shape
        S, K = k.shape[1], k.shape[2]
        if self_attention or T != 1 or bias is not None:
            return None  # prefill (or something unusual): run as usual
        kw = dict(scale=scale, softcap=softcap, sinks=sinks, bias=None, return_lse=return_lse)
        if layer < self.selection[0] or layer in self.selection:
            o, lse = select_impl(call, impl).fn(q, k, v, mask=mask, **kw)
            if layer in self.selection:
                self.idx = self._select(q, k, mask, scale, softcap)
            return o, lse
        if sinks is not None:
            raise NotImplementedError("TidalDecode: learned attention sinks are per query head; "
                                      "the sparse layers fold kv heads into the batch")
        kk = self.idx.shape[-1]
        G = N // K
        idx = self.idx  # [B, K, kk]
        k_sel = jnp.take_along_axis(k.transpose(0, 2, 1, 3), idx[..., None], axis=2)  # [B, K, kk, H]
        v_sel = jnp.take_along_axis(v.transpose(0, 2, 1, 3), idx[..., None], axis=2)
        qp, kp = mask.positions(B, T, S)
        kseg = jnp.ones((B, S), jnp.int32) if mask.kv_segment_ids is None else mask.kv_segment_ids
        qseg = jnp.ones((B, T), jnp.int32) if mask.q_segment_ids is None else mask.q_segment_ids
        gather = lambda a: jnp.take_along_axis(jnp.broadcast_to(a[:, None, :], (B, K, S)), idx, axis=2)
        R = B * K
        qf = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(R, T, G, H)
        kf = k_sel.reshape(R, kk, 1, H)
        vf = v_sel.reshape(R, kk, 1, v.shape[-1])
        m = Mask(causal=mask.causal, window=mask.window,
                 q_positions=jnp.repeat(qp, K, axis=0), kv_positions=gather(kp).reshape(R, kk),
                 q_segment_ids=jnp.repeat(qseg, K, axis=0),
                 kv_segment_ids=gather(kseg).reshape(R, kk))
        sub = make_call(qf, kf, vf, mask=m, scale=scale, softcap=softcap, return_lse=return_lse)
        o, lse = select_impl(sub, impl).fn(qf, kf, vf, mask=m, **dict(kw, sinks=None))
        o = o.reshape(B, K, T, G, -1).transpose(0, 2, 1, 3, 4).reshape(B, T, N, -1)
        if lse is not None:
            lse = lse.reshape(B, K, G, T).reshape(B, N, T)
        return o, lse

    def _select(self, q, k, mask, scale, softcap):
        """int32 ``[B, K, k]``: the top-k slots by attention, per kv head."""
        B, T, N, H = q.shape
        S, K = k.shape[1], k.shape[2]
        s = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(B, T, K, N // K, H).astype(jnp.float32),
                       k.astype(jnp.float32)) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        vis = mask.materialize(B, T, S)  # [B, N|1, T, S]
        vis = jnp.broadcast_to(vis, (B, N, T, S)).reshape(B, K, N // K, T, S)
        s = jnp.where(vis, s, -jnp.inf)
        mx = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0)), 0.0)
        p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
        score = jnp.sum(p, axis=(2, 3))  # [B, K, S]
        # Hidden slots rank last (score −1), so they are only picked when k exceeds the visible keys.
        score = jnp.where(jnp.any(vis, axis=(2, 3)), score, -1.0)
        return jax.lax.top_k(score, min(self.k, S))[1].astype(jnp.int32)
