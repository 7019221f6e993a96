"""Feed-forward layers by name, so the layer pattern picks the FFN as it picks attention.

``LMConfig.ffn`` is a comma-separated pattern of the names registered here ("swiglu",
"moe", ...), zipped with the attention pattern (a one-name pattern applies to every
layer); ``LMConfig.ffn_overrides`` sets per-FFN config fields. An FFN file calls
``register(FFN(...))`` at import; every module of this package is imported on the first
lookup (a ``pkgutil`` scan, as ``attn.registry`` does), and ``models.transformer``
registers its dense SwiGLU itself. No if/elif chain names them.

An FFN's module follows ``module(config, name=...)(x_BTD) -> y_BTD``; layers with
auxiliary losses sow them into ``"aux_loss"``, statistics into ``"moe_stats"``, and
non-gradient state (the MoE balance bias) lives in ``"moe_state"`` (see
``models/ffn/moe.py``).

Example:
  >>> from models import ffn
  >>> import models.transformer  # registers "swiglu"
  >>> {"swiglu", "moe"} <= set(ffn.names())
  True
  >>> ffn.get("moe").make_config(dict(d_model=32, ffn_dim=96), {"num_experts": 4}).num_experts
  4
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Mapping

from attn.errors import UserError

_REGISTRY: dict[str, "FFN"] = {}
_builtins_loaded = False


@dataclasses.dataclass(frozen=True)
class FFN:
    """One registered feed-forward layer.

    Attributes:
      name: registry name ("swiglu", "moe").
      module: linen module class; ``module(config, name=...)(x_BTD) -> y_BTD``.
      make_config: ``(common: dict, overrides: dict) -> config``; ``common`` holds the
        model-wide fields (``d_model``, ``ffn_dim``, ``dtype``, ``param_dtype``).
      stats: ``(config) -> dict(params, active_params, flops_per_token)``.
      description: one line for tables.
    """

    name: str
    module: type
    make_config: Callable[[Mapping[str, Any], Mapping[str, Any]], Any]
    stats: Callable[[Any], dict] | None = None
    description: str = ""


def register(ffn: FFN) -> FFN:
    """Register ``ffn`` under its name (re-registering replaces it); returns it."""
    if not isinstance(ffn, FFN):
        raise ValueError(f"ffn.register: expected an FFN, got {type(ffn).__name__}")
    _REGISTRY[ffn.name] = ffn
    return ffn


def _load_builtins() -> None:
    """Import every module of this package (they register themselves) and the SwiGLU."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("models.transformer")
        for info in pkgutil.walk_packages(__path__, __name__ + "."):
            importlib.import_module(info.name)


def names() -> tuple[str, ...]:
    """Registered FFN names, sorted."""
    _load_builtins()
    return tuple(sorted(_REGISTRY))


def get(name: str) -> FFN:
    """The ``FFN`` registered as ``name``; ``UserError`` listing the names otherwise."""
    _load_builtins()
    if name not in _REGISTRY:
        raise UserError(f"unknown FFN {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def config_factory(config_cls: type, ffn_name: str) -> Callable[[Mapping, Mapping], Any]:
    """A ``make_config`` for a dataclass: (common ∩ fields) + overrides; unknown keys raise.

    Example:
      >>> @dataclasses.dataclass(frozen=True)
      ... class C:
      ...     d_model: int
      ...     width: int = 2
      >>> config_factory(C, "toy")({"d_model": 8, "dtype": "f32"}, {"width": 3})
      C(d_model=8, width=3)
    """
    fields = {f.name for f in dataclasses.fields(config_cls)}

    def make(common: Mapping[str, Any], overrides: Mapping[str, Any]):
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise UserError(f"unknown config key(s) {unknown} for FFN {ffn_name!r}; accepted: {sorted(fields)}")
        kw = {k: v for k, v in dict(common).items() if k in fields}
        kw.update(overrides)
        return config_cls(**kw)

    return make
