"""The attention op contract and its registry of implementations.

``attention(q, k, v, *, mask, scale, softcap, sinks, bias, return_lse, impl)`` in the
``[B, T, N, H]`` layout is the single entry point every layer, kernel and
context-parallel strategy goes through. See ``docs/design.md`` §3.

Math (per batch b, query head n = k·G + g, query t, key s):

    logits[t, s] = softcap(scale · q[t]·k[s]) + bias[b, n, t, s]       (hidden keys: -inf)
    lse[t]       = log(Σ_s exp(logits[t, s]) + exp(sinks[n]))             (float32)
    o[t]         = Σ_s exp(logits[t, s] - lse[t]) · v[s]

A fully masked row (no visible key and no sink) has ``o = 0`` and ``lse = -inf``;
nothing is NaN, forward or backward.

Implementations register with ``register_impl(name, fn, supports)``. ``supports(call)``
returns None when the implementation can serve the call, or a string saying why not.
``impl="auto"`` walks ``AUTO_PREFERENCE[platform]`` and logs its choice once.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from attn.core import attention
  >>> from attn.masks import Mask
  >>> q = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))
  >>> k = jax.random.normal(jax.random.key(1), (2, 7, 2, 8))
  >>> v = jax.random.normal(jax.random.key(2), (2, 7, 2, 6))
  >>> o, lse = attention(q, k, v, mask=Mask(causal=True), return_lse=True, impl="xla")
  >>> o.shape, lse.shape
  ((2, 5, 4, 6), (2, 4, 5))
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from attn.masks import Mask

Array = Any
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What an implementation's ``supports()`` sees: shapes, dtypes and options."""

    q_shape: tuple[int, ...]  # [B, T, N, H]
    k_shape: tuple[int, ...]  # [B, S, K, H]
    v_shape: tuple[int, ...]  # [B, S, K, E]
    dtype: Any
    mask: Mask
    scale: float
    softcap: float | None
    has_sinks: bool
    bias_shape: tuple[int, ...] | None
    return_lse: bool
    platform: str

    @property
    def batch(self) -> int:
        return self.q_shape[0]

    @property
    def q_len(self) -> int:
        return self.q_shape[1]

    @property
    def kv_len(self) -> int:
        return self.k_shape[1]

    @property
    def num_heads(self) -> int:
        return self.q_shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.k_shape[2]

    @property
    def head_dim(self) -> int:
        return self.q_shape[3]

    @property
    def value_dim(self) -> int:
        return self.v_shape[3]


class ImplFn(Protocol):
    def __call__(
        self, q, k, v, *, mask: Mask, scale: float, softcap, sinks, bias, return_lse: bool
    ) -> tuple[Array, Array | None]: ...


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    fn: ImplFn
    supports: Callable[[AttentionCall], str | None]
    # Why "auto" should pass this one over even though it could run the call
    # (for example: dense logits too large). None = happy to be picked.
    auto_declines: Callable[[AttentionCall], str | None] = lambda call: None
    # ``fn`` also takes ``out_dtype=`` (float32 ``o`` from low-precision inputs), for
    # callers that merge partial results (the context-parallel ring) without rounding.
    float32_out: bool = False


_IMPLS: dict[str, Impl] = {}

# Tried in order by impl="auto"; unknown names (not registered on this install) are skipped.
# The rule that changes this table: a kernel that has never run on hardware is never what
# "auto" picks. A Pallas kernel (pallas_gpu / pallas_tpu) enters its platform's row, ahead
# of what it beats, only in the change that commits (a) its hardware test run passing and
# (b) a benchmark under benchmarks/results/ on that hardware saying it is faster. As of
# 2026-12 benchmarks/results/ holds CPU runs only: no Pallas kernel has run on a GPU or TPU,
# so the GPU row is cuDNN (where it can serve the call), then XLA; TPU is XLA only.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "gpu": ("cudnn", "xla", "xla_chunked"),
    "tpu": ("xla", "xla_chunked"),
    "cpu": ("xla", "xla_chunked"),
}
_AUTO_LOGGED: set[tuple[str, str]] = set()
_UNKNOWN_PLATFORM_LOGGED: set[str] = set()


def register_impl(
    name: str,
    fn: ImplFn,
    supports: Callable[[AttentionCall], str | None],
    *,
    auto_declines: Callable[[AttentionCall], str | None] | None = None,
    float32_out: bool = False,
) -> None:
    """Register an implementation under ``name`` (re-registering replaces it).

    ``fn(q, k, v, *, mask, scale, softcap, sinks, bias, return_lse) -> (o, lse | None)``;
    ``supports(call: AttentionCall) -> None | reason``. ``float32_out``: ``fn`` also
    accepts ``out_dtype=jnp.float32``.
    """
    _IMPLS[name] = Impl(name, fn, supports, auto_declines or (lambda call: None), float32_out)


def registered_impls() -> tuple[str, ...]:
    return tuple(_IMPLS)


def get_impl(name: str) -> Impl:
    if name not in _IMPLS:
        raise ValueError(
            f"unknown attention impl {name!r}; registered: {sorted(_IMPLS)} or 'auto'"
        )
    return _IMPLS[name]


def select_impl(call: AttentionCall, impl: str = "auto") -> Impl:
    """Resolve ``impl`` for ``call``; raise ``NotImplementedError`` with the reason."""
    if impl != "auto":
        chosen = get_impl(impl)
        reason = chosen.supports(call)
        if reason is not None:
            raise NotImplementedError(f"attention impl {impl!r} cannot serve this call: {reason}")
        return chosen
    reasons = []
    if call.platform not in AUTO_PREFERENCE and call.platform not in _UNKNOWN_PLATFORM_LOGGED:
        _UNKNOWN_PLATFORM_LOGGED.add(call.platform)
        log.warning("attention impl='auto': platform %r has no row in AUTO_PREFERENCE %s; "
                    "treating it as 'cpu'", call.platform, sorted(AUTO_PREFERENCE))
    for name in AUTO_PREFERENCE.get(call.platform, AUTO_PREFERENCE["cpu"]):
        if name not in _IMPLS:
            continue
        cand = _IMPLS[name]
        reason = cand.supports(call) or cand.auto_declines(call)
        if reason is None:
            key = (call.platform, name)
            if key not in _AUTO_LOGGED:
                _AUTO_LOGGED.add(key)
                log.info("attention impl='auto' on %s chose %r (passed over: %s)",
                         call.platform, name, "; ".join(reasons) or "none")
            return cand
        reasons.append(f"{name}: {reason}")
    raise NotImplementedError("no attention implementation supports this call: " + "; ".join(reasons))


# --------------------------------------------------------------------------- routing
# A router sees every ``attention()`` call made inside ``route_attention(router)`` before
# an implementation is chosen. Context parallelism uses it: the layers keep calling
# ``attention`` on global shapes, and the router re-expresses the call on local shards
# (``jax.shard_map``) where the layer's own ``impl`` runs. Routers call implementations
# through ``select_impl(...).fn`` — never ``attention`` — so they cannot recurse.
Router = Callable[..., "tuple[Array, Array] | None"]
_ROUTER: contextvars.ContextVar[Router | None] = contextvars.ContextVar("attn_router", default=None)


@contextlib.contextmanager
def route_attention(router: Router | None):
    """Offer every ``attention()`` call in this block to ``router`` first.

    ``router(call, q, k, v, *, mask, scale, softcap, sinks, bias, return_lse, impl,
    self_attention)`` returns ``(o, lse)`` to take the call or None to decline it (the
    call then runs as usual). ``route_attention(None)`` switches routing off inside the block. Routing is
    read at trace time: wrap the traced function body, not the ``jax.jit`` call site.

    Example:
      >>> import jax
      >>> from attn.core import attention, route_attention
      >>> seen = []
      >>> def spy(call, q, k, v, **kw):
      ...     seen.append(call.q_shape)
      ...     return None  # decline: run normally
      >>> x = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
      >>> with route_attention(spy):
      ...     _ = attention(x, x, x)
      >>> seen
      [(1, 4, 2, 8)]
    """
    token = _ROUTER.set(router)
    try:
        yield
    finally:
        _ROUTER.reset(token)


# --------------------------------------------------------------------------- validation
def _check_inputs(q, k, v, mask: Mask, sinks, bias) -> None:
    """Shape and dtype checks, raised as ``ValueError`` before anything traces."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"attention: {name} must be rank 4 [B, T|S, N|K, H|E], got shape "
                f"{getattr(x, 'shape', type(x))}"
            )
    B, T, N, H = q.shape
    Bk, S, K, Hk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"attention: batch differs: q {q.shape}, k {k.shape}, v {v.shape}")
    if v.shape[1] != S or v.shape[2] != K:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} must agree on [B, S, K]")
    if Hk != H:
        raise ValueError(f"attention: q head dim H={H} differs from k head dim {Hk}")
    if K == 0 or N % K != 0:
        raise ValueError(f"attention: N={N} query heads must be a multiple of K={K} kv heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"attention: inputs must be floating point, got {q.dtype}")
    if sinks is not None and tuple(sinks.shape) != (N,):
        raise ValueError(f"attention: sinks must have shape [N]=({N},), got {tuple(sinks.shape)}")
    if bias is not None:
        try:  # broadcastable *to* [B,N,T,S]: the result must be exactly that shape
            ok = np.broadcast_shapes(tuple(bias.shape), (B, N, T, S)) == (B, N, T, S)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"attention: bias shape {tuple(bias.shape)} does not broadcast to [B,N,T,S]={(B, N, T, S)}"
            )
    mask.validate(B, T, S, N)


def make_call(q, k, v, *, mask=None, scale=None, softcap=None, sinks=None, bias=None,
              return_lse=False, platform=None) -> AttentionCall:
    """Build the ``AttentionCall`` that ``attention`` would hand to ``supports()``."""
    mask = Mask() if mask is None else mask
    return AttentionCall(
        q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape),
        dtype=jnp.dtype(q.dtype), mask=mask,
        scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
        softcap=softcap, has_sinks=sinks is not None,
        bias_shape=None if bias is None else tuple(bias.shape),
        return_lse=return_lse, platform=platform or jax.default_backend(),
    )


# --------------------------------------------------------------------------- the op
def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: Array | None = None,
    bias: Array | None = None,
    return_lse: bool = False,
    impl: str = "auto",
    self_attention: bool | None = None,
):
    """Scaled dot-product attention in the ``[B, T, N, H]`` layout.

    Args:
      q: ``[B, T, N, H]`` queries.
      k: ``[B, S, K, H]`` keys; ``N % K == 0`` (GQA/MQA by grouping, K/V never repeated).
      v: ``[B, S, K, E]`` values; E may differ from H (MLA).
      mask: a ``Mask``; None means every query sees every key.
      scale: logit scale, default ``H ** -0.5``.
      softcap: if set, ``logits = c · tanh(logits / c)`` (applied before ``bias``).
      sinks: ``[N]`` learned sink logits: an extra softmax term with a zero value.
      bias: additive logits, broadcastable to ``[B, N, T, S]``.
      return_lse: also return the float32 log-sum-exp ``[B, N, T]``.
      impl: a registered implementation (``registered_impls()``) or ``"auto"``.
      self_attention: True when k and v are computed from the very tokens of q, in
        the same order (no cache, no other sequence): then ``S == T`` is required and a
        router (context parallelism) may split the sequence of q, k and v alike. False:
        cross-attention or attention over a cache. None: not declared; routers leave
        the call alone. Shapes cannot tell: cross-attention can have ``T == S``.

    Returns:
      ``o [B, T, N, E]`` in the input dtype, or ``(o, lse)`` with ``return_lse``.

    Example:
      >>> import jax
      >>> from attn.core import attention
      >>> from attn.masks import Mask
      >>> x = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
      >>> attention(x, x, x, mask=Mask(causal=True)).shape
      (1, 4, 2, 8)
    """
    mask = Mask() if mask is None else mask
    _check_inputs(q, k, v, mask, sinks, bias)
    if self_attention and k.shape[1] != q.shape[1]:
        raise ValueError(f"attention: self_attention=True needs S == T, got T={q.shape[1]}, "
                         f"S={k.shape[1]} (attention over a cache passes self_attention=False)")
    call = make_call(q, k, v, mask=mask, scale=scale, softcap=softcap, sinks=sinks,
                     bias=bias, return_lse=return_lse)
    router = _ROUTER.get()
    if router is not None:
        routed = router(call, q, k, v, mask=mask, scale=call.scale, softcap=softcap, sinks=sinks,
                        bias=bias, return_lse=return_lse, impl=impl,
                        self_attention=self_attention)
        if routed is not None:
            return routed if return_lse else routed[0]
    chosen = select_impl(call, impl)
    o, lse = chosen.fn(q, k, v, mask=mask, scale=call.scale, softcap=softcap, sinks=sinks,
                       bias=bias, return_lse=return_lse)
    return (o, lse) if return_lse else o


# --------------------------------------------------------------------------- shared math
def _acc_dtype(dtype) -> Any:
    """float32, or float64 when the inputs are float64 (oracle comparisons with x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _bias_grouped(bias, B, N, T, S, K):
    """Bias as ``[B|1, K|1, G|1, T|1, S|1]`` so it adds onto grouped logits."""
    b4 = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
    b, n, t, s = b4.shape
    if n == N:
        return b4.reshape(b, K, N // K, t, s)
    return b4.reshape(b, 1, 1, t, s)


def _mask_grouped(vis, K):
    """Visibility ``[B|1, N|1, T, S]`` as ``[B|1, K|1, G|1, T, S]``."""
    if vis is None:
        return None
    b, n, t, s = vis.shape
    if n == 1:
        return vis.reshape(b, 1, 1, t, s)
    return vis.reshape(b, K, n // K, t, s)


def _softcap(s, softcap):
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def _finalize(m, l, acc, sinks_KG, out_dtype):
    """Fold sinks into running (max, sum, acc) and normalise: returns ``o``, ``lse``.

    Shapes: m, l ``[B,K,G,T]``; acc ``[B,K,G,T,E]``; sinks ``[K,G]`` or None.
    """
    if sinks_KG is not None:
        sink = sinks_KG.astype(m.dtype)[None, :, :, None]
        m_new = jnp.maximum(m, sink)
        alpha = jnp.exp(m - m_new)  # m = -inf gives 0, which is right: nothing seen yet
        l = l * alpha + jnp.exp(sink - m_new)
        acc = acc * alpha[..., None]
        m = m_new
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o = acc / l_safe[..., None]
    lse = jnp.where(seen, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l_safe), -jnp.inf)
    return o.astype(out_dtype), lse


def _to_public(o_BKGTE, lse_BKGT, lse_dtype=jnp.float32):
    """Grouped results back to ``o [B,T,N,E]`` and ``lse [B,N,T]`` (float32 by default)."""
    B, K, G, T, E = o_BKGTE.shape
    o = jnp.transpose(o_BKGTE, (0, 3, 1, 2, 4)).reshape(B, T, K * G, E)
    lse = lse_BKGT.reshape(B, K * G, T).astype(lse_dtype)
    return o, lse


# --------------------------------------------------------------------------- xla
def xla_attention(q, k, v, *, mask: Mask | None = None, scale=None, softcap=None, sinks=None,
                  bias=None, return_lse=False, out_dtype=None):
    """Reference attention with dense ``[B,K,G,T,S]`` logits; returns ``(o, lse)``.

    Same arguments and shapes as ``attention``; accumulates in float32 (float64 for
    float64 inputs); ``o`` in ``out_dtype`` (default: the input dtype). Gradients come
    from autodiff.

    Example:
      >>> import jax
      >>> from attn.core import xla_attention
      >>> x = jax.random.normal(jax.random.key(0), (1, 3, 2, 4))
      >>> xla_attention(x, x, x)[0].shape
      (1, 3, 2, 4)
    """
    mask = Mask() if mask is None else mask
    B, T, N, H = q.shape
    S, K, E = k.shape[1], k.shape[2], v.shape[3]
    G = N // K
    scale = H ** -0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)
    qg = q.reshape(B, T, K, G, H)
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=acc) * scale
    s = _softcap(s, softcap)
    if bias is not None:
        s = s + _bias_grouped(bias, B, N, T, S, K).astype(acc)
    qp, kp = mask.positions(B, T, S)
    vis = _mask_grouped(
        mask.tile(qp, kp, mask.q_segment_ids, mask.kv_segment_ids, jnp.arange(T), jnp.arange(S)), K
    )
    if vis is not None:
        s = jnp.where(vis, s, -jnp.inf)
    # The max is a numerical shift only: softmax is invariant to it, so no gradient.
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("BKGTS,BSKE->BKGTE", p, v.astype(acc))
    sinks_KG = None if sinks is None else sinks.reshape(K, G)
    o, lse = _finalize(m, l, o, sinks_KG, q.dtype if out_dtype is None else out_dtype)
    return _to_public(o, lse)


def _xla_supports(call: AttentionCall) -> str | None:
    return None


# Dense logits above this many bytes make "auto" prefer the chunked path.
AUTO_DENSE_LOGITS_BYTES = 1 << 30


def _xla_auto_declines(call: AttentionCall) -> str | None:
    nbytes = call.batch * call.num_heads * call.q_len * call.kv_len * 4
    if nbytes > AUTO_DENSE_LOGITS_BYTES:
        return f"dense logits would take {nbytes / 2**30:.1f} GiB"
    return None


register_impl("xla", xla_attention, _xla_supports, auto_declines=_xla_auto_declines,
              float32_out=True)

# xla_chunked, cudnn and the Pallas kernels live in their own modules and register
# themselves on import.
from attn import chunked as _chunked  # noqa: E402,F401
from attn import cudnn as _cudnn  # noqa: E402,F401
from kernels_pallas.flash import register as _flash_register  # noqa: E402,F401
from kernels_pallas.decode import register as _decode_register  # noqa: E402,F401
