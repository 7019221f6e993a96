"""Orbax checkpoints of the train state plus the data position, verified on restore.

A checkpoint at step ``s`` holds the state after ``s`` updates and ``{"step": s, ...}``
for the data: sources are pure in (seed, step), so the step *is* the iterator state and
a resumed run sees exactly the batches an uninterrupted one would.

Nothing bad is saved or loaded as good:
  * ``save`` refuses a state with a NaN/inf anywhere (``NonFiniteStateError``), so the
    newest checkpoint is always one training can continue from;
  * each step folder holds an ``integrity`` record: a 64-bit digest of every array's bits
    (computed on device, so it costs one pass over the state and works for arrays sharded
    over many processes) and a SHA-256 of the data state. ``restore_latest`` recomputes it
    on the restored arrays; a step that is unreadable, half deleted or fails its digest is
    moved aside to ``<step>.bad`` with one warning line naming it, and the next older step
    is tried. If no step is good it raises ``CheckpointError`` (one line) and moves nothing.
  * a folder that cannot be written fails at ``check_writable`` (before anything compiles),
    and a save that fails later raises ``CheckpointError`` (one line) instead of leaving
    orbax's background threads waiting on it.

Saves are asynchronous (the device-to-host copy blocks, the write does not); orbax
writes into a temporary directory and renames it when complete, so a run killed
mid-write leaves the previous checkpoint as the latest. Step directories are created
synchronously: orbax's asynchronous creation leaves threads waiting up to 20 minutes for
a directory that failed, which hung the process at exit.

In a multi-process run every process calls ``save`` / ``restore_latest`` / ``close`` with
the same step (orbax synchronises them through ``jax.distributed`` and each process writes
the shards it holds), so the directory must be one that all hosts see. Every decision
(good / bad step) is agreed by all processes; only process 0 renames folders.

Example:
  >>> import jax.numpy as jnp, tempfile
  >>> from train.checkpoint import CheckpointConfig, Checkpointer
  >>> ck = Checkpointer(tempfile.mkdtemp(), CheckpointConfig(max_to_keep=2))
  >>> ck.save(3, {"w": jnp.ones(2)}, {"step": 3})
  >>> ck.wait(); ck.latest_step()
  3
  >>> state, data, step = ck.restore_latest({"w": jnp.zeros(2)}); data["step"], step
  (3, 3)
  >>> ck.close()
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from train.config_args import dataclass_from_dict

log = logging.getLogger(__name__)

INTEGRITY_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint folder cannot be written, a save failed, or no saved step is loadable.

    The message is one line naming the folder; the entry point prints it and exits non-zero.
    """


class NonFiniteStateError(ValueError):
    """``save`` was given a state holding NaN/inf; ``leaves`` names the offending arrays."""

    def __init__(self, message: str, leaves: list[str]):
        super().__init__(message)
        self.leaves = leaves


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


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, shortened: orbax errors can run to pages."""
    text = (str(e).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_writable(directory: str, what: str = "directory") -> None:
    """Create ``directory`` if needed and prove it writable with a probe file.

    ``os.access`` is not enough: it ignores read-only mounts' quirks and root's rights,
    and says nothing about a path that is a file. Raises ``CheckpointError`` (one line).

    Example:
      >>> import tempfile; check_writable(tempfile.mkdtemp())
      >>> check_writable("/proc/attnlab")
      Traceback (most recent call last):
      ...
      train.checkpoint.CheckpointError: directory /proc/attnlab is not writable: ...
    """
    probe = os.path.join(directory, f".write-probe-{os.getpid()}-{jax.process_index()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"{what} {directory} is not writable: "
                              f"{e.strerror or e} ({e.filename or directory})") from None


# ----------------------------------------------------------------- state digest
def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection, so distinct inputs never collide."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits_u32(x: jax.Array) -> jax.Array:
    """The array's bit pattern as uint32 words (8-byte types gain a trailing axis of 2)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    if size < 4:
        return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    return lax.bitcast_convert_type(x, jnp.uint32)


def _leaf_digest(x: jax.Array) -> jax.Array:
    """[2] uint32: two independent position-keyed sums of mixed words.

    Each word is mixed with a hash of its flat position, so moved or swapped values
    change the digest; the wrapping uint32 sum is exact in any reduction order, so the
    digest does not depend on the sharding (a restore onto another mesh matches). Index
    arithmetic per axis instead of a reshape keeps sharded arrays where they are.
    """
    w = _bits_u32(x)
    pos = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):
        pos = pos + lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= w.shape[axis]
    lanes = []
    for seed in (0x9E3779B9, 0x7F4A7C15):
        key = _fmix32(pos * jnp.uint32(0x01000193) + jnp.uint32(seed))
        lanes.append(jnp.sum(_fmix32(w ^ key), dtype=jnp.uint32))
    # The size enters too: an array truncated to a prefix must not keep its digest.
    return jnp.stack(lanes) ^ jnp.uint32(w.size % 2**32)


def _integrity_fn(state):
    leaves = jax.tree.leaves(state)
    finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
              for x in leaves]
    return jnp.stack(finite), jnp.stack([_leaf_digest(x) for x in leaves])


def _replicated_like(state):
    leaf = next((x for x in jax.tree.leaves(state) if isinstance(getattr(x, "sharding", None),
                                                                   NamedSharding)), None)
    return NamedSharding(leaf.sharding.mesh, P()) if leaf is not None else None


def _host(x: jax.Array) -> np.ndarray:
    # Outputs are replicated; in a multi-process run only the local copy is addressable.
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def state_integrity(state: Any) -> tuple[dict[str, bool], dict[str, str]]:
    """({leaf: finite}, {leaf: 16-hex-digit digest}) for a pytree of arrays, in one jit.

    Example:
      >>> import jax.numpy as jnp
      >>> fin, dig = state_integrity({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])})
      >>> fin
      {"['a']": True, "['b']": False}
      >>> dig == state_integrity({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])})[1]
      True
    """
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    if not names:
        return {}, {}
    out = _replicated_like(state)
    finite, digest = jax.jit(_integrity_fn, out_shardings=(out, out) if out else None)(state)
    finite, digest = _host(finite), _host(digest)
    return (dict(zip(names, map(bool, finite))),
            {n: f"{int(d[0]):08x}{int(d[1]):08x}" for n, d in zip(names, digest)})


def _data_sha256(data_state: dict) -> str:
    return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


def all_processes_agree(ok: bool) -> bool:
    """True only if ``ok`` on every process (so all take the same branch)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _abstract(target: Any) -> Any:
    return jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        target,
    )


class _BadStep(Exception):
    """This step cannot be loaded; the message says why (one line)."""


class Checkpointer:
    """``ocp.CheckpointManager`` with the state + data + integrity layout."""

    def __init__(self, directory: str, config: CheckpointConfig):
        self.directory = os.path.abspath(directory)
        self.config = config
        self._failed: str | None = None  # the first save failure, once seen
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.max_to_keep,
            enable_async_checkpointing=config.async_save,
            create=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {self.directory} cannot be opened: "
                                  f"{_one_line(e)}") from None

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (not yet verified), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    # ------------------------------------------------------------- save
    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Save ``state`` (a pytree of jax arrays) and ``data_state`` (JSON) at ``step``.

        Raises:
          NonFiniteStateError: some array holds NaN/inf (nothing is written).
          CheckpointError: this or an earlier asynchronous save failed (one line).
        """
        finite, digest = state_integrity(state)
        bad = [name for name, ok in finite.items() if not ok]
        if bad:
            raise NonFiniteStateError(
                f"state at step {step} is not finite in {len(bad)} arrays "
                f"(first: {', '.join(bad[:3])}); not saved", bad)
        integrity = {"format": INTEGRITY_FORMAT, "step": int(step), "state": digest,
                     "data_sha256": _data_sha256(dict(data_state))}
        self._guard(f"save at step {step}", lambda: self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(dict(data_state)),
                integrity=ocp.args.JsonSave(integrity),
            ),
            force=True,  # the trainer decides when to save; no interval policy here
        ))

    def _guard(self, what: str, fn) -> Any:
        """Run a manager call; any failure becomes one ``CheckpointError`` line."""
        if self._failed:
            raise CheckpointError(self._failed)
        try:
            return fn()
        except Exception as e:  # orbax raises OSError, ValueError, tensorstore errors, ...
            self._failed = f"checkpoint {what} in {self.directory} failed: {_one_line(e)}"
            raise CheckpointError(self._failed) from None

    def wait(self) -> None:
        """Block until any asynchronous save has been written (``CheckpointError`` if not)."""
        self._guard("write", self._manager.wait_until_finished)

    def close(self) -> None:
        """Finish the last save and release orbax; after a failure, only release."""
        if self._failed:
            try:
                self._manager.close()
            except Exception:  # the failure was already reported once
                pass
            return
        self._guard("write", self._manager.close)

    # ------------------------------------------------------------- restore
    def restore_latest(self, target: Any) -> tuple[Any, dict, int] | None:
        """``(state, data_state, step)`` of the newest good checkpoint, or None if none exist.

        ``target`` gives structure, dtypes and shardings (arrays or ``jax.ShapeDtypeStruct``
        with ``sharding`` set), so the state comes back already sharded over the current
        mesh. Steps that fail are moved aside (see the module docstring).

        Raises:
          CheckpointError: steps exist but none is good, or they hold a different state
            than ``target`` (another model config), in one line.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = _abstract(target)
        bad: list[tuple[int, str]] = []
        for step in steps:
            try:
                state, data_state = self._restore_verified(step, abstract)
            except _BadStep as e:
                bad.append((step, str(e)))
                continue
            for (bad_step, why), moved in zip(bad, self._move_aside([s for s, _ in bad])):
                log.warning("checkpoint %s is unusable (%s): moved to %s; resuming from step %d",
                            os.path.join(self.directory, str(bad_step)), why, moved, step)
            return state, data_state, step
        reasons = "; ".join(f"{s}: {why}" for s, why in bad)
        raise CheckpointError(f"no loadable checkpoint in {self.directory} ({reasons}); move that "
                              f"folder away to start afresh")

    def _restore_verified(self, step: int, abstract: Any) -> tuple[Any, dict]:
        error = None
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
                integrity=ocp.args.JsonRestore(),
            ))
        except Exception as e:  # unreadable: truncated, half deleted, garbled metadata
            error = f"unreadable: {_one_line(e)}"
        if not all_processes_agree(error is None):
            self._raise_if_other_config(step, abstract)
            raise _BadStep(error or "unreadable on another process")
        state, data_state, integrity = out["state"], dict(out["data"]), out["integrity"]
        why = self._verify(state, data_state, integrity)
        if why:
            self._raise_if_other_config(step, abstract)
            raise _BadStep(why)
        return state, data_state

    @staticmethod
    def _verify(state: Any, data_state: dict, integrity: Any) -> str | None:
        """None if the restored step matches its record, else the reason (one line)."""
        if not isinstance(integrity, dict) or integrity.get("format") != INTEGRITY_FORMAT:
            return "no integrity record (written before checksums, or damaged)"
        if integrity.get("data_sha256") != _data_sha256(data_state):
            return "data state fails its checksum"
        finite, digest = state_integrity(state)
        saved = integrity.get("state", {})
        wrong = [n for n in digest if saved.get(n) != digest[n]] + [n for n in saved if n not in digest]
        if wrong:
            return f"checksum mismatch in {len(wrong)} arrays (first: {wrong[0]})"
        if not all(finite.values()):  # cannot happen for our saves; a foreign writer might
            return "state holds NaN/inf"
        return None

    def _raise_if_other_config(self, step: int, abstract: Any) -> None:
        """A checkpoint of another model is not corrupt: say so, and move nothing."""
        try:
            meta = self._manager.item_metadata(step)["state"]
        except Exception:  # the metadata itself is unreadable: a damaged step
            return
        if meta is None:
            return
        want = {jax.tree_util.keystr(p): (tuple(x.shape), jnp.dtype(x.dtype))
                for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        try:
            have = {jax.tree_util.keystr(p): (tuple(m.shape), jnp.dtype(m.dtype))
                    for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
        except Exception:
            return
        diff = sorted(set(want.items()) ^ set(have.items()))
        if diff:
            name = diff[0][0]
            raise CheckpointError(
                f"checkpoint {os.path.join(self.directory, str(step))} holds a different state than "
                f"this config builds (at {name}: saved {have.get(name)}, expected {want.get(name)}); "
                f"use another workdir or the config it was trained with")

    def _move_aside(self, steps: list[int]) -> list[str]:
        """Rename bad steps to ``<step>.bad`` (orbax ignores the name) and return the new
        paths: a resumed run saves those steps again, and the bytes stay for inspection."""
        moved = []
        for step in steps:
            src = os.path.join(self.directory, str(step))
            dst, n = src + ".bad", 1
            while os.path.exists(dst):
                n += 1
                dst = f"{src}.bad{n}"
            moved.append(dst)
        _sync("attnlab_checkpoint_move_aside_plan")  # every process names them before any move
        if jax.process_index() == 0:
            for step, dst in zip(steps, moved):
                os.rename(os.path.join(self.directory, str(step)), dst)
        _sync("attnlab_checkpoint_move_aside")
        self._manager.reload()
        return moved
