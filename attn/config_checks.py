"""Validation shared by the mechanism ``Config`` dataclasses; errors name field and value.

Example:
  >>> from attn.config_checks import positive_int
  >>> positive_int("Config", "num_heads", 4)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def positive_int(owner: str, field: str, value) -> None:
    """Raise ``ValueError("{owner}.{field} must be a positive int, ...")`` unless it is one."""
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{owner}.{field} must be a positive int, got {value!r}")


def check_runtime_fields(config, owner: str = "Config") -> None:
    """Check ``impl`` and ``norm_eps``, and resolve ``dtype`` / ``param_dtype`` in place.

    For frozen dataclasses with those four fields; dtypes may be given as strings.
    """
    if not isinstance(config.impl, str):
        raise ValueError(f"{owner}.impl must be a string, got {config.impl!r}")
    if not config.norm_eps > 0:
        raise ValueError(f"{owner}.norm_eps must be > 0, got {config.norm_eps!r}")
    for field in ("dtype", "param_dtype"):
        value = getattr(config, field)
        try:
            object.__setattr__(config, field, jnp.dtype(value))
        except TypeError as e:
            raise ValueError(f"{owner}.{field}: not a dtype: {value!r}") from e
