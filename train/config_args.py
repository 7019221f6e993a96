"""Config loading and parsing: ``--config NAME|PATH[:key=value,...]`` and ``--config.a.b=v``.

Config files call ``parse_arg_string(arg, defaults)`` in ``get_config(arg)`` so that each
file only lists its knobs and their defaults; the parsing, type coercion and error
messages live here once. ``load_config`` resolves a bare name (``mqar``) to the shipped
``configs/mqar.py`` (the ``configs`` package is installed with attnlab) and a path to
that file; ``apply_overrides`` sets single values by dotted key. Every mistake raises
``attn.errors.UserError`` naming the key and the value (the command line prints it as
one line).

Example:
  >>> from train.config_args import parse_arg_string
  >>> parse_arg_string("attn=gqa,steps=100", {"attn": "mha", "steps": 400, "fast": False})
  {'attn': 'gqa', 'steps': 100, 'fast': False}
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import os
import pkgutil
from typing import Any, Iterable, Sequence

from attn.errors import UserError

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
        raise UserError(
            f"config argument {key}={text!r}: expected {type(default).__name__} "
            f"like the default {default!r}"
        ) from None
    return text


def parse_arg_string(arg: str | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """Parse ``"key=value,key=value"`` over ``defaults``; unknown keys raise UserError.

    Args:
      arg: the text after ``:`` in ``--config configs/x.py:arg`` (None or "" = defaults).
      defaults: every accepted key with its default; values are coerced to its type.

    Returns:
      A new dict: ``defaults`` updated with the parsed values.

    Example:
      >>> parse_arg_string("size=S", {"size": "M"})
      {'size': 'S'}
      >>> parse_arg_string("sise=S", {"size": "M"})
      Traceback (most recent call last):
      ...
      attn.errors.UserError: unknown config argument 'sise' (in 'sise=S'); known: ['size']
    """
    out = dict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise UserError(f"config argument {item!r} is not key=value; known: {sorted(defaults)}")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in defaults:
            raise UserError(f"unknown config argument {key!r} (in {item!r}); known: {sorted(defaults)}")
        out[key] = _coerce(key, value, defaults[key])
    return out


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise UserError naming ``key``.

    Example:
      >>> check_choice("attn", "gqa", ("mha", "gqa", "mqa"))
      'gqa'
    """
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"config argument {key}={value!r}: expected one of {choices}")
    return value


def check_at_least(key: str, value: Any, low: int | float) -> Any:
    """Return ``value`` if it is >= ``low``, else raise UserError naming the argument ``key``.

    Configs check their own arguments with it before deriving values from them, so that
    ``steps=-5`` is reported as ``steps``, not as a warmup computed from it.

    Example:
      >>> check_at_least("steps", -5, 1)
      Traceback (most recent call last):
      ...
      attn.errors.UserError: config argument steps=-5: must be >= 1
    """
    if not value >= low:
        raise UserError(f"config argument {key}={value!r}: must be >= {low}")
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
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(
            f"unknown config key {section}.{unknown[0]!s}; known keys in {section}: {sorted(known)}"
        )
    return cls(**d)


def _impl_fields(x: Any, path: str):
    """Every ``(dotted path, value)`` of a field named ``impl`` in nested config objects."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            if not f.name.startswith("_"):
                yield from _impl_fields(getattr(x, f.name), f"{path}.{f.name}")
        for i, layer in enumerate(getattr(x, "layer_configs", ()) or ()):  # LMConfig's built layers
            yield from _impl_fields(layer, f"{path}.layer[{i}]")
    elif hasattr(x, "items"):
        for k, v in x.items():
            yield from _impl_fields(v, f"{path}.{k}")
    if path.rsplit(".", 1)[-1] == "impl" and (x is None or isinstance(x, str)):
        yield path, x


def check_impl_names(section: Any, name: str) -> None:
    """Raise UserError if a field ``impl`` anywhere in ``section`` names no attention impl.

    ``section`` is a validated config object (dataclasses, mappings, nested); every field
    called ``impl`` must be None, "auto" or registered in ``attn.core``.

    Example:
      >>> import dataclasses
      >>> @dataclasses.dataclass
      ... class Layer:
      ...     impl: str = "auto"
      >>> check_impl_names({"enc": Layer("xla_chunkd")}, "model")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      attn.errors.UserError: model.enc.impl='xla_chunkd' is not a registered attention impl; known: 'auto', ...
    """
    from attn import core

    known = sorted(core.registered_impls())
    for path, value in _impl_fields(section, name):
        if value is not None and value != "auto" and value not in known:
            shown = ", ".join(known) if len(", ".join(known)) < 600 else ", ".join(known[:20]) + ", ..."
            raise UserError(f"{path}={value!r} is not a registered attention impl; known: 'auto', {shown}")


# --------------------------------------------------------------------------- loading
SHIPPED_PACKAGE = "configs"
# Modules of the configs package that are helpers, not experiments.
_NOT_CONFIGS = frozenset({"common"})


def shipped_configs() -> tuple[str, ...]:
    """Names of the configs installed with attnlab (``--config NAME`` accepts them).

    Example:
      >>> "mqar" in shipped_configs() and "common" not in shipped_configs()
      True
    """
    pkg = importlib.import_module(SHIPPED_PACKAGE)
    return tuple(sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                        if not m.ispkg and not m.name.startswith("_") and m.name not in _NOT_CONFIGS))


def _shipped_dir() -> str:
    return os.path.realpath(os.path.dirname(importlib.import_module(SHIPPED_PACKAGE).__file__))


def config_module(name_or_path: str):
    """The module of a config: a shipped name (``mqar``) or a ``.py`` file path.

    A file inside the shipped package is imported as ``configs.<name>`` (so configs can
    build on each other with ordinary imports); any other file is loaded by path.
    A path that exists wins over a shipped name.

    Example:
      >>> config_module("mqar").__name__
      'configs.mqar'
    """
    if os.path.isfile(name_or_path):
        path = os.path.realpath(name_or_path)
        stem = os.path.splitext(os.path.basename(path))[0]
        if os.path.dirname(path) == _shipped_dir() and stem in shipped_configs():
            return importlib.import_module(f"{SHIPPED_PACKAGE}.{stem}")
        spec = importlib.util.spec_from_file_location("_config_" + stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if name_or_path in shipped_configs():
        return importlib.import_module(f"{SHIPPED_PACKAGE}.{name_or_path}")
    stem = os.path.splitext(os.path.basename(name_or_path))[0]
    hint = f" (did you mean the shipped --config {stem}?)" if stem in shipped_configs() else ""
    raise UserError(f"--config {name_or_path!r} is neither a file nor a shipped config{hint}; "
                    f"shipped: {', '.join(shipped_configs())}")


def load_config(spec: str):
    """Load ``"NAME|path/to/config.py[:args]"`` and return its ``get_config(args)``.

    The same thing ``--config`` does on the command line, for tests and notebooks.
    Mistakes in the arguments raise ``UserError`` naming the argument.

    Example:
      >>> load_config("mqar:attn=gqa").model.attn
      'gqa'
      >>> load_config("mqar:steps=-5")
      Traceback (most recent call last):
      ...
      attn.errors.UserError: config argument steps=-5: must be >= 1
    """
    path, _, arg = spec.partition(":")
    module = config_module(path)
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"--config {path!r} defines no get_config(arg)")
    return module.get_config(arg or None)


def config_arguments(spec: str) -> tuple[str, ...]:
    """The ``:key=value`` arguments a config accepts (its ``ARGS``), for error hints."""
    try:
        return tuple(sorted(getattr(config_module(spec.partition(":")[0]), "ARGS", {})))
    except UserError:
        return ()


# --------------------------------------------------------------------------- overrides
def _parse_value(key: str, text: str, current: Any) -> Any:
    """``text`` as the type of the value it replaces (literal syntax when there is none)."""
    def literal():
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text  # a bare word: a string

    try:
        if isinstance(current, bool):
            return _coerce(key, text, current)
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if current is None:
            return literal()
        if isinstance(current, (tuple, list)):
            value = literal()
            if not isinstance(value, (tuple, list)):
                raise ValueError(text)
            return tuple(value) if isinstance(current, tuple) else list(value)
        if hasattr(current, "items"):
            value = literal()
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
    except ValueError:
        raise UserError(f"--config.{key}={text!r}: expected {type(current).__name__} like the "
                        f"current value {current!r}") from None
    return literal()


def apply_overrides(config, overrides: Sequence[tuple[str, str]], *, config_args: Sequence[str] = (),
                    config_name: str = "NAME"):
    """Set ``config[a][b] = value`` for each ``("a.b", "value")``; only existing keys.

    Args:
      config: the ConfigDict (or nested dicts) ``get_config`` returned; changed in place.
      overrides: dotted keys and the text of their values, as given on the command line
        (``--config.train.num_steps=200``). The text is read as the type of the value it
        replaces (``None``: a Python literal, else a string).
      config_args: the config's own ``:key=value`` arguments, named in the error for a
        key that does not exist (they are how a config changes its structure, e.g.
        ``text:data=PATH`` switches to a token file).
      config_name: how the config was named on the command line, for that hint.

    Returns:
      ``config``.

    Example:
      >>> from ml_collections import ConfigDict
      >>> c = ConfigDict({"train": {"num_steps": 10, "seed": 0}})
      >>> apply_overrides(c, [("train.num_steps", "3")]).train.num_steps
      3
      >>> apply_overrides(c, [("train.steps", "3")])
      Traceback (most recent call last):
      ...
      attn.errors.UserError: unknown config key train.steps (--config.train.steps=3); keys in train: ['num_steps', 'seed']
    """
    for key, text in overrides:
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts):
            here = ".".join(parts[: depth + 1])
            keys = sorted(node.keys()) if hasattr(node, "keys") else None
            if keys is None or part not in keys:
                where = ".".join(parts[:depth]) or "the config"
                if keys is None:
                    msg = f"config key {'.'.join(parts[:depth])} is a value, not a section"
                else:
                    msg = f"unknown config key {here} (--config.{key}={text}); keys in {where}: {keys}"
                if config_args:
                    msg += (f"; to change what the config builds use its own arguments: "
                            f"--config {config_name}:key=value with key in {list(config_args)}")
                raise UserError(msg)
            if depth < len(parts) - 1:
                node = node[part]
        value = _parse_value(key, text, node[parts[-1]])
        try:
            node[parts[-1]] = value
        except (TypeError, ValueError, AttributeError) as e:  # ConfigDict's own type check
            raise UserError(f"--config.{key}={text!r}: {e}") from None
    return config
