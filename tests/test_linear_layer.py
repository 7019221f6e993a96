"""The linear family as attnlab mechanisms: registry, decode == forward, stats, hybrids."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import registry
from models.transformer import LMConfig, Transformer, init_cache

NAMES = ["gdn", "kda", "gla", "lightning"]
COMMON = dict(d_model=24, num_heads=2, head_dim=12, dtype="float32", impl="auto")


def _layer(name, **over):
    mech = registry.get(name)
    cfg = mech.make_config(COMMON, dict(dict(chunk_size=8, value_dim=10), **over))
    return mech, cfg, mech.module(cfg)


def _random_params(layer, x):
    """Random parameters in the layer's layout without compiling its initialisers (slow)."""
    shapes = jax.eval_shape(lambda: nn.unbox(layer.init(jax.random.key(0), x)))
    r = np.random.default_rng(0)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(0.3 * r.standard_normal(a.shape) + (a.ndim == 1), a.dtype), shapes)


def test_registered_with_package_scan():
    assert set(NAMES) <= set(registry.names())
    assert not registry.get("gdn").order_free  # conv and recurrence run along T


@pytest.mark.parametrize("name", NAMES)
def test_decode_in_any_steps_equals_forward(name):
    """Prefill 7, two single tokens, then 14 at once (chunked inside) == one forward."""
    mech, cfg, layer = _layer(name, conv_size=3 if name in ("gdn", "kda") else 0)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 23, 24)), jnp.float32)
    params = _random_params(layer, x)
    y, _ = jax.jit(layer.apply)(params, x)
    cache = mech.init_cache(cfg, batch=2, max_len=23)
    step = jax.jit(lambda c, xs: layer.apply(params, xs, cache=c))
    outs = []
    for a, b in ((0, 7), (7, 8), (8, 9), (9, 23)):
        o, cache = step(cache, x[:, a:b])
        outs.append(o)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(y), atol=2e-5, rtol=2e-5)
    assert int(cache.length) == 23
    # state_bytes is what the cache holds per sequence (the shared int32 length aside).
    per_seq = sum(a.nbytes for a in jax.tree_util.tree_leaves(cache) if a.ndim) // 2
    assert mech.stats(cfg, 23)["state_bytes"] == per_seq
    n = sum(a.size for a in jax.tree_util.tree_leaves(params))
    assert mech.stats(cfg, 23)["params"] == n


def test_packed_documents_equal_separate_runs():
    """Segment ids reset the state and the conv; padding (0) gives identity steps."""
    mech, cfg, layer = _layer("gdn", conv_size=4)
    r = np.random.default_rng(2)
    x = jnp.asarray(r.normal(size=(1, 30, 24)), jnp.float32)
    params = _random_params(layer, x)
    seg = jnp.asarray([[0] * 3 + [1] * 11 + [2] * 16])
    y, _ = jax.jit(lambda p, x, s: layer.apply(p, x, segment_ids_BT=s))(params, x, seg)
    fwd = jax.jit(layer.apply)
    y1, _ = fwd(params, x[:, 3:14])
    y2, _ = fwd(params, x[:, 14:])
    np.testing.assert_allclose(np.asarray(y[:, 3:]), np.asarray(jnp.concatenate([y1, y2], 1)), atol=2e-5)


@functools.lru_cache(maxsize=None)
def _lm(attn):
    cfg = LMConfig(vocab_size=32, d_model=24, num_layers=2, num_heads=2, head_dim=12, attn=attn,
                   attn_overrides={n: {"chunk_size": 8} for n in attn.split(",") if n in NAMES},
                   dtype="float32", param_dtype="float32")
    return cfg, _random_params(Transformer(cfg), jnp.zeros((1, 4), jnp.int32))


def test_hybrid_lm_gdn_mha_decode():
    """A gdn + mha stack: chunked prefill and decode through the model cache == forward."""
    cfg, params = _lm("gdn,mha")
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 32, size=(2, 19)), jnp.int32)
    ref, _ = jax.jit(Transformer(cfg).apply)(params, tokens)
    cache = init_cache(cfg, batch=2, max_len=19)
    apply = jax.jit(lambda t, c: Transformer(cfg).apply(params, t, cache=c))
    outs = []
    for a, b in ((0, 10), (10, 11), (11, 19)):
        y, cache = apply(tokens[:, a:b], cache)
        outs.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(ref), atol=1e-4, rtol=1e-4)


def test_layer_gradients_finite():
    """Gradients flow through the whole layer (conv, gates, beta, chunked VJP, norm)."""
    mech, cfg, layer = _layer("kda", conv_size=3)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 20, 24)), jnp.float32)
    params = _random_params(layer, x)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x)[0] ** 2)))(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0 for g in leaves)

def test_mqar_config_accepts_linear_names():
    from configs import mqar
    for attn in ("gla", "gdn", "kda", "lightning", "gdn+mha"):
        c = mqar.get_config(f"attn={attn},steps=10")
        LMConfig.from_dict(c.model.to_dict())
