"""Mixture-of-experts FFN (DeepSeek-MoE / DeepSeek-V3 style), registered as the FFN "moe".

Per token ``x [D]``: router logits ``l = x W_r [E]``; gate scores ``s = softmax(l)`` or
``sigmoid(l)``; the ``top_k`` experts by ``s + b`` (``b [E]``: the balance bias, used for
*selection only*); weights ``w_j = s_{e_j}`` (renormalised over the chosen ones when
``normalize_weights``, times ``routed_scale``); output

    y = sum_j w_j · SwiGLU_{e_j}(x) + SwiGLU_shared(x)

with ``num_experts`` fine-grained routed experts of width ``expert_dim`` and
``num_shared_experts`` always-on experts (one SwiGLU of width
``num_shared_experts · expert_dim``, which equals the sum of that many experts).

Load balancing:
* **auxiliary-loss-free** (DeepSeek-V3): after each training forward the bias moves by
  ``b_i += bias_update_rate · sign(mean_load − load_i)``. It is held in the non-gradient
  collection ``"moe_state"`` and updated only when that collection is mutable (the
  trainer must carry it; see ``docs/design.md``); it never enters the gradient.
* **classic auxiliary loss** (Switch / GShard): ``aux_loss_coef · E · Σ_i f_i P_i`` with
  ``f_i`` the fraction of the ``N·k`` assignments routed to ``i`` (no gradient) and
  ``P_i`` the mean gate distribution (softmax probabilities; for sigmoid gates the
  scores normalised per token). Uniform routing gives exactly ``aux_loss_coef``.
* **router z-loss** (ST-MoE): ``z_loss_coef · mean_tokens(logsumexp(l)²)``.
Both losses are sown into ``"aux_loss"`` already weighted by their coefficients, so a
config using this layer sets ``train.aux_loss_weight = 1``.

Dispatch (``dispatch``):
* ``"ragged"`` (dropless): the ``N·k`` assignments sorted by expert, one grouped matmul
  per projection with ``jax.lax.ragged_dot`` (group sizes = per-expert counts).
* ``"capacity"``: every expert takes at most ``C = ceil(capacity_factor·N·k/E)``
  assignments, first choices of all tokens before second choices (GShard's priority);
  the rest are dropped (counted in ``moe_stats/dropped_fraction``) and contribute 0.
Under a mesh whose token axes have more than one device, ``"ragged"`` runs inside
``jax.shard_map`` on each device's own tokens, and experts split over the mesh axes the
logical axis ``"expert"`` maps to exchange tokens by all-to-all
(``models/ffn/expert_parallel.py``).

Statistics sown into ``"moe_stats"`` (scalars per layer): ``max_load`` (largest expert
load over the mean load, 1 = balanced), ``dropped_fraction``, ``balance_loss`` and
``z_loss`` (unweighted), ``bias_spread`` (max − min of the bias).

Example:
  >>> import jax, jax.numpy as jnp
  >>> cfg = Config(d_model=16, num_experts=4, top_k=2, expert_dim=8, dtype="float32")
  >>> x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  >>> v = MoE(cfg).init(jax.random.key(1), x)
  >>> y, upd = MoE(cfg).apply(v, x, mutable=["moe_state", "moe_stats", "aux_loss"])
  >>> y.shape, upd["moe_state"]["expert_bias"].shape
  ((2, 5, 16), (4,))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.axes import EMBED, MLP
from attn.errors import UserError
from models import ffn as ffn_registry

Array = Any

EXPERT = "expert"  # logical axis of the expert dimension; unmapped by default (replicated)


# --------------------------------------------------------------------------- gates
def acc_dtype(dtype):
    """Router / accumulation dtype: float32, or the compute dtype when that is wider (float64 tests)."""
    return jnp.promote_types(jnp.float32, dtype)


def _softmax_gate(logits_NE):
    """(selection scores, balance distribution) = (softmax, softmax)."""
    p = jax.nn.softmax(logits_NE, axis=-1)
    return p, p


def _sigmoid_gate(logits_NE):
    """DeepSeek-V3: sigmoid affinities; the balance distribution normalises them per token."""
    s = jax.nn.sigmoid(logits_NE)
    return s, s / jnp.sum(s, axis=-1, keepdims=True)


GATES: dict[str, Callable] = {"softmax": _softmax_gate, "sigmoid": _sigmoid_gate}


@dataclasses.dataclass(frozen=True)
class Config:
    """MoE FFN settings; validates itself.

    Attributes:
      d_model: D.
      ffn_dim: width of the dense FFN this replaces; only sets the ``expert_dim`` default.
      num_experts: E routed experts.
      top_k: experts per token.
      expert_dim: F_e of every expert; None = ``ffn_dim // (top_k + num_shared_experts)``
        (active FFN parameters then match the dense SwiGLU of width ``ffn_dim``).
      num_shared_experts: always-active experts (DeepSeek-MoE), 0 for none.
      gate: "softmax" | "sigmoid".
      normalize_weights: renormalise the chosen experts' scores to sum to 1.
      routed_scale: factor on the routed output (DeepSeek-V3's routed scaling factor).
      bias_update_rate: γ of the auxiliary-loss-free bias update; 0 disables it.
      aux_loss_coef: weight of the Switch/GShard balance loss (0 = off; 0.01 is usual).
      z_loss_coef: weight of the router z-loss (0 = off).
      dispatch: "ragged" (dropless grouped matmul) | "capacity".
      capacity_factor: for "capacity": slots per expert = ceil(cf · N · k / E).
      ep_capacity_factor: expert parallelism: all-to-all buffer per peer =
        ceil(cf · n · k / ep) rows of each device's n tokens; None = n·k (never drops;
        ep times the memory of a balanced exchange).
      dtype, param_dtype: compute / parameter dtypes (the router runs in float32).
    """

    d_model: int
    ffn_dim: int | None = None
    num_experts: int = 8
    top_k: int = 2
    expert_dim: int | None = None
    num_shared_experts: int = 1
    gate: str = "softmax"
    normalize_weights: bool = True
    routed_scale: float = 1.0
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 1e-3
    dispatch: str = "ragged"
    capacity_factor: float = 1.25
    ep_capacity_factor: float | None = None
    dtype: Any = "bfloat16"
    param_dtype: Any = "float32"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        for f in ("d_model", "num_experts", "top_k"):
            v = getattr(self, f)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise UserError(f"moe.{f} must be a positive int, got {v!r}")
        if not (isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0):
            raise UserError(f"moe.num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}")
        if self.top_k > self.num_experts:
            raise UserError(f"moe.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.expert_dim is None:
            if self.ffn_dim is None:
                raise UserError("moe: give expert_dim (or ffn_dim, from which it defaults)")
            set_("expert_dim", max(1, self.ffn_dim // (self.top_k + self.num_shared_experts)))
        if not (isinstance(self.expert_dim, int) and self.expert_dim > 0):
            raise UserError(f"moe.expert_dim must be a positive int, got {self.expert_dim!r}")
        if self.gate not in GATES:
            raise UserError(f"moe.gate must be one of {sorted(GATES)}, got {self.gate!r}")
        if self.dispatch not in DISPATCHES:
            raise UserError(f"moe.dispatch must be one of {sorted(DISPATCHES)}, got {self.dispatch!r}")
        for f in ("bias_update_rate", "aux_loss_coef", "z_loss_coef"):
            if not getattr(self, f) >= 0:
                raise UserError(f"moe.{f} must be >= 0, got {getattr(self, f)!r}")
        if not self.capacity_factor > 0:
            raise UserError(f"moe.capacity_factor must be > 0, got {self.capacity_factor!r}")
        if self.ep_capacity_factor is not None and not self.ep_capacity_factor > 0:
            raise UserError(f"moe.ep_capacity_factor must be > 0 or None, got {self.ep_capacity_factor!r}")
        for f in ("dtype", "param_dtype"):
            try:
                set_(f, jnp.dtype(getattr(self, f)))
            except TypeError as e:
                raise UserError(f"moe.{f}: not a dtype: {getattr(self, f)!r}") from e

    @property
    def shared_dim(self) -> int:
        return self.num_shared_experts * self.expert_dim


# --------------------------------------------------------------------------- routing
class Routing(NamedTuple):
    """Router output for N tokens: chosen experts, their weights, the balance distribution."""

    idx_NK: Array      # int32 expert ids, best first
    weight_NK: Array   # float32 combine weights
    probs_NE: Array    # float32 gate distribution used by the balance loss
    logits_NE: Array   # float32 router logits (z-loss)


def route(logits_NE, bias_E, config: Config) -> Routing:
    """Top-k selection on ``scores + bias`` (bias not in the gradient), weights from scores.

    Example:
      >>> import jax.numpy as jnp
      >>> cfg = Config(d_model=4, num_experts=3, top_k=1, expert_dim=2)
      >>> r = route(jnp.array([[0.0, 1.0, 0.5]]), jnp.array([0.0, 0.0, 2.0]), cfg)
      >>> r.idx_NK.tolist(), r.weight_NK.tolist()
      ([[2]], [[1.0]])
    """
    logits_NE = logits_NE.astype(acc_dtype(logits_NE.dtype))
    scores_NE, probs_NE = GATES[config.gate](logits_NE)
    # Selection only: the bias shifts which experts win, never how much they weigh.
    _, idx_NK = jax.lax.top_k(jax.lax.stop_gradient(scores_NE + bias_E.astype(logits_NE.dtype)), config.top_k)
    w_NK = jnp.take_along_axis(scores_NE, idx_NK, axis=-1)
    if config.normalize_weights:
        w_NK = w_NK / jnp.maximum(jnp.sum(w_NK, axis=-1, keepdims=True), 1e-20)
    return Routing(idx_NK.astype(jnp.int32), w_NK * config.routed_scale, probs_NE, logits_NE)


def expert_load(idx_NK, num_experts: int, dtype=jnp.float32):
    """Assignments per expert ``[E]``."""
    return jnp.zeros((num_experts,), dtype).at[idx_NK.reshape(-1)].add(1.0)


def balance_loss(probs_NE, idx_NK):
    """Switch/GShard: ``E · Σ_i f_i · P_i``; f = assignment fractions (no gradient), P = mean probs.

    Example:
      >>> import jax.numpy as jnp
      >>> float(balance_loss(jnp.full((4, 2), 0.5), jnp.array([[0], [1], [0], [1]])))
      1.0
    """
    N, E = probs_NE.shape
    f_E = expert_load(idx_NK, E, probs_NE.dtype) / idx_NK.size
    return E * jnp.sum(jax.lax.stop_gradient(f_E) * jnp.mean(probs_NE, axis=0))


def router_z_loss(logits_NE):
    """ST-MoE z-loss: ``mean_tokens(logsumexp(logits)²)``."""
    return jnp.mean(jax.nn.logsumexp(logits_NE.astype(acc_dtype(logits_NE.dtype)), axis=-1) ** 2)


def update_bias(bias_E, load_E, rate: float):
    """DeepSeek-V3: ``b += rate · sign(mean(load) − load)`` (overloaded experts lose bias).

    Example:
      >>> import jax.numpy as jnp
      >>> update_bias(jnp.zeros(3), jnp.array([5.0, 1.0, 3.0]), 0.1).tolist()
      [-0.10000000149011612, 0.10000000149011612, 0.0]
    """
    load_E = jax.lax.stop_gradient(load_E)
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


# --------------------------------------------------------------------------- experts
def grouped_swiglu(x_AD, group_sizes_E, experts, dtype):
    """Rows of ``x_AD`` sorted by expert, ``group_sizes_E`` rows each -> ``[A, D]`` float32.

    ``experts``: ``w_gate, w_up [E, D, F]``, ``w_down [E, F, D]``. Rows past
    ``sum(group_sizes)`` (empty buffer slots) come out 0.
    """
    x = x_AD.astype(dtype)
    g = jax.lax.ragged_dot(x, experts["w_gate"].astype(dtype), group_sizes_E)
    u = jax.lax.ragged_dot(x, experts["w_up"].astype(dtype), group_sizes_E)
    return jax.lax.ragged_dot(nn.silu(g) * u, experts["w_down"].astype(dtype), group_sizes_E,
                              preferred_element_type=acc_dtype(dtype))


def dense_swiglu(p, x_ND, dtype):
    """``(silu(x W_gate) * (x W_up)) W_down`` (the shared experts) in float32 out."""
    x = x_ND.astype(dtype)
    h = nn.silu(x @ p["w_gate"].astype(dtype)) * (x @ p["w_up"].astype(dtype))
    return jnp.matmul(h, p["w_down"].astype(dtype), preferred_element_type=acc_dtype(dtype))


def ragged_dispatch(x_ND, idx_NK, w_NK, experts, config: Config):
    """Dropless: sort the N·k assignments by expert, grouped matmuls, weighted sum back.

    Returns ``(y_ND float32, dropped)`` with dropped = 0.
    """
    N, K = idx_NK.shape
    E = experts["w_gate"].shape[0]
    e_A = idx_NK.reshape(-1)
    order_A = jnp.argsort(e_A, stable=True)
    group_sizes = jnp.bincount(e_A, length=E).astype(jnp.int32)
    ys_AD = grouped_swiglu(x_ND[order_A // K], group_sizes, experts, config.dtype)
    y_NKD = ys_AD[jnp.argsort(order_A)].reshape(N, K, -1)
    return jnp.einsum("NKD,NK->ND", y_NKD, w_NK.astype(y_NKD.dtype)), jnp.zeros((), jnp.int32)


def capacity(config: Config, num_tokens: int) -> int:
    """Slots per expert of the capacity dispatch: ``ceil(cf · N · k / E)`` (at least 1)."""
    return max(1, math.ceil(config.capacity_factor * num_tokens * config.top_k / config.num_experts))


def capacity_dispatch(x_ND, idx_NK, w_NK, experts, config: Config):
    """Fixed ``[E, C, D]`` buffers; first choices of all tokens fill them before second choices.

    Returns ``(y_ND float32, dropped assignments int32)``.
    """
    N, K = idx_NK.shape
    E = experts["w_gate"].shape[0]
    C = capacity(config, N)
    e_A = idx_NK.T.reshape(-1)                          # choice-major priority order
    tok_A = jnp.tile(jnp.arange(N), K)
    order_A = jnp.argsort(e_A, stable=True)
    counts_E = jnp.bincount(e_A, length=E)
    start_E = jnp.cumsum(counts_E) - counts_E
    # Rank of each assignment among those of its expert (stable sort keeps priority).
    rank_A = (jnp.arange(e_A.size) - start_E[e_A[order_A]])[jnp.argsort(order_A)]
    keep_A = rank_A < C
    slot_A = jnp.where(keep_A, e_A * C + rank_A, E * C)  # E·C is out of range: dropped
    dtype = config.dtype
    buf = jnp.zeros((E * C, x_ND.shape[-1]), dtype).at[slot_A].set(x_ND[tok_A].astype(dtype), mode="drop")
    buf = buf.reshape(E, C, -1)
    h = (nn.silu(jnp.einsum("ECD,EDF->ECF", buf, experts["w_gate"].astype(dtype)))
         * jnp.einsum("ECD,EDF->ECF", buf, experts["w_up"].astype(dtype)))
    out = jnp.einsum("ECF,EFD->ECD", h, experts["w_down"].astype(dtype),
                     preferred_element_type=acc_dtype(dtype)).reshape(E * C, -1)
    y_AD = jnp.where(keep_A[:, None], out[jnp.minimum(slot_A, E * C - 1)], 0.0)
    y_KND = y_AD.reshape(K, N, -1)
    y_ND = jnp.einsum("KND,NK->ND", y_KND, w_NK.astype(y_KND.dtype))
    return y_ND, jnp.sum(~keep_A).astype(jnp.int32)


DISPATCHES: dict[str, Callable] = {"ragged": ragged_dispatch, "capacity": capacity_dispatch}


# --------------------------------------------------------------------------- the layer math
def moe_forward(params, x_BTD, bias_E, config: Config):
    """The MoE FFN as a pure function.

    Args:
      params: ``router [D, E]``, ``experts`` (``w_gate, w_up [E, D, F]``, ``w_down
        [E, F, D]``), and ``shared`` (``w_gate, w_up [D, Fs]``, ``w_down [Fs, D]``) when
        ``num_shared_experts > 0``.
      x_BTD: ``[B, T, D]`` input.
      bias_E: ``[E]`` balance bias (selection only).
      config: the ``Config``.

    Returns:
      ``(y_BTD in x's dtype, info)`` with info: ``load_E`` (assignments per expert,
      float32), ``dropped`` (int32), ``balance_loss``, ``z_loss`` (unweighted scalars).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = Config(d_model=8, num_experts=4, top_k=2, expert_dim=4, num_shared_experts=0,
      ...              dtype="float32")
      >>> ks = jax.random.split(jax.random.key(0), 4)
      >>> p = {"router": jax.random.normal(ks[0], (8, 4)),
      ...      "experts": {n: jax.random.normal(k, s) for n, k, s in
      ...                  (("w_gate", ks[1], (4, 8, 4)), ("w_up", ks[2], (4, 8, 4)),
      ...                   ("w_down", ks[3], (4, 4, 8)))}}
      >>> y, info = moe_forward(p, jnp.ones((1, 3, 8)), jnp.zeros(4), cfg)
      >>> y.shape, float(info["load_E"].sum())
      ((1, 3, 8), 6.0)
    """
    from models.ffn import expert_parallel  # noqa: PLC0415 (it imports this module)

    B, T, D = x_BTD.shape
    rdt = acc_dtype(config.dtype)
    logits_BTE = jnp.einsum("BTD,DE->BTE", x_BTD.astype(rdt), params["router"].astype(rdt))
    r = route(logits_BTE.reshape(B * T, -1), bias_E, config)
    plan = expert_parallel.plan(config) if config.dispatch == "ragged" else None
    if plan is not None:
        y_BTD, dropped = expert_parallel.dispatch(
            x_BTD, r.idx_NK.reshape(B, T, -1), r.weight_NK.reshape(B, T, -1), params["experts"], config, plan)
    else:
        y_ND, dropped = DISPATCHES[config.dispatch](x_BTD.reshape(B * T, D), r.idx_NK, r.weight_NK,
                                                     params["experts"], config)
        y_BTD = y_ND.reshape(B, T, D)
    if config.num_shared_experts:
        y_BTD = y_BTD + dense_swiglu(params["shared"], x_BTD, config.dtype)
    info = dict(load_E=expert_load(r.idx_NK, config.num_experts), dropped=dropped,
                balance_loss=balance_loss(r.probs_NE, r.idx_NK), z_loss=router_z_loss(r.logits_NE))
    return y_BTD.astype(x_BTD.dtype), info


# --------------------------------------------------------------------------- module
def _expert_init():
    # Per-expert fan-in (axis -2); the leading expert axis is a batch of matrices.
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                            batch_axis=(0,))


class MoE(nn.Module):
    """MoE FFN layer: ``MoE(config)(x_BTD) -> y_BTD``; see the module docstring.

    Parameters: ``router [D, E]`` (EMBED, -), ``experts_w_gate, experts_w_up [E, D, F]``
    (EXPERT, EMBED, MLP), ``experts_w_down [E, F, D]`` (EXPERT, MLP, EMBED), ``shared_*``
    as the dense SwiGLU. State: ``moe_state/expert_bias [E]``.
    """

    config: Config

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.config
        E, D, F, Fs = cfg.num_experts, cfg.d_model, cfg.expert_dim, cfg.shared_dim
        if x_BTD.shape[-1] != D:
            raise UserError(f"moe: input width {x_BTD.shape[-1]} != d_model={D}")
        part = nn.with_logical_partitioning
        params = {"router": self.param("router", part(nn.initializers.lecun_normal(), (EMBED, None)), (D, E),
                                       cfg.param_dtype)}
        params["experts"] = {
            n: self.param(f"experts_{n}", part(_expert_init(), axes), shape, cfg.param_dtype)
            for n, shape, axes in (("w_gate", (E, D, F), (EXPERT, EMBED, MLP)),
                                   ("w_up", (E, D, F), (EXPERT, EMBED, MLP)),
                                   ("w_down", (E, F, D), (EXPERT, MLP, EMBED)))}
        if Fs:
            init = nn.initializers.lecun_normal()
            params["shared"] = {
                n: self.param(f"shared_{n}", part(init, axes), shape, cfg.param_dtype)
                for n, shape, axes in (("w_gate", (D, Fs), (EMBED, MLP)), ("w_up", (D, Fs), (EMBED, MLP)),
                                       ("w_down", (Fs, D), (MLP, EMBED)))}
        mutable = self.is_mutable_collection("moe_state")
        if mutable or self.has_variable("moe_state", "expert_bias"):
            bias = self.variable("moe_state", "expert_bias", jnp.zeros, (E,), jnp.float32)
            bias_E = bias.value
        else:  # applied with params only (eval, or a trainer that does not carry the state)
            bias, bias_E = None, jnp.zeros((E,), jnp.float32)
        y_BTD, info = moe_forward(params, x_BTD, bias_E, cfg)
        if cfg.aux_loss_coef:
            self.sow("aux_loss", "moe_balance", cfg.aux_loss_coef * info["balance_loss"])
        if cfg.z_loss_coef:
            self.sow("aux_loss", "moe_z", cfg.z_loss_coef * info["z_loss"])
        load_E = info["load_E"]
        n_assign = x_BTD.shape[0] * x_BTD.shape[1] * cfg.top_k
        for name, value in (("max_load", jnp.max(load_E) * E / n_assign),
                            ("dropped_fraction", info["dropped"] / n_assign),
                            ("balance_loss", info["balance_loss"]), ("z_loss", info["z_loss"]),
                            ("bias_spread", jnp.max(bias_E) - jnp.min(bias_E))):
            self.sow("moe_stats", name, jnp.asarray(value, jnp.float32))
        if mutable and not self.is_initializing() and cfg.bias_update_rate:
            bias.value = update_bias(bias_E, load_E, cfg.bias_update_rate)
        return y_BTD


def stats(config: Config) -> dict:
    """Parameter counts (total, active per token) and forward FLOPs per token.

    Example:
      >>> s = stats(Config(d_model=8, num_experts=4, top_k=2, expert_dim=4, num_shared_experts=1))
      >>> s["params"], s["active_params"]
      (512, 320)
    """
    D, E, F, k = config.d_model, config.num_experts, config.expert_dim, config.top_k
    per_expert = 3 * D * F
    shared = 3 * D * config.shared_dim
    active = D * E + k * per_expert + shared
    return dict(params=D * E + E * per_expert + shared, active_params=active, flops_per_token=2 * active)


ffn_registry.register(ffn_registry.FFN(
    name="moe", module=MoE, make_config=ffn_registry.config_factory(Config, "moe"), stats=stats,
    description="mixture of experts: routed + shared SwiGLU experts, top-k, bias or aux-loss balancing"))
