"""Registers the Pallas flash kernels with ``attn.core`` (imported by ``attn.core``).

Registered implementations:

* ``pallas_tpu``           the Mosaic TPU kernel; needs ``platform == "tpu"``.
* ``pallas_gpu``           the best GPU kernel available (``resolve_gpu_kernel``): the
                           Hopper (Mosaic GPU) kernel of ``kernels_pallas/flash/gpu.py``
                           when it accepts the call (an sm90 device, bf16/fp16), else
                           the Pallas Triton kernel; needs ``platform == "gpu"``.
* ``pallas_triton``        the Pallas Triton kernel alone; needs ``platform == "gpu"``.
* ``pallas_mosaic_gpu``    the Mosaic GPU (Hopper, sm90) kernel alone.
* ``pallas_tpu_interpret`` the same TPU kernel run with ``pltpu.InterpretParams()``;
* ``pallas_triton_interpret`` the Triton kernel with ``interpret=True``;
* ``pallas_gpu_interpret`` the same GPU resolution run with ``interpret=True``: always
                           the Triton kernel, since the Mosaic GPU module refuses
                           interpret mode on JAX 0.10 (its GPU interpreter cannot run it).
                           There is therefore no ``pallas_mosaic_gpu_interpret``.

``pallas_gpu`` is an alias: it logs once which kernel it resolved to and why the
Mosaic GPU kernel refused.

Every name is registered with ``float32_out=True``: its ``fn`` also takes
``out_dtype=`` (float32: the kernel's accumulator written out unrounded), which the
context-parallel ring asks for so block outputs are merged before any rounding.

**Interpret mode is part of the contract:** the ``*_interpret`` names run the exact
kernel code on any platform (``supports()`` returns None on CPU), for tests and for CPU
users who want the kernels' semantics; they are slow and never chosen by ``"auto"``
(they are not in ``attn.core.AUTO_PREFERENCE``).

Every kernel refuses, with the reason: ``bias`` (not implemented: a ``[B,N,T,S]``
bias would have to be streamed per block — use ``xla`` / ``xla_chunked``),
``Mask.dense`` (reference implementations only), ``Mask.q_extra_range`` (the block
classification of ``masking.py`` does not know it), a ``block_mask`` whose block size is
not a multiple of a legal kernel block, and float64 on hardware.

A GPU kernel module plugs in by defining ``name``, ``supports(call, *, interpret,
out_dtype=None) -> str | None`` and ``attention(q, k, v, *, mask, scale, softcap, sinks,
interpret, out_dtype=None) -> (o, lse)``; the custom VJP around its pallas_calls is
``kernels_pallas.flash.shell``'s.

Example:
  >>> import jax
  >>> import attn.core as core
  >>> import kernels_pallas.flash.register  # noqa: F401  (until attn.core imports it)
  >>> from attn.masks import Mask
  >>> q = jax.random.normal(jax.random.key(0), (1, 16, 4, 32))
  >>> kv = jax.random.normal(jax.random.key(1), (1, 16, 2, 32))
  >>> o = core.attention(q, kv, kv, mask=Mask(causal=True), impl="pallas_gpu_interpret")
  >>> o.shape
  (1, 16, 4, 32)
"""

from __future__ import annotations

import functools
import importlib
import logging

import jax.numpy as jnp

from attn import core
from kernels_pallas.flash import _compat, gpu_triton, tpu

log = logging.getLogger(__name__)
_LOGGED: set[str] = set()

BIAS_REASON = ("bias is not implemented in the Pallas flash kernels (a [B,N,T,S] bias would "
               "have to be streamed per block); use impl='xla' or 'xla_chunked'")


def _common_reason(call: core.AttentionCall, *, interpret: bool, max_head_dim: int) -> str | None:
    if call.bias_shape is not None:
        return BIAS_REASON
    if call.mask.dense is not None:
        return "Mask.dense is only accepted by the reference implementations ('xla')"
    if call.mask.q_extra_range is not None:
        return ("Mask.q_extra_range is not in the kernels' block classification; use impl='xla' "
                "or 'xla_chunked'")
    if call.q_len == 0 or call.kv_len == 0:
        return "empty sequence (T or S is 0)"
    if not interpret and call.dtype == jnp.dtype(jnp.float64):
        return "float64 is not supported by the hardware kernels"
    if max(call.head_dim, call.value_dim) > max_head_dim:
        return f"head dims above {max_head_dim} are not supported (H={call.head_dim}, E={call.value_dim})"
    return None


def _plan_reason(make_plan, call: core.AttentionCall, interpret: bool) -> str | None:
    try:
        make_plan(call.q_shape, call.k_shape, call.v_shape, call.mask, scale=call.scale,
                  softcap=call.softcap, has_sinks=call.has_sinks, interpret=interpret)
    except NotImplementedError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------- TPU
def _tpu_supports(interpret: bool):
    def supports(call: core.AttentionCall) -> str | None:
        if not interpret and call.platform != "tpu":
            return f"needs a TPU (platform is {call.platform}); 'pallas_tpu_interpret' runs anywhere"
        return (_common_reason(call, interpret=interpret, max_head_dim=512)
                or _plan_reason(tpu.make_plan, call, interpret))
    return supports


def _tpu_fn(interpret: bool):
    def fn(q, k, v, *, mask, scale, softcap, sinks, bias, return_lse, out_dtype=None):
        if bias is not None:
            raise NotImplementedError(BIAS_REASON)
        return tpu.flash_attention_tpu(q, k, v, mask=mask, scale=scale, softcap=softcap,
                                       sinks=sinks, interpret=interpret, out_dtype=out_dtype)
    return fn


# --------------------------------------------------------------------------- GPU
class _TritonKernel:
    """The portable Pallas Triton kernel, in the shape ``resolve_gpu_kernel`` expects."""

    name = "triton"

    @staticmethod
    def supports(call: core.AttentionCall, *, interpret: bool, out_dtype=None) -> str | None:
        if not _compat.triton_available():
            return "this JAX has no Pallas Triton backend"
        return (_common_reason(call, interpret=interpret, max_head_dim=256)
                or _plan_reason(gpu_triton.make_plan, call, interpret))

    @staticmethod
    def attention(q, k, v, *, mask, scale, softcap, sinks, interpret, out_dtype=None):
        return gpu_triton.flash_attention_triton(q, k, v, mask=mask, scale=scale,
                                                 softcap=softcap, sinks=sinks, interpret=interpret,
                                                 out_dtype=out_dtype)


def _gpu_candidates():
    """GPU kernels, best first: the Hopper module when it exists, then Triton."""
    try:
        hopper = importlib.import_module("kernels_pallas.flash.gpu")
    except ModuleNotFoundError as e:
        if e.name != "kernels_pallas.flash.gpu":
            raise  # the module exists but is broken: say so, do not hide it
        hopper = None
    return ([hopper] if hopper is not None else []) + [_TritonKernel]


def resolve_gpu_kernel(call: core.AttentionCall, *, interpret: bool = False, out_dtype=None):
    """The GPU kernel that serves ``call``: ``(kernel, None)`` or ``(None, reasons)``.

    Tries the Hopper kernel (``kernels_pallas.flash.gpu``) first, then Triton; each
    candidate's ``supports`` decides (the Hopper one checks the device generation, and
    whether its blocks fit shared memory with ``o`` in ``out_dtype``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from attn.core import make_call
      >>> x = jax.ShapeDtypeStruct((1, 128, 4, 64), jnp.bfloat16)
      >>> resolve_gpu_kernel(make_call(x, x, x, platform="gpu"))[0].name
      'triton'
    """
    reasons = []
    for cand in _gpu_candidates():
        reason = cand.supports(call, interpret=interpret, out_dtype=out_dtype)
        if reason is None:
            name = getattr(cand, "name", getattr(cand, "__name__", "?"))
            # Logged once per (kernel, refusals) with why the better one refused: the
            # Hopper kernel's reason (wrong GPU, dtype, interpret) must not be dropped.
            key = f"{name}|{interpret}|{'; '.join(reasons)}"
            if key not in _LOGGED:
                _LOGGED.add(key)
                log.info("pallas_gpu%s resolved to the %s kernel (refused: %s)",
                         "_interpret" if interpret else "", name, "; ".join(reasons) or "none")
            return cand, None
        reasons.append(f"{getattr(cand, 'name', getattr(cand, '__name__', '?'))}: {reason}")
    return None, "; ".join(reasons)


def _mosaic_module():
    return importlib.import_module("kernels_pallas.flash.gpu")


def _kernel_supports(get_kernel, interpret: bool):
    """``supports`` of one named GPU kernel (no resolution between kernels)."""
    def supports(call: core.AttentionCall) -> str | None:
        if not interpret and call.platform != "gpu":
            return f"needs a GPU (platform is {call.platform})"
        return get_kernel().supports(call, interpret=interpret)
    return supports


def _kernel_fn(get_kernel, interpret: bool):
    def fn(q, k, v, *, mask, scale, softcap, sinks, bias, return_lse, out_dtype=None):
        if bias is not None:
            raise NotImplementedError(BIAS_REASON)
        return get_kernel().attention(q, k, v, mask=mask, scale=scale, softcap=softcap,
                                      sinks=sinks, interpret=interpret, out_dtype=out_dtype)
    return fn


def _gpu_supports(interpret: bool):
    def supports(call: core.AttentionCall) -> str | None:
        if not interpret and call.platform != "gpu":
            return f"needs a GPU (platform is {call.platform}); 'pallas_gpu_interpret' runs anywhere"
        return resolve_gpu_kernel(call, interpret=interpret)[1]
    return supports


def _gpu_fn(interpret: bool):
    def fn(q, k, v, *, mask, scale, softcap, sinks, bias, return_lse, out_dtype=None):
        if bias is not None:
            raise NotImplementedError(BIAS_REASON)
        call = core.make_call(q, k, v, mask=mask, scale=scale, softcap=softcap, sinks=sinks,
                              return_lse=return_lse, platform="gpu")
        kernel, reason = resolve_gpu_kernel(call, interpret=interpret, out_dtype=out_dtype)
        if kernel is None:
            raise NotImplementedError(f"no Pallas GPU kernel serves this call: {reason}")
        return kernel.attention(q, k, v, mask=mask, scale=scale, softcap=softcap, sinks=sinks,
                                interpret=interpret, out_dtype=out_dtype)
    return fn


def register() -> None:
    """(Re-)register the Pallas implementations with ``attn.core`` (runs on import).

    Example:
      >>> from attn import core
      >>> register()
      >>> "pallas_tpu_interpret" in core.registered_impls()
      True
    """
    # float32_out: every fn takes out_dtype= (the shell writes the accumulator unrounded).
    reg = functools.partial(core.register_impl, float32_out=True)
    reg("pallas_tpu", _tpu_fn(False), _tpu_supports(False))
    reg("pallas_tpu_interpret", _tpu_fn(True), _tpu_supports(True))
    reg("pallas_gpu", _gpu_fn(False), _gpu_supports(False))
    reg("pallas_gpu_interpret", _gpu_fn(True), _gpu_supports(True))
    # Each GPU kernel under its own name. No pallas_mosaic_gpu_interpret: JAX 0.10's GPU
    # interpreter cannot run the Mosaic GPU kernel (gpu.INTERPRET_REASON).
    triton = lambda: _TritonKernel  # noqa: E731
    reg("pallas_triton", _kernel_fn(triton, False), _kernel_supports(triton, False))
    reg("pallas_triton_interpret", _kernel_fn(triton, True), _kernel_supports(triton, True))
    reg("pallas_mosaic_gpu", _kernel_fn(_mosaic_module, False),
        _kernel_supports(_mosaic_module, False))


register()
