"""Knowledge distillation from a frozen teacher checkpoint (``train.distill_from``).

A converted model (TransMLA, X-EcoMLA, MoH, a linearized one) heals faster when it
learns the original model's full next-token distributions rather than the one-hot
targets alone ("dark knowledge"). With ``train.distill_from`` set, every train step also
runs the teacher (a ``models.pretrained`` checkpoint, loaded once, frozen, never
checkpointed with the run) on the same batch, and the loss becomes

    distill_weight · τ² · KL(softmax(z_teacher / τ) || softmax(z_student / τ))
      + (1 - distill_weight) · CE(z_student, targets)

averaged over the positions the task's weights count (τ = ``distill_temperature``;
the τ² keeps gradient sizes comparable across temperatures, Hinton et al.). Eval still
reports the student's own cross-entropy.

Example:
  >>> import jax.numpy as jnp
  >>> z = jnp.asarray([[[2.0, 0.0, -1.0]]])
  >>> float(kl_sums(z, z, jnp.ones((1, 1)), 2.0)["kl_sum"])   # a student equal to its teacher
  0.0
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp


def kl_sums(student_BTV, teacher_BTV, weights_BT, temperature: float) -> dict:
    """``{"kl_sum"}``: Σ weights · τ² · KL(teacher_τ || student_τ), in float32."""
    t = temperature
    log_ps = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / t, axis=-1)
    log_pt = jax.nn.log_softmax(teacher_BTV.astype(jnp.float32) / t, axis=-1)
    kl_BT = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1) * (t * t)
    return {"kl_sum": jnp.sum(jnp.where(weights_BT != 0, weights_BT * kl_BT, 0.0))}


@dataclasses.dataclass
class Teacher:
    """The frozen teacher: its model config, ``logits(params, batch)`` and parameter layout."""

    source: str
    config: Any
    logits: Callable[[Any, dict], Any]
    abstract_params: Any
    shardings: Any

    def load(self, task) -> Any:
        """The teacher's parameters, checked against its layout and placed on the mesh."""
        from train.trainer import checked_params

        loaded = task.pretrained_params(self.source, self.config)
        return checked_params(loaded, self.abstract_params, self.shardings, f"train.distill_from={self.source!r}")


def build_teacher(exp, task, mesh, rules) -> Teacher | None:
    """The teacher of ``exp`` (None without ``train.distill_from``); nothing is loaded yet."""
    import flax.linen as nn

    from attn.errors import UserError
    from train import sharding as shd

    source = exp.train.distill_from
    if source is None:
        return None
    if task.pretrained_config is None:
        raise UserError(f"train.distill_from: config.task={task.name!r} cannot load a checkpoint")
    try:
        cfg = task.pretrained_config(source, {})
    except ValueError as e:
        raise UserError(" ".join(str(e).split())) from e
    model = task.build_model(cfg)
    B = exp.data.batch_size

    def init(rng):
        args, kwargs = task.model_inputs(task.example_batch(cfg, exp.data, B))
        return model.init(rng, *args, **kwargs)["params"]

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = shd.logical_shardings(boxed, mesh, rules)

    def logits(params, batch):
        args, kwargs = task.model_inputs(batch)
        out = model.apply({"params": params}, *args, **kwargs)
        return jax.lax.stop_gradient(task.outputs(out, batch)[0])

    return Teacher(source=source, config=cfg, logits=logits, abstract_params=nn.meta.unbox(boxed),
                   shardings=shardings)
