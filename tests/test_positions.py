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


# --------------------------------------------------------------------------- vs Hugging Face
# Peer: transformers' own RoPE initialisers (ROPE_INIT_FUNCTIONS) and its Llama rotary
# embedding + apply_rotary_pos_emb. Test-only dependency; these tests skip without it.
from attn.positions import DynamicNTKScaling, Llama3Scaling, LinearScaling  # noqa: E402

HF_H, HF_THETA, HF_MAXPOS = 72, 10_000.0, 32

# id -> (HF rope_parameters without rope_theta, our scaling with the same numbers)
HF_ROPE_CASES = {
    "linear": ({"rope_type": "linear", "factor": 3.0}, LinearScaling(3.0)),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.5}, DynamicNTKScaling(2.5, HF_MAXPOS)),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
             YarnScaling(4.0, 16)),
    "yarn-untruncated-betas": (
        {"rope_type": "yarn", "factor": 6.0, "original_max_position_embeddings": 20, "truncate": False,
         "beta_fast": 24.0, "beta_slow": 2.0},
        YarnScaling(6.0, 20, beta_fast=24.0, beta_slow=2.0, truncate=False)),
    "yarn-deepseek-mscale": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 24, "mscale": 1.0,
         "mscale_all_dim": 0.7},
        YarnScaling(4.0, 24, mscale_num=1.0, mscale_den=0.7)),
    "yarn-attention-factor": (
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16,
         "attention_factor": 1.3},
        YarnScaling(2.0, 16, mscale=1.3)),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64},
               Llama3Scaling(8.0, 64, low_freq_factor=1.0, high_freq_factor=4.0)),
    "llama3-narrow": ({"rope_type": "llama3", "factor": 3.0, "low_freq_factor": 2.0, "high_freq_factor": 3.0,
                       "original_max_position_embeddings": 300},
                      Llama3Scaling(3.0, 300, low_freq_factor=2.0, high_freq_factor=3.0)),
}


def _hf_config(params):
    transformers = pytest.importorskip("transformers")
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)  # YaRN factor-ratio warnings
    return transformers.LlamaConfig(hidden_size=64, num_attention_heads=1, head_dim=HF_H,
                                    max_position_embeddings=HF_MAXPOS,
                                    rope_parameters={**params, "rope_theta": HF_THETA})


@pytest.mark.parametrize("case", sorted(HF_ROPE_CASES))
def test_inv_freq_and_attention_factor_match_hf(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params, ours = HF_ROPE_CASES[case]
    cfg = _hf_config(params)
    kind = params["rope_type"]
    base = rope_frequencies(HF_H, theta=HF_THETA)
    for seq_len in ((20, 77) if kind == "dynamic" else (None,)):
        ref, ref_factor = ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len=seq_len)
        pos = None if seq_len is None else jnp.arange(seq_len)[None]
        got = np.asarray(ours.inv_freq(np.asarray(base, np.float64), theta=HF_THETA, rotary_dims=HF_H,
                                       positions_BT=pos))
        np.testing.assert_allclose(got, ref.numpy(), rtol=2e-6, err_msg=f"{case} seq_len={seq_len}")
        assert math.isclose(ours.attention_factor, float(ref_factor), rel_tol=1e-12), case
    # Each case exercises its scaling (some frequencies move, and for the ramps some stay).
    moved = ~np.isclose(ref.numpy(), base, rtol=1e-6)
    assert moved.any(), case
    if kind in ("yarn", "llama3"):
        assert (~moved).any() and not np.allclose(ref.numpy()[moved] / base[moved],
                                                  ref.numpy()[moved][0] / base[moved][0]), case


@pytest.mark.parametrize("case", ["default", *sorted(HF_ROPE_CASES)])
def test_rotated_queries_match_hf_llama(case):
    """apply_rope == HF's LlamaRotaryEmbedding + apply_rotary_pos_emb (cos/sin incl. the
    attention factor, and for "dynamic" the base recomputed from the largest position)."""
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    params, ours = HF_ROPE_CASES.get(case, ({"rope_type": "default"}, None))
    rope = LlamaRotaryEmbedding(_hf_config(params))
    x = _rand(10, (2, 9, 3, HF_H))
    k = _rand(11, (2, 9, 3, HF_H))
    for pos in (np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8], [3, 9, 15, 21, 27, 28, 29, 30, 31]]),
                np.array([[5, 17, 40, 41, 42, 43, 44, 45, 46], [0, 2, 4, 6, 8, 10, 12, 77, 13]])):
        cos, sin = rope(torch.zeros(1), torch.from_numpy(pos))
        q_ref, k_ref = apply_rotary_pos_emb(torch.tensor(np.asarray(x)).transpose(1, 2),
                                            torch.tensor(np.asarray(k)).transpose(1, 2), cos, sin)
        got = apply_rope(x, jnp.asarray(pos), theta=HF_THETA, scaling=ours)
        np.testing.assert_allclose(np.asarray(got), q_ref.transpose(1, 2).numpy(), atol=3e-5, rtol=3e-5,
                                   err_msg=f"{case} positions {pos.tolist()}")
        got_k = apply_rope(k, jnp.asarray(pos), theta=HF_THETA, scaling=ours)
        np.testing.assert_allclose(np.asarray(got_k), k_ref.transpose(1, 2).numpy(), atol=3e-5, rtol=3e-5)


def test_yarn_default_is_hf_not_wavelength():
    """The default "yarn" (a dict without "type", and ``SCALINGS["yarn"]``) is HF's ramp over
    the dimension index; the wavelength-ratio ramp differs and needs its explicit name."""
    from attn.positions import SCALINGS, scaling_from_any

    assert SCALINGS["yarn"] is YarnScaling and SCALINGS["yarn_wavelength"] is YarnWavelengthScaling
    assert isinstance(scaling_from_any({"factor": 4.0, "original_max_position": 16}), YarnScaling)
    hf = rope_frequencies(HF_H, theta=HF_THETA, scaling=YarnScaling(4.0, 16))
    wl = rope_frequencies(HF_H, theta=HF_THETA, scaling=YarnWavelengthScaling(4.0, 16))
    assert np.max(np.abs(hf / wl - 1)) > 0.1


def test_interleaved_to_half_gives_interleaved_rope_scores():
    """Oracle: interleaved RoPE (pairs (2i, 2i+1), GPT-J / ggml / DeepSeek) in float64 on
    q = W x; permuting W's rows with interleaved_to_half and applying our rotate-half RoPE
    gives the same q·k scores for every head and position pair."""
    from attn.positions import interleaved_to_half

    N, Hd, D, T, theta = 3, 10, 7, 6, 500.0
    rng = np.random.default_rng(0)
    Wq, Wk = rng.normal(size=(N * Hd, D)), rng.normal(size=(N * Hd, D))
    x = rng.normal(size=(T, D))
    pos = np.array([0, 3, 4, 9, 17, 40])
    inv = 1.0 / theta ** (np.arange(0, Hd, 2) / Hd)

    def rope_interleaved(y):  # y [T, N, Hd]
        a = pos[:, None, None] * inv  # [T, 1, Hd/2]
        even, odd = y[..., 0::2], y[..., 1::2]
        out = np.empty_like(y)
        out[..., 0::2] = even * np.cos(a) - odd * np.sin(a)
        out[..., 1::2] = odd * np.cos(a) + even * np.sin(a)
        return out

    q_ref = rope_interleaved((x @ Wq.T).reshape(T, N, Hd))
    k_ref = rope_interleaved((x @ Wk.T).reshape(T, N, Hd))
    ref = np.einsum("tnh,snh->nts", q_ref, k_ref)

    def ours(W):
        y = (x @ interleaved_to_half(W, N, Hd).T).reshape(1, T, N, Hd).astype(np.float32)
        return np.asarray(apply_rope(jnp.asarray(y), jnp.asarray(pos)[None], theta=theta), np.float64)[0]

    got = np.einsum("tnh,snh->nts", ours(Wq), ours(Wk))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    with pytest.raises(ValueError, match="rows are not"):
        interleaved_to_half(Wq[:-1], N, Hd)
