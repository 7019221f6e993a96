"""Command line: ``python -m train --config configs/mqar.py[:args] --workdir runs/mqar``.

The config is loaded by file path (configs are never installed); the text after ``:``
is passed to its ``get_config(arg)``. Dotted overrides of single values are accepted
too, e.g. ``--config.train.num_steps=200`` (ml_collections ``config_flags``).

Multi-process runs start the same command in every process, with the process's place
given by the config's ``distributed`` section or ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (detected on TPU pods and SLURM); see
``train/distributed.py``.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file, optionally followed by ':args' for its get_config(args)",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints and tensorboard events")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax logs every checkpoint step at INFO through absl; keep those quiet and show
    # this project's own INFO lines (resume, impl choices, evals without a bar).
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("train", "attn", "models"):
        logging.getLogger(name).setLevel(logging.INFO)
    # Before anything else touches a device: a multi-process run (config section
    # `distributed`, JAX_* variables, or a TPU pod / SLURM job) must join its peers before
    # the backend starts; a single-process run returns at once.
    import jax

    from train import distributed

    section = _CONFIG.value.get("distributed", None)
    distributed.initialize(distributed.DistributedConfig.from_dict(
        section.to_dict() if hasattr(section, "to_dict") else (section or {})))
    from train.checkpoint import CheckpointError
    from train.trainer import NonFiniteLossError, TrainingInterrupted, train_and_evaluate

    try:
        metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLossError as e:
        print(f"STOPPED: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:  # unwritable folder, failed save, nothing loadable
        print(f"CHECKPOINT ERROR: {e}", file=sys.stderr)
        return 4
    except TrainingInterrupted as e:  # SIGINT / SIGTERM: the step was saved first
        print(f"STOPPED: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    if jax.process_index() != 0:  # every process holds the same (replicated) metrics
        return 0
    lines = [f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in sorted(metrics.items())]
    print("final metrics:\n" + "\n".join(lines))
    if "eval/accuracy" in metrics:
        print(f"FINAL EVAL ACCURACY: {metrics['eval/accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    app.run(main)
