"""Version shims for the Pallas APIs this package uses (JAX 0.10.x and 0.11.x).

Names moved between releases; every kernel imports them from here, so a rename is
fixed in one place:

* TPU interpret params: ``pltpu.InterpretParams`` (0.7+), formerly
  ``pltpu.TPUInterpretParams``.
* TPU compiler params: ``pltpu.CompilerParams`` (0.7+), formerly
  ``pltpu.TPUCompilerParams`` (removed in 0.8.1).
* Triton compiler params: ``jax.experimental.pallas.triton.CompilerParams`` (0.7+),
  formerly ``TritonCompilerParams``. The Triton backend is deprecated as of JAX 0.11
  and may warn on import, or be missing in a later release: ``triton_available()``
  says so instead of raising at import time.
* SMEM memory space: ``pltpu.SMEM`` (0.7+), formerly ``pltpu.TPUMemorySpace.SMEM``.

Grid dimension semantics are passed as the strings ``"parallel"`` / ``"arbitrary"``,
which every version accepts.
"""

from __future__ import annotations

import functools
import warnings

from jax.experimental.pallas import tpu as pltpu


def tpu_interpret_params():
    """A fresh TPU interpret-mode parameter object (runs Mosaic kernels on CPU)."""
    cls = getattr(pltpu, "InterpretParams", None) or getattr(pltpu, "TPUInterpretParams")
    return cls()


def tpu_compiler_params(**kwargs):
    """``pltpu.CompilerParams(**kwargs)`` under whichever name this JAX has."""
    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    return cls(**kwargs)


def tpu_smem():
    """The SMEM memory space (for scalar inputs such as per-head sinks)."""
    smem = getattr(pltpu, "SMEM", None)
    if smem is None:
        smem = pltpu.TPUMemorySpace.SMEM
    return smem


def tpu_vmem(shape, dtype):
    """A VMEM scratch buffer description."""
    return pltpu.VMEM(tuple(shape), dtype)


@functools.lru_cache(maxsize=None)
def _triton_module():
    """``jax.experimental.pallas.triton`` or None (deprecated in 0.11, may be gone)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas import triton as pltriton
    except ImportError:  # pragma: no cover - depends on the installed JAX
        return None
    return pltriton


def triton_available() -> bool:
    """Whether this JAX still ships the Pallas Triton backend."""
    return _triton_module() is not None


def triton_compiler_params(*, num_warps: int, num_stages: int):
    """Triton compiler params under whichever name this JAX has."""
    mod = _triton_module()
    if mod is None:  # pragma: no cover
        raise NotImplementedError("this JAX has no Pallas Triton backend")
    cls = getattr(mod, "CompilerParams", None) or getattr(mod, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)
