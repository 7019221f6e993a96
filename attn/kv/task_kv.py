"""Task-KV (He, Liu & Chen, 2025, arXiv:2501.15113): heads far from the semantic centre keep
the full cache; the others keep sinks, recent tokens and a few "middle activations".

The paper's claim: projected into the model's representation space, most heads' outputs
cluster around a *semantic centre*; the few far from it (*heterogeneous heads*) carry the
task's semantic content and need the whole context, while the rest aggregate and focus
and do with attention sinks, a recent window and a few middle-context tokens that the
prompt's last queries attend to most (the *middle activations*). A *semantic separator*
splits the heads by their distance to the centre, measured on the task's own prompts.

Only the abstract of the paper could be read here (the stored page holds no method
section), so the measurements below are this codebase's reading of it:

* ``semantic_distances``: head n of layer l has the semantic vector
  ``s[l, n] = mean over real tokens of o[b, t, n, :] @ W_O[l, n]`` (its contribution to
  the residual stream; per-head outputs from ``models.analysis.capture`` with
  ``out_layers``); the centre of layer l is ``mean_n s[l, n]``; the distance
  ``‖s[l, n] − c_l‖`` is divided by the layer's mean distance, so layers compare;
  ``kv_head_scores`` (max over the G query heads) gives one score per kv head.
* The separator: with ``separator`` set, heads with normalised distance > separator are
  heterogeneous (budget ignored). Otherwise the heads are ranked by distance and the
  budget sets how many keep the full cache so that the total held is ≈ β · full
  (``attn.kv.razor.plan_split`` with the others' fixed size ``sinks + recent + middle``).
* Middle activations: the ``middle`` tokens outside the sinks and the recent window with
  the largest attention from the prompt's last ``obs_window`` queries (summed over those
  queries, averaged over each kv group), as SnapKV votes.

Knobs: ``distances`` (tuple of tuples ``[L][K]`` or a JSON path: a list or
``{"scores": ...}``), ``separator`` (None), ``sinks`` (4), ``recent`` (16), ``middle`` (8),
``obs_window`` (16).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn.kv.policy import Observation, make_policy
  >>> p = make_policy("task_kv", distances=((2.0, 0.5),), separator=1.0, sinks=1, recent=1,
  ...                 middle=1, obs_window=1)
  >>> st = jax.tree_util.tree_map(lambda a: a[0], p.layer_state(1, 2))
  >>> q = jnp.zeros((1, 6, 2, 1)).at[0, 5].set(4.0)
  >>> k = jnp.array([0., 0., 1., 0., 0., 0.]).reshape(1, 6, 1, 1) * jnp.ones((1, 1, 2, 1))
  >>> obs = Observation(q=q, k=k, v=k, positions=jnp.arange(6)[None],
  ...     segment_ids=jnp.ones((1, 6), jnp.int32), budget_B=jnp.array([3]), layer_state=st)
  >>> p.select(obs).keep[0].astype(int).tolist()   # head 1: sink, token 2 (middle), newest
  [[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 1]]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from attn.kv.policy import (KVPolicy, Selection, group_mean, probs_of_rows, register_policy,
                            top_budget)
from attn.kv.razor import as_tuples, load_scores, plan_split, rank_state, streaming_keep

Array = Any


def semantic_distances(o_per_layer: Sequence[Array], o_kernels: Sequence[Array],
                       segment_ids_BT=None) -> np.ndarray:
    """Normalised distances of each head's semantic vector to its layer's centre: ``[L, N]``.

    Args:
      o_per_layer: per layer, the per-head attention outputs ``o [B, T, N, E]`` (before
        the output projection) on the task's prompts.
      o_kernels: per layer, the output projection ``W_O [N, E, D]``.
      segment_ids_BT: ``[B, T]`` (0 = padding, excluded) or None (all tokens).

    Example:
      >>> o = np.zeros((1, 2, 3, 1)); o[..., 2, 0] = 3.0           # head 2 stands out
      >>> W = np.ones((3, 1, 2))
      >>> semantic_distances([o], [W]).round(2).tolist()
      [[0.75, 0.75, 1.5]]
    """
    out = []
    for o, W in zip(o_per_layer, o_kernels):
        o = np.asarray(o, np.float64)
        w = np.ones(o.shape[:2]) if segment_ids_BT is None else (np.asarray(segment_ids_BT) != 0) * 1.0
        mean_NE = np.einsum("BT,BTNE->NE", w, o) / max(w.sum(), 1.0)
        s_ND = np.einsum("NE,NED->ND", mean_NE, np.asarray(W, np.float64))
        d = np.linalg.norm(s_ND - s_ND.mean(0, keepdims=True), axis=-1)
        out.append(d / max(d.mean(), 1e-30))
    return np.stack(out)


@register_policy("task_kv")
@dataclasses.dataclass(frozen=True)
class TaskKV(KVPolicy):
    """Heterogeneous heads full; others sinks + recent + middle activations (see the module)."""

    distances: Any = None
    separator: float | None = None
    sinks: int = 4
    recent: int = 16
    middle: int = 8
    obs_window: int = 16

    def __post_init__(self):
        for f in ("sinks", "recent", "middle"):
            v = getattr(self, f)
            if not (isinstance(v, int) and v >= 0):
                raise ValueError(f"{f} must be an int >= 0, got {v!r}")
        if not (isinstance(self.obs_window, int) and self.obs_window >= 1):
            raise ValueError(f"obs_window must be an int >= 1, got {self.obs_window!r}")
        object.__setattr__(self, "distances", as_tuples(self.distances))

    def layer_state(self, num_layers, num_kv_heads):
        d = load_scores(self.distances, num_layers, num_kv_heads)
        st = rank_state(d)
        st["full"] = d > (self.separator if self.separator is not None else np.inf)
        return st

    def max_keep(self, prompt_len, budget):
        return prompt_len

    def select(self, obs):
        st = obs.layer_state
        B, K = obs.k.shape[0], obs.num_kv_heads
        if self.separator is not None:
            full_BK = jnp.broadcast_to(st["full"][None, :], (B, K))
        else:
            n_full_B, _ = plan_split(obs.budget_B, obs.row_len(), int(st["heads"].shape[-1]),
                                     sinks=self.sinks, extra=self.middle, window=self.recent)
            full_BK = st["rank"][None, :] < n_full_B[:, None]
        window_B = jnp.full((B,), self.recent, jnp.int32)
        keep = streaming_keep(obs, full_BK, window_B, self.sinks)
        if self.middle:
            votes = group_mean(jnp.sum(probs_of_rows(obs, self.obs_window), axis=2), K)  # [B, K, S]
            free = obs.real_BS[:, None, :] & ~keep
            mid = top_budget(jnp.where(free, votes, -1.0), jnp.full((B,), self.middle, jnp.int32),
                             obs.real_BS) & free
            keep = keep | mid
        return Selection(keep=keep)
