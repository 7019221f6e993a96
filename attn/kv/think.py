"""ThinK (Xu et al., 2024, *ThinK: Thinner Key Cache by Query-Driven Pruning*): drop the
key channels the queries do not use.

The key cache has low-rank, unevenly used channels: a few channels carry most of the
``q · k`` magnitude. ThinK scores each channel c of kv head k by how much it can
contribute to the logits of the observation window, the last ``window`` prompt queries
(as SnapKV), stacked over the G query heads of the group (one layer, row b):

    score[b, k, c] = ‖Q_obs[b, k][:, c]‖₂ · ‖K[b, k][:, c]‖₂
    Q_obs[b, k] = [q[b, t, kG+g, :]  for g in 1..G, t in the last `window` real queries]
    K[b, k]     = [k[b, s, k, :]     for every real token s]

and keeps the top ``H − floor(λ · H)`` channels (``λ = ratio``, the fraction pruned);
logits then use only the kept channels, ``q[C] · k[C] / √H`` with the scale of the full
head dim. The cache (``HeadKVCache`` with ``channels``) stores only the kept key channels
of every token, decoded ones included, and gathers the queries to the same channels:
key bytes shrink by ``λ``; values are kept whole.

Channels compose with token eviction: ``tokens`` names any registered policy (e.g.
``"snapkv"``, ``"h2o"``, with its knobs in ``tokens_args``, ``"window=16,kernel=3"``),
whose token selection is kept alongside the channel pruning, as in the paper (ThinK on
top of SnapKV / H2O). With ``tokens="none"`` every real token is kept whatever the
budget (``max_keep`` is then the prompt length).

Knobs: ``ratio`` (0.5), ``window`` (32), ``tokens`` ("none"), ``tokens_args`` ("").

Example:
  >>> from attn.kv.policy import example_observation, make_policy
  >>> obs = example_observation()   # one row of 8 tokens, 2 query heads, 1 kv head, budget 4
  >>> sel = make_policy("think", ratio=0.5, tokens="snapkv", tokens_args="window=2").select(obs)
  >>> sel.channels.shape, int(sel.keep.sum())            # 2 of 4 channels, 4 tokens
  ((1, 1, 2), 4)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from attn.kv.policy import KVPolicy, Observation, Selection, make_policy, parse_knobs, register_policy


def channel_scores(obs: Observation, window: int):
    """float32 ``[B, K, H]``: ``‖Q_obs[:, c]‖ · ‖K[:, c]‖`` per kv head (padding excluded)."""
    B, S, N, H = obs.q.shape
    K = obs.num_kv_heads
    idx, n = obs.index_in_row(), obs.row_len()
    in_win = (idx >= (n - window)[:, None]) & obs.real_BS                  # [B, S]
    q = jnp.where(in_win[:, :, None, None], obs.q.astype(jnp.float32), 0.0).reshape(B, S, K, N // K, H)
    k = jnp.where(obs.real_BS[:, :, None, None], obs.k.astype(jnp.float32), 0.0)
    qn = jnp.sqrt(jnp.sum(q * q, axis=(1, 3)))                             # [B, K, H]
    kn = jnp.sqrt(jnp.sum(k * k, axis=1))
    return qn * kn


def kept_channels(H: int, ratio: float) -> int:
    """Channels kept of ``H``: ``H − floor(ratio · H)``.

    Example:
      >>> kept_channels(64, 0.5), kept_channels(8, 0.4)
      (32, 5)
    """
    return H - int(H * ratio + 1e-9)


@register_policy("think")
@dataclasses.dataclass(frozen=True)
class ThinK(KVPolicy):
    """Query-driven key-channel pruning, optionally over a token policy.  Knobs: ``ratio``
    (0.5, fraction of channels pruned), ``window`` (32), ``tokens`` ("none" or a policy
    name), ``tokens_args`` ("k=v,k=v")."""

    ratio: float = 0.5
    window: int = 32
    tokens: str = "none"
    tokens_args: str = ""

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and 0 <= self.ratio < 1):
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio!r}")
        if not (isinstance(self.window, int) and self.window >= 1):
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        tok = None
        if self.tokens != "none":
            if self.tokens == "think":
                raise ValueError("tokens='think' would prune channels twice")
            knobs = parse_knobs([a for a in str(self.tokens_args).split(",") if a])
            tok = make_policy(self.tokens, **knobs)
        elif self.tokens_args:
            raise ValueError(f"tokens_args={self.tokens_args!r} needs a token policy (tokens=NAME)")
        object.__setattr__(self, "_token_policy", tok)

    def layer_state(self, num_layers, num_kv_heads):
        tok = self._token_policy
        return None if tok is None else tok.layer_state(num_layers, num_kv_heads)

    def max_keep(self, prompt_len, budget):
        tok = self._token_policy
        return prompt_len if tok is None else tok.max_keep(prompt_len, budget)

    def select(self, obs):
        B, S, N, H = obs.q.shape
        K = obs.num_kv_heads
        if self._token_policy is None:
            sel = Selection(keep=jnp.broadcast_to(obs.real_BS[:, None, :], (B, K, S)))
        else:
            sel = self._token_policy.select(obs)
            if sel.channels is not None:
                raise ValueError(f"think: token policy {self.tokens!r} already selects channels")
        scores = channel_scores(obs, self.window)
        order = jnp.argsort(-scores, axis=-1, stable=True)[..., :kept_channels(H, self.ratio)]
        return Selection(keep=sel.keep, channels=jnp.sort(order, axis=-1).astype(jnp.int32),
                         extra=sel.extra)
