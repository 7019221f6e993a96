"""SnapKV (Li et al., 2024): keep the tokens the prompt's last queries attend to.

The last ``window`` queries of the prompt (the "observation window", where the question
usually is) vote: their attention probabilities are summed per key, averaged over the G
query heads of each kv group, and max-pooled over ``kernel`` neighbouring keys so that a
selected token keeps its neighbours (a clustered selection). The observation window is
always kept; the rest of the budget goes to the top-voted keys.

Example:
  >>> from attn.kv.policy import example_observation, make_policy
  >>> obs = example_observation()   # one row of 8 tokens, 2 query heads, 1 kv head, budget 4
  >>> keep = make_policy("snapkv", window=2, kernel=1).select(obs).keep
  >>> int(keep.sum()), keep[0, 0, -2:].tolist()
  (4, [True, True])
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from attn.kv.policy import ScorePolicy, group_mean, max_pool_1d, probs_of_rows, register_policy


@register_policy("snapkv")
@dataclasses.dataclass(frozen=True)
class SnapKV(ScorePolicy):
    """Observation-window voting.  Knobs: ``window`` (32), ``kernel`` (5, max pooling)."""

    window: int = 32
    kernel: int = 5

    def __post_init__(self):
        for f in ("window", "kernel"):
            v = getattr(self, f)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{f} must be an int >= 1, got {v!r}")

    def scores(self, obs):
        K = obs.num_kv_heads
        votes = group_mean(jnp.sum(probs_of_rows(obs, self.window), axis=2), K)  # [B, K, S]
        votes = max_pool_1d(votes, self.kernel)
        idx, n = obs.index_in_row(), obs.row_len()
        in_window = idx >= (n - self.window)[:, None]
        return jnp.where(in_window[:, None, :], 1e9, votes)
