"""Multi-process start-up: ``jax.distributed.initialize`` from the config or the environment.

Every process of a multi-host run executes the same program; ``initialize`` must run in
each of them before anything touches a JAX device. Where the arguments come from, first
match wins:

  1. the config's ``distributed`` section (``DistributedConfig``);
  2. environment variables, one per field that the config leaves unset:
     ``JAX_COORDINATOR_ADDRESS`` ("host:port" of process 0; JAX reads it itself too),
     ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (this project's names: JAX 0.10 reads
     no variables for these two), ``JAX_LOCAL_DEVICE_IDS`` ("0,1"; JAX reads it too);
  3. a cluster that JAX detects by itself (``detect_cluster``): a Cloud TPU VM (pod
     slices, GKE) or a SLURM job step with more than one task. There
     ``jax.distributed.initialize()`` gets only what 1 and 2 set and JAX fills in the
     rest (from the TPU metadata server or the ``SLURM_*`` variables).

With none of these, the run is a single process and nothing is initialised, so a plain
``python -m train`` never waits for a coordinator.

Example (one process standing in for a cluster of one; the function is idempotent):
  >>> from train.distributed import DistributedConfig, initialize   # doctest: +SKIP
  >>> initialize(DistributedConfig(coordinator_address="localhost:12355",  # doctest: +SKIP
  ...                              num_processes=1, process_id=0))
  True
  >>> import jax; jax.process_count()                                # doctest: +SKIP
  1

Two processes on one machine (each line in its own shell; CPU collectives use gloo):
  JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \\
      python -m train --config configs/mqar.py --workdir runs/mqar2
  JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 \\
      python -m train --config configs/mqar.py --workdir runs/mqar2
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import jax

from train.config_args import dataclass_from_dict

log = logging.getLogger(__name__)

ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"

# The variables jax._src.clusters.SlurmCluster needs, all of them, to detect a job step.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")

# (field, environment variable) for the three values without which a process cannot join.
_REQUIRED = (("coordinator_address", ENV_COORDINATOR_ADDRESS),
             ("num_processes", ENV_NUM_PROCESSES),
             ("process_id", ENV_PROCESS_ID))


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """The ``config.distributed`` section; every field may stay unset (None).

    ``python -m train`` applies it before JAX starts; code that calls
    ``train_and_evaluate`` itself calls ``initialize(config)`` first. (The trainer
    validates the section with the others and records it in ``config.json``.)

    Attributes:
      coordinator_address: "host:port" of process 0, reachable from every process.
      num_processes: how many processes take part.
      process_id: this process's index, 0 .. num_processes - 1 (usually from the
        environment: one config file serves all processes).
      local_device_ids: the local devices this process uses (GPU: one process per GPU);
        None = all of them.
      initialization_timeout: seconds to wait for every process to reach the coordinator.

    Example:
      >>> DistributedConfig.from_dict({"num_processes": 2, "local_device_ids": [0, 1]})
      DistributedConfig(coordinator_address=None, num_processes=2, process_id=None, local_device_ids=(0, 1), initialization_timeout=300)
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int = 300

    def __post_init__(self):
        if self.coordinator_address is not None and not isinstance(self.coordinator_address, str):
            raise ValueError(f"distributed.coordinator_address must be 'host:port', "
                             f"got {self.coordinator_address!r}")
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise ValueError(f"distributed.coordinator_address={self.coordinator_address!r} "
                             f"has no port; expected 'host:port'")
        if self.num_processes is not None and (not _is_int(self.num_processes) or self.num_processes < 1):
            raise ValueError(f"distributed.num_processes must be an int >= 1, got {self.num_processes!r}")
        if self.process_id is not None and (not _is_int(self.process_id) or self.process_id < 0):
            raise ValueError(f"distributed.process_id must be an int >= 0, got {self.process_id!r}")
        if (self.num_processes is not None and self.process_id is not None
                and self.process_id >= self.num_processes):
            raise ValueError(f"distributed.process_id={self.process_id} must be below "
                             f"distributed.num_processes={self.num_processes}")
        if self.local_device_ids is not None:
            ids = self.local_device_ids
            ids = (ids,) if _is_int(ids) else tuple(ids)
            if not ids or not all(_is_int(i) and i >= 0 for i in ids):
                raise ValueError(f"distributed.local_device_ids must be device ids >= 0, "
                                 f"got {self.local_device_ids!r}")
            object.__setattr__(self, "local_device_ids", ids)
        if not _is_int(self.initialization_timeout) or self.initialization_timeout < 1:
            raise ValueError(f"distributed.initialization_timeout must be an int >= 1 (seconds), "
                             f"got {self.initialization_timeout!r}")

    @classmethod
    def from_dict(cls, d: Any) -> "DistributedConfig":
        """Build from a dict / ConfigDict; an unknown key raises ValueError naming it."""
        return dataclass_from_dict(cls, d, "distributed")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def with_environment(config: DistributedConfig, environ: Mapping[str, str] | None = None) -> DistributedConfig:
    """``config`` with each unset field taken from its environment variable, if set.

    Example:
      >>> with_environment(DistributedConfig(process_id=1),
      ...                  {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}).process_id
      1
    """
    environ = os.environ if environ is None else environ
    updates: dict[str, Any] = {}

    def env_int(name: str) -> int | None:
        text = environ.get(name, "").strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r} is not an integer") from None

    if config.coordinator_address is None and environ.get(ENV_COORDINATOR_ADDRESS, "").strip():
        updates["coordinator_address"] = environ[ENV_COORDINATOR_ADDRESS].strip()
    if config.num_processes is None and (n := env_int(ENV_NUM_PROCESSES)) is not None:
        updates["num_processes"] = n
    if config.process_id is None and (i := env_int(ENV_PROCESS_ID)) is not None:
        updates["process_id"] = i
    if config.local_device_ids is None and environ.get(ENV_LOCAL_DEVICE_IDS, "").strip():
        text = environ[ENV_LOCAL_DEVICE_IDS]
        try:
            updates["local_device_ids"] = tuple(int(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise ValueError(f"environment variable {ENV_LOCAL_DEVICE_IDS}={text!r} is not a "
                             f"comma-separated list of device ids") from None
    return dataclasses.replace(config, **updates) if updates else config


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """``"tpu"`` or ``"slurm"`` where ``jax.distributed.initialize()`` can fill in every
    argument by itself; else None.

    ``"tpu"``: any Cloud TPU VM (JAX reads the workers from the metadata server or the
    GKE variables; a single-host slice becomes a runtime of one process, as the JAX docs
    intend). ``"slurm"``: a job step with more than one task.

    Why not simply call ``initialize()`` everywhere: off a cluster it raises for want of
    a coordinator, and in a single-task SLURM step it would hide all GPUs but one
    (JAX maps ``SLURM_LOCALID`` to ``local_device_ids``).

    Example:
      >>> detect_cluster({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
      ...                 "SLURM_PROCID": "1", "SLURM_LOCALID": "0"})
      'slurm'
      >>> detect_cluster({})   # on a CPU or GPU machine without SLURM
    """
    environ = os.environ if environ is None else environ
    # Set at ``import jax`` when libtpu and TPU chips are present; JAX's own TPU cluster
    # detection (metadata server, GKE variables) keys on the same flag.
    from jax._src import cloud_tpu_init

    if getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
        return "tpu"
    if all(v in environ for v in _SLURM_VARS):
        try:
            if int(environ["SLURM_NTASKS"]) > 1:
                return "slurm"
        except ValueError:
            pass
    return None


def _enable_cpu_collectives() -> None:
    """Cross-process reductions on CPU need a collectives library: gloo, unless the
    user chose one (mpi). JAX 0.10 defaults to gloo; older releases defaulted to none,
    where the first cross-process all-reduce fails."""
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(config: DistributedConfig | None = None) -> bool:
    """Join the multi-process run described by ``config`` and the environment, if any.

    Call it first thing in every process, before any JAX computation or ``jax.devices()``.
    A second call is a no-op, and so is a call in a single-process run.

    Args:
      config: the ``distributed`` section (None = all fields unset).

    Returns:
      True when this process is part of an initialised multi-process runtime (now or
      from an earlier call), False for a single-process run.

    Raises:
      ValueError: a partial setup off any detected cluster (for example num_processes
        without a coordinator address); the message names the missing config keys and
        environment variables.
      RuntimeError: (from JAX) a multi-process setup was requested after the backend
        had already started.

    Example:
      >>> from train.distributed import initialize
      >>> initialize()   # no config, no variables, no cluster: a single process
      False
      >>> initialize(DistributedConfig(num_processes=2))
      Traceback (most recent call last):
      ...
      ValueError: incomplete multi-process setup: set distributed.coordinator_address (or JAX_COORDINATOR_ADDRESS), distributed.process_id (or JAX_PROCESS_ID); given: num_processes=2
    """
    if jax.distributed.is_initialized():
        return True
    config = with_environment(config if config is not None else DistributedConfig())
    given = {field: getattr(config, field) for field, _ in _REQUIRED if getattr(config, field) is not None}
    cluster = detect_cluster()
    if not given and cluster is None:
        return False
    if cluster is None:
        missing = [f"distributed.{field} (or {env})" for field, env in _REQUIRED if field not in given]
        if missing:
            have = ", ".join(f"{k}={v}" for k, v in given.items())
            raise ValueError(f"incomplete multi-process setup: set {', '.join(missing)}; given: {have}")
        if config.process_id >= config.num_processes:  # one from the config, one from the environment
            raise ValueError(f"process_id={config.process_id} must be below num_processes={config.num_processes} "
                             f"(config section distributed, or {ENV_PROCESS_ID} / {ENV_NUM_PROCESSES})")
    _enable_cpu_collectives()
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
        local_device_ids=list(config.local_device_ids) if config.local_device_ids is not None else None,
        initialization_timeout=config.initialization_timeout,
    )
    # The values JAX settled on (auto-detected ones included), read without starting the
    # backend: jax.process_index() would, and the caller may still configure it.
    from jax._src.distributed import global_state

    log.info("distributed: process %d of %d, coordinator %s%s", global_state.process_id,
             global_state.num_processes, global_state.coordinator_address,
             f" (detected {cluster})" if cluster else "")
    return True
