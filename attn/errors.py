"""``UserError``: the base class of every error that a user's input causes.

Bad config values or keys, unknown names, a mesh larger than the machine, a bad data or
checkpoint file: the command-line entry points (``python -m train``, ``attnlab ...``)
print such an error as one line and exit with status 2, and show the traceback only with
``--verbose``. Anything else is a bug and keeps its traceback. It subclasses
``ValueError`` so that callers catching ``ValueError`` keep working.

Example:
  >>> from attn.errors import UserError
  >>> issubclass(UserError, ValueError)
  True
  >>> str(UserError("config key train.steps=-5: must be positive"))
  'config key train.steps=-5: must be positive'
"""

from __future__ import annotations


class UserError(ValueError):
    """An expected error caused by the user's input; its message is one line naming the key and value."""
