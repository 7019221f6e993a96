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
from typing import Any, Callable

import jax
import optax

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
      b1, b2, eps: Adam moments (for Muon: b1 is Muon's momentum, b1/b2 also drive the
        Adam part that handles non-matrix parameters).
      grad_clip_norm: clip the global gradient norm to this (None = no clipping).
      muon_learning_rate: peak rate of the Muon-updated matrices (optim.name="muon");
        the Adam-updated rest uses ``learning_rate``. Same warmup / decay shape.
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


def _muon_dims(params, param_axes=None):
    """Muon's reshape rule per parameter, read off the logical axis names; None = Adam.

    A kernel whose first axis is EMBED maps D -> the rest ([D, N, H] q/k/v, [D, F]);
    one whose last axis is EMBED maps the rest -> D ([N, H, D] out, [F, D]). Embedding
    tables (VOCAB x EMBED), vectors and anything unannotated go to Adam: orthogonalised
    updates suit hidden matrices, not lookup tables (Jordan et al.). Without axis names
    every 2-D parameter except embeddings is treated as [in, out].
    """
    from optax.contrib import MuonDimensionNumbers as Dims

    from attn import axes

    def rule(path, p, names):
        names = tuple(names) if names is not None else ()
        # A leading LAYERS axis (scan_layers) is a batch axis to Muon: skip over it.
        lead = 1 if names[:1] == (axes.LAYERS,) else 0
        if p.ndim - lead < 2 or axes.VOCAB in names:
            return None
        if len(names) > lead and names[lead] == axes.EMBED:
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


@register_optimizer("muon")
def _muon(c: OptimConfig, schedule: optax.Schedule, param_axes=None) -> optax.GradientTransformation:
    from optax.contrib import muon

    ratio = c.muon_learning_rate / c.learning_rate
    return muon(lambda step: schedule(step) * ratio, beta=c.b1, eps=c.eps,
                weight_decay=c.weight_decay, weight_decay_mask=_decay_mask,
                adam_b1=c.b1, adam_b2=c.b2, adam_weight_decay=c.weight_decay,
                adam_learning_rate=schedule,
                muon_weight_dimension_numbers=lambda params: _muon_dims(params, param_axes))


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


def make_optimizer(config: OptimConfig, num_steps: int, param_axes: Any = None,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for ``config`` (clipping first, then the registered update rule).

    Args:
      config: the optim section.
      num_steps: train.num_steps, the schedule length unless ``decay_steps`` is set.
      param_axes: optional tree (structure of the params) of logical axis names per
        parameter, e.g. ``nn.get_partition_spec(boxed_params)``; Muon uses it to tell
        fan-in from fan-out axes.

    Returns:
      ``(tx, schedule)``; ``schedule(step)`` is the learning rate, for logging.
    """
    schedule = make_schedule(config, num_steps)
    tx = _OPTIMIZERS[config.name](config, schedule, param_axes)
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx, schedule
