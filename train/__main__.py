"""``python -m train --config NAME|PATH[:args] [--config.KEY=VALUE ...] --workdir DIR [--verbose]``.

The same command as ``attnlab train`` (``train/cli.py``): ``--config`` takes a shipped
config's name (``mqar``) or a config file, the text after ``:`` goes to its
``get_config(arg)``, and ``--config.train.num_steps=200`` style flags set single
existing values. User errors print one line and exit 2 (``--verbose``: with traceback).

``python -m`` puts the current folder first on ``sys.path``: run from a folder holding
its own ``train.py`` or ``models/``, those shadow attnlab's. The ``attnlab`` console
script (or ``python -P -m train``, which leaves the folder off) is unambiguous.

Multi-process runs start the same command in every process, with the process's place
given by the config's ``distributed`` section or ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (detected on TPU pods and SLURM); see
``train/distributed.py``.
"""

from __future__ import annotations

import sys

from train.cli import train_main


def main(argv: list[str] | None = None) -> int:
    """``train_main`` under the name ``python -m train`` (``argv`` without the program name)."""
    return train_main(sys.argv[1:] if argv is None else argv, prog="python -m train")


if __name__ == "__main__":
    sys.exit(main())
