"""The linear family's pure functions (attn/linear) against the float64 oracle.

Naive and chunked forms: forward, final state and gradients (directional finite
differences of the float64 oracle), awkward shapes (T = 37, 130; chunk 16; H = 12,
V = 10), initial states, packed documents, gate and beta extremes, bf16, padding.
Peer: FLA (PyTorch/Triton) is not installed here, so there is no peer comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.errors import UserError
from attn.linear import gated_delta_rule, gla, kda, lightning, lightning_slopes
from tests import linear_oracle

B, N, H, V, C = 2, 2, 12, 10, 16

# name -> (delta rule, per-channel gate, has g, has beta)
VARIANTS = {"gdn": (True, False), "kda": (True, True), "gla": (False, True), "lightning": (False, False)}


def make(name, T, seed=0, *, gate_scale=1.0, beta=None, unit_keys=True):
    delta, channel = VARIANTS[name]
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, T, N, H))
    k = r.normal(size=(B, T, N, H))
    if unit_keys:
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = r.normal(size=(B, T, N, V))
    g = -gate_scale * np.log1p(np.exp(r.normal(size=(B, T, N) + ((H,) if channel else ()))))
    b = r.uniform(0.05, 0.95, size=(B, T, N)) if beta is None else np.full((B, T, N), float(beta))
    s0 = r.normal(size=(B, N, H, V)) * 0.3
    if name == "lightning":  # the fixed decay, for the oracle (the library derives it)
        g = np.broadcast_to(-np.asarray(lightning_slopes(N), np.float64), (B, T, N)).copy()
    return dict(q=q, k=k, v=v, g=g, beta=b, s0=s0)


def call(name, a, *, dtype=jnp.float32, **kw):
    """Run the library function; ``a`` as from ``make`` (arrays cast to ``dtype``)."""
    j = lambda x: jnp.asarray(x, dtype)
    q, k, v = j(a["q"]), j(a["k"]), j(a["v"])
    s0 = None if a.get("s0") is None else jnp.asarray(a["s0"], jnp.float32)
    kw = dict(initial_state=s0, output_final_state=True, chunk_size=C, **kw)
    fns = {
        "gdn": lambda: gated_delta_rule(q, k, v, j(a["g"]), j(a["beta"]), **kw),
        "kda": lambda: kda(q, k, v, j(a["g"]), j(a["beta"]), **kw),
        "gla": lambda: gla(q, k, v, j(a["g"]), **kw),
        "lightning": lambda: lightning(q, k, v, **kw),
    }
    return fns[name]()


def oracle(name, a, **kw):
    delta, _ = VARIANTS[name]
    return linear_oracle.recurrence(a["q"], a["k"], a["v"], a["g"], a["beta"], delta=delta,
                                    initial_state=a.get("s0"), **kw)


def close(x, y, tol):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    err = np.max(np.abs(x - y)) / max(1.0, np.max(np.abs(y)))
    assert err < tol, f"max rel error {err:.2e} >= {tol}"


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_and_state_vs_oracle(name, impl):
    a = make(name, 37, seed=1)
    o, s = call(name, a, impl=impl)
    o_ref, s_ref = oracle(name, a)
    close(o, o_ref, 2e-5)
    close(s, s_ref, 2e-5)


@pytest.mark.parametrize("name", ["gdn", "gla"])
def test_chunked_long_odd_length_no_initial_state(name):
    a = make(name, 130, seed=2)
    a["s0"] = None
    o, s = call(name, a, impl="chunked")
    o_ref, s_ref = oracle(name, a)
    close(o, o_ref, 5e-5)
    close(s, s_ref, 5e-5)


def _loss_weights(a, seed=9):
    r = np.random.default_rng(seed)
    T = a["q"].shape[1]
    return r.normal(size=(B, T, N, V)), r.normal(size=(B, N, H, V))


# Every variant's chunked custom VJP; the naive form's (autodiff of a scan) once.
@pytest.mark.parametrize("name,impl", [(n, "chunked") for n in VARIANTS] + [("gdn", "naive")])
def test_gradients_vs_oracle_finite_differences(name, impl):
    """<jax.grad, d> against the float64 oracle's central difference along d, per input."""
    a = make(name, 37, seed=3)
    wo, ws = _loss_weights(a)
    keys = ["q", "k", "v", "s0"] + (["g"] if name != "lightning" else []) + (["beta"] if VARIANTS[name][0] else [])

    def loss_jax(*xs):
        o, s = call(name, dict(a, **dict(zip(keys, xs))), impl=impl)
        return jnp.sum(o * wo) + jnp.sum(s * ws)

    grads = jax.grad(loss_jax, argnums=tuple(range(len(keys))))(*[jnp.asarray(a[kk], jnp.float32) for kk in keys])
    r = np.random.default_rng(4)
    eps = 1e-5
    for kk, gr in zip(keys, grads):
        d = r.normal(size=a[kk].shape)
        lo = oracle(name, dict(a, **{kk: a[kk] - eps * d}))
        hi = oracle(name, dict(a, **{kk: a[kk] + eps * d}))
        fd = (np.sum((hi[0] - lo[0]) * wo) + np.sum((hi[1] - lo[1]) * ws)) / (2 * eps)
        got = float(np.sum(np.asarray(gr, np.float64) * d))
        assert abs(got - fd) <= 2e-3 * max(1.0, abs(fd)), f"d{kk}: jax {got} vs fd {fd}"


@pytest.mark.parametrize("name", ["gdn", "kda"])
def test_packed_documents_reset_state(name):
    """cu_seqlens (B = 1) and segment ids give what the oracle gives with resets."""
    a = make(name, 37, seed=5)
    a = {kk: vv[:1] for kk, vv in a.items()}
    a["s0"] = None
    cu = np.array([0, 9, 25, 37])
    starts = np.zeros((1, 37), bool); starts[0, cu[1:-1]] = True
    global B
    B0, B = B, 1
    try:
        o_ref, s_ref = oracle(name, a, starts=starts)
        o_cu, _ = call_no_state(name, a, cu_seqlens=jnp.asarray(cu))
        close(o_cu, o_ref, 2e-5)
        seg = np.searchsorted(cu, np.arange(37), side="right")[None]
        for impl in ("naive", "chunked"):
            o, s = call(name, a, impl=impl, segment_ids=jnp.asarray(seg))
            close(o, o_ref, 2e-5)
            close(s, s_ref, 2e-5)
    finally:
        B = B0


def call_no_state(name, a, **kw):
    j = lambda x: jnp.asarray(x, jnp.float32)
    fn = {"gdn": gated_delta_rule, "kda": kda}[name]
    return fn(j(a["q"]), j(a["k"]), j(a["v"]), j(a["g"]), j(a["beta"]), chunk_size=C, impl="chunked", **kw)


@pytest.mark.parametrize("name", ["gla", "lightning"])
def test_padding_is_identity_and_outputs_zero(name):
    """Segment id 0: output 0, state untouched; a fully padded row gives zeros, not NaN."""
    a = make(name, 37, seed=6)
    seg = np.ones((B, 37), int)
    seg[0, :5] = 0; seg[0, 30:] = 0  # left and right padding
    seg[1] = 0  # fully padded row
    o, s = call(name, a, impl="chunked", segment_ids=jnp.asarray(seg))
    keep = seg.astype(bool)
    b = {kk: (np.where(keep.reshape(B, 37, *([1] * (vv.ndim - 2))), vv, 0) if kk in ("q", "k", "v", "g") else vv)
         for kk, vv in a.items()}
    o_ref, s_ref = oracle(name, b)
    assert np.all(np.isfinite(np.asarray(o)))
    assert np.all(np.asarray(o)[~keep] == 0)
    close(o, o_ref, 2e-5)
    close(s, s_ref, 2e-5)
    close(s[1], a["s0"][1], 1e-6)  # fully padded row: the initial state passes through


@pytest.mark.parametrize("name", ["gdn", "kda"])
def test_gate_extremes(name):
    """g = 0 (no decay) and strongly negative gates (decay to ~0 within a chunk)."""
    for scale, tol in ((0.0, 5e-5), (60.0, 2e-5)):
        a = make(name, 37, seed=7, gate_scale=scale)
        o, s = call(name, a, impl="chunked")
        o_ref, s_ref = oracle(name, a)
        assert np.all(np.isfinite(np.asarray(o)))
        close(o, o_ref, tol)
        close(s, s_ref, tol)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_beta_extremes(beta):
    """beta = 0: no write (only decay); beta = 1: full replacement of the key's value."""
    a = make("gdn", 37, seed=8, beta=beta)
    o, s = call("gdn", a, impl="chunked")
    o_ref, s_ref = oracle("gdn", a)
    close(o, o_ref, 2e-5)
    close(s, s_ref, 2e-5)


def test_unnormalised_keys_delta_rule():
    a = make("kda", 37, seed=10, unit_keys=False)
    a["k"] = a["k"] * 0.35  # |k| ~ 1.2: still a contraction for beta <= 1
    o, s = call("kda", a, impl="chunked")
    o_ref, s_ref = oracle("kda", a)
    close(o, o_ref, 5e-5)


@pytest.mark.parametrize("name", ["gdn", "gla"])
def test_bf16_inputs(name):
    a = make(name, 37, seed=11)
    o, s = call(name, a, impl="chunked", dtype=jnp.bfloat16)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    b = {kk: (np.asarray(jnp.asarray(vv, jnp.bfloat16), np.float64) if kk in ("q", "k", "v", "g", "beta") else vv)
         for kk, vv in a.items()}
    o_ref, s_ref = oracle(name, b)
    close(o, o_ref, 2e-2)
    close(s, s_ref, 1e-4)  # the state is float32 from the (rounded) inputs


def test_errors_are_one_line_user_errors():
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(UserError, match="unknown impl"):
        gla(q, q, q, jnp.zeros((1, 4, 2, 8)), impl="pallas")
    with pytest.raises(UserError, match="g must be"):
        kda(q, q, q, jnp.zeros((1, 4, 2)), jnp.ones((1, 4, 2)))
    with pytest.raises(UserError, match="beta must be"):
        gated_delta_rule(q, q, q, jnp.zeros((1, 4, 2)), jnp.ones((1, 4)))
    with pytest.raises(UserError, match="cu_seqlens needs batch size 1"):
        gla(jnp.ones((2, 4, 2, 8)), jnp.ones((2, 4, 2, 8)), jnp.ones((2, 4, 2, 8)),
            jnp.zeros((2, 4, 2, 8)), cu_seqlens=jnp.array([0, 2, 4]))
