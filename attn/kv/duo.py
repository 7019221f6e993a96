"""DuoAttention (Xiao et al., 2024, arXiv:2410.10819): retrieval heads keep the full cache,
streaming heads keep attention sinks + a recent window; which is which is *learned*.

**Gates.** Every (layer, kv head) has a gate α ∈ [0, 1]. During gate training (the model
frozen, ``models/duo_train.py``) each head's attention output is

    o = α · full_attention + (1 − α) · streaming_attention(sinks, recent)

(``DuoMixRouter``, at the op contract: every ``attention()`` call of an unscanned model,
layer = call order; streaming attention is causal + a window of ``recent`` keys OR the
first ``sinks`` positions, ``streaming_mask``). The loss is the L2 distance of the final
hidden states to the full model's on the answer tokens of synthetic passkey-retrieval
samples, plus ``λ · mean |α|`` (the paper's L1 term); α starts at 1 and is clipped to
[0, 1] after each step. Heads whose α stays high are retrieval heads.

**The policy** ``duo`` reads the gates (``gates``: a tuple of tuples ``[L][K]`` or the JSON
file the trainer writes, ``{"gates": [[...]], ...}``). Heads are ranked by α (ties to
the earlier head). With ``threshold`` set, heads with α > threshold keep everything and
the budget is ignored; otherwise the budget sets the number of full heads F so that
``F·n + (L·K − F)·(sinks + recent) ≈ β·n·L·K`` (``attn.kv.razor.plan_split`` with a fixed
window: the paper also fixes the streaming sizes and varies the retrieval fraction).
β = 1 keeps every head full.

Knobs: ``gates``, ``threshold`` (None), ``sinks`` (4), ``recent`` (32).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn.kv.policy import Observation, make_policy
  >>> p = make_policy("duo", gates=((0.1, 0.95),), threshold=0.5, sinks=1, recent=2)
  >>> st = jax.tree_util.tree_map(lambda a: a[0], p.layer_state(1, 2))
  >>> x = jnp.ones((1, 6, 2, 1))
  >>> obs = Observation(q=x, k=x, v=x, positions=jnp.arange(6)[None],
  ...     segment_ids=jnp.ones((1, 6), jnp.int32), budget_B=jnp.array([3]), layer_state=st)
  >>> p.select(obs).keep[0].astype(int).tolist()   # head 0 streaming, head 1 retrieval
  [[1, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from attn.errors import UserError
from attn.kv.policy import KVPolicy, Selection, register_policy
from attn.kv.razor import as_tuples, plan_split, rank_state, read_head_table, streaming_keep
from attn.masks import Mask

Array = Any


def load_gates(source, num_layers: int, num_kv_heads: int) -> np.ndarray:
    """Gates ``[L, K]`` from a tuple of tuples or a JSON file (``{"gates": ...}`` or a list)."""
    if source is None:
        raise UserError("KV policy 'duo' needs gates=... (a tuple of tuples [L][K] or the JSON "
                        "file of python -m models.duo_train)")
    g = read_head_table(source, "duo gate", keys=("gates",))
    if g.shape != (num_layers, num_kv_heads):
        raise UserError(f"duo gates have shape {g.shape}, the model has ({num_layers}, {num_kv_heads}) "
                        "(layers, kv heads)")
    return g


@register_policy("duo")
@dataclasses.dataclass(frozen=True)
class DuoAttention(KVPolicy):
    """Learned retrieval/streaming split (see the module docstring)."""

    gates: Any = None
    threshold: float | None = None
    sinks: int = 4
    recent: int = 32

    def __post_init__(self):
        for f in ("sinks", "recent"):
            v = getattr(self, f)
            if not (isinstance(v, int) and v >= 0):
                raise ValueError(f"{f} must be an int >= 0, got {v!r}")
        if self.threshold is not None and not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be None or a number, got {self.threshold!r}")
        object.__setattr__(self, "gates", as_tuples(self.gates))

    def layer_state(self, num_layers, num_kv_heads):
        g = load_gates(self.gates, num_layers, num_kv_heads)
        st = rank_state(g)
        st["full"] = (g > (self.threshold if self.threshold is not None else np.inf))
        return st

    def max_keep(self, prompt_len, budget):
        return prompt_len

    def select(self, obs):
        st = obs.layer_state
        B = obs.k.shape[0]
        if self.threshold is not None:
            full_BK = jnp.broadcast_to(st["full"][None, :], (B, obs.num_kv_heads))
            window_B = jnp.full((B,), self.recent, jnp.int32)
        else:
            n_full_B, window_B = plan_split(obs.budget_B, obs.row_len(), int(st["heads"].shape[-1]),
                                            sinks=self.sinks, extra=0, window=self.recent)
            full_BK = st["rank"][None, :] < n_full_B[:, None]
        return Selection(keep=streaming_keep(obs, full_BK, window_B, self.sinks))


# --------------------------------------------------------------------------- training mix
def streaming_mask(mask: Mask, *, batch: int, q_len: int, kv_len: int, sinks: int, recent: int) -> Mask:
    """``mask`` restricted to a streaming head's view: causal keys within ``recent`` of the
    query (a window of ``recent`` keys, the query's own included) or among the first
    ``sinks`` positions (``Mask.q_extra_range``, capped at the query so it stays causal).

    Example:
      >>> m = streaming_mask(Mask(causal=True), batch=1, q_len=5, kv_len=5, sinks=1, recent=2)
      >>> m.materialize(1, 5, 5)[0, 0].astype(int).tolist()
      [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]]
    """
    qp, _ = mask.positions(batch, q_len, kv_len)
    qp = jnp.broadcast_to(qp, (batch, q_len)).astype(jnp.int32)
    left = recent - 1
    if mask.window is not None and mask.window[0] is not None:
        left = min(left, mask.window[0])
    right = 0 if mask.window is None else mask.window[1]
    hi = jnp.minimum(qp, sinks - 1) if sinks > 0 else jnp.full_like(qp, -1)
    extra = jnp.stack([jnp.zeros_like(qp), hi], axis=-1)
    return dataclasses.replace(mask, causal=True, window=(max(left, 0), right), q_extra_range=extra)


class DuoMixRouter:
    """Router for ``attn.core.route_attention``: layer ``l`` (call order) outputs
    ``α[l, k] · full + (1 − α[l, k]) · streaming`` per kv head k (shared by its G query heads).

    ``gates_LK`` may be a tracer (it is what gate training differentiates). After the
    forward, ``calls`` is the number of attention calls seen.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from attn.core import attention, route_attention
      >>> x = jax.random.normal(jax.random.key(0), (1, 6, 2, 4))
      >>> with route_attention(DuoMixRouter(jnp.ones((1, 2)), sinks=1, recent=2)):
      ...     o = attention(x, x, x, mask=Mask(causal=True))
      >>> bool(jnp.allclose(o, attention(x, x, x, mask=Mask(causal=True)), atol=1e-6))
      True
    """

    def __init__(self, gates_LK, *, sinks: int, recent: int):
        self.gates, self.sinks, self.recent = gates_LK, sinks, recent
        self.calls = 0

    def __call__(self, call, q, k, v, *, mask, scale, softcap, sinks, bias, return_lse, impl,
                 self_attention=None):
        from attn.core import make_call, select_impl

        layer = self.calls
        self.calls += 1
        if layer >= self.gates.shape[0]:
            raise ValueError(f"DuoMixRouter: attention call {layer + 1} but gates cover "
                             f"{self.gates.shape[0]} layers")
        B, T, N, _ = q.shape
        S, K = k.shape[1], k.shape[2]
        kw = dict(scale=scale, softcap=softcap, sinks=sinks, bias=bias, return_lse=return_lse)
        o_full, lse = select_impl(call, impl).fn(q, k, v, mask=mask, **kw)
        smask = streaming_mask(mask, batch=B, q_len=T, kv_len=S, sinks=self.sinks, recent=self.recent)
        scall = make_call(q, k, v, mask=smask, scale=scale, softcap=softcap, sinks=sinks, bias=bias,
                          return_lse=return_lse)
        o_str, _ = select_impl(scall, impl).fn(q, k, v, mask=smask, **kw)
        a = jnp.repeat(self.gates[layer].astype(jnp.float32), N // K)  # [N]
        a = a[None, None, :, None]
        o = a * o_full.astype(jnp.float32) + (1 - a) * o_str.astype(jnp.float32)
        return o.astype(o_full.dtype), lse
