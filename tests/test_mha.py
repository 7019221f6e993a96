"""MHA / GQA / MQA layer: decode == full forward, caches, stats, input errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import mha
from attn.cache import KVCache, RingKVCache, cache_nbytes
from attn.positions import RopeConfig, YarnScaling

B, T, D = 2, 7, 32

# Two packed documents in row 0; two padding tokens (segment 0) then one document in row 1.
SEG = np.array([[1, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1]], np.int32)
POS_SEG = np.array([[0, 1, 2, 0, 1, 2, 3], [0, 0, 0, 1, 2, 3, 4]], np.int32)
POS = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))

CONFIGS = {
    "mha": mha.Config(d_model=D, num_heads=4, dtype="float32"),
    "gqa_window": mha.Config(d_model=D, num_heads=4, num_kv_heads=2, window=2, dtype="float32"),
    "mqa_everything": mha.Config(
        d_model=D, num_heads=4, num_kv_heads=1, head_dim=6, qk_norm=True, sinks=True,
        softcap=5.0, use_bias=True, dtype="float32",
        rope=RopeConfig(fraction=0.5, scaling=YarnScaling(factor=2.0, original_max_position=4)),
    ),
    "gqa_window3_sinks": mha.Config(d_model=D, num_heads=4, num_kv_heads=2, window=3,
                                    sinks=True, dtype="float32"),
}

# (config name, use segments, chunk sizes for the appends)
DECODE_CASES = [
    ("mha", False, [1] * T),
    ("mha", True, [3, 1, 3]),
    ("gqa_window", False, [1] * T),
    ("gqa_window", False, [3, 1, 3]),  # a chunk longer than the ring (capacity 2)
    ("mqa_everything", True, [2, 4, 1]),
    ("gqa_window3_sinks", True, [1, 5, 1]),
]


@functools.lru_cache(maxsize=None)
def _params(name):
    return _init(CONFIGS[name])


def _init(cfg):
    """Random params in the layer's layout, without compiling its initializers (slow on CPU).

    Everything is random, so zero-initialised biases, sinks and norm gains matter too.
    """
    shapes = jax.eval_shape(lambda: nn.unbox(mha.MHA(cfg).init(jax.random.key(0), jnp.zeros((B, T, D)))))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray((0.3 if a.ndim < 2 else 0.2) * rng.standard_normal(a.shape)
                              + (a.ndim < 2), a.dtype), shapes)


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, x, pos, seg, cache):
    return mha.MHA(cfg).apply(params, x, positions_BT=pos, segment_ids_BT=seg, cache=cache)


def _x():
    return jax.random.normal(jax.random.key(2), (B, T, D), jnp.float32)


@pytest.mark.parametrize("name,segments,chunks", DECODE_CASES,
                         ids=[f"{n}-seg{int(s)}-{'x'.join(map(str, c))}" for n, s, c in DECODE_CASES])
def test_decode_equals_full_forward(name, segments, chunks):
    cfg, params, x = CONFIGS[name], _params(name), _x()
    pos = jnp.asarray(POS_SEG if segments else POS)
    seg = jnp.asarray(SEG) if segments else None
    y_full, none = _apply(cfg, params, x, pos, seg, None)
    assert none is None
    cache = mha.init_cache(cfg, batch=B, max_len=T + 2, dtype=jnp.float32)
    assert isinstance(cache, RingKVCache if cfg.window is not None else KVCache)
    outs, t = [], 0
    for n in chunks:
        y, cache = _apply(cfg, params, x[:, t:t + n], pos[:, t:t + n],
                          None if seg is None else seg[:, t:t + n], cache)
        outs.append(y)
        t += n
    assert int(cache.length) == T
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(y_full),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["gqa_window3_sinks", "mqa_everything"])
def test_forward_matches_oracle(name):
    """Projections from the layer, mask written out by hand, attention from the float64 oracle."""
    from oracle import reference_attention

    cfg, params, x = CONFIGS[name], _params(name), _x()
    p = params["params"]
    pos, seg = POS_SEG, SEG
    q, k, v = mha.project_qkv(p, x, jnp.asarray(pos), cfg)
    W = np.inf if cfg.window is None else cfg.window
    dq, dk = pos[:, :, None], pos[:, None, :]
    vis = (dk <= dq) & (dk >= dq - W) & (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    o, _ = reference_attention(np.asarray(q), np.asarray(k), np.asarray(v), dense_mask=vis[:, None],
                               softcap=cfg.softcap,
                               sinks=np.asarray(p["sinks"]) if cfg.sinks else None)
    y_ref = np.einsum("btne,ned->btd", o, np.asarray(p["o_kernel"], np.float64))
    if cfg.use_bias:
        y_ref = y_ref + np.asarray(p["o_bias"])
    y, _ = _apply(cfg, params, x, jnp.asarray(pos), jnp.asarray(seg), None)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5, rtol=2e-5)


def test_window_actually_limits_context():
    """Sanity for the test above: a window-2 layer differs from the unwindowed one."""
    name = "gqa_window"
    full = CONFIGS[name].replace(window=None)
    params, x = _params(name), _x()
    y_win, _ = _apply(CONFIGS[name], params, x, jnp.asarray(POS), None, None)
    y_all, _ = _apply(full, params, x, jnp.asarray(POS), None, None)
    np.testing.assert_allclose(np.asarray(y_win[:, :3]), np.asarray(y_all[:, :3]), atol=1e-5)
    assert not np.allclose(np.asarray(y_win[:, 3:]), np.asarray(y_all[:, 3:]), atol=1e-3)


def test_positions_none_means_arange():
    cfg, params, x = CONFIGS["mha"], _params("mha"), _x()
    y0, _ = mha.MHA(cfg).apply(params, x)
    y1, _ = mha.MHA(cfg).apply(params, x, positions_BT=jnp.asarray(POS))
    np.testing.assert_allclose(np.asarray(y0), np.asarray(y1), atol=1e-6)


def test_bf16_compute_fp32_params():
    cfg = CONFIGS["mha"].replace(dtype="bfloat16")
    params = _init(cfg)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))
    y, _ = mha.MHA(cfg).apply(params, _x())
    assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["mha", "mqa_everything", "gqa_window3_sinks"])
def test_stats_match_counted_params_and_cache_bytes(name):
    cfg = CONFIGS[name].replace(dtype="bfloat16")
    params = jax.eval_shape(lambda: nn.unbox(mha.MHA(cfg).init(jax.random.key(0), _x())))
    counted = sum(a.size for a in jax.tree_util.tree_leaves(params))
    s = mha.stats(cfg, seq_len=16)
    assert s["params"] == counted
    assert s["state_bytes"] == 0
    batch, max_len = 3, 11
    cache = mha.init_cache(cfg, batch, max_len)
    slots = cfg.window if cfg.window is not None else max_len
    assert cache.capacity == slots
    # Every array but the scalar write index scales with the cached tokens.
    per_slot_bytes = cache_nbytes(cache) - cache.length.nbytes
    assert per_slot_bytes == s["kv_bytes_per_token"] * batch * slots
    assert cache.k.dtype == jnp.bfloat16


def test_flops_formula():
    cfg = mha.Config(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8)
    s = mha.stats(cfg, seq_len=4)
    proj = 2 * (32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32)
    assert s["flops_per_token"] == proj + 4 * 4 * 8 * 2.5  # causal mean context (T+1)/2
    win = mha.stats(cfg.replace(window=1), seq_len=4)
    assert win["flops_per_token"] == proj + 4 * 4 * 8 * (1 + 2 + 2 + 2) / 4
    assert mha.mean_context(5, causal=False, window=None) == 5.0


def test_full_cache_overflow():
    c = KVCache.create(batch=1, max_len=4, num_kv_heads=1, head_dim=2)
    new = lambda n: (jnp.ones((1, n, 1, 2)), jnp.ones((1, n, 1, 2)),
                     jnp.zeros((1, n), jnp.int32), jnp.ones((1, n), jnp.int32))
    with pytest.raises(ValueError, match="overflow.*T=5"):
        c.append(*new(5))
    *_, c = c.append(*new(3))
    with pytest.raises(ValueError, match="length=3 \\+ T=2"):
        c.append(*new(2))
    # Traced length: cannot raise; extra tokens are dropped and the flag says so.
    c2 = jax.jit(lambda c: c.append(*new(2))[-1])(c)
    assert bool(c2.overflowed) and int(c2.length) == 5
    np.testing.assert_array_equal(np.asarray(c2.segment_ids), [[1, 1, 1, 1]])


def test_ring_keeps_newest_tokens():
    c = RingKVCache.create(batch=1, window=3, num_kv_heads=1, head_dim=2)
    for n in (2, 5, 1):
        t0 = int(c.length)
        pos = jnp.arange(t0, t0 + n, dtype=jnp.int32)[None]
        x = jnp.broadcast_to(pos[..., None, None].astype(jnp.float32), (1, n, 1, 2))
        k_all, _, p_all, s_all, c = c.append(x, x, pos, jnp.ones_like(pos))
        assert k_all.shape[1] == 3 + n
    assert sorted(np.asarray(c.positions)[0].tolist()) == [5, 6, 7]
    np.testing.assert_array_equal(np.asarray(c.k[0, :, 0, 0]), np.asarray(c.positions[0]))


def test_bad_inputs_raise_clear_errors():
    cfg, params = CONFIGS["mha"], _params("mha")
    layer = mha.MHA(cfg)
    with pytest.raises(ValueError, match="x must be \\[B, T, D\\]"):
        layer.apply(params, jnp.ones((T, D)))
    with pytest.raises(ValueError, match="d_model=32"):
        layer.apply(params, jnp.ones((B, T, D + 1)))
    with pytest.raises(ValueError, match="positions_BT must have shape"):
        layer.apply(params, _x(), positions_BT=jnp.zeros((B, T + 1), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids_BT must have shape"):
        layer.apply(params, _x(), segment_ids_BT=jnp.zeros((B,), jnp.int32))
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        mha.Config(d_model=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="d_model=30 is not a multiple of num_heads=4"):
        mha.Config(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="Config.window"):
        mha.Config(d_model=32, num_heads=4, window=-1)
    with pytest.raises(ValueError, match="Config.dtype"):
        mha.Config(d_model=32, num_heads=4, dtype="floaty")
    with pytest.raises(ValueError, match="Config.num_heads must be a positive int, got 0"):
        mha.Config(d_model=32, num_heads=0)
    nc = cfg.replace(causal=False)
    with pytest.raises(ValueError, match="causal=True"):
        mha.MHA(nc).apply(params, _x()[:, :1], positions_BT=jnp.zeros((B, 1), jnp.int32),
                          cache=mha.init_cache(cfg, B, 4))
