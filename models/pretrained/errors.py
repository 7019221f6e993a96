"""The error every bad-input case of the importers raises: one line naming the file and the cause."""

from __future__ import annotations

from attn.errors import UserError


class PretrainedError(UserError):
    """A checkpoint that cannot be imported (missing, truncated, unsupported, inconsistent).

    Example:
      >>> issubclass(PretrainedError, UserError) and issubclass(PretrainedError, ValueError)
      True
    """
