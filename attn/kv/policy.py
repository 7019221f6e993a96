"""The KV-cache policy interface: per layer and kv head, which prompt tokens stay cached.

A policy is a frozen, hashable dataclass (its fields are its knobs) with one method,

    select(obs: Observation) -> Selection

called once per layer at the end of prefill (``attn.kv.head_cache.PolicyPrefillCache``)
with everything the layer computed for the prompt: queries and keys after RoPE, values,
positions, segment ids (0 = left padding) and the per-row budget. It returns a boolean
``keep [B, K, S]`` (per kv head, so GQA groups share a decision as kvpress and the
papers do), optionally key channels to keep (ThinK) and extra tokens to append
(RazorAttention's compensation token). The cache then holds exactly that, per head and
per row; decoding appends every new token to every head.

Most eviction methods are *score* policies: subclass ``ScorePolicy`` and return
``scores [B, K, S]``; the top ``budget_B[b]`` real tokens of each (row, head) are kept
(ties go to the earlier token). Rows of different lengths get their own budgets
(``budgets(prompt_lens, fraction)``), which published harnesses that assume batch 1 do
not handle.

Policies register by name (``register_policy``) and are found by a package scan of
``attn.kv``, like the attention registry: a new policy is one file and one test.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn.kv import policy
  >>> p = policy.make_policy("streaming", sinks=1)
  >>> B, S, K, N, H = 1, 6, 1, 2, 4
  >>> x = jax.random.normal(jax.random.key(0), (B, S, N, H))
  >>> obs = policy.Observation(q=x, k=x[:, :, :1], v=x[:, :, :1],
  ...     positions=jnp.arange(S)[None], segment_ids=jnp.ones((B, S), jnp.int32),
  ...     budget_B=jnp.array([3]))
  >>> p.select(obs).keep.astype(int).tolist()     # the sink and the two newest tokens
  [[[1, 0, 0, 0, 1, 1]]]
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from attn.errors import UserError

Array = Any
NEG = -1e30  # finite "minus infinity" for scores (keeps argsort and sums NaN-free)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Observation:
    """One layer's prompt, as a policy sees it.

    Attributes:
      q: ``[B, S, N, H]`` queries after RoPE (the prompt's own queries: T = S).
      k: ``[B, S, K, H]`` keys after RoPE.  v: ``[B, S, K, E]``.
      positions: int32 ``[B, S]``.  segment_ids: int32 ``[B, S]`` (0 = padding).
      budget_B: int32 ``[B]`` tokens each kv head of row b may keep.
      layer_state: the policy's per-layer arrays (``KVPolicy.layer_state``) or None.
      softcap, window: the layer's logit softcap and window (static).
    """

    q: Array
    k: Array
    v: Array
    positions: Array
    segment_ids: Array
    budget_B: Array
    layer_state: Any = None
    softcap: float | None = dataclasses.field(default=None, metadata=dict(static=True))
    window: Any = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def real_BS(self) -> Array:
        return self.segment_ids != 0

    def index_in_row(self) -> Array:
        """int32 ``[B, S]``: 0-based index of each real token within its row (−1 on padding)."""
        real = self.real_BS.astype(jnp.int32)
        return jnp.where(real > 0, jnp.cumsum(real, axis=1) - 1, -1)

    def row_len(self) -> Array:
        """int32 ``[B]`` real tokens per row."""
        return jnp.sum(self.real_BS, axis=1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
    """What a policy keeps.

    Attributes:
      keep: bool ``[B, K, S]``.
      channels: int32 ``[B, K, H']`` key channels to keep (ThinK) or None (all).
      extra: ``(k [B, X, K, H], v [B, X, K, E], pos [B, X], seg [B, X, K])`` tokens to
        append after the kept ones, or None.
    """

    keep: Array
    channels: Array | None = None
    extra: Any = None


def probs_of_rows(obs: Observation, rows: int) -> Array:
    """float32 ``[B, N, W, S]`` attention probabilities of the last ``W = min(rows, S)``
    queries of each row over the prompt (causal on positions, segments), as the layer
    computed them. Padding queries give all-zero rows.

    Rows are the last W array indices: prompts are left-padded, so these are every row's
    newest real tokens (a row shorter than W has padding queries, whose rows are 0).
    """
    B, S, N, H = obs.q.shape
    W = min(int(rows), S)
    K = obs.num_kv_heads
    q = obs.q[:, S - W:].astype(jnp.float32).reshape(B, W, K, N // K, H)
    s = jnp.einsum("BWKGH,BSKH->BKGWS", q, obs.k.astype(jnp.float32)) * H ** -0.5
    if obs.softcap is not None:
        s = obs.softcap * jnp.tanh(s / obs.softcap)
    qp, kp = obs.positions[:, S - W:], obs.positions
    qs, ks = obs.segment_ids[:, S - W:], obs.segment_ids
    vis = (kp[:, None, :] <= qp[:, :, None]) & (qs[:, :, None] == ks[:, None, :]) & (qs[:, :, None] != 0)
    if obs.window is not None and obs.window[0] is not None:
        vis &= kp[:, None, :] >= qp[:, :, None] - obs.window[0]
    s = jnp.where(vis[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    z = jnp.sum(p, axis=-1, keepdims=True)
    p = jnp.where(z > 0, p / jnp.where(z > 0, z, 1.0), 0.0)
    return p.reshape(B, N, W, S)


def example_observation(*, S: int = 8, N: int = 2, K: int = 1, H: int = 4, budget: int = 4,
                        seed: int = 0) -> Observation:
    """A one-row random ``Observation`` for examples (keys and values are the first K
    query heads, so scores are non-trivial): ``q [1, S, N, H]``, ``budget_B = [budget]``.

    Example:
      >>> example_observation().k.shape
      (1, 8, 1, 4)
    """
    q = jax.random.normal(jax.random.key(seed), (1, S, N, H))
    return Observation(q=q, k=q[:, :, :K], v=q[:, :, :K], positions=jnp.arange(S)[None],
                       segment_ids=jnp.ones((1, S), jnp.int32), budget_B=jnp.array([budget]))


def group_mean(x_BN_rest, K: int) -> Array:
    """Average the G query heads of each kv group: ``[B, N, ...] -> [B, K, ...]``."""
    B, N = x_BN_rest.shape[:2]
    return jnp.mean(x_BN_rest.reshape((B, K, N // K) + x_BN_rest.shape[2:]), axis=2)


def top_budget(scores_BKS, budget_B, real_BS) -> Array:
    """bool ``[B, K, S]``: the ``budget_B[b]`` highest-scoring real tokens per (row, head).

    Ties go to the earlier index (a stable sort), padding is never kept.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[[0.1, 0.9, 0.5, 0.9]]])
      >>> top_budget(s, jnp.array([2]), jnp.ones((1, 4), bool)).astype(int).tolist()
      [[[0, 1, 0, 1]]]
    """
    s = jnp.where(real_BS[:, None, :], scores_BKS.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-s, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return (rank < budget_B[:, None, None]) & real_BS[:, None, :]


class KVPolicy:
    """Base class: a frozen dataclass subclass with ``select`` (see the module docstring).

    ``layer_state(num_layers, num_kv_heads)`` returns per-layer arrays ``[L, ...]`` (e.g.
    per-head retrieval scores) that reach ``Observation.layer_state`` for that layer, or
    None. ``max_keep(prompt_len, budget)`` bounds the tokens one head keeps, which sizes
    the page pool (default: the budget).
    """

    name = "?"

    def select(self, obs: Observation) -> Selection:  # pragma: no cover - interface
        raise NotImplementedError

    def layer_state(self, num_layers: int, num_kv_heads: int):
        return None

    def max_keep(self, prompt_len: int, budget: int) -> int:
        return budget


class ScorePolicy(KVPolicy):
    """A policy that ranks tokens: implement ``scores(obs) -> [B, K, S]`` (higher = keep)."""

    def scores(self, obs: Observation) -> Array:  # pragma: no cover - interface
        raise NotImplementedError

    def select(self, obs: Observation) -> Selection:
        return Selection(keep=top_budget(self.scores(obs), obs.budget_B, obs.real_BS))


def budgets(prompt_lens, fraction: float, *, minimum: int = 1) -> np.ndarray:
    """Tokens kept per head for each row: ``ceil(fraction · len)``, at least ``minimum``.

    Example:
      >>> budgets([100, 37], 0.1).tolist()
      [10, 4]
    """
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise UserError(f"KV budget must be a fraction in (0, 1], got {fraction!r}")
    lens = np.asarray(prompt_lens, np.int64)
    return np.minimum(lens, np.maximum(minimum, np.ceil(fraction * lens - 1e-9))).astype(np.int32)


# --------------------------------------------------------------------------- registry
_POLICIES: dict[str, type] = {}
_scanned = False


def register_policy(name: str) -> Callable[[type], type]:
    """Class decorator: make ``make_policy(name, **knobs)`` build this policy."""
    def deco(cls):
        if name in _POLICIES and _POLICIES[name] is not cls:
            raise ValueError(f"KV policy {name!r} is already registered by {_POLICIES[name].__module__}")
        cls.name = name
        _POLICIES[name] = cls
        return cls
    return deco


def _scan():
    global _scanned
    if not _scanned:
        _scanned = True
        package = importlib.import_module(__name__.rpartition(".")[0])
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)


def policy_names() -> tuple[str, ...]:
    """Registered policy names."""
    _scan()
    return tuple(sorted(_POLICIES))


def make_policy(name: str, **knobs) -> KVPolicy:
    """Build a registered policy; unknown names and knobs are one-line ``UserError``s.

    Example:
      >>> make_policy("snapkv", window=16).window
      16
    """
    _scan()
    if name not in _POLICIES:
        raise UserError(f"unknown KV policy {name!r}; known: {', '.join(policy_names())}")
    cls = _POLICIES[name]
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    bad = sorted(set(knobs) - fields)
    if bad:
        raise UserError(f"KV policy {name!r} has no knob {bad[0]!r}; its knobs: "
                        f"{', '.join(sorted(fields)) or 'none'}")
    try:
        return cls(**knobs)
    except (TypeError, ValueError) as e:
        raise UserError(f"KV policy {name!r}: {e}") from e


def parse_knobs(items) -> dict:
    """``["window=32", "pool=max"]`` -> ``{"window": 32, "pool": "max"}`` (ints/floats parsed).

    Example:
      >>> parse_knobs(["window=32", "ratio=0.5", "pool=max"])
      {'window': 32, 'ratio': 0.5, 'pool': 'max'}
    """
    out = {}
    for it in items or ():
        key, sep, val = str(it).partition("=")
        if not sep or not key:
            raise UserError(f"KV policy knob {it!r}: expected NAME=VALUE")
        for conv in (int, float):
            try:
                val = conv(val)
                break
            except ValueError:
                pass
        out[key] = val
    return out


def max_pool_1d(x_BKS, kernel: int) -> Array:
    """Max over a centred window of ``kernel`` tokens along S (SnapKV's clustering)."""
    if kernel <= 1:
        return x_BKS
    lo = (kernel - 1) // 2
    return jax.lax.reduce_window(x_BKS, -jnp.inf, jax.lax.max, (1, 1, kernel), (1, 1, 1),
                                 ((0, 0), (0, 0), (lo, kernel - 1 - lo)))

