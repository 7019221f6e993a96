"""Attention mechanisms by name, so models and configs pick attention with a string.

A mechanism file defines its layer, ``Config``, ``init_cache``, ``stats`` and optionally
``small_config`` and calls ``register(Mechanism(...))`` at import time. Adding a mechanism
means writing that one file (and its test) anywhere under the ``attn`` package, including
subpackages such as ``attn/linear/``: on the first lookup every module of the package is
imported (a ``pkgutil`` scan), so ``import attn.registry; attn.registry.get("mha")``
works and no central list names the modules. A project outside attnlab just imports its
own module, which registers itself. There is no if/elif dispatch.

``make_config(common, overrides)`` builds the mechanism's ``Config`` from the model's
shared fields (``d_model``, ``num_heads``, ``head_dim``, ``dtype``, ``param_dtype``,
``impl``, ``rope``, ``norm_eps``, ...; keys the mechanism does not use are ignored) plus
per-mechanism ``overrides`` (every key must be a field the mechanism accepts, else
``ValueError`` naming the key and the mechanism).

Example:
  >>> from attn import registry
  >>> mech = registry.get("gqa")
  >>> cfg = mech.make_config(dict(d_model=64, num_heads=8), {"num_kv_heads": 4})
  >>> cfg.num_kv_heads, "mha" in registry.names()
  (4, True)
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Iterable, Mapping

_REGISTRY: dict[str, "Mechanism"] = {}
_builtins_loaded = False


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """One registered attention mechanism.

    Attributes:
      name: registry name ("mha", "gqa", ...).
      module: the linen module class; ``module(config)(x_BTD, *, positions_BT,
        segment_ids_BT=None, cache=None) -> (y_BTD, cache)``.
      config_cls: the frozen ``Config`` dataclass of the layer.
      init_cache: ``(config, batch, max_len, dtype=None) -> cache pytree``.
      stats: ``(config, seq_len) -> dict(params, kv_bytes_per_token, flops_per_token,
        state_bytes)``.
      make_config: ``(common: dict, overrides: dict) -> config``.
      description: one line for tables and the README.
      order_free: the layer mixes tokens only through ``attention`` masked by positions
        and segments, so tokens may be stored in any order (context parallelism's zigzag
        reorders them). False for layers with convolutions or shifts along T.
      small_config: ``(width) -> overrides`` that make the mechanism sensible in a small
        model (``d_model = width`` of 32-256, 4 heads: configs/mqar.py, benchmarks/zoo.py)
        where its defaults are sized for a large one; ``None`` when the defaults fit.

    Example:
      >>> from attn import registry
      >>> registry.get("mqa").description
      'multi-query attention: one shared K/V head'
    """

    name: str
    module: type
    config_cls: type
    init_cache: Callable[..., Any]
    stats: Callable[..., dict]
    make_config: Callable[[Mapping[str, Any], Mapping[str, Any]], Any]
    description: str = ""
    order_free: bool = True
    small_config: Callable[[int], dict] | None = None


def register(mechanism: Mechanism) -> Mechanism:
    """Register ``mechanism`` under its name (re-registering replaces it); returns it."""
    if not isinstance(mechanism, Mechanism):
        raise ValueError(f"register: expected a Mechanism, got {type(mechanism).__name__}")
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


def _load_builtins() -> None:
    """Import every module of the ``attn`` package once; mechanism modules register themselves.

    An import error propagates: every module must import on a CPU-only install (the
    doctest run imports them all too), and a silently missing mechanism is worse.
    """
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True  # set first: a module that looks names up while loading
        package = importlib.import_module(__name__.rpartition(".")[0])
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)


def names() -> tuple[str, ...]:
    """Registered mechanism names, sorted.

    Example:
      >>> from attn import registry
      >>> {"mha", "gqa", "mqa"} <= set(registry.names())
      True
    """
    _load_builtins()
    return tuple(sorted(_REGISTRY))


def get(name: str) -> Mechanism:
    """The ``Mechanism`` registered as ``name``; ``ValueError`` listing names otherwise.

    Example:
      >>> from attn import registry
      >>> registry.get("mha").name
      'mha'
    """
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention mechanism {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def make_config(name: str, common: Mapping[str, Any], overrides: Mapping[str, Any] | None = None):
    """Shorthand for ``get(name).make_config(common, overrides or {})``."""
    return get(name).make_config(dict(common), dict(overrides or {}))


def small_overrides(names_: Iterable[str], width: int) -> dict[str, dict]:
    """``{name: get(name).small_config(width)}`` for the named mechanisms that define one.

    The ``attn_overrides`` of a small LM (``d_model = width``, 4 heads) whose pattern uses
    ``names_``; mechanisms without the hook, and repeats, are left out.

    Example:
      >>> from attn import registry
      >>> registry.small_overrides(["gqa", "mha", "gqa"], 64)
      {'gqa': {'num_kv_heads': 2}}
    """
    out = {}
    for name in dict.fromkeys(names_):
        hook = get(name).small_config
        if hook is not None:
            out[name] = dict(hook(width))
    return out


# --------------------------------------------------------------------------- helpers
def dataclass_config_factory(
    config_cls: type,
    mechanism: str,
    *,
    fixed: Mapping[str, Any] | None = None,
    defaults: Callable[[dict], dict] | None = None,
) -> Callable[[Mapping[str, Any], Mapping[str, Any]], Any]:
    """A ``make_config`` for a dataclass ``Config``: (common ∩ fields) + overrides + defaults + pins.

    Args:
      config_cls: the layer's dataclass.
      mechanism: name used in error messages.
      fixed: fields the mechanism pins, as values or ``fn(fields_so_far)``
        (overriding one raises ``ValueError``).
      defaults: ``fn(fields_so_far) -> dict`` of mechanism defaults (overridable).

    Example:
      >>> import dataclasses
      >>> @dataclasses.dataclass(frozen=True)
      ... class C:
      ...     d_model: int
      ...     window: int | None = None
      >>> mk = dataclass_config_factory(C, "toy")
      >>> mk({"d_model": 8, "num_heads": 2}, {"window": 4})
      C(d_model=8, window=4)
    """
    fields = {f.name for f in dataclasses.fields(config_cls)}
    fixed = dict(fixed or {})

    def make(common: Mapping[str, Any], overrides: Mapping[str, Any]):
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"unknown config key(s) {unknown} for attention mechanism {mechanism!r}; "
                f"accepted: {sorted(fields - set(fixed))}"
            )
        kw = {k: v for k, v in dict(common).items() if k in fields}
        kw.update(overrides)
        # Defaults and pins see the overridden fields (a gqa default K follows num_heads).
        if defaults is not None:
            kw.update({k: v for k, v in defaults(kw).items() if k not in overrides})
        pins = {k: v(kw) if callable(v) else v for k, v in fixed.items()}
        clash = sorted(set(overrides) & set(pins))
        if clash:
            raise ValueError(
                f"attention mechanism {mechanism!r} fixes "
                f"{', '.join(f'{k}={pins[k]!r}' for k in clash)}; cannot override {clash}"
            )
        kw.update(pins)
        return config_cls(**kw)

    return make
