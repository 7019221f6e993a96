"""The error every bad-input case of the importers raises: one line naming the file and the cause."""

from __future__ import annotations

try:  # the project's user-error class, when train/config_args.py provides it
    from train.config_args import UserError as _Base  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the tree
    _Base = ValueError


class PretrainedError(_Base if issubclass(_Base, ValueError) else ValueError):
    """A checkpoint that cannot be imported (missing, truncated, unsupported, inconsistent).

    Example:
      >>> issubclass(PretrainedError, ValueError)
      True
    """
