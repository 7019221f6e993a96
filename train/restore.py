"""``restore_trained(workdir)``: a finished (or interrupted) run's model config and parameters.

A run writes ``workdir/run_config.json`` (the config as given, command-line overrides
included) next to its checkpoints; this rebuilds the same validated experiment from it,
lays the state out on this host's devices as the trainer would, and restores the newest
checkpoint that passes its checksum (``train/checkpoint.py``). The parameters then go
straight into ``models.transformer.generate`` (or the task's model).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax

from attn.errors import UserError
from train import peft, trainer
from train.checkpoint import Checkpointer


def restore_trained(workdir: str, config: Any = None, *, merged: bool = True) -> tuple[Any, Any, int]:
    """``(model config, variables, step)`` of the newest good checkpoint in ``workdir``.

    Args:
      workdir: a run's ``--workdir``.
      config: the config the run used; None = the ``workdir/run_config.json`` it wrote
        (the config as given, every command-line override included).
      merged: fold a peft run's adapters into their kernels (False: the state's own
        ``{"base", factors}`` nodes, e.g. for ``python -m train.lofit``).

    Returns:
      The validated model config (``models.transformer.LMConfig`` for LM tasks), the
      variables ``model.apply`` and ``generate`` take (``{"params": ...}``, plus the
      non-gradient model state a run carries, e.g. MoE's ``moe_state`` balancing bias,
      without which an MoE model would route differently), placed on this host's
      devices, and the step they are from. A ``config.peft`` run's adapters come back
      merged into their kernels (``train.peft.merge``): an ordinary model.

    Raises:
      attn.errors.UserError: no run_config.json or no checkpoint in ``workdir``.
      train.checkpoint.CheckpointError: checkpoints exist but none passes its checksum.

    Example:
      >>> from train.restore import restore_trained                     # doctest: +SKIP
      >>> from models.transformer import generate                       # doctest: +SKIP
      >>> cfg, variables, step = restore_trained("runs/mqar")           # doctest: +SKIP
      >>> generate(cfg, variables, jnp.asarray([[3, 70, 9, 100, 3]]), max_new_tokens=1)  # doctest: +SKIP
    """
    if config is None:
        path = os.path.join(workdir, trainer.RUN_CONFIG)
        if not os.path.isfile(path):
            raise UserError(f"{path} does not exist: is {workdir!r} the --workdir of a run?")
        with open(path) as f:
            config = json.load(f)
    exp, _ = trainer.validate(config)
    c = trainer._compiled_for(exp)  # the trainer's own layout (and its cache of compiled runs)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), exp.checkpoint)
    try:
        with jax.set_mesh(c.mesh), nn.logical_axis_rules(c.rules):
            restored = ckpt.restore_latest(c.abstract_state)
    finally:
        ckpt.close()
    if restored is None:
        raise UserError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    state, _, step = restored
    variables = trainer.model_variables(state)
    # A peft run keeps {"base", adapter factors} nodes; the model takes merged kernels.
    if merged:
        variables["params"] = peft.merge(variables["params"], exp.peft)
    return exp.model, variables, int(step)
