"""StreamingLLM (Xiao et al., 2023): keep the first ``sinks`` tokens and the newest ones.

The attention-sink tokens at the start of a sequence absorb attention mass that has
nowhere else to go; keeping them plus a recent window keeps a model fluent under a
fixed budget. Per (row, head): the row's first ``sinks`` real tokens, then the
``budget − sinks`` most recent.

Example:
  >>> import jax.numpy as jnp
  >>> from attn.kv.policy import Observation, make_policy
  >>> x = jnp.ones((2, 5, 1, 2)); seg = jnp.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
  >>> pos = jnp.maximum(jnp.cumsum(seg, 1) - 1, 0)
  >>> obs = Observation(q=x, k=x, v=x, positions=pos, segment_ids=seg, budget_B=jnp.array([2, 3]))
  >>> make_policy("streaming", sinks=1).select(obs).keep[:, 0].astype(int).tolist()
  [[0, 1, 0, 0, 1], [1, 0, 0, 1, 1]]
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from attn.kv.policy import ScorePolicy, register_policy


@register_policy("streaming")
@dataclasses.dataclass(frozen=True)
class Streaming(ScorePolicy):
    """Sinks + recent window.  Knobs: ``sinks`` (default 4)."""

    sinks: int = 4

    def __post_init__(self):
        if not (isinstance(self.sinks, int) and self.sinks >= 0):
            raise ValueError(f"sinks must be an int >= 0, got {self.sinks!r}")

    def scores(self, obs):
        idx = obs.index_in_row().astype(jnp.float32)  # recency: later = higher
        s = jnp.where(idx < self.sinks, 1e9, idx)
        return jnp.broadcast_to(s[:, None, :], (s.shape[0], obs.num_kv_heads, s.shape[1]))
