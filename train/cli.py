"""The command line: ``attnlab train|generate|perplexity|export ...`` and ``python -m train``.

``attnlab`` (the console script installed with the package, ``[project.scripts]``) is
the unambiguous way to run attnlab from any folder: a console script does not put the
current folder on ``sys.path``, so a user's own ``models/`` or ``train.py`` there cannot
shadow attnlab's packages. ``python -m train`` does put it first (Python's rule for
``-m``); inside a checkout, or with ``python -P -m train``, it is the same command.

Subcommands are a table (``COMMANDS``): name -> ``"module:function"``, imported only
when chosen; each function takes the argument list and returns the exit status.

Exit status: 0 done; 2 a user error (``attn.errors.UserError``: a bad config key or
value, unknown name, mesh larger than the machine, bad data, checkpoint or model file),
printed as one line ``<prog>: error: <message>`` (the traceback only with
``--verbose``); 3 a non-finite loss or state; 4 a checkpoint error; 128+N stopped by
signal N (the step was saved). Anything else is a bug and keeps its traceback.

``train`` flags::

  --config NAME|PATH[:key=value,...]   a shipped config (``mqar``) or a config file
  --config.SECTION.KEY=VALUE           set one existing value (repeatable)
  --workdir DIR                        checkpoints, tensorboard events, config.json
  --verbose                            tracebacks for user errors too

Example:
  >>> from train.cli import split_overrides
  >>> split_overrides(["--config", "mqar", "--config.train.num_steps=5", "--workdir", "w"])
  (['--config', 'mqar', '--workdir', 'w'], [('train.num_steps', '5')])
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import traceback
from typing import Callable, Sequence

from attn.errors import UserError


STATUS_USER_ERROR = 2
STATUS_NON_FINITE = 3
STATUS_CHECKPOINT = 4


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: ``target`` is ``"module:function"``, ``function(argv, prog=...) -> int``."""

    target: str
    help: str

    def load(self) -> Callable[[list[str]], int]:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    "train": Command("train.cli:train_main", "train and evaluate a config (same flags as python -m train)"),
    "generate": Command("models.generate:main", "stream text from a pretrained model"),
    "perplexity": Command("models.perplexity:main", "perplexity of a pretrained model on the pydoc text"),
    "export": Command("models.export:main", "export a run or a checkpoint as safetensors (hf or native)"),
}


# --------------------------------------------------------------------------- errors
def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (newlines and runs of spaces collapsed)."""
    return " ".join(str(e).split()) or type(e).__name__


def guarded(prog: str, body: Callable[[], int], *, verbose: bool = False) -> int:
    """Run ``body()``; a ``UserError`` becomes one line on stderr and status 2.

    Everything else propagates with its traceback (a bug). ``verbose`` also prints the
    traceback of a user error, before its line.

    Example:
      >>> def bad():
      ...     raise UserError("config key train.num_steps=-5: must be >= 1")
      >>> import contextlib, io
      >>> err = io.StringIO()
      >>> with contextlib.redirect_stderr(err):
      ...     guarded("attnlab train", bad)
      2
      >>> err.getvalue()
      'attnlab train: error: config key train.num_steps=-5: must be >= 1\\n'
    """
    try:
        return body()
    except UserError as e:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return STATUS_USER_ERROR


# --------------------------------------------------------------------------- train
def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate ``--config.KEY=VALUE`` / ``--config.KEY VALUE`` from the other arguments."""
    rest, overrides, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            key, eq, value = a[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{a} needs a value: {a}=VALUE")
                value, i = argv[i + 1], i + 1
            if not key:
                raise UserError(f"{a}: expected --config.SECTION.KEY=VALUE")
            overrides.append((key, value))
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def _train_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train and evaluate a config; a run in the same --workdir resumes.",
        epilog="Single values: --config.SECTION.KEY=VALUE (existing keys only), e.g. "
               "--config.train.num_steps=200. Exit status: 2 user error, 3 non-finite, "
               "4 checkpoint error, 128+N signal N.")
    from train.config_args import shipped_configs

    p.add_argument("--config", required=True, metavar="NAME|PATH[:key=value,...]",
                   help=f"a shipped config ({', '.join(shipped_configs())}) or a config file; "
                        f"the text after ':' goes to its get_config(arg)")
    p.add_argument("--workdir", required=True, help="directory for checkpoints and tensorboard events")
    p.add_argument("--verbose", "-v", action="store_true", help="show tracebacks of user errors")
    return p


def _setup_logging() -> None:
    # Orbax logs every checkpoint step at INFO through absl; keep those quiet and show
    # this project's own INFO lines (resume, impl choices, evals without a bar).
    from absl import flags as absl_flags
    from absl import logging as absl_logging

    if not absl_flags.FLAGS.is_parsed():  # no absl app here: stop its "before flag parsing" note
        absl_flags.FLAGS.mark_as_parsed()
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.basicConfig(format="%(levelname)s:%(name)s: %(message)s")  # no-op if already set up
    for name in ("train", "attn", "models"):
        logging.getLogger(name).setLevel(logging.INFO)


def build_train_config(spec: str, overrides: Sequence[tuple[str, str]]):
    """``load_config(spec)`` with the ``--config.KEY=VALUE`` overrides applied (UserError if bad)."""
    from train.config_args import apply_overrides, config_arguments, load_config

    try:
        config = load_config(spec)
    except UserError:
        raise
    except ValueError as e:  # a config's own check of its arguments
        raise UserError(f"--config {spec}: {one_line(e)}") from e
    return apply_overrides(config, overrides, config_args=config_arguments(spec),
                           config_name=spec.partition(":")[0])


def train_main(argv: Sequence[str] | None = None, prog: str = "attnlab train") -> int:
    """``attnlab train`` / ``python -m train``: parse, validate, train, print the results.

    The last line printed is the headline metric of the config (its ``metric`` key),
    e.g. ``FINAL EVAL ACCURACY: 1.0000`` or ``FINAL EVAL BITS_PER_BYTE: 2.3100``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or "-v" in argv
    return guarded(prog, lambda: _train(argv, prog), verbose=verbose)


def _train(argv: list[str], prog: str) -> int:
    rest, overrides = split_overrides(argv)
    args = _train_parser(prog).parse_args(rest)
    _setup_logging()
    config = build_train_config(args.config, overrides)
    # Before anything else touches a device: a multi-process run (config section
    # `distributed`, JAX_* variables, or a TPU pod / SLURM job) must join its peers before
    # the backend starts; a single-process run returns at once.
    import jax

    from train import distributed

    section = config.get("distributed", None)
    try:
        dist = distributed.DistributedConfig.from_dict(
            section.to_dict() if hasattr(section, "to_dict") else (section or {}))
        distributed.initialize(dist)
    except UserError:
        raise
    except ValueError as e:  # bad section values or JAX_* variables
        raise UserError(one_line(e)) from e
    from train.checkpoint import CheckpointError
    from train.trainer import NonFiniteLossError, TrainingInterrupted, train_and_evaluate

    try:
        metrics = train_and_evaluate(config, args.workdir)
    except NonFiniteLossError as e:
        print(f"STOPPED: {e}", file=sys.stderr)
        return STATUS_NON_FINITE
    except CheckpointError as e:  # unwritable folder, failed save, nothing loadable
        print(f"CHECKPOINT ERROR: {e}", file=sys.stderr)
        return STATUS_CHECKPOINT
    except TrainingInterrupted as e:  # SIGINT / SIGTERM: the step was saved first
        print(f"STOPPED: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    if jax.process_index() != 0:  # every process holds the same (replicated) metrics
        return 0
    print(format_results(metrics))
    return 0


def format_results(metrics: dict) -> str:
    """The ``final metrics:`` block and, last, ``FINAL EVAL <METRIC>: value``.

    Example:
      >>> print(format_results({"eval/bits_per_byte": 2.31, "eval/accuracy": 0.4,
      ...                       "metric": "eval/bits_per_byte"}))
      final metrics:
        eval/accuracy: 0.4000
        eval/bits_per_byte: 2.3100
        metric: eval/bits_per_byte
      FINAL EVAL BITS_PER_BYTE: 2.3100
    """
    lines = [f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in sorted(metrics.items())]
    out = "final metrics:\n" + "\n".join(lines)
    key = metrics.get("metric")
    if key in metrics:
        out += f"\nFINAL {key.replace('/', ' ').upper()}: {metrics[key]:.4f}"
    return out


# --------------------------------------------------------------------------- attnlab
def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items())
    return (f"usage: attnlab [--verbose] COMMAND [ARGS...]\n\ncommands:\n{rows}\n\n"
            f"'attnlab COMMAND --help' shows the flags of one command.")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``attnlab`` console script: ``attnlab [--verbose] COMMAND ARGS...``.

    Example:
      >>> import contextlib, io
      >>> out = io.StringIO()
      >>> with contextlib.redirect_stdout(out):
      ...     status = main(["--help"])
      >>> status, "perplexity" in out.getvalue()
      (0, True)
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    lead, verbose = [], False
    while argv and argv[0].startswith("-"):  # options before the command
        lead.append(argv.pop(0))
    if any(a in ("-h", "--help") for a in lead):
        print(_usage())
        return 0
    if not argv and not lead:
        print(_usage(), file=sys.stderr)
        return STATUS_USER_ERROR
    for a in lead:
        if a in ("--verbose", "-v"):
            verbose = True
        else:
            print(f"attnlab: error: unknown option {a!r} before the command\n{_usage()}", file=sys.stderr)
            return STATUS_USER_ERROR
    if not argv or argv[0] not in COMMANDS:
        got = argv[0] if argv else "nothing"
        print(f"attnlab: error: unknown command {got!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return STATUS_USER_ERROR
    name, rest = argv[0], argv[1:]
    if verbose and "--verbose" not in rest:
        rest.append("--verbose")
    fn = COMMANDS[name].load()
    # Each command handles its own user errors; this catches those raised before it can.
    return guarded(f"attnlab {name}", lambda: fn(rest, prog=f"attnlab {name}"), verbose=verbose)


if __name__ == "__main__":
    sys.exit(main())
