"""Shared machinery of the linear family: one gated (delta-)recurrence, two implementations.

Every variant in ``attn/linear/`` is a special case of

    S_t = (I - b_t k_t k_tᵀ) Diag(a_t) S_{t-1} + b_t k_t v_tᵀ      (delta rules: gdn, kda)
    S_t = Diag(a_t) S_{t-1} + k_t v_tᵀ                            (gla, lightning)
    o_t = scale · S_tᵀ q_t,          a_t = exp(g_t),  g_t <= 0 the log-decay

with the state ``S [H, V]`` per head, ``g`` either one value per head (``Hg = 1``: gdn,
lightning) or one per key channel (``Hg = H``: gla, kda). Packed documents reset the
state: ``reset [B, T]`` zeroes it before step t.

Implementations (``IMPLS``, chosen by name; "auto" takes ``naive`` for T <= 16, the
decode path, else ``chunked``):

* ``naive``: ``lax.scan`` over t of the recurrence above (float32 state).
* ``chunked``: chunks of C tokens. Within a chunk, with cumulative log-gates
  ``G_i = Σ_{s<=i} g_s`` (float32), the delta rule becomes a GLA with pseudo-values
  ``U = U0 - W S0`` (the WY/UT form): ``(I + A) [W | U0] = [b ⊙ exp(G) ⊙ K | b ⊙ V]``
  with ``A_ij = b_i Σ_h k_ih k_jh exp(G_ih - G_jh)`` for j < i, inverted by
  ``unit_lower_inverse`` (matmuls only); then ``o = scale (exp(G) ⊙ Q S0 + P U)`` with the causal intra-chunk
  scores ``P_ij = Σ_h q_ih k_jh exp(G_ih - G_jh)`` (j <= i), and
  ``S_C = exp(G_C) S0 + (exp(G_C - G) ⊙ K)ᵀ U``. Every exponent is <= 0, so nothing
  overflows however negative the gates are. Only the chunk-start states are kept; the
  custom VJP recomputes each chunk from its start state in a reverse scan.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from attn.errors import UserError

Array = Any
AUTO_NAIVE_MAX_T = 16  # decode steps and tiny prefills: the scan has no chunk overhead


# --------------------------------------------------------------------------- naive scan
def naive(q, k, v, g, beta, reset, state, *, scale, delta, chunk_size=None):
    """Recurrence by ``lax.scan`` over t. Shapes: q,k ``[B,T,N,H]``, v ``[B,T,N,V]``,
    g ``[B,T,N,Hg]`` float32, beta ``[B,T,N]`` float32, reset ``[B,T]`` bool, state
    ``[B,N,H,V]`` float32. Returns ``(o [B,T,N,V] float32, state)``."""
    f32 = lambda a: jnp.moveaxis(a.astype(jnp.float32), 1, 0)
    xs = (f32(q), f32(k), f32(v), f32(g), f32(beta), jnp.moveaxis(reset, 1, 0))

    def step(S, x):
        q_t, k_t, v_t, g_t, b_t, r_t = x
        S = jnp.where(r_t[:, None, None, None], 0.0, S)
        S = jnp.exp(g_t)[..., None] * S  # Diag(a_t) S (Hg = 1 broadcasts)
        if delta:
            u = b_t[..., None] * (v_t - jnp.einsum("bnhv,bnh->bnv", S, k_t))
        else:
            u = v_t
        S = S + k_t[..., :, None] * u[..., None, :]
        return S, scale * jnp.einsum("bnhv,bnh->bnv", S, q_t)

    S, o = jax.lax.scan(step, state.astype(jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1), S


# --------------------------------------------------------------------------- chunked form
def unit_lower_inverse(A):
    """``(I + A)^-1`` for strictly lower-triangular ``A [..., C, C]``, by matmuls only.

    Diagonal blocks of b <= 16 rows: ``(I + A)^-1 = Π_s (I + (-A)^(2^s))`` (A is nilpotent,
    so the doubling product is exact after ceil(log2 b) factors); then blockwise forward
    substitution ``X_ij = -X_ii Σ_{j<=k<i} A_ik X_kj``. No LAPACK call: XLA CPU's
    triangular solve inside the chunk scan hung the trainer (see docs/linear.md).
    """
    C = A.shape[-1]
    b = next(d for d in (16, 8, 4, 2, 1) if C % d == 0)
    nb = C // b
    eye = jnp.eye(b, dtype=A.dtype)
    blk = lambda i, j: A[..., i * b:(i + 1) * b, j * b:(j + 1) * b]
    X = {}
    for i in range(nb):
        P = -blk(i, i)
        Xi = eye + P
        for _ in range(max(b - 1, 1).bit_length() - 1):
            P = P @ P
            Xi = Xi @ (eye + P)
        X[i, i] = Xi
    for i in range(nb):
        for j in range(i - 1, -1, -1):
            acc = sum(blk(i, k) @ X[k, j] for k in range(j, i))
            X[i, j] = -X[i, i] @ acc
    zero = jnp.zeros_like(eye) * A[..., :b, :b]
    rows = [jnp.concatenate([X.get((i, j), zero) for j in range(nb)], -1) for i in range(nb)]
    return jnp.concatenate(rows, -2)


def _gated_scores(a, b, G, mask):
    """``Σ_h a_ih b_jh exp(G_ih - G_jh)`` where ``mask`` [B,1,C,C], else 0.

    a, b ``[B,N,C,H]``, G ``[B,N,C,Hg]``. With one gate per head the decay factors out
    of the sum ([C, C]); per channel it is the exact [C, C, H] form (transient: one chunk).
    """
    if G.shape[-1] == 1:
        diff = G[..., :, None, 0] - G[..., None, :, 0]
        d = jnp.exp(jnp.where(mask, diff, -jnp.inf))
        return jnp.einsum("bnih,bnjh->bnij", a, b) * d
    diff = G[..., :, None, :] - G[..., None, :, :]
    d = jnp.exp(jnp.where(mask[..., None], diff, -jnp.inf))
    return jnp.einsum("bnih,bnjh,bnijh->bnij", a, b, d)


def _chunk_step(S, xs, lc, *, scale, delta):
    """One chunk: state ``S [B,N,H,V]`` at its start -> (state at its end, o [B,N,C,V]).

    xs = (q, k, v [B,N,C,*] float32, g [B,N,C,Hg] float32, beta [B,N,C] float32);
    lc ``[B,C]`` int: resets seen so far in this chunk (tokens with equal lc share a state).
    """
    q, k, v, g, beta = xs
    C = q.shape[2]
    G = jnp.cumsum(g, axis=2)
    same = (lc[:, None, :, None] == lc[:, None, None, :])
    causal = jnp.tril(jnp.ones((C, C), bool))
    carry = (lc == 0)[:, None, :, None]  # the chunk-start state still reaches token t
    gam = jnp.exp(G) * carry  # [B,N,C,Hg]
    if delta:
        strict = jnp.tril(jnp.ones((C, C), bool), -1)
        A = beta[..., None] * _gated_scores(k, k, G, same & strict)
        rhs = jnp.concatenate([beta[..., None] * gam * k, beta[..., None] * v], axis=-1)
        sol = unit_lower_inverse(A) @ rhs
        W, U0 = sol[..., : k.shape[-1]], sol[..., k.shape[-1]:]
        U = U0 - jnp.einsum("bnch,bnhv->bncv", W, S)
    else:
        U = v
    P = _gated_scores(q, k, G, same & causal)
    o = scale * (jnp.einsum("bnch,bnhv->bncv", gam * q, S) + jnp.einsum("bnij,bnjv->bniv", P, U))
    last = lc[:, -1:]  # [B,1]
    end_ok = (lc == last)[:, None, :, None]
    kend = k * jnp.exp(jnp.where(end_ok, G[:, :, -1:, :] - G, -jnp.inf))
    gam_end = jnp.exp(G[:, :, -1, :]) * (last == 0)[:, :, None]  # [B,N,Hg]
    S = gam_end[..., None] * S + jnp.einsum("bnch,bncv->bnhv", kend, U)
    return S, o


def _scan_chunks(S0, xs, lc, scale, delta):
    """Forward over chunks (leading axis of xs / lc); returns (S_final, o, chunk-start states)."""
    def body(S, x):
        *fx, l = x
        S_new, o = _chunk_step(S, tuple(fx), l, scale=scale, delta=delta)
        return S_new, (o, S)

    S, (o, starts) = jax.lax.scan(body, S0, (*xs, lc))
    return S, o, starts


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _chunked_core(q, k, v, g, beta, lc, S0, scale, delta):
    S, o, _ = _scan_chunks(S0, (q, k, v, g, beta), lc, scale, delta)
    return o, S


def _chunked_fwd(q, k, v, g, beta, lc, S0, scale, delta):
    S, o, starts = _scan_chunks(S0, (q, k, v, g, beta), lc, scale, delta)
    return (o, S), ((q, k, v, g, beta), lc, starts)


def _chunked_bwd(scale, delta, res, cts):
    xs, lc, starts = res
    do, dS = cts

    def body(dS_end, x):
        S_in, fx, l, do_c = x
        step = lambda S, f: _chunk_step(S, f, l, scale=scale, delta=delta)
        _, vjp = jax.vjp(step, S_in, fx)  # recompute the chunk from its start state
        dS_in, dfx = vjp((dS_end, do_c))
        return dS_in, dfx

    dS0, dxs = jax.lax.scan(body, dS, (starts, xs, lc, do), reverse=True)
    return (*dxs, None, dS0)


_chunked_core.defvjp(_chunked_fwd, _chunked_bwd)


def chunked(q, k, v, g, beta, reset, state, *, scale, delta, chunk_size=64):
    """Chunked form (same arguments as ``naive``); T is padded to a multiple of C with
    identity steps (zero q/k/v/beta, zero log-gate, no reset)."""
    B, T, N, H = q.shape
    C = int(chunk_size)
    pad = (-T) % C
    nc = (T + pad) // C

    def prep(a, fill=0):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
        a = a.reshape(B, nc, C, *a.shape[2:])
        # [nc, B, N, C, ...]: the scan axis first, heads before the chunk axis.
        return jnp.moveaxis(a, (1, 3), (0, 2)) if a.ndim > 3 else jnp.moveaxis(a, 1, 0)

    f32 = lambda a: a.astype(jnp.float32)
    xs = [prep(f32(a)) for a in (q, k, v, g)]
    b = prep(f32(beta)[..., None])[..., 0]
    r = jnp.pad(reset, [(0, 0), (0, pad)]).reshape(B, nc, C)
    lc = jnp.moveaxis(jnp.cumsum(r.astype(jnp.int32), axis=-1), 1, 0)  # [nc, B, C]
    o, S = _chunked_core(*xs, b, lc, state.astype(jnp.float32), float(scale), bool(delta))
    o = jnp.moveaxis(o, (0, 2), (1, 3)).reshape(B, nc * C, N, v.shape[-1])[:, :T]
    return o, S


IMPLS: dict[str, Callable] = {"naive": naive, "chunked": chunked}


# --------------------------------------------------------------------------- front door
def resets_from(cu_seqlens, segment_ids, B: int, T: int):
    """``reset [B, T]`` bool from FLA's ``cu_seqlens`` (B must be 1) or attnlab segment ids.

    A token resets the state where its segment id differs from the previous token's and
    is not 0 (0 = padding: an identity step that neither resets nor ends a document).
    """
    if cu_seqlens is not None and segment_ids is not None:
        raise UserError("pass cu_seqlens or segment_ids, not both")
    if cu_seqlens is not None:
        if B != 1:
            raise UserError(f"cu_seqlens needs batch size 1 (packed sequences), got B={B}")
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        starts = jnp.zeros((T,), bool).at[cu[1:-1]].set(True, mode="drop")
        return starts[None]
    if segment_ids is None:
        return jnp.zeros((B, T), bool)
    seg = jnp.asarray(segment_ids, jnp.int32)
    if seg.shape != (B, T):
        raise UserError(f"segment_ids must have shape [B, T]={(B, T)}, got {seg.shape}")
    # Compare with the last non-padding id so padding inside a document does not reset.
    idx = jnp.where(seg != 0, jnp.arange(T)[None], -1)
    last = jax.lax.cummax(idx, axis=1)
    prev_idx = jnp.concatenate([jnp.full((B, 1), -1), last[:, :-1]], axis=1)
    prev = jnp.where(prev_idx >= 0, jnp.take_along_axis(seg, jnp.maximum(prev_idx, 0), 1), 0)
    return (seg != 0) & (prev != 0) & (seg != prev)


def run(q, k, v, g, beta, *, name: str, delta: bool, scale=None, initial_state=None,
        output_final_state=False, cu_seqlens=None, segment_ids=None, impl="auto",
        chunk_size=64):
    """Validate, normalise gates, dispatch through ``IMPLS``; returns ``(o, final_state)``.

    ``g`` is ``[B,T,N]`` (one gate per head) or ``[B,T,N,H]`` (per channel), or None (no
    decay); ``beta`` ``[B,T,N]`` or None (delta rules: 1). Padding tokens (segment id 0)
    become identity steps with output 0.
    """
    for nm, a, nd in (("q", q, 4), ("k", k, 4), ("v", v, 4)):
        if getattr(a, "ndim", None) != nd:
            raise UserError(f"{name}: {nm} must be [B, T, N, {'V' if nm == 'v' else 'H'}], got shape {getattr(a, 'shape', a)}")
    B, T, N, H = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != (B, T, N):
        raise UserError(f"{name}: q {q.shape}, k {k.shape}, v {v.shape} must share [B, T, N] and q/k H")
    if g is None:
        g = jnp.zeros((B, T, N, 1), jnp.float32)
    elif g.shape == (B, T, N):
        g = g.astype(jnp.float32)[..., None]
    elif g.shape == (B, T, N, H):
        g = g.astype(jnp.float32)
    else:
        raise UserError(f"{name}: g must be [B, T, N] or [B, T, N, H]={(B, T, N, H)}, got {g.shape}")
    if beta is None:
        beta = jnp.ones((B, T, N), jnp.float32)
    elif beta.shape != (B, T, N):
        raise UserError(f"{name}: beta must be [B, T, N]={(B, T, N)}, got {beta.shape}")
    if initial_state is not None and initial_state.shape != (B, N, H, V):
        raise UserError(f"{name}: initial_state must be [B, N, H, V]={(B, N, H, V)}, got {initial_state.shape}")
    if cu_seqlens is not None and initial_state is not None:
        raise UserError(f"{name}: initial_state with cu_seqlens (one state per sequence) is not supported")
    if cu_seqlens is not None and output_final_state:
        raise UserError(f"{name}: output_final_state with cu_seqlens (one state per sequence) is not supported")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise UserError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")
    impl_name = ("naive" if T <= AUTO_NAIVE_MAX_T else "chunked") if impl == "auto" else impl
    fn = IMPLS.get(impl_name)
    if fn is None:
        raise UserError(f"{name}: unknown impl {impl!r}; choose from {['auto', *IMPLS]}")
    scale = H ** -0.5 if scale is None else float(scale)
    reset = resets_from(cu_seqlens, segment_ids, B, T)
    if segment_ids is not None:
        # Padding is an identity step: no key, value, query, erase or decay.
        keep = (jnp.asarray(segment_ids) != 0)
        q, k, v = (jnp.where(keep[..., None, None], a, 0) for a in (q, k, v))
        g = jnp.where(keep[..., None, None], g, 0.0)
        beta = jnp.where(keep[..., None], beta, 0.0)
    S0 = jnp.zeros((B, N, H, V), jnp.float32) if initial_state is None else initial_state
    o, S = fn(q, k, v, g, beta, reset, S0, scale=scale, delta=delta, chunk_size=chunk_size)
    return o.astype(q.dtype), (S if output_final_state else None)
