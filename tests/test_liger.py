"""Liger (attn/linear/liger.py): the layer against a float64 numpy oracle written from the
equations, decode == full forward, gradients of the chunked form == the naive scan, and
the exact limit (mix = 1, window >= T) where the hybrid is the original softmax layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import mha
from attn.linear import liger

D, N, K, H, T = 24, 4, 2, 6, 11


def _params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = dict(q_kernel=(D, N, H), k_kernel=(D, K, H), v_kernel=(D, K, H), o_kernel=(N, H, D))
    return {k: 0.4 * rng.standard_normal(s) for k, s in shapes.items()}


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _rope(x, pos, theta):
    h = x.shape[-1] // 2
    ang = pos[:, :, None, None] * theta ** (-np.arange(h) * 2.0 / x.shape[-1])
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def _oracle(p, x, *, hybrid, window, mix=0.5, theta=10000.0):
    q = np.einsum("btd,dnh->btnh", x, p["q_kernel"])
    k = np.einsum("btd,dkh->btkh", x, p["k_kernel"])
    v = np.einsum("btd,dkh->btkh", x, p["v_kernel"])
    rep = lambda a: np.repeat(a, N // K, axis=2)
    qf, kf, vr = _softmax(q), rep(_softmax(k)), rep(v)
    g = rep(-np.logaddexp(0.0, -k) / 16.0)                       # logsigmoid / 16
    B = x.shape[0]
    S = np.zeros((B, N, H, H))
    o_lin = np.zeros((B, T, N, H))
    for t in range(T):
        S = np.exp(g[:, t])[..., None] * S + kf[:, t, :, :, None] * vr[:, t, :, None, :]
        o_lin[:, t] = np.einsum("bnh,bnhv->bnv", qf[:, t], S)
    o = o_lin
    if hybrid:
        pos = np.broadcast_to(np.arange(T), (B, T)).astype(np.float64)
        qr, kr = _rope(q, pos, theta), rep(_rope(k, pos, theta))
        logits = np.einsum("btnh,bsnh->bnts", qr, kr) / np.sqrt(H)
        d = np.arange(T)[:, None] - np.arange(T)[None]
        logits = np.where((d >= 0) & (d <= window), logits, -np.inf)
        o_swa = np.einsum("bnts,bsnh->btnh", _softmax(logits), vr)
        o = mix * o_swa + (1 - mix) * o_lin
    return np.einsum("btnh,nhd->btd", o, p["o_kernel"])


@pytest.mark.parametrize("hybrid", [True, False])
def test_liger_matches_the_float64_oracle(hybrid):
    p = _params()
    x = np.random.default_rng(1).standard_normal((2, T, D))
    cfg = liger.Config(d_model=D, num_heads=N, num_kv_heads=K, head_dim=H, window=3, hybrid=hybrid,
                       dtype="float32", chunk_size=4)
    y, _ = liger.liger_forward({k: jnp.asarray(v, jnp.float32) for k, v in p.items()},
                               jnp.asarray(x, jnp.float32), config=cfg)
    np.testing.assert_allclose(np.asarray(y), _oracle(p, x, hybrid=hybrid, window=3), rtol=2e-4, atol=2e-4)
    assert liger.stats(cfg, 64)["kv_bytes_per_token"] == 0


def test_liger_decode_equals_forward_and_chunked_grads_equal_naive():
    p = {k: jnp.asarray(v, jnp.float32) for k, v in _params(2).items()}
    x = jax.random.normal(jax.random.key(3), (2, T, D))
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    cfg = liger.Config(d_model=D, num_heads=N, num_kv_heads=K, head_dim=H, window=3, dtype="float32",
                       chunk_size=4)
    fwd = jax.jit(liger.liger_forward, static_argnames="config")
    full, _ = fwd(p, x, config=cfg, positions_BT=pos)
    cache, outs = liger.init_cache(cfg, 2), []
    for a, b in ((0, 5), (5, 6), (6, T)):                           # a prefill, one token, the rest
        y, cache = fwd(p, x[:, a:b], config=cfg, positions_BT=pos[:, a:b], cache=cache)
        outs.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=2e-5)
    assert int(cache.length) == T and cache.swa.k.shape[1] == 3

    # Gradients through the recurrence (the softmax branch is the op's, tested elsewhere).
    def loss(params, impl):
        y, _ = liger.liger_forward(params, x[:1, :6], config=cfg.replace(linear_impl=impl, hybrid=False))
        return jnp.sum(y * jnp.cos(jnp.arange(D)))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g1, g2 = grad(p, "chunked"), grad(p, "naive")
    for k in p:
        np.testing.assert_allclose(np.asarray(g1[k]), np.asarray(g2[k]), rtol=1e-4, atol=1e-4, err_msg=k)


def test_liger_hybrid_with_only_the_softmax_branch_is_the_original_layer():
    """mix = 1 and a window >= T: the same function as the MHA layer on the same weights."""
    p = {k: jnp.asarray(v, jnp.float32) for k, v in _params(4).items()}
    x = jax.random.normal(jax.random.key(5), (1, T, D))
    g = mha.Config(d_model=D, num_heads=N, num_kv_heads=K, head_dim=H, dtype="float32")
    cfg = liger.Config(d_model=D, num_heads=N, num_kv_heads=K, head_dim=H, dtype="float32", window=T, mix=1.0)
    np.testing.assert_allclose(np.asarray(liger.liger_forward(p, x, config=cfg)[0]),
                               np.asarray(mha.mha_forward(p, x, config=g)[0]), atol=1e-5)
    assert liger.Config.from_mha(g, window=T, mix=1.0) == cfg
    for bad, match in ((dict(mix=2.0), "mix must be in"), (dict(linear_impl="x"), "linear_impl")):
        with pytest.raises(ValueError, match=match):
            liger.Config(d_model=D, num_heads=N, **bad)
    for bad, match in ((dict(qk_norm=True), "qk_norm"), (dict(causal=False), "causal=False")):
        with pytest.raises(ValueError, match=match):
            liger.Config.from_mha(g.replace(**bad))
