"""Expert parallelism: the MoE's ragged dispatch inside ``jax.shard_map``, tokens exchanged by all-to-all.

Mesh axes (documented reuse, no new mesh axis): experts are split over the mesh axes that
the logical axis ``"expert"`` (``models.ffn.moe.EXPERT``) maps to in the config's rules,
and those must be among the axes the tokens are split over (``batch`` / ``length``:
data, fsdp, context). That is GShard's layout: each data-parallel device owns
``E / ep`` experts, so expert parallelism costs no extra devices and the mesh keeps its
four axes. Enable it with a rule, e.g. ``mesh.rules = (*DEFAULT_RULES, ("expert",
("data", "fsdp")))`` (``train.sharding.with_expert_rule``). Without the rule experts
are replicated and each device still dispatches only its own tokens (no global sort).

Per device, with its ``n`` tokens and ``ep`` peers each owning ``E_l = E / ep``
experts:
  1. the ``n·k`` assignments are sorted by expert (so by owner); assignment ``a`` for
     owner ``p`` gets slot ``p·C + rank`` of a send buffer ``[ep·C, D]``, where
     ``C = n·k`` (``ep_capacity_factor=None``: nothing can drop) or
     ``ceil(cf·n·k/ep)`` (rows past it are dropped and counted);
  2. ``all_to_all`` (tiled) sends chunk ``p`` to peer ``p``; the local expert id of each
     row travels with it (``E_l`` marks an empty slot);
  3. the receiver sorts its ``ep·C`` rows by local expert and runs the grouped matmuls
     (``jax.lax.ragged_dot``; empty slots sort last and come out 0);
  4. the reverse ``all_to_all`` returns each row to its slot; the sender combines with
     its routing weights.
Routing, the balance losses and the bias update are computed outside, on the global
arrays (their load sums are then global, as on one device). Devices along axes the
tokens are not split over (``tensor``) hold the same tokens and compute the same result.

Example:
  >>> plan(None) is None   # no mesh set: plain single-device dispatch
  True
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from attn.axes import BATCH, LENGTH
from attn.errors import UserError
from models.ffn.moe import EXPERT, Config, grouped_swiglu, ragged_dispatch


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where tokens and experts live: mesh axes (sizes > 1 only) and the EP degree."""

    mesh: object
    batch_axes: tuple
    length_axes: tuple
    expert_axes: tuple
    ep: int


def _axes(spec_entry) -> tuple:
    if spec_entry is None:
        return ()
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def plan(config: Config | None) -> Plan | None:
    """The dispatch plan under the ambient mesh (``jax.set_mesh``) and logical rules.

    None (plain dispatch) when no mesh is set or the tokens are on one device. Raises
    ``UserError`` when the experts' mesh axes are not token axes or do not divide E.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if config is None or mesh.empty:
        return None
    rules = nn.get_logical_axis_rules()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    big = lambda names: tuple(a for a in names if sizes.get(a, 1) > 1)  # noqa: E731
    # Each logical name resolved on its own: the rules may map expert to the batch axes.
    resolve = lambda name: big(_axes(nn.logical_to_mesh_axes((name,), rules)[0]))  # noqa: E731
    b, t, e = resolve(BATCH), resolve(LENGTH), resolve(EXPERT)
    t = tuple(a for a in t if a not in b)
    if not (b or t or e):
        return None
    stray = [a for a in e if a not in b + t]
    if stray:
        raise UserError(f"moe expert parallelism: the 'expert' rule maps to mesh axis {stray[0]!r}, which "
                        f"does not split the tokens (batch/length axes {b + t}); map 'expert' to some of those")
    ep = math.prod(sizes[a] for a in e)
    if config.num_experts % ep:
        raise UserError(f"moe expert parallelism: num_experts={config.num_experts} does not divide over the "
                        f"{ep} devices of mesh axes {e}")
    return Plan(mesh, b, t, e, ep)


def _exchange(x_nD, idx_nK, w_nK, experts, config: Config, axes: tuple, ep: int):
    """One device's tokens through the experts of all ``ep`` peers; ``(y_nD, dropped)``."""
    n, K = idx_nK.shape
    E_l = experts["w_gate"].shape[0]
    A = n * K
    C = A if config.ep_capacity_factor is None else min(A, math.ceil(config.ep_capacity_factor * A / ep))
    e_A = idx_nK.reshape(-1)
    owner_A = e_A // E_l
    order_A = jnp.argsort(e_A, stable=True)             # by expert, hence by owner
    counts_p = jnp.bincount(owner_A, length=ep)
    start_p = jnp.cumsum(counts_p) - counts_p
    rank_A = (jnp.arange(A) - start_p[owner_A[order_A]])[jnp.argsort(order_A)]
    keep_A = rank_A < C
    slot_A = jnp.where(keep_A, owner_A * C + rank_A, ep * C)  # out of range: dropped
    D = x_nD.shape[-1]
    send_x = jnp.zeros((ep * C, D), config.dtype).at[slot_A].set(
        x_nD[jnp.arange(A) // K].astype(config.dtype), mode="drop")
    send_e = jnp.full((ep * C,), E_l, jnp.int32).at[slot_A].set(e_A % E_l, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, axes, 0, 0, tiled=True)
    recv_e = jax.lax.all_to_all(send_e, axes, 0, 0, tiled=True)
    order_R = jnp.argsort(recv_e, stable=True)          # empty slots (id E_l) last
    sizes = jnp.bincount(recv_e, length=E_l + 1)[:E_l].astype(jnp.int32)
    out_R = grouped_swiglu(recv_x[order_R], sizes, experts, config.dtype)[jnp.argsort(order_R)]
    back = jax.lax.all_to_all(out_R, axes, 0, 0, tiled=True)
    y_AD = jnp.where(keep_A[:, None], back[jnp.minimum(slot_A, ep * C - 1)], 0.0)
    y_nD = jnp.einsum("nKD,nK->nD", y_AD.reshape(n, K, D), w_nK.astype(y_AD.dtype))
    return y_nD, jnp.sum(~keep_A).astype(jnp.int32)


def dispatch(x_BTD, idx_BTK, w_BTK, experts, config: Config, plan_: Plan):
    """Ragged dispatch per device (and all-to-all across the expert axes); ``(y_BTD f32, dropped)``.

    Args:
      x_BTD: ``[B, T, D]`` tokens; idx_BTK / w_BTK: ``[B, T, k]`` routing (global arrays).
      experts: ``w_gate, w_up [E, D, F]``, ``w_down [E, F, D]``.
      config: the MoE ``Config``; plan_: from ``plan``.
    """
    tok = P(plan_.batch_axes or None, plan_.length_axes or None, None)
    ex = P(plan_.expert_axes or None, None, None)
    token_axes = plan_.batch_axes + plan_.length_axes
    ep, e_axes = plan_.ep, plan_.expert_axes

    def body(x, idx, w, wg, wu, wd):
        b, t, D = x.shape
        args = (x.reshape(b * t, D), idx.reshape(b * t, -1), w.reshape(b * t, -1),
                {"w_gate": wg, "w_up": wu, "w_down": wd}, config)
        y, dropped = _exchange(*args, e_axes, ep) if ep > 1 else ragged_dispatch(*args)
        return y.reshape(b, t, D), jax.lax.psum(dropped, token_axes)

    fn = jax.shard_map(body, mesh=plan_.mesh, in_specs=(tok, tok, tok, ex, ex, ex), out_specs=(tok, P()),
                       check_vma=False)
    return fn(x_BTD, idx_BTK, w_BTK, experts["w_gate"], experts["w_up"], experts["w_down"])
