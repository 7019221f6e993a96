"""The sections every config shares: optim, train, mesh, checkpoint (one place for defaults).

Each function returns a ``ConfigDict`` of one section with the keys the trainer reads
(``train.optim.OptimConfig``, ``train.trainer.TrainConfig``, ``train.sharding.MeshConfig``,
``train.checkpoint.CheckpointConfig``); a config passes only what it changes. ``steps``
is the config's own ``steps`` argument: it is checked here, under that name, before a
warmup is derived from it.

Example:
  >>> from configs import common
  >>> o = common.optim(steps=100, warmup_max=50, learning_rate=5e-3)
  >>> o.name, o.warmup_steps, o.learning_rate
  ('adamw', 25, 0.005)
  >>> common.train(steps=100, seed=0, eval_every=50).num_steps
  100
"""

from __future__ import annotations

from ml_collections import ConfigDict

from train.config_args import check_at_least

# AdamW with warmup + cosine decay and clipping: what every shipped config starts from.
OPTIM = dict(
    name="adamw",
    learning_rate=2e-3,
    decay_steps=None,  # = train.num_steps
    min_lr_ratio=0.1,
    weight_decay=0.1,
    b1=0.9,
    b2=0.98,
    eps=1e-8,
    grad_clip_norm=1.0,
)

TRAIN = dict(
    log_every=50,
    eval_every=500,
    eval_steps=4,
    aux_loss_weight=0.01,
    progress_bar=True,
)

CHECKPOINT = dict(enabled=True, every_steps=500, max_to_keep=2, async_save=True)


def optim(*, steps: int, warmup_max: int, warmup_div: int = 4, **overrides) -> ConfigDict:
    """``config.optim``: ``OPTIM`` with ``overrides``; warmup ``min(warmup_max, steps // warmup_div)``.

    The cap on warmup keeps short smoke runs (``steps=4``) valid.
    """
    check_at_least("steps", steps, 1)
    return ConfigDict({**OPTIM, "warmup_steps": min(warmup_max, steps // warmup_div), **overrides})


def train(*, steps: int, seed: int, **overrides) -> ConfigDict:
    """``config.train``: ``steps`` updates, init seed ``seed``, ``TRAIN`` with ``overrides``."""
    check_at_least("steps", steps, 1)
    return ConfigDict({"num_steps": steps, "seed": seed, **TRAIN, **overrides})


def mesh(shape=(-1, 1, 1, 1), **overrides) -> ConfigDict:
    """``config.mesh``: (data, fsdp, context, tensor); the default puts every device on data."""
    return ConfigDict({"shape": tuple(shape), "rules": None, **overrides})


def checkpoint(**overrides) -> ConfigDict:
    """``config.checkpoint``: ``CHECKPOINT`` with ``overrides``."""
    return ConfigDict({**CHECKPOINT, **overrides})
