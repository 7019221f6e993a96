"""Optimizers: AdamW (default) or Muon, with linear warmup + cosine decay and clipping.

The optimizer is chosen by ``config.optim.name`` through a small registry, so adding
one is a decorated function, not an edit to a dispatch chain.

Example:
  >>> import jax.numpy as jnp
  >>> from train.optim import OptimConfig, make_optimizer
  >>> tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=10), 100)
  >>> params = {"w": jnp.ones((4, 4)), "b": jnp.zeros((4,))}
  >>> state = tx.init(params)
  >>> round(float(schedule(10)), 6)  # the peak, reached at the end of warmup
  0.001
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

from train.config_args import dataclass_from_dict


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The ``config.optim`` section.

    Attributes:
      name: "adamw" or "muon" (registered optimizers).
      learning_rate: peak learning rate after warmup.
      warmup_steps: linear warmup from 0 to ``learning_rate``.
      decay_steps: total schedule length including warmup (None = train.num_steps);
        cosine decay runs from the end of warmup to here.
      min_lr_ratio: the final learning rate as a fraction of the peak.
      weight_decay: decoupled weight decay, applied to parameters with ndim >= 2 only
        (norm scales and biases are not decayed).
      b1, b2, eps: Adam moments. Under Muon the non-matrix parameters (embedding,
        output head, norm scales, biases, conv filters) are trained exactly as
        optim.name="adamw" trains them: these b1/b2, no Nesterov, vectors not decayed.
      grad_clip_norm: clip the global gradient norm to this (None = no clipping).
      muon_learning_rate: peak rate of the Muon-updated matrices (optim.name="muon");
        the Adam-updated rest uses ``learning_rate``. Same warmup / decay shape.
      muon_beta: Muon's momentum. 0.95 as in Jordan's reference, torch.optim.Muon and
        optax (it is not b1: an earlier version reused b1 = 0.9).
      muon_nesterov: Nesterov momentum ``(1-beta) g + beta m`` (all references: True).
      muon_bias_correction: divide the momentum by ``1 - beta^t`` as optax.contrib.muon
        does. False (default) is the reference (Jordan, torch): no correction, so the
        first steps' momentum is small in norm, which orthogonalisation removes anyway
        except through the Nesterov mix of g and m. True reproduces optax exactly.
      muon_ns_steps: Newton-Schulz iterations (quintic 3.4445, -4.7750, 2.0315).
      trainable: None (train every parameter) or a regular expression searched in each
        parameter's "/"-joined path ("units/block_0/attn/q_kernel"): only matching
        parameters are updated. The others get no gradient at all (the trainer stops it,
        so their weight gradients are never computed), no optimizer state and no weight
        decay. ``"attn/"`` tunes attention only; ``"attn/(k|v)_"`` the key and value maps.
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float | None = 1.0
    muon_learning_rate: float = 0.02
    muon_beta: float = 0.95
    muon_nesterov: bool = True
    muon_bias_correction: bool = False
    muon_ns_steps: int = 5
    trainable: str | None = None

    def __post_init__(self):
        if self.name not in _OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r} is not registered; known: {sorted(_OPTIMIZERS)}")
        if not self.learning_rate > 0:
            raise ValueError(f"optim.learning_rate must be > 0, got {self.learning_rate!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(f"optim.decay_steps must be >= 1 or None, got {self.decay_steps!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"optim.grad_clip_norm must be > 0 or None, got {self.grad_clip_norm!r}")
        if not 0.0 <= self.muon_beta < 1.0:
            raise ValueError(f"optim.muon_beta must be in [0, 1), got {self.muon_beta!r}")
        if self.muon_ns_steps < 1:
            raise ValueError(f"optim.muon_ns_steps must be >= 1, got {self.muon_ns_steps!r}")
        if self.trainable == "":
            object.__setattr__(self, "trainable", None)  # "" from a command line = everything
        if self.trainable is not None:
            try:
                re.compile(self.trainable)
            except (re.error, TypeError) as e:
                raise ValueError(f"optim.trainable={self.trainable!r} is not a regular expression ({e})")

    @classmethod
    def from_dict(cls, d: Any) -> "OptimConfig":
        """Build from a dict / ConfigDict; an unknown key raises ValueError naming it."""
        return dataclass_from_dict(cls, d, "optim")


_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {}


def register_optimizer(name: str):
    """Decorator: ``fn(config, schedule, param_axes) -> GradientTransformation`` becomes
    ``optim.name``; ``param_axes`` is a tree of logical axis names per parameter (or None).
    """

    def deco(fn):
        _OPTIMIZERS[name] = fn
        return fn

    return deco


def _decay_mask(params):
    """Decay matrices and embeddings, not vectors (norm scales, biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


@register_optimizer("adamw")
def _adamw(c: OptimConfig, schedule: optax.Schedule, param_axes=None) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                       mask=_decay_mask)


# Kernels map their first axis to the rest when it is one of these input-side names
# ([D, N, H] q/k/v, [D, L] down-projections, [L, N, H] MLA up-projections, [F, D]),
# and the rest to D when D is last ([N, H, D] out). Flax kernels put inputs first.
_FAN_IN_AXES = ("embed", "latent", "mlp")

# Kernels trained by Adam under Muon whatever their shape, by their own parameter name.
# The MoE router [D, E] (models/ffn/moe.py): its fan-out is a set of expert logits, a
# classifier like the output head rather than a map between feature spaces, and Muon's
# equalised spectrum would move every expert's logit direction by the same amount
# whatever its gradient signal, fighting the balance bias. (MoH's "router_kernel" is
# not listed: unchanged.)
ADAM_PARAM_NAMES = ("router",)


def _muon_dims(params, param_axes=None):
    """Muon's reshape rule per parameter, read off the logical axis names; None = Adam.

    A kernel whose first axis is EMBED, LATENT or MLP maps that axis (fan-in) to the
    rest (fan-out, flattened); one whose last axis is EMBED maps the rest to D. So every
    hidden matrix of every mechanism, 3-D ones included (MLA's ``k_up``/``v_up``
    ``[L, N, H]``), is orthogonalised as the ``fan_in x fan_out`` matrix it applies.
    Embedding and output head (VOCAB), vectors, and CCA's convolution filters (a leading
    unnamed taps axis: per-channel filters, not maps between feature spaces) go to
    Adam: orthogonalised updates suit hidden matrices, not lookup tables (Jordan et
    al.). Leading batch axes: LAYERS (scan_layers), then EXPERT (MoE experts ``[E, D, F]``
    / ``[E, F, D]``, ``train.sharding.EXPERT_LOGICAL_AXIS``), so each expert of each layer
    is orthogonalised as its own ``D x F`` / ``F x D`` matrix. MoE routers (parameters
    named in ``ADAM_PARAM_NAMES``) go to Adam. Without axis names every 2-D parameter
    except embeddings is treated as [in, out].
    """
    from optax.contrib import MuonDimensionNumbers as Dims

    from attn import axes
    from train.sharding import EXPERT_LOGICAL_AXIS

    def rule(path, p, names):
        names = tuple(names) if names is not None else ()
        lead = 0
        for batch_axis in (axes.LAYERS, EXPERT_LOGICAL_AXIS):  # in this order: [L, E, ...]
            if names[lead:lead + 1] == (batch_axis,):
                lead += 1
        own_name = str(getattr(path[-1], "key", "")) if path else ""
        if p.ndim - lead < 2 or axes.VOCAB in names or own_name in ADAM_PARAM_NAMES:
            return None
        if len(names) > lead and names[lead] in _FAN_IN_AXES:
            return Dims(reduction_axis=(lead,), output_axis=tuple(range(lead + 1, p.ndim)))
        if len(names) > lead and names[-1] == axes.EMBED:
            return Dims(reduction_axis=tuple(range(lead, p.ndim - 1)), output_axis=(p.ndim - 1,))
        is_embedding = any("embed" in str(getattr(k, "key", "")).lower() for k in path)
        if p.ndim == 2 and not names and not is_embedding:
            return Dims(reduction_axis=0, output_axis=1)
        return None

    # Looked up by key path, not zipped by structure: inside optax's partition() the
    # tree arrives with masked (empty) nodes in place of the Adam-handled leaves.
    names_by_path = {}
    if param_axes is not None:
        is_spec = lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec)
        for path, names in jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=is_spec)[0]:
            names_by_path[tuple(path)] = names
    return jax.tree_util.tree_map_with_path(
        lambda path, p: rule(path, p, names_by_path.get(tuple(path))), params)


def matrix_dims(params, param_axes=None):
    """Per parameter, the ``fan_in x fan_out`` matrix it applies (``MuonDimensionNumbers``),
    or None for lookup tables, vectors and filters: the reading Muon orthogonalises by
    and low-rank adapters factor (``train/peft.py``). The rule: ``_muon_dims``.

    Example:
      >>> import jax.numpy as jnp
      >>> matrix_dims({"w": jnp.ones((4, 3)), "b": jnp.ones(3)})["w"].output_axis
      1
    """
    return _muon_dims(params, param_axes)


# Jordan's quintic: maximises the slope at 0, so 5 steps push every singular value of
# a Frobenius-normalised matrix (those not ~1e-3 below the largest) into roughly
# [0.68, 1.2] rather than exactly to 1; Jordan found that does not hurt training.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g_BIO, steps: int = 5, eps: float = 1e-7):
    """Approximate ``U V^T`` of each ``[I, O]`` matrix of ``g_BIO`` ([batch, I, O]).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> o = newton_schulz(jax.random.normal(jax.random.key(0), (2, 6, 10)))
      >>> s = jnp.linalg.svd(o, compute_uv=False)  # [2, 6]: all near 1, none exactly
      >>> o.shape, bool(jnp.all((s > 0.6) & (s < 1.25)))
      ((2, 6, 10), True)
    """
    a, b, c = NS_COEFFS
    wide = g_BIO.shape[-2] <= g_BIO.shape[-1]
    # Iterate on the wide orientation: the Gram matrix X X^T is then the smaller one.
    x = g_BIO if wide else g_BIO.swapaxes(-1, -2)
    x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)
    for _ in range(steps):
        gram = x @ x.swapaxes(-1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.swapaxes(-1, -2)


def _orthogonalize(u, dims, steps, eps):
    """Reshape by ``dims`` to [batch, fan_in, fan_out], orthogonalise, scale, undo."""
    red = tuple(np.atleast_1d(dims.reduction_axis) % u.ndim)
    out = tuple(np.atleast_1d(dims.output_axis) % u.ndim)
    batch = tuple(i for i in range(u.ndim) if i not in red + out)
    perm = batch + red + out
    moved = u.transpose(perm)
    fan_in = int(np.prod([u.shape[i] for i in red]))
    fan_out = int(np.prod([u.shape[i] for i in out]))
    o = newton_schulz(moved.reshape(-1, fan_in, fan_out), steps, eps)
    # Jordan's shape factor (torch's adjust_lr_fn="original", optax's default).
    o = o * np.sqrt(max(1.0, fan_out / fan_in))
    return o.reshape(moved.shape).transpose(np.argsort(perm))


def scale_by_muon(dims_fn, *, beta=0.95, nesterov=True, bias_correction=False,
                  ns_steps=5, eps=1e-7) -> optax.GradientTransformation:
    """Momentum, then Newton-Schulz orthogonalisation per ``dims_fn(updates)`` leaf.

    Written from the math of Jordan's reference: ``m <- beta m + (1-beta) g``; the
    direction is ``(1-beta) g + beta m`` (Nesterov) or ``m``; with ``bias_correction``
    m and g are divided by ``1-beta^(t+1)`` and ``1-beta^t`` as optax.contrib.muon does.
    """

    def init_fn(params):
        return optax.contrib.MuonState(count=jnp.zeros([], jnp.int32),
                                       mu=jax.tree.map(jnp.zeros_like, params),
                                       ns_coeffs=jnp.asarray(NS_COEFFS))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, state.mu, updates)
        t = state.count + 1
        if bias_correction:
            cm, cg = 1 - beta ** (t + 1).astype(jnp.float32), 1 - beta ** t.astype(jnp.float32)
        else:
            cm = cg = 1.0
        if nesterov:
            direction = jax.tree.map(lambda m, g: beta * m / cm + (1 - beta) * g / cg, mu, updates)
        else:
            direction = jax.tree.map(lambda m: m / cg, mu)
        is_dims = lambda x: isinstance(x, optax.contrib.MuonDimensionNumbers)
        out = jax.tree.map(lambda d, u: _orthogonalize(u, d, ns_steps, eps),
                           dims_fn(updates), direction, is_leaf=is_dims)
        return out, optax.contrib.MuonState(count=t, mu=mu, ns_coeffs=state.ns_coeffs)

    return optax.GradientTransformation(init_fn, update_fn)


@register_optimizer("muon")
def _muon(c: OptimConfig, schedule: optax.Schedule, param_axes=None) -> optax.GradientTransformation:
    ratio = c.muon_learning_rate / c.learning_rate
    dims_fn = lambda tree: _muon_dims(tree, param_axes)

    def labels(params):
        is_dims = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
        return jax.tree.map(lambda d: "adam" if d is None else "muon", dims_fn(params),
                            is_leaf=is_dims)

    muon_part = optax.chain(
        # Inside partition() the Adam leaves arrive as MaskedNode (empty subtrees), so
        # dims_fn's tree has the same structure as the masked updates.
        scale_by_muon(dims_fn, beta=c.muon_beta, nesterov=c.muon_nesterov,
                      bias_correction=c.muon_bias_correction, ns_steps=c.muon_ns_steps),
        # Muon-updated leaves are all matrices, so no mask is needed here.
        optax.add_decayed_weights(c.weight_decay),
        optax.scale_by_learning_rate(lambda step: schedule(step) * ratio),
    )
    return optax.partition({"muon": muon_part, "adam": _adamw(c, schedule)}, labels)


def make_schedule(config: OptimConfig, num_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio * peak``.

    Example:
      >>> s = make_schedule(OptimConfig(learning_rate=1.0, warmup_steps=2, min_lr_ratio=0.0), 10)
      >>> [round(float(s(i)), 3) for i in (0, 1, 2, 10)]
      [0.0, 0.5, 1.0, 0.0]
    """
    total = config.decay_steps or num_steps
    if config.warmup_steps > total:
        raise ValueError(
            f"optim.warmup_steps={config.warmup_steps} exceeds the schedule length {total} "
            f"(optim.decay_steps or train.num_steps)"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(total, 1),
        end_value=config.learning_rate * config.min_lr_ratio,
    )


def param_path(path) -> str:
    """A key path of a parameter tree as ``"a/b/c"`` (what ``optim.trainable`` is searched in)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def trainable_mask(params, pattern: str | None):
    """A tree of Python bools like ``params``: True where ``pattern`` is found in the path.

    ``ValueError`` (naming a few paths) when the pattern matches no parameter.

    Example:
      >>> m = trainable_mask({"attn": {"q": 0, "k": 0}, "mlp": {"w": 0}}, "attn/k")
      >>> m
      {'attn': {'k': True, 'q': False}, 'mlp': {'w': False}}
    """
    if pattern is None:
        return jax.tree.map(lambda _: True, params)
    rx = re.compile(pattern)
    mask = jax.tree_util.tree_map_with_path(lambda path, _: bool(rx.search(param_path(path))), params)
    if not any(jax.tree.leaves(mask)):
        paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ValueError(f"optim.trainable={pattern!r} matches no parameter; paths look like "
                         f"{paths[:3]} ({len(paths)} in all)")
    return mask


def make_optimizer(config: OptimConfig, num_steps: int, param_axes: Any = None,
                   trainable: Callable[[Any], Any] | None = None,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for ``config`` (clipping first, then the registered update rule;
    with ``config.trainable``, only matching parameters get either).

    Args:
      config: the optim section.
      num_steps: train.num_steps, the schedule length unless ``decay_steps`` is set.
      param_axes: optional tree (structure of the params) of logical axis names per
        parameter, e.g. ``nn.get_partition_spec(boxed_params)``; Muon uses it to tell
        fan-in from fan-out axes.
      trainable: optional ``params -> tree of bools`` of the parameters to update (the
        rest get ``set_to_zero`` and no state); default ``config.trainable``'s mask.

    Returns:
      ``(tx, schedule)``; ``schedule(step)`` is the learning rate, for logging.
    """
    schedule = make_schedule(config, num_steps)
    tx = _OPTIMIZERS[config.name](config, schedule, param_axes)
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    if trainable is None and config.trainable is not None:
        trainable = lambda params: trainable_mask(params, config.trainable)
    if trainable is not None:
        labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))
        tx = optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
