"""Registers the decode implementations with ``attn.core`` (imported by ``attn.core``).

A layer with a cache calls ``attention(q [B,T,N,H], k [B,S,K,H], v, mask=Mask(causal,
window, q/kv positions, q/kv segments), softcap, sinks)`` over its whole cache buffer.
These implementations serve exactly such calls (1 <= T <= 16, no bias, no dense /
block-sparse / extra-range mask) by viewing the dense cache as a page pool
(``common.from_dense``: a free reshape when the page size divides S) and running the
split-K decode:

* ``xla_decode``                   the XLA split-K reference; any platform.
* ``pallas_decode_tpu``            the Mosaic TPU kernel; needs a TPU.
* ``pallas_decode_tpu_interpret``  the same kernel with ``pltpu.InterpretParams()``.
* ``pallas_decode_triton``         the Triton kernel; needs a GPU.
* ``pallas_decode_triton_interpret`` the same kernel with ``interpret=True``.

And, for layers whose ``impl`` serves prefill *and* decode, the combined names
``xla+decode``, ``pallas_tpu+decode``, ``pallas_gpu+decode`` and the interpret-mode
``pallas_tpu+decode_interpret``, ``pallas_gpu+decode_interpret``:
decode-shaped calls go to the matching decode implementation, every other call to the
flash one. The name says so; nothing switches silently.

None is in ``attn.core.AUTO_PREFERENCE``: the Pallas kernels have never run on hardware
(the project's rule), and ``xla_decode`` is not faster than ``xla`` on CPU (it does the
same work in XLA; its point is being the kernels' reference). Forward only: the Pallas
kernels have no VJP (decode needs none); ``xla_decode`` differentiates by autodiff.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn import core
  >>> from attn.masks import Mask
  >>> import kernels_pallas.decode.register  # noqa: F401
  >>> q = jax.random.normal(jax.random.key(0), (2, 1, 4, 8))
  >>> k = jax.random.normal(jax.random.key(1), (2, 24, 2, 8))
  >>> pos = jnp.tile(jnp.arange(24), (2, 1))
  >>> mask = Mask(causal=True, q_positions=jnp.array([[23], [10]]), kv_positions=pos)
  >>> a = core.attention(q, k, k, mask=mask, impl="xla")
  >>> b = core.attention(q, k, k, mask=mask, impl="pallas_decode_tpu_interpret")
  >>> bool(jnp.allclose(a, b, atol=1e-5))
  True
"""

from __future__ import annotations

import jax.numpy as jnp

from attn import core
from attn.masks import Mask
from kernels_pallas.decode import common, reference, tpu, triton

# Page sizes tried for a dense cache, largest first (one that divides S is a free
# reshape; otherwise the smallest is used and the tail padded, a copy).
PAGE_SIZES = (128, 64, 32, 16, 8)


def page_size_for(S: int) -> int:
    """The page size used to view a dense cache of S slots.

    Example:
      >>> page_size_for(4096), page_size_for(40), page_size_for(37)
      (128, 8, 8)
    """
    for c in PAGE_SIZES:
        if S % c == 0:
            return c
    return PAGE_SIZES[-1]


def _reason(call: core.AttentionCall, *, platform: str | None, interpret: bool) -> str | None:
    if platform is not None and not interpret and call.platform != platform:
        return f"needs platform {platform!r} (platform is {call.platform})"
    if call.bias_shape is not None:
        return "bias is not supported by the decode implementations; use 'xla'"
    m = call.mask
    if m.dense is not None or m.block_mask is not None or m.q_extra_range is not None:
        return "Mask.dense / block_mask / q_extra_range are not supported by decode; use 'xla'"
    if not 1 <= call.q_len <= common.MAX_DECODE_Q:
        return f"decode serves 1..{common.MAX_DECODE_Q} query tokens, got T={call.q_len}"
    if call.kv_len == 0:
        return "empty cache (S = 0)"
    if platform is not None and not interpret and call.dtype == jnp.dtype(jnp.float64):
        return "float64 is not supported by the hardware kernels"
    return None


def _paged(q, k, v, mask: Mask):
    """The dense call as ``(kv: PagedKV, q_pos, q_seg)``."""
    B, T = q.shape[:2]
    S = k.shape[1]
    qp, kp = mask.positions(B, T, S)
    qp = jnp.broadcast_to(qp, (B, T)).astype(jnp.int32)
    kp = jnp.broadcast_to(kp, (B, S)).astype(jnp.int32)
    if mask.has_segments:
        qs, ks = mask.q_segment_ids.astype(jnp.int32), mask.kv_segment_ids.astype(jnp.int32)
    else:
        qs, ks = jnp.ones((B, T), jnp.int32), jnp.ones((B, S), jnp.int32)
    return common.from_dense(k, v, kp, ks, page_size=page_size_for(S)), qp, qs


def _fn(split_fn, interpret: bool):
    """An ``attn.core`` implementation around a backend's ``split_partials``."""
    def fn(q, k, v, *, mask, scale, softcap, sinks, bias, return_lse):
        if bias is not None:
            raise NotImplementedError("bias is not supported by the decode implementations")
        kv, qp, qs = _paged(q, k, v, mask)
        cfg = common.make_cfg(q.shape, kv, causal=mask.causal,
                              window=None if mask.window is None else mask.window,
                              scale=scale, softcap=softcap, num_splits=None,
                              interpret=interpret)
        o_s, lse_s = split_fn(q, kv, qp, qs, cfg)
        o, lse = common.merge_splits(o_s, lse_s, sinks, cfg, q.dtype)
        return o, lse.astype(jnp.float32)
    return fn


def _triton_supports(interpret: bool):
    def supports(call: core.AttentionCall) -> str | None:
        reason = _reason(call, platform="gpu", interpret=interpret)
        if reason or interpret:
            return reason
        cfg = common.DecodeCfg(B=call.batch, T=call.q_len, N=call.num_heads,
                               K=call.num_kv_heads, H=call.head_dim, E=call.value_dim,
                               page_size=page_size_for(call.kv_len), max_pages=1, num_splits=1,
                               scale=call.scale, softcap=None, left=None, right=None, mla=False)
        return triton.hardware_reason(cfg)
    return supports


def _combined(flash_name: str, decode_name: str):
    """``<flash>+decode``: decode-shaped calls to ``decode_name``, the rest to ``flash_name``."""
    def pick(call):
        dec = core.get_impl(decode_name)
        return dec if dec.supports(call) is None else core.get_impl(flash_name)

    def supports(call):
        return pick(call).supports(call)

    def fn(q, k, v, *, mask, scale, softcap, sinks, bias, return_lse):
        call = core.make_call(q, k, v, mask=mask, scale=scale, softcap=softcap, sinks=sinks,
                              bias=bias, return_lse=return_lse)
        return pick(call).fn(q, k, v, mask=mask, scale=scale, softcap=softcap, sinks=sinks,
                             bias=bias, return_lse=return_lse)
    return fn, supports


def register() -> None:
    """(Re-)register the decode implementations (runs on import).

    Example:
      >>> from attn import core
      >>> register()
      >>> "pallas_decode_tpu_interpret" in core.registered_impls()
      True
    """
    core.register_impl("xla_decode", _fn(reference.split_partials, False),
                       lambda call: _reason(call, platform=None, interpret=False))
    for name, mod, platform in (("tpu", tpu, "tpu"), ("triton", triton, "gpu")):
        for interpret in (False, True):
            sfx = "_interpret" if interpret else ""
            supports = (_triton_supports(interpret) if name == "triton" else
                        (lambda i: lambda call: _reason(call, platform="tpu", interpret=i))(interpret))
            core.register_impl(f"pallas_decode_{name}{sfx}", _fn(mod.split_partials, interpret),
                               supports)
    # Interpret names keep the "_interpret" suffix last (tools such as benchmarks/kernels.py
    # recognise interpret-mode implementations by it).
    for name, flash_name, decode_name in (
            ("xla+decode", "xla", "xla_decode"),
            ("pallas_tpu+decode", "pallas_tpu", "pallas_decode_tpu"),
            ("pallas_tpu+decode_interpret", "pallas_tpu_interpret", "pallas_decode_tpu_interpret"),
            ("pallas_gpu+decode", "pallas_gpu", "pallas_decode_triton"),
            ("pallas_gpu+decode_interpret", "pallas_gpu_interpret",
             "pallas_decode_triton_interpret")):
        fn, supports = _combined(flash_name, decode_name)
        core.register_impl(name, fn, supports)


register()
