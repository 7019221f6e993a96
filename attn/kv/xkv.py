"""xKV (Chang et al., 2025, *xKV: Cross-Layer SVD for KV-Cache Compression*): adjacent
layers share one low-rank token subspace.

The dominant singular vectors of the keys (and of the values) of adjacent layers are well
aligned, so a group of ``g`` layers is compressed together. Per row b, stack the group's
per-layer caches side by side, ``X = [X_1, ..., X_g] ∈ R^{S × g·K·H}`` (``X_l`` the
layer's ``[S, K·H]`` keys, all kv heads; padding rows zeroed), and truncate its SVD:

    X ≈ U_r Σ_r V_rᵀ = A · [B_1, ..., B_g],   A = U_r Σ_r ∈ R^{S × r}  (shared by the group),
                                              B_l ∈ R^{r × K·H}       (one per layer)
    X̂_l = A · B_l

Stored per row: ``S·r`` for A per group plus ``r·K·H`` per layer, against ``g·S·K·H``
dense, so a byte fraction φ allows ``r = floor(φ · g·S·K·H / (S + g·K·H))``
(``rank_for_fraction``); values get their own factors. ``g = 1`` is plain per-layer SVD
(ShadowKV / Palu-style), the baseline xKV improves on. The paper factors pre-RoPE keys
(RoPE mixes positions into the channels and raises the rank) and re-applies RoPE after
reconstruction; both forms can be measured here.

**No cache route.** ``KVPolicy.select`` sees one layer, and ``HeadKVCache`` stores
tokens and channels, not factors: it cannot hold a cross-layer basis. Storing the
reconstruction ``X̂_l`` in it would report full-size ``held_bytes`` for a compressed
cache, so the registered ``xkv`` policy refuses with that reason, and this module offers
the measurement instead: ``compress_layers`` (factors), ``reconstruct``,
``relative_error`` (per layer, real tokens only) and ``factor_bytes`` (what a factor cache
would hold). Serving xKV needs a cache that runs the whole model's prefill before
compressing (a cross-layer prefill hook); that is future work.

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = jax.random.normal(jax.random.key(0), (2, 1, 6, 1, 4))      # [L, B, S, K, H]
  >>> f = compress_layers(x, rank=6, group=2)                        # full rank: exact
  >>> f.tokens.shape, f.maps.shape, float(relative_error(x, f).max()) < 1e-5
  ((1, 1, 6, 6), (2, 1, 6, 1, 4), True)
  >>> rank_for_fraction(0.25, S=1024, K=3, H=64, group=4)
  109
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.errors import UserError
from attn.kv.policy import KVPolicy, register_policy

Array = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class XKVFactors:
    """Cross-layer factors of one tensor kind (keys or values).

    Attributes:
      tokens: ``[n_groups, B, S, r]`` the shared token bases ``A = U_r Σ_r``.
      maps: ``[L, B, r, K, H]`` each layer's ``B_l``.
      group: static layers per group (the last group may be smaller).
    """

    tokens: Array
    maps: Array
    group: int = dataclasses.field(metadata=dict(static=True), default=1)


def _groups(L: int, group: int):
    return [list(range(i, min(i + group, L))) for i in range(0, L, group)]


def compress_layers(x_LBSKH, segment_ids_BS=None, *, rank: int, group: int = 4) -> XKVFactors:
    """Truncated SVD of each group of ``group`` adjacent layers, per row.

    Args:
      x_LBSKH: ``[L, B, S, K, H]`` keys (or values) of L layers.
      segment_ids_BS: int ``[B, S]`` (0 = padding, zeroed before the SVD) or None.
      rank: r, at most ``min(S, g·K·H)``.
      group: g adjacent layers share one token basis (1 = per-layer SVD).

    Returns:
      ``XKVFactors``; ``reconstruct`` gives ``[L, B, S, K, H]`` back.
    """
    L, B, S, K, H = x_LBSKH.shape
    if not (isinstance(group, int) and group >= 1):
        raise ValueError(f"group must be an int >= 1, got {group!r}")
    if not (isinstance(rank, int) and 1 <= rank <= min(S, min(group, L) * K * H)):
        raise ValueError(f"rank must be an int in [1, min(S, g·K·H) = {min(S, min(group, L) * K * H)}], got {rank!r}")
    x = x_LBSKH.astype(jnp.float32)
    if segment_ids_BS is not None:
        x = jnp.where((segment_ids_BS != 0)[None, :, :, None, None], x, 0.0)
    tokens, maps = [], []
    for layers in _groups(L, group):
        g = len(layers)
        X = jnp.moveaxis(x[jnp.array(layers)], 0, 2).reshape(B, S, g * K * H)
        r = min(rank, S, g * K * H)
        U, s, Vt = jnp.linalg.svd(X, full_matrices=False)
        A = U[..., :r] * s[:, None, :r]
        Bm = Vt[:, :r].reshape(B, r, g, K, H)
        if r < rank:  # a short last group: pad to a common rank with zeros (exact)
            A = jnp.pad(A, ((0, 0), (0, 0), (0, rank - r)))
            Bm = jnp.pad(Bm, ((0, 0), (0, rank - r), (0, 0), (0, 0), (0, 0)))
        tokens.append(A)
        maps.extend(Bm[:, :, i] for i in range(g))
    return XKVFactors(tokens=jnp.stack(tokens), maps=jnp.stack(maps), group=group)


def reconstruct(f: XKVFactors) -> Array:
    """``[L, B, S, K, H]``: ``X̂_l = A_{group(l)} · B_l``."""
    L = f.maps.shape[0]
    gid = jnp.arange(L) // f.group
    return jnp.einsum("LBSR,LBRKH->LBSKH", f.tokens[gid], f.maps)


def relative_error(x_LBSKH, f: XKVFactors, segment_ids_BS=None) -> Array:
    """float32 ``[L]``: ``‖X_l − X̂_l‖_F / ‖X_l‖_F`` over the real tokens of every row."""
    x = x_LBSKH.astype(jnp.float32)
    d = x - reconstruct(f)
    if segment_ids_BS is not None:
        m = (segment_ids_BS != 0)[None, :, :, None, None]
        x, d = jnp.where(m, x, 0.0), jnp.where(m, d, 0.0)
    return jnp.sqrt(jnp.sum(d * d, axis=(1, 2, 3, 4)) / jnp.sum(x * x, axis=(1, 2, 3, 4)))


def factor_bytes(*, S: int, L: int, K: int, H: int, rank: int, group: int, itemsize: int = 2) -> int:
    """Bytes per row of one tensor kind held as factors: ``n_groups·S·r + L·r·K·H`` elements.

    Example:
      >>> factor_bytes(S=1024, L=4, K=3, H=64, rank=109, group=4) / (4 * 1024 * 3 * 64 * 2)
      0.24837239583333334
    """
    n_groups = -(-L // group)
    return int((n_groups * S * rank + L * rank * K * H) * itemsize)


def rank_for_fraction(fraction: float, *, S: int, K: int, H: int, group: int) -> int:
    """The largest rank whose factors take at most ``fraction`` of the dense bytes of a full
    group (``S·r + g·r·K·H ≤ φ·g·S·K·H``), at least 1."""
    return max(1, int(np.floor(fraction * group * S * K * H / (S + group * K * H))))


@register_policy("xkv")
@dataclasses.dataclass(frozen=True)
class XKV(KVPolicy):
    """Registered so that ``--kv-policy xkv`` explains itself: it refuses the per-layer
    cache route (see the module docstring).  Knobs: ``fraction`` (0.25), ``group`` (4)."""

    fraction: float = 0.25
    group: int = 4

    def _refuse(self):
        raise UserError("KV policy 'xkv' shares one token basis across layers; the per-layer "
                        "KV-policy cache cannot hold it (use attn.kv.xkv.compress_layers / "
                        "relative_error to measure it)")

    def max_keep(self, prompt_len, budget):
        self._refuse()

    def select(self, obs):
        self._refuse()
