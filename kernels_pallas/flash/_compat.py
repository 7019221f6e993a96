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


# --------------------------------------------------------------------------- Mosaic GPU
# Pallas Mosaic GPU (Hopper) names. GPU interpret mode: JAX 0.10 has
# ``jax._src.pallas.mosaic_gpu.interpret.params.InterpretGPUParams`` (private); later
# releases may export it from ``jax.experimental.pallas.mosaic_gpu``. The 0.10
# interpreter lacks ``layout_cast``, the layout-annotated ``plgpu.load`` and
# ``run_state`` (the kernels add a fresh product instead when interpreting); the shims
# below cover the first two. It also lacks transposed wgmma operands and dynamic-slice
# reads, which the kernels cannot avoid, so ``gpu.supports`` refuses interpret mode.
@functools.lru_cache(maxsize=None)
def _mgpu_module():
    """``jax.experimental.pallas.mosaic_gpu`` or None when this JAX lacks it."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:  # pragma: no cover - depends on the installed JAX
        return None
    return plgpu


def mgpu_available() -> bool:
    """Whether this JAX ships Pallas Mosaic GPU."""
    return _mgpu_module() is not None


def mgpu_interpret_params():
    """A GPU interpret-mode parameter object (runs Mosaic GPU kernels on CPU), or None."""
    plgpu = _mgpu_module()
    for name in ("InterpretParams", "InterpretGPUParams"):
        cls = getattr(plgpu, name, None)
        if cls is not None:
            return cls()
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:  # pragma: no cover
        return None
    return InterpretGPUParams()


def mgpu_load_vec(ref, layout, *, interpret: bool):
    """Load a 1-D ref (SMEM or GMEM) into registers with a WGMMA-compatible layout.

    On hardware ``plgpu.load`` fixes the layout so the vector broadcasts against WGMMA
    tiles; the 0.10 interpreter has no rule for it, and values carry no layout there,
    so a plain read is equivalent.
    """
    if interpret:
        return ref[...]
    return _mgpu_module().load(ref, (), layout=layout)


def mgpu_layout(x, layout, *, interpret: bool):
    """``plgpu.layout_cast(x, layout)``; identity in interpret mode.

    The 0.10 GPU interpreter has no rule for ``layout_cast`` (later ones treat it as
    the no-op it is there: interpreted values carry no register layout).
    """
    if interpret:
        return x
    return _mgpu_module().layout_cast(x, layout)
