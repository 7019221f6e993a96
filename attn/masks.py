"""The attention mask: one frozen pytree that every implementation understands.

A key ``s`` is visible to a query ``t`` when every active rule allows it:

* ``causal``: ``kv_pos[s] <= q_pos[t]``;
* ``window=(left, right)``: ``q_pos[t] - left <= kv_pos[s] <= q_pos[t] + right``
  (``None`` on a side means unbounded; the meaning of ``jax.nn``'s
  ``local_window_size``);
* ``q_extra_range[b, t] = (lo, hi)``: keys with ``lo <= kv_pos[s] <= hi`` are visible
  to query ``t`` *as well*, whatever causal and window say (an OR with those two rules;
  segments, ``block_mask`` and ``dense`` still apply). An empty range (``hi < lo``)
  adds nothing. This is how a causal LM lets some tokens see a stretch of the future:
  image tokens their own image (prefix-LM) or the question after them (modality-mutual
  attention, ``models/vlm.py``);
* segments: ``q_seg[t] == kv_seg[s]`` and both non-zero (0 marks padding, so a
  padded query sees nothing and its output row is 0);
* ``block_mask[n, t // Cq, s // Ck]`` (per-head block sparsity on array indices);
* ``dense[b, n, t, s]`` (escape hatch, reference implementations only).

Causality and windows are defined on *positions*, not array indices. Positions
default to ``arange(T)`` / ``arange(S)``; decode and context-parallel shards pass
them explicitly, which makes offsets, rings and packed documents need no special
cases.

Example:
  >>> import jax.numpy as jnp
  >>> from attn.masks import Mask
  >>> m = Mask(causal=True, window=(3, 0))
  >>> m.materialize(batch=1, q_len=4, kv_len=4)[0, 0].astype(int).tolist()
  [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = Any

_ARRAY_FIELDS = (
    "q_segment_ids",
    "kv_segment_ids",
    "q_positions",
    "kv_positions",
    "q_extra_range",
    "block_mask",
    "dense",
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query may see. All array fields are optional.

    Attributes:
      causal: static bool; keys at later positions are hidden.
      window: static ``(left, right)``; either side may be ``None`` (unbounded).
      q_segment_ids: int ``[B, T]``; 0 means padding.
      kv_segment_ids: int ``[B, S]``; 0 means padding. Give both segment arrays or
        neither.
      q_positions: int ``[B, T]``; default ``arange(T)``.
      kv_positions: int ``[B, S]``; default ``arange(S)``.
      q_extra_range: int ``[B, T, 2]``: per query an inclusive range ``(lo, hi)`` of key
        *positions* that are visible in addition to the causal / window rule (OR-ed with
        it; ``hi < lo`` = nothing extra). Indexed by query array index, like
        ``q_segment_ids``. Served by ``xla`` and ``xla_chunked``; the kernels refuse it.
      block_mask: bool ``[N|1, ceil(T/Cq), ceil(S/Ck)]``; True = block may be visited.
      block_size: static ``(Cq, Ck)``; required with ``block_mask``.
      dense: bool ``[B|1, N|1, T, S]``; reference implementations only.
    """

    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
    window: tuple[int | None, int | None] | None = dataclasses.field(
        default=None, metadata=dict(static=True)
    )
    q_segment_ids: Array | None = None
    kv_segment_ids: Array | None = None
    q_positions: Array | None = None
    kv_positions: Array | None = None
    q_extra_range: Array | None = None
    block_mask: Array | None = None
    block_size: tuple[int, int] | None = dataclasses.field(
        default=None, metadata=dict(static=True)
    )
    dense: Array | None = None

    def __post_init__(self):
        if self.window is not None:
            if not (isinstance(self.window, tuple) and len(self.window) == 2):
                raise ValueError(f"Mask.window must be a (left, right) tuple, got {self.window!r}")
            for side in self.window:
                if side is not None and (not isinstance(side, int) or side < 0):
                    raise ValueError(
                        f"Mask.window sides must be non-negative ints or None, got {self.window!r}"
                    )
        # Only checked for real arrays: pytree transforms rebuild masks with other leaves.
        if hasattr(self.block_mask, "shape") and self.block_size is None:
            raise ValueError("Mask.block_mask needs Mask.block_size=(Cq, Ck)")

    # ------------------------------------------------------------------ queries
    @property
    def has_segments(self) -> bool:
        return self.q_segment_ids is not None

    @property
    def window_left(self) -> int | None:
        return None if self.window is None else self.window[0]

    @property
    def window_right(self) -> int | None:
        """Right reach, with causality folded in (causal means at most 0)."""
        right = None if self.window is None else self.window[1]
        if self.causal:
            return 0 if right is None else min(right, 0)
        return right

    def replace(self, **changes) -> "Mask":
        return dataclasses.replace(self, **changes)

    def validate(self, batch: int, q_len: int, kv_len: int, num_heads: int) -> None:
        """Raise ``ValueError`` naming the field whose shape disagrees with the call."""
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError(
                "Mask: give both q_segment_ids [B,T] and kv_segment_ids [B,S], or neither"
            )
        expect = {
            "q_segment_ids": (batch, q_len),
            "kv_segment_ids": (batch, kv_len),
            "q_positions": (batch, q_len),
            "kv_positions": (batch, kv_len),
        }
        for name, shape in expect.items():
            arr = getattr(self, name)
            if arr is not None and tuple(arr.shape) != shape:
                raise ValueError(f"Mask.{name} has shape {tuple(arr.shape)}, expected {shape}")
        if self.q_extra_range is not None and tuple(self.q_extra_range.shape) != (batch, q_len, 2):
            raise ValueError(f"Mask.q_extra_range has shape {tuple(self.q_extra_range.shape)}, "
                             f"expected {(batch, q_len, 2)}")
        if self.block_mask is not None:
            cq, ck = self.block_size
            nb = (-(-q_len // cq), -(-kv_len // ck))
            bm = tuple(self.block_mask.shape)
            if len(bm) != 3 or bm[0] not in (1, num_heads) or bm[1:] != nb:
                raise ValueError(
                    f"Mask.block_mask has shape {bm}, expected ({num_heads}|1, {nb[0]}, {nb[1]})"
                    f" for block_size {self.block_size}"
                )
        if self.dense is not None:
            d = tuple(self.dense.shape)
            if (
                len(d) != 4
                or d[0] not in (1, batch)
                or d[1] not in (1, num_heads)
                or d[2:] != (q_len, kv_len)
            ):
                raise ValueError(
                    f"Mask.dense has shape {d}, expected ({batch}|1, {num_heads}|1, {q_len}, {kv_len})"
                )

    def positions(self, batch: int, q_len: int, kv_len: int) -> tuple[Array, Array]:
        """``(q_pos [B,T], kv_pos [B,S])`` int32, filling the arange defaults."""
        qp = self.q_positions
        kp = self.kv_positions
        if qp is None:
            qp = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
        if kp is None:
            kp = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
        return qp.astype(jnp.int32), kp.astype(jnp.int32)

    # -------------------------------------------------------------- evaluation
    def tile(
        self,
        q_pos_BT: Array,
        kv_pos_BS: Array,
        q_seg_BT: Array | None,
        kv_seg_BS: Array | None,
        q_idx_T: Array,
        kv_idx_S: Array,
    ) -> Array | None:
        """Visibility of one (query tile, key tile): bool ``[B|1, N|1, T, S]``, or None.

        Positions and segments are those of the tile; ``q_idx_T`` / ``kv_idx_S`` are
        the tile's array indices into the full sequence (for ``q_extra_range``,
        ``block_mask`` and ``dense``). Returns None when nothing is masked.
        """
        out = None

        def both(a, b):
            return b if a is None else a & b

        qp = q_pos_BT[:, None, :, None]
        kp = kv_pos_BS[:, None, None, :]
        if self.causal:
            out = both(out, kp <= qp)
        if self.window is not None:
            left, right = self.window
            if left is not None:
                out = both(out, kp >= qp - left)
            if right is not None:
                out = both(out, kp <= qp + right)
        if self.q_extra_range is not None and out is not None:
            # OR-ed with causal/window only: segments and block masks still hide keys.
            r = self.q_extra_range[:, q_idx_T].astype(kv_pos_BS.dtype)  # [B, T, 2]
            lo, hi = r[:, None, :, 0, None], r[:, None, :, 1, None]
            out = out | ((kp >= lo) & (kp <= hi))
        if q_seg_BT is not None:
            qs = q_seg_BT[:, None, :, None]
            ks = kv_seg_BS[:, None, None, :]
            out = both(out, (qs == ks) & (qs != 0))
        if self.block_mask is not None:
            cq, ck = self.block_size
            bm = self.block_mask[:, q_idx_T[:, None] // cq, kv_idx_S[None, :] // ck]
            out = both(out, bm[None].astype(bool))
        if self.dense is not None:
            d = self.dense[:, :, q_idx_T[:, None], kv_idx_S[None, :]]
            out = both(out, d.astype(bool))
        return out

    def materialize(self, batch: int, q_len: int, kv_len: int) -> Array:
        """The dense boolean mask ``[B, N|1, T, S]`` (for tests and the reference)."""
        qp, kp = self.positions(batch, q_len, kv_len)
        m = self.tile(
            qp,
            kp,
            self.q_segment_ids,
            self.kv_segment_ids,
            jnp.arange(q_len),
            jnp.arange(kv_len),
        )
        if m is None:
            return jnp.ones((batch, 1, q_len, kv_len), bool)
        return jnp.broadcast_to(m, (batch,) + m.shape[1:])
