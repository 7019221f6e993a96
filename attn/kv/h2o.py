"""H2O (Zhang et al., 2023, *H2O: Heavy-Hitter Oracle for Efficient Generative Inference
of Large Language Models*): keep the tokens that have received the most attention.

Rule (one layer, row b, kv head k with query heads g = 1..G, prompt queries t, keys s):

    A[b, k, s] = (1/G) Σ_g Σ_t P[b, kG+g, t, s]        (accumulated attention, "heavy hitters")
    P[b, n, t, :] = softmax_s(q_t · k_s / √H)  over the keys query t sees (causal on
                    positions, same segment, the layer's window and softcap)

Of row b's budget ``β_b`` tokens per head, the newest ``r_b`` real tokens are always kept
(the recent window) and the other ``β_b − r_b`` are the real tokens with the largest
``A`` (ties to the earlier token). ``r_b = min(recent, β_b)`` when ``recent`` is given,
else ``floor(recent_ratio · β_b)``: H2O splits its budget evenly between heavy hitters
and recent tokens (``recent_ratio = 0.5``). H2O evicts greedily during decoding; this
cache selects once, at the end of the prompt, from the prompt's own attention (the
scores H2O has accumulated at that point), and keeps every decoded token.

Knobs: ``recent`` (None: use ``recent_ratio``), ``recent_ratio`` (0.5), ``block`` (128:
query rows per step of the accumulation, see below).

**Memory.** ``A`` needs every prompt query's probabilities; at 8k context the full
``[B, N, T, S]`` would be 8 GiB per layer for 32 heads. ``accumulate_over_queries``
scans blocks of ``block`` query rows (``lax.scan``) and sums per block, so the peak is
``[B, N, block, S]``. The same helper serves Scissorhands (``scissorhands.py``) and
Keyformer (``keyformer.py``).

Example:
  >>> from attn.kv.policy import example_observation, make_policy
  >>> obs = example_observation()   # one row of 8 tokens, 2 query heads, 1 kv head, budget 4
  >>> keep = make_policy("h2o", recent=2).select(obs).keep
  >>> int(keep.sum()), keep[0, 0, -2:].tolist()          # 2 heavy hitters + 2 recent
  (4, [True, True])
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from attn.kv.policy import Observation, ScorePolicy, register_policy

Array = jax.Array


def _softmax_rows(s):
    """Softmax over the last axis with −inf for invisible keys; all-invisible rows give 0."""
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    z = jnp.sum(p, axis=-1, keepdims=True)
    return jnp.where(z > 0, p / jnp.where(z > 0, z, 1.0), 0.0)


def accumulate_over_queries(obs: Observation, contrib: Callable, *, rows: int | None = None,
                            block: int = 128) -> Array:
    """Sum a per-query quantity over the prompt's query rows, a block at a time.

    Args:
      obs: the layer's ``Observation``.
      contrib: ``contrib(s, vis, q_pos, q_idx) -> [B, K, G, S]``, the block's contribution
        summed over its C query rows, from the logits ``s [B, K, G, C, S]`` (float32, scaled
        by ``H ** -0.5``, softcapped, ``-inf`` where the query does not see the key),
        ``vis [B, C, S]`` bool, the queries' positions ``q_pos [B, C]`` and their index in
        their row ``q_idx [B, C]`` (−1 for padding queries, whose ``vis`` rows are False).
      rows: only the last ``rows`` array rows are queried (prompts are left-padded, so
        these are each row's newest real tokens); None: all ``S``.
      block: query rows per scan step; memory peaks at ``[B, N, block, S]``.

    Returns:
      float32 ``[B, K, S]``: the contributions summed over all query rows and averaged over
      the ``G`` query heads of each kv group.
    """
    B, S, N, H = obs.q.shape
    K = obs.num_kv_heads
    G = N // K
    W = S if rows is None else min(int(rows), S)
    C = max(1, min(int(block), W))
    nb = -(-W // C)
    pad = nb * C - W
    idx = obs.index_in_row()
    q = obs.q[:, S - W:].astype(jnp.float32).reshape(B, W, K, G, H)
    qpos, qseg, qidx = obs.positions[:, S - W:], obs.segment_ids[:, S - W:], idx[:, S - W:]
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        qpos = jnp.pad(qpos, ((0, 0), (0, pad)))
        qseg = jnp.pad(qseg, ((0, 0), (0, pad)))
        qidx = jnp.pad(qidx, ((0, 0), (0, pad)), constant_values=-1)

    def blocks(a):  # [B, nb·C, ...] -> [nb, B, C, ...]
        return jnp.moveaxis(a.reshape((B, nb, C) + a.shape[2:]), 1, 0)

    k = obs.k.astype(jnp.float32)
    kp, ks = obs.positions, obs.segment_ids
    scale = H ** -0.5

    def step(acc, xs):
        qb, pb, sb, ib = xs
        s = jnp.einsum("BCKGH,BSKH->BKGCS", qb, k) * scale
        if obs.softcap is not None:
            s = obs.softcap * jnp.tanh(s / obs.softcap)
        vis = (kp[:, None, :] <= pb[:, :, None]) & (sb[:, :, None] == ks[:, None, :]) & (sb[:, :, None] != 0)
        if obs.window is not None and obs.window[0] is not None:
            vis &= kp[:, None, :] >= pb[:, :, None] - obs.window[0]
        s = jnp.where(vis[:, None, None], s, -jnp.inf)
        return acc + contrib(s, vis, pb, ib).astype(jnp.float32), None

    acc0 = jnp.zeros((B, K, G, S), jnp.float32)
    acc, _ = jax.lax.scan(step, acc0, (blocks(q), blocks(qpos), blocks(qseg), blocks(qidx)))
    return jnp.mean(acc, axis=2)


def recent_counts(obs: Observation, recent: int | None, recent_ratio: float) -> Array:
    """int32 ``[B]``: the recent-window size of each row, ``min(recent, budget)`` or
    ``floor(recent_ratio · budget)``."""
    b = obs.budget_B.astype(jnp.int32)
    if recent is not None:
        return jnp.minimum(jnp.int32(recent), b)
    return jnp.floor(recent_ratio * b.astype(jnp.float32) + 1e-6).astype(jnp.int32)


def with_recent_window(importance_BKS, obs: Observation, recent_B) -> Array:
    """Scores that put the newest ``recent_B[b]`` real tokens first (newest highest), then
    the rest by ``importance`` (which must lie in ``[0, 2·S]``)."""
    S = obs.k.shape[1]
    idx, n = obs.index_in_row(), obs.row_len()
    is_recent = (idx >= (n - recent_B)[:, None]) & obs.real_BS
    top = (4.0 * S + idx.astype(jnp.float32))[:, None, :]
    return jnp.where(is_recent[:, None, :], top, importance_BKS)


def check_recent(policy) -> None:
    """Validate the shared ``recent`` / ``recent_ratio`` / ``block`` knobs."""
    if policy.recent is not None and not (isinstance(policy.recent, int) and policy.recent >= 0):
        raise ValueError(f"recent must be None or an int >= 0, got {policy.recent!r}")
    if not (isinstance(policy.recent_ratio, (int, float)) and 0 <= policy.recent_ratio <= 1):
        raise ValueError(f"recent_ratio must be in [0, 1], got {policy.recent_ratio!r}")
    if not (isinstance(policy.block, int) and policy.block >= 1):
        raise ValueError(f"block must be an int >= 1, got {policy.block!r}")


def accumulated_attention(obs: Observation, *, block: int = 128) -> Array:
    """float32 ``[B, K, S]``: H2O's ``A`` (probabilities summed over every prompt query,
    averaged over each kv group's G heads)."""
    return accumulate_over_queries(
        obs, lambda s, vis, pos, idx: jnp.sum(_softmax_rows(s), axis=3), block=block)


@register_policy("h2o")
@dataclasses.dataclass(frozen=True)
class H2O(ScorePolicy):
    """Heavy hitters + recent window.  Knobs: ``recent``, ``recent_ratio`` (0.5), ``block``."""

    recent: int | None = None
    recent_ratio: float = 0.5
    block: int = 128

    def __post_init__(self):
        check_recent(self)

    def scores(self, obs):
        imp = accumulated_attention(obs, block=self.block)
        return with_recent_window(imp, obs, recent_counts(obs, self.recent, self.recent_ratio))
