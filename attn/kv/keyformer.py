"""Keyformer (Adnan et al., 2024, *Keyformer: KV Cache Reduction through Key Tokens
Selection for Efficient Generative Inference*): key tokens by a Gumbel-regularised score.

Dropping tokens changes the softmax over the ones left, so Keyformer scores tokens with
a *Gumbel softmax* of the logits instead of the attention itself: the noise regularises
the score towards tokens that stay important once others are removed. For one layer, row
b, kv head k with query heads g = 1..G, prompt queries t and the keys s each one sees:

    x[n, t, s]  = q_t · k_s / √H   (softcapped like the layer)
    ζ[n, t, s]  ~ Gumbel(0, 1)      (= −log(−log u), u uniform in (0, 1))
    f[n, t, s]  = exp((x + ζ) / τ) / Σ_{s' visible} exp((x[n, t, s'] + ζ[n, t, s']) / τ)
    F[b, k, s]  = (1/G) Σ_g Σ_t f[kG+g, t, s]                  (accumulated score)

The newest ``r_b`` real tokens of row b form the recent window (always kept); the other
``β_b − r_b`` of the budget are the *key tokens*, the largest ``F`` (ties to the earlier
token). ``r_b = min(recent, β_b)``, or ``floor(recent_ratio · β_b)`` when ``recent`` is
None; Keyformer's default recent window is 30% of the cache (``recent_ratio = 0.3``).

Temperature. The paper's schedule ``τ(i) = τ_init + i · Δτ`` grows with the decoding
step i (the reference code: ``τ_init = 1``, ``Δτ = 0.01``); the prompt is step 0, so the
selection made here uses ``τ = tau`` (τ_init). This cache selects once, at the end of the
prompt, and keeps every decoded token, so Δτ never enters.

Noise. ``ζ`` is a pure function of ``(seed, layer, query head, query position, key
position)`` (a counter-based hash, ``gumbel_noise``): deterministic by ``seed``,
independent of the batch, its padding and the block size of the accumulation, so a row
selects the same tokens alone or in a batch. The layer index reaches the policy through
``layer_state`` (without it, layer 0).

Knobs: ``tau`` (1.0), ``seed`` (0), ``recent`` (None), ``recent_ratio`` (0.3), ``block``
(128 query rows per accumulation step, see h2o.py).

Example:
  >>> from attn.kv.policy import example_observation, make_policy
  >>> obs = example_observation()   # one row of 8 tokens, 2 query heads, 1 kv head, budget 4
  >>> keep = make_policy("keyformer", recent=1, seed=3).select(obs).keep
  >>> int(keep.sum()), bool(keep[0, 0, -1])
  (4, True)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from attn.kv.h2o import (_softmax_rows, accumulate_over_queries, check_recent, recent_counts,
                         with_recent_window)
from attn.kv.policy import Observation, ScorePolicy, register_policy


def _fmix(h):
    """MurmurHash3's 32-bit finaliser (uint32 in, uint32 out; wraps)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def gumbel_noise(seed, layer, head, q_pos, k_pos):
    """float32 standard Gumbel samples, a pure function of the (broadcast) integer indices.

    Example:
      >>> z = gumbel_noise(0, 0, 0, jnp.arange(200)[:, None], jnp.arange(200)[None])
      >>> z.shape, abs(float(z.mean()) - 0.5772) < 0.02       # E[Gumbel] = Euler's γ
      ((200, 200), True)
    """
    u32 = lambda a: jnp.asarray(a).astype(jnp.int32).astype(jnp.uint32)
    h = _fmix(u32(seed) ^ jnp.uint32(0x9E3779B9))
    for a, c in ((layer, 0x85EBCA77), (head, 0xC2B2AE3D), (q_pos, 0x27D4EB2F), (k_pos, 0x165667B1)):
        h = _fmix(h ^ (u32(a) * jnp.uint32(c)) + jnp.uint32(0x9E3779B9))
    u = ((h >> 8).astype(jnp.float32) + 0.5) * np.float32(2.0 ** -24)   # in (0, 1)
    return -jnp.log(-jnp.log(u))


def keyformer_scores(obs: Observation, *, tau: float = 1.0, seed: int = 0, layer=0,
                     block: int = 128):
    """float32 ``[B, K, S]``: Keyformer's accumulated Gumbel-softmax score ``F``."""
    B, S, N, H = obs.q.shape
    K = obs.num_kv_heads
    G = N // K
    heads = jnp.arange(N, dtype=jnp.int32).reshape(1, K, G, 1, 1)
    kpos = obs.positions[:, None, None, None, :]

    def contrib(s, vis, pos, idx):
        z = gumbel_noise(seed, layer, heads, pos[:, None, None, :, None], kpos)
        y = jnp.where(vis[:, None, None], (s + z) / tau, -jnp.inf)
        return jnp.sum(_softmax_rows(y), axis=3)

    return accumulate_over_queries(obs, contrib, block=block)


@register_policy("keyformer")
@dataclasses.dataclass(frozen=True)
class Keyformer(ScorePolicy):
    """Gumbel-softmax key tokens + recent window.  Knobs: ``tau`` (1.0), ``seed`` (0),
    ``recent``, ``recent_ratio`` (0.3), ``block``."""

    tau: float = 1.0
    seed: int = 0
    recent: int | None = None
    recent_ratio: float = 0.3
    block: int = 128

    def __post_init__(self):
        if not (isinstance(self.tau, (int, float)) and self.tau > 0):
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        check_recent(self)

    def layer_state(self, num_layers, num_kv_heads):
        return jnp.arange(num_layers, dtype=jnp.int32)  # each layer draws its own noise

    def scores(self, obs):
        layer = 0 if obs.layer_state is None else obs.layer_state
        imp = keyformer_scores(obs, tau=float(self.tau), seed=self.seed, layer=layer, block=self.block)
        return with_recent_window(imp, obs, recent_counts(obs, self.recent, self.recent_ratio))


