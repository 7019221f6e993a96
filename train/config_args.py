"""Parsing of ``configs/x.py:key=value,key=value`` arguments, shared by every config file.

Config files call ``parse_arg_string(arg, defaults)`` in ``get_config(arg)`` so that each
file only lists its knobs and their defaults; the parsing, type coercion and error
messages live here once.

Example:
  >>> from train.config_args import parse_arg_string
  >>> parse_arg_string("attn=gqa,steps=100", {"attn": "mha", "steps": 400, "fast": False})
  {'attn': 'gqa', 'steps': 100, 'fast': False}
"""

from __future__ import annotations

from typing import Any, Iterable

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(key: str, text: str, default: Any) -> Any:
    """Convert ``text`` to the type of ``default`` (str when the default is None)."""
    text = text.strip()
    try:
        if isinstance(default, bool):  # before int: bool is a subclass of int
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ValueError(
            f"config argument {key}={text!r}: expected a {type(default).__name__} "
            f"like the default {default!r}"
        ) from None
    return text


def parse_arg_string(arg: str | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """Parse ``"key=value,key=value"`` over ``defaults``; unknown keys raise ValueError.

    Args:
      arg: the text after ``:`` in ``--config configs/x.py:arg`` (None or "" = defaults).
      defaults: every accepted key with its default; values are coerced to its type.

    Returns:
      A new dict: ``defaults`` updated with the parsed values.

    Example:
      >>> parse_arg_string("size=S", {"size": "M"})
      {'size': 'S'}
    """
    out = dict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(
                f"config argument {item!r} is not key=value; known keys: {sorted(defaults)}"
            )
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"unknown config argument {key!r}; known keys: {sorted(defaults)}"
            )
        out[key] = _coerce(key, value, defaults[key])
    return out


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise ValueError naming ``key``.

    Example:
      >>> check_choice("attn", "gqa", ("mha", "gqa", "mqa"))
      'gqa'
    """
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"config argument {key}={value!r}: expected one of {choices}")
    return value


def dataclass_from_dict(cls, d: Any, section: str):
    """``cls(**d)`` for a config section, with a clear error for unknown keys.

    Args:
      cls: a dataclass whose fields are the section's keys.
      d: a dict or ml_collections ConfigDict.
      section: the section's name in the config, used in error messages ("train").

    Example:
      >>> import dataclasses
      >>> @dataclasses.dataclass
      ... class C:
      ...     a: int = 1
      >>> dataclass_from_dict(C, {"a": 2}, "sec")
      C(a=2)
    """
    import dataclasses

    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(
            f"unknown config key {section}.{unknown[0]!s}; known keys in {section}: {sorted(known)}"
        )
    return cls(**d)


def load_config(spec: str):
    """Load ``"path/to/config.py[:args]"`` by file path and return ``get_config(args)``.

    The same thing ``--config`` does on the command line, for tests and notebooks.

    Example:
      >>> cfg = load_config("configs/mqar.py:attn=gqa")   # doctest: +SKIP
      >>> cfg.model.attn                                   # doctest: +SKIP
      'gqa'
    """
    import importlib.util
    import os

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    name = "_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
