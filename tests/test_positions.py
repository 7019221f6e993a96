"""RoPE (full, partial, YaRN) and ALiBi helpers in attn/positions.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.positions import (
    RopeConfig,
    YarnScaling,
    YarnWavelengthScaling,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    rope_frequencies,
    rotary_dims,
)

H = 72  # awkward head dim on purpose


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def _numpy_rope(x, pos, inv_freq):
    """Reference rotate-half RoPE written pair by pair (dim i pairs with i + R/2)."""
    x = np.asarray(x, np.float64)
    R = 2 * len(inv_freq)
    out = x.copy()
    for i, f in enumerate(np.asarray(inv_freq, np.float64)):
        a = np.asarray(pos, np.float64)[:, :, None] * f
        x1, x2 = x[..., i], x[..., i + R // 2]
        out[..., i] = x1 * np.cos(a) - x2 * np.sin(a)
        out[..., i + R // 2] = x2 * np.cos(a) + x1 * np.sin(a)
    return out


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_matches_pairwise_reference(fraction):
    x = _rand(0, (2, 5, 3, H))
    pos = jnp.array([[0, 1, 2, 3, 4], [7, 100, 3, 0, 2048]])
    y = apply_rope(x, pos, theta=10_000.0, fraction=fraction)
    ref = _numpy_rope(x, pos, rope_frequencies(H, theta=10_000.0, fraction=fraction))
    np.testing.assert_allclose(np.asarray(y), ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "rope",
    [
        RopeConfig(),
        RopeConfig(theta=500_000.0, fraction=0.25),
        RopeConfig(scaling=YarnScaling(factor=8.0, original_max_position=64)),
    ],
    ids=["full", "partial", "yarn"],
)
def test_relative_position_property(rope):
    """q·k after RoPE depends only on pos_q - pos_k."""
    q = _rand(1, (1, 1, 1, H))
    k = _rand(2, (1, 1, 1, H))

    def score(pq, pk):
        rq = rope.apply(q, jnp.array([[pq]]))
        rk = rope.apply(k, jnp.array([[pk]]))
        return float(jnp.sum(rq * rk))

    for delta in (0, 3, 37):
        scores = [score(p + delta, p) for p in (0, 5, 123, 1000)]
        np.testing.assert_allclose(scores, scores[0], rtol=2e-4, atol=2e-4)
    # ...and it does depend on the difference.
    assert abs(score(10, 0) - score(0, 0)) > 1e-3


def test_partial_fraction_leaves_tail_unchanged():
    x = _rand(3, (2, 4, 2, H))
    pos = jnp.arange(4)[None].repeat(2, 0) + 5
    R = rotary_dims(H, 0.25)
    assert R == 18
    y = apply_rope(x, pos, fraction=0.25)
    np.testing.assert_array_equal(np.asarray(y[..., R:]), np.asarray(x[..., R:]))
    assert not np.allclose(np.asarray(y[..., :R]), np.asarray(x[..., :R]))


def test_position_zero_is_identity_and_norm_is_kept():
    x = _rand(4, (1, 2, 2, H))
    y = apply_rope(x, jnp.array([[0, 9]]))
    np.testing.assert_allclose(np.asarray(y[:, 0]), np.asarray(x[:, 0]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_dtype_roundtrip_bf16():
    x = _rand(5, (1, 3, 1, 8)).astype(jnp.bfloat16)
    y = apply_rope(x, jnp.arange(3)[None])
    assert y.dtype == jnp.bfloat16


def test_yarn_sanity():
    base = rope_frequencies(H, theta=10_000.0)
    # factor 1 is plain RoPE.
    same = rope_frequencies(H, theta=10_000.0, scaling=YarnWavelengthScaling(factor=1.0, original_max_position=256))
    np.testing.assert_allclose(same, base, rtol=1e-6)
    s = YarnWavelengthScaling(factor=4.0, original_max_position=256)
    scaled = rope_frequencies(H, theta=10_000.0, scaling=s)
    ratio = scaled / base
    wavelength = 2 * np.pi / base
    r = s.original_max_position / wavelength
    # High frequencies (many rotations in the original context) are kept ...
    np.testing.assert_allclose(ratio[r > s.beta_fast], 1.0, rtol=1e-6)
    # ... low frequencies are interpolated by the full factor ...
    np.testing.assert_allclose(ratio[r < s.beta_slow], 1 / s.factor, rtol=1e-6)
    # ... with a monotone ramp in between, and both ends present in this head.
    assert (r > s.beta_fast).any() and (r < s.beta_slow).any()
    assert np.all(np.diff(ratio) <= 1e-7)
    # Temperature: sqrt(1/t) = 0.1 ln s + 1 scales q and k, so norms grow by it.
    assert math.isclose(s.attention_factor, 0.1 * math.log(4.0) + 1.0)
    x = _rand(6, (1, 2, 1, H))
    y = apply_rope(x, jnp.array([[0, 50]]), scaling=s, fraction=0.5)
    np.testing.assert_allclose(
        np.linalg.norm(y, axis=-1), s.attention_factor * np.linalg.norm(x, axis=-1), rtol=1e-5
    )


def test_alibi():
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=1e-6)
    s6 = alibi_slopes(6)  # 4 power-of-two slopes, then every other one of the 8-head set
    np.testing.assert_allclose(s6, [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rtol=1e-6)
    b = alibi_bias(jnp.asarray(s6), jnp.array([[3]]), jnp.array([[0, 1, 2, 3]]))
    np.testing.assert_allclose(np.asarray(b[0, 0, 0]), -0.25 * np.array([3, 2, 1, 0]), rtol=1e-6)


def test_errors_name_the_cause():
    x = jnp.ones((1, 2, 1, 8))
    with pytest.raises(ValueError, match="x must be"):
        apply_rope(x[0], jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="positions must be"):
        apply_rope(x, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="fraction"):
        RopeConfig(fraction=0.0)
    with pytest.raises(ValueError, match="factor"):
        YarnScaling(factor=0.5, original_max_position=10)
    with pytest.raises(ValueError, match="unknown keys"):
        RopeConfig.from_any({"thetaa": 1.0})
    cfg = RopeConfig.from_any({"theta": 5.0, "scaling": {"factor": 2.0, "original_max_position": 8}})
    assert cfg.scaling.factor == 2.0
