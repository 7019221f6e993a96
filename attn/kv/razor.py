"""RazorAttention (Tang et al., 2024, arXiv:2407.15891): full cache for retrieval heads,
sinks + a recent window + one compensation token for every other head.

The paper's observation: only a few heads (*retrieval heads*: echo heads, which attend to
an earlier copy of the current token, and induction heads, which attend to the token
after it) read the whole context; the rest read a local window and the attention sinks.
So, per (layer, kv head):

* a retrieval head keeps its whole prompt;
* any other head keeps the row's first ``sinks`` real tokens and its ``window`` newest
  ones, and the evicted tokens are folded into one **compensation token**
  ``k̂ = mean(evicted keys)``, ``v̂ = mean(evicted values)`` (keys after RoPE), appended
  through ``Selection.extra`` at the position of the newest evicted token (any position
  before the decoded tokens gives the same causal mask). The paper's token is one plain
  slot; a version weighted by the number of evicted tokens would need a per-slot logit
  bias, which the cache does not carry.

**Which heads.** ``scores`` rank the ``L·K`` (layer, kv head) pairs; ties go to the
earlier pair. They come from anywhere: a retrieval-head score file (``[L, N]`` query-head
scores are reduced to kv heads with ``kv_head_scores``, max over each group of G, so a
group is protected when any of its query heads retrieves), or echo/induction scores
measured on a repeated random sequence (``echo_induction_scores``, the paper's
data-free recipe).

**Budget → (heads kept full, window).** With the budget fraction β (per row
``β_b = budget_B[b] / len_b``, as ``attn.kv.policy.budgets`` makes it), n the row's
length, F = ``round(fraction · L·K)`` heads full and ``s = sinks + 1`` (the
compensation token), every other head keeps

    w = floor((β·n·L·K − F·n) / (L·K − F)) − s      (clipped to [0, n])

recent tokens, so that the total held is ``F·n + (L·K − F)·(w + s) ≈ β·n·L·K``, the
budget of a uniform policy. Without ``fraction``: F = ``round(β/2 · L·K)`` (half of the
budget to full heads, half to windows: at β = 0.32 that is 16 % of the heads and windows
of about n/5, the paper's operating point of 15 % heads and n/5). With ``window`` set and
no ``fraction``, F is solved from the same equation; with both set, β is ignored. β = 1
keeps everything. Short prompts (``n < s/β``-ish) cannot meet small budgets (the sinks
alone exceed them): ``held_fraction`` reports what was really kept.

Knobs: ``scores`` (tuple of tuples ``[L][K]``, or a JSON path: a list, or a dict with
``"scores"``), ``fraction`` (None: from the budget), ``sinks`` (4), ``window`` (None:
from the budget), ``compensate`` (True).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn.kv.policy import Observation, make_policy
  >>> p = make_policy("razor", scores=((0.9, 0.1),), fraction=0.5, sinks=1, window=2)
  >>> st = p.layer_state(1, 2); st["rank"].tolist()
  [[0, 1]]
  >>> k = jnp.arange(8.0).reshape(1, 8, 1, 1) * jnp.ones((1, 1, 2, 1))
  >>> obs = Observation(q=jnp.ones((1, 8, 2, 1)), k=k, v=k, positions=jnp.arange(8)[None],
  ...     segment_ids=jnp.ones((1, 8), jnp.int32), budget_B=jnp.array([4]),
  ...     layer_state=jax.tree_util.tree_map(lambda a: a[0], st))
  >>> sel = p.select(obs)
  >>> sel.keep[0].astype(int).tolist()       # head 0 retrieval (full), head 1 streaming
  [[1, 1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 1, 1]]
  >>> float(sel.extra[0][0, 0, 1, 0]), sel.extra[3][0, 0].tolist()   # mean of keys 1..5
  (3.0, [0, 1])
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp
import numpy as np

from attn.errors import UserError
from attn.kv.policy import KVPolicy, Observation, Selection, register_policy

Array = Any


# --------------------------------------------------------------------------- head scores
def kv_head_scores(scores_LN, num_kv_heads: int, reduce: str = "max") -> np.ndarray:
    """Query-head scores ``[L, N]`` → kv-head scores ``[L, K]`` (max or mean over each group).

    Example:
      >>> kv_head_scores([[0.1, 0.7, 0.2, 0.0]], 2).tolist()
      [[0.7, 0.2]]
    """
    s = np.asarray(scores_LN, np.float64)
    L, N = s.shape
    if N % num_kv_heads:
        raise UserError(f"head scores have {N} heads per layer, not a multiple of K={num_kv_heads}")
    g = s.reshape(L, num_kv_heads, N // num_kv_heads)
    return g.max(-1) if reduce == "max" else g.mean(-1)


def read_head_table(source, what: str, *, keys: tuple[str, ...]) -> np.ndarray:
    """float64 array from a tuple of tuples, or a JSON file holding a list or a dict with
    the list under the first of ``keys`` it has; an unreadable file is a one-line error."""
    if isinstance(source, str):
        try:
            with open(source) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{what} file {source!r}: {e}") from None
        if isinstance(data, dict):
            data = next((data[k] for k in keys if k in data), None)
        source = data
    return np.asarray(source, np.float64)


def load_scores(source, num_layers: int, num_kv_heads: int) -> np.ndarray:
    """Per-(layer, kv head) scores ``[L, K]`` from a tuple of tuples or a JSON file.

    The file holds a list ``[L][K or N]`` or a dict with ``"scores"`` (the retrieval-head
    score file of ``models.analysis``); N query-head columns are reduced with
    ``kv_head_scores``.
    """
    if source is None:
        raise UserError("this KV policy needs per-head scores (knob scores=...: a tuple of "
                        "tuples [L][K] or a JSON score file)")
    s = read_head_table(source, "head score", keys=("scores", "score"))
    if s.ndim != 2 or s.shape[0] != num_layers:
        raise UserError(f"head scores have shape {s.shape}, the model has {num_layers} layers "
                        f"× {num_kv_heads} kv heads")
    if s.shape[1] != num_kv_heads:
        s = kv_head_scores(s, num_kv_heads)
    return s


def global_rank(scores_LK) -> np.ndarray:
    """int32 ``[L, K]``: 0 for the highest-scoring (layer, kv head), ties to the earlier pair.

    Example:
      >>> global_rank([[0.2, 0.9], [0.9, 0.1]]).tolist()
      [[2, 0], [1, 3]]
    """
    s = np.asarray(scores_LK, np.float64)
    order = np.argsort(-s.reshape(-1), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank.reshape(s.shape).astype(np.int32)


def echo_induction_scores(probs_LBNTS, period: int, *, echo_weight: float = 1.0) -> np.ndarray:
    """RazorAttention's data-free head scores ``[L, N]`` from attention probabilities on a
    sequence made of a random block of ``period`` tokens repeated.

    For a query at index t ≥ period (in the second copy or later), the *echo* score is
    the attention on index ``t − period`` (the same token in the previous copy) and the
    *induction* score the attention on ``t − period + 1`` (the token that followed it);
    both are averaged over those queries and the batch. Returns
    ``echo_weight · echo + induction``. ``probs_LBNTS`` is a sequence of per-layer
    ``[B, N, T, S]`` probabilities over every query row (T = S), e.g. from
    ``models.analysis.capture`` with ``probs_layers`` = all layers and ``rows=None``.

    Example:
      >>> p = np.zeros((1, 1, 1, 4, 4)); p[0, 0, 0, 2, 1] = p[0, 0, 0, 3, 2] = 1.0  # induction
      >>> echo_induction_scores(p, 2).tolist()
      [[1.0]]
    """
    out = []
    for p in probs_LBNTS:
        p = np.asarray(p, np.float64)
        T = p.shape[2]
        t = np.arange(period, T)
        echo = p[:, :, t, t - period].mean(axis=(0, 2))
        ind = p[:, :, t, t - period + 1].mean(axis=(0, 2))
        out.append(echo_weight * echo + ind)
    return np.stack(out)


# --------------------------------------------------------------------------- the split
def plan_split(budget_B, row_len_B, total_heads: int, *, sinks: int, extra: int,
               fraction=None, window=None):
    """Per row: ``(n_full_B, window_B)`` int32 — heads kept full and the recent window of
    the others, from the budget (the mapping of the module docstring)."""
    n = row_len_B.astype(jnp.float32)
    beta = budget_B.astype(jnp.float32) / jnp.maximum(n, 1.0)
    LK = float(total_heads)
    s = float(sinks + extra)
    if fraction is not None:
        n_full = jnp.full_like(n, float(round(fraction * total_heads)))
    elif window is not None:
        local = jnp.minimum(n, s + window)
        f = (beta * n - local) / jnp.maximum(n - local, 1.0)
        n_full = jnp.where(n > local, jnp.round(jnp.clip(f, 0.0, 1.0) * LK), LK)
    else:
        n_full = jnp.round(beta / 2 * LK)
    n_full = jnp.clip(n_full, 0, LK)
    if window is not None:
        w = jnp.full_like(n, float(window))
    else:
        rest = (beta * n * LK - n_full * n) / jnp.maximum(LK - n_full, 1.0)
        w = jnp.floor(rest + 1e-4) - s
    w = jnp.clip(w, 0.0, n)
    return n_full.astype(jnp.int32), w.astype(jnp.int32)


def streaming_keep(obs: Observation, full_BK, window_B, sinks: int) -> Array:
    """bool ``[B, K, S]``: every real token in full heads; sinks + newest ``window_B`` in the others."""
    idx, n = obs.index_in_row(), obs.row_len()
    local = (idx < sinks) | (idx >= (n - window_B)[:, None])  # [B, S]
    real = obs.real_BS
    return real[:, None, :] & (full_BK[:, :, None] | local[:, None, :])


def head_split(obs: Observation, *, sinks: int, extra: int, fraction, window):
    """``(full_BK, window_B)`` from ``obs.layer_state["rank"]`` / ``["heads"]`` and the budget."""
    st = obs.layer_state
    if st is None:
        raise UserError("per-head KV policy: no layer_state (build the cache with "
                        "models.serving.make_policy_cache)")
    rank_K, total = st["rank"], st["heads"]
    n_full_B, window_B = plan_split(obs.budget_B, obs.row_len(), int(total.shape[-1]),
                                    sinks=sinks, extra=extra, fraction=fraction, window=window)
    full_BK = rank_K[None, :] < n_full_B[:, None]
    return full_BK, window_B


def rank_state(scores_LK) -> dict:
    """``layer_state`` of a ranked per-head policy: ``{"rank": [L, K], "heads": [L, L·K]}``
    (the second only carries the static head count through scan)."""
    rank = global_rank(scores_LK)
    L, K = rank.shape
    return {"rank": rank, "heads": np.zeros((L, L * K), np.int8)}


def _check_common(p):
    if not (isinstance(p.sinks, int) and p.sinks >= 0):
        raise ValueError(f"sinks must be an int >= 0, got {p.sinks!r}")
    if p.window is not None and not (isinstance(p.window, int) and p.window >= 0):
        raise ValueError(f"window must be None or an int >= 0, got {p.window!r}")
    if p.fraction is not None and not (isinstance(p.fraction, (int, float)) and 0 <= p.fraction <= 1):
        raise ValueError(f"fraction must be None or in [0, 1], got {p.fraction!r}")


def as_tuples(x):
    """Nested lists/arrays → nested tuples of floats (hashable knobs), strings unchanged."""
    if x is None or isinstance(x, str):
        return x
    return tuple(tuple(float(v) for v in row) for row in np.asarray(x, np.float64))


# --------------------------------------------------------------------------- the policy
@register_policy("razor")
@dataclasses.dataclass(frozen=True)
class RazorAttention(KVPolicy):
    """Retrieval heads full; others sinks + window + a compensation token (see the module)."""

    scores: Any = None
    fraction: float | None = None
    sinks: int = 4
    window: int | None = None
    compensate: bool = True

    def __post_init__(self):
        _check_common(self)
        object.__setattr__(self, "scores", as_tuples(self.scores))

    def layer_state(self, num_layers, num_kv_heads):
        return rank_state(load_scores(self.scores, num_layers, num_kv_heads))

    def max_keep(self, prompt_len, budget):
        return prompt_len  # retrieval heads hold the whole prompt

    def select(self, obs):
        extra_n = 1 if self.compensate else 0
        full_BK, window_B = head_split(obs, sinks=self.sinks, extra=extra_n,
                                       fraction=self.fraction, window=self.window)
        keep = streaming_keep(obs, full_BK, window_B, self.sinks)
        if not self.compensate:
            return Selection(keep=keep)
        return Selection(keep=keep, extra=compensation_token(obs, keep))


def compensation_token(obs: Observation, keep_BKS):
    """``Selection.extra`` with one token per (row, kv head): the mean key and value of the
    evicted real tokens, at the newest evicted position; segment 0 (not stored) where
    nothing was evicted."""
    ev = (obs.real_BS[:, None, :] & ~keep_BKS).astype(jnp.float32)  # [B, K, S]
    m = jnp.sum(ev, axis=-1)  # [B, K]
    w = ev / jnp.maximum(m, 1.0)[..., None]
    k_hat = jnp.einsum("BKS,BSKH->BKH", w, obs.k.astype(jnp.float32)).astype(obs.k.dtype)
    v_hat = jnp.einsum("BKS,BSKE->BKE", w, obs.v.astype(jnp.float32)).astype(obs.v.dtype)
    pos_BK = jnp.max(jnp.where(ev > 0, obs.positions[:, None, :], 0), axis=-1)
    pos_B = jnp.max(pos_BK, axis=-1)  # one position per row (the extra's pos is [B, X])
    seg = (m > 0).astype(jnp.int32)
    return (k_hat[:, None], v_hat[:, None], pos_B[:, None].astype(jnp.int32), seg[:, None])


def held_fraction(caches, prompt_lens, num_layers: int, num_kv_heads: int) -> float:
    """Prompt tokens held by all ``HeadKVCache`` leaves (every layer, row, kv head; the
    compensation tokens included) over what the full cache holds, right after prefill.

    ``prompt_lens [B]``: real prompt tokens per row. Works for scanned (stacked) and
    unscanned cache trees.
    """
    import jax

    from attn.kv.head_cache import HeadKVCache

    leaves = [c for c in jax.tree_util.tree_leaves(caches, is_leaf=lambda x: isinstance(x, HeadKVCache))
              if isinstance(c, HeadKVCache)]
    held = sum(float(np.asarray(c.paged.lengths, np.float64).sum()) for c in leaves)
    full = float(num_layers * num_kv_heads * np.asarray(prompt_lens, np.float64).sum())
    return held / full
