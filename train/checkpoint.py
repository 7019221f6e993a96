"""Orbax checkpoints of the train state plus the data position.

A checkpoint at step ``s`` holds the state after ``s`` updates and ``{"step": s, ...}``
for the data: sources are pure in (seed, step), so the step *is* the iterator state and
a resumed run sees exactly the batches an uninterrupted one would.

Saves are asynchronous (the device-to-host copy blocks, the write does not); orbax
writes into a temporary directory and renames it when complete, so a run killed
mid-write leaves the previous checkpoint as the latest.

In a multi-process run every process calls ``save`` / ``restore`` / ``close`` with the
same step (orbax synchronises them through ``jax.distributed`` and each process writes
the shards it holds), so the directory must be one that all hosts see.

Example:
  >>> import jax.numpy as jnp, tempfile
  >>> from train.checkpoint import CheckpointConfig, Checkpointer
  >>> ck = Checkpointer(tempfile.mkdtemp(), CheckpointConfig(max_to_keep=2))
  >>> ck.save(3, {"w": jnp.ones(2)}, {"step": 3})
  >>> ck.wait(); ck.latest_step()
  3
  >>> state, data = ck.restore(3, {"w": jnp.zeros(2)}); data["step"]
  3
  >>> ck.close()
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from train.config_args import dataclass_from_dict


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The ``config.checkpoint`` section.

    Attributes:
      enabled: save at all (resume still reads existing checkpoints when False).
      every_steps: save every this many steps, and always at the last step.
      max_to_keep: older checkpoints are deleted (None = keep all).
      async_save: write in a background thread while training continues.
    """

    enabled: bool = True
    every_steps: int = 500
    max_to_keep: int | None = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {self.every_steps!r}")
        if self.max_to_keep is not None and self.max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep must be >= 1 or None, got {self.max_to_keep!r}")

    @classmethod
    def from_dict(cls, d: Any) -> "CheckpointConfig":
        """Build from a dict / ConfigDict; an unknown key raises ValueError naming it."""
        return dataclass_from_dict(cls, d, "checkpoint")


class Checkpointer:
    """A thin holder around ``ocp.CheckpointManager`` with the state + data layout."""

    def __init__(self, directory: str, config: CheckpointConfig):
        self.directory = os.path.abspath(directory)
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.max_to_keep,
            enable_async_checkpointing=config.async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Save ``state`` (a pytree of jax arrays) and ``data_state`` (JSON) at ``step``."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(dict(data_state)),
            ),
            force=True,  # the trainer decides when to save; no interval policy here
        )

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """Restore ``(state, data_state)``; ``target`` gives structure, dtypes and shardings.

        ``target`` may hold arrays or ``jax.ShapeDtypeStruct`` with ``sharding`` set, so the
        state comes back already sharded over the current mesh.
        """
        abstract = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target,
        )
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], dict(out["data"])

    def wait(self) -> None:
        """Block until any asynchronous save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
