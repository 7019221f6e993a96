"""Scissorhands (Liu et al., 2023, *Scissorhands: Exploiting the Persistence of Importance
Hypothesis for LLM KV Cache Compression at Test Time*): keep the *pivotal* tokens.

A token is pivotal for a query when it gets more than the uniform share of that query's
attention, ``P[t, s] > 1/t_vis`` (``t_vis``: the number of keys query t sees, i.e. the
sequence length at that step). Persistence of importance: tokens that were pivotal in
the recent past stay pivotal, so the importance of a token is how often it was pivotal
over a history window of the last ``history`` queries (one layer, row b, kv head k with
query heads g = 1..G):

    I[b, k, s] = (1/G) Σ_g Σ_{t in the last `history` real queries of row b} 1[P[b, kG+g, t, s] > 1/t_vis]

As in H2O, the newest ``r_b`` real tokens of row b are always kept (Scissorhands' recent
window, never evicted), and the rest of the budget ``β_b`` goes to the largest ``I``
(ties to the earlier token). ``r_b = min(recent, β_b)``, or ``floor(recent_ratio · β_b)``
when ``recent`` is None.

How it differs from H2O (``h2o.py``): a count of threshold crossings over a *recent
history window* instead of a sum of probabilities over *all* queries. Summing all
probabilities favours early tokens, which every query sees; the count over a window of
recent queries does not. The paper phrases its compression step as dropping the tokens
most often *below* the threshold; for a key that every window query sees (every key
older than the window) that count is ``history − I`` and ranks identically. Keys inside
the window are seen by fewer window queries; here they score by their pivotal count.

Knobs: ``history`` (32; our default, the paper tunes it per model), ``recent`` (None),
``recent_ratio`` (0.5), ``block`` (128 query rows per accumulation step, see h2o.py).

Example:
  >>> from attn.kv.policy import example_observation, make_policy
  >>> obs = example_observation()   # one row of 8 tokens, 2 query heads, 1 kv head, budget 4
  >>> p = make_policy("scissorhands", history=4, recent=1)
  >>> float(p.scores(obs).max()) > 8, int(p.select(obs).keep.sum())   # recent first; 4 kept
  (True, 4)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from attn.kv.h2o import (_softmax_rows, accumulate_over_queries, check_recent, recent_counts,
                         with_recent_window)
from attn.kv.policy import Observation, ScorePolicy, register_policy


def pivotal_counts(obs: Observation, history: int, *, block: int = 128):
    """float32 ``[B, K, S]``: how often each key was pivotal (``P > 1/t_vis``) for the last
    ``history`` real queries of its row, averaged over each kv group's G heads."""

    def contrib(s, vis, pos, idx):
        p = _softmax_rows(s)                                   # [B, K, G, C, S]
        t = jnp.sum(vis, axis=-1).astype(jnp.float32)           # [B, C] keys each query sees
        thr = jnp.where(t > 0, 1.0 / jnp.maximum(t, 1.0), jnp.inf)
        piv = (p > thr[:, None, None, :, None]) & vis[:, None, None]
        return jnp.sum(piv.astype(jnp.float32), axis=3)

    return accumulate_over_queries(obs, contrib, rows=history, block=block)


@register_policy("scissorhands")
@dataclasses.dataclass(frozen=True)
class Scissorhands(ScorePolicy):
    """Pivotal-token counts over a history window + recent window.  Knobs: ``history``
    (32), ``recent``, ``recent_ratio`` (0.5), ``block``."""

    history: int = 32
    recent: int | None = None
    recent_ratio: float = 0.5
    block: int = 128

    def __post_init__(self):
        if not (isinstance(self.history, int) and self.history >= 1):
            raise ValueError(f"history must be an int >= 1, got {self.history!r}")
        check_recent(self)

    def scores(self, obs):
        imp = pivotal_counts(obs, self.history, block=self.block)
        return with_recent_window(imp, obs, recent_counts(obs, self.recent, self.recent_ratio))
