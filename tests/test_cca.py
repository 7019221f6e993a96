"""CCA / CCGQA layer: float64 reference, decode == full forward (conv state), documents, stats, LM.

The MQAR training smoke run that covers "ccgqa" lives in tests/test_moh.py (one compile
for a two-layer "ccgqa,moh" model).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import cca, registry
from attn.cache import KVCache, cache_nbytes
from attn.positions import RopeConfig

B, T, D = 2, 7, 32

# Two packed documents in row 0; two padding tokens (segment 0) then one document in row 1.
SEG = np.array([[1, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1]], np.int32)
POS_SEG = np.array([[0, 1, 2, 0, 1, 2, 3], [0, 0, 0, 1, 2, 3, 4]], np.int32)
POS = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))

CONFIGS = {
    # N' = 2 latent heads of H = 8, K = 2 (plain CCA), reference kernel widths 2 and 2.
    "cca": cca.Config(d_model=D, num_heads=4, dtype="float32"),
    # CCGQA with awkward shapes: H = 6, K = 1 < N' = 2, conv1 of width 3.
    "ccgqa_w3": cca.Config(d_model=D, num_heads=4, head_dim=6, num_kv_heads=1, seq_kernel=3,
                           dtype="float32", rope=RopeConfig(theta=100.0)),
    # Ablations off and a width-1 conv1 (an empty conv1 state), conv2 of width 3.
    "bare_w1": cca.Config(d_model=D, num_heads=8, compression=4, seq_kernel=1, seq_channel_kernel=3,
                          qk_mean=False, value_shift=False, conv_bias=False, rope=None,
                          dtype="float32"),
}

DECODE_CASES = [
    ("cca", False, [1] * T),
    ("cca", True, [3, 1, 3]),
    ("ccgqa_w3", True, [1, 5, 1]),
    ("bare_w1", True, [2, 4, 1]),
]


@functools.lru_cache(maxsize=None)
def _params(name):
    return _init(CONFIGS[name])


def _init(cfg):
    """Random params in the layer's layout, without compiling its initializers (slow on CPU).

    Everything is random (conv biases, temperatures), so nothing hides behind a zero init.
    """
    shapes = jax.eval_shape(lambda: nn.unbox(cca.CCA(cfg).init(jax.random.key(0), jnp.zeros((B, T, D)))))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape) + (a.ndim == 1), a.dtype), shapes)


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, x, pos, seg, cache):
    return cca.CCA(cfg).apply(params, x, positions_BT=pos, segment_ids_BT=seg, cache=cache)


def _x(seed=2):
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


# --------------------------------------------------------------------------- reference
def _np_rope(x_TNH, pos_T, theta):
    H = x_TNH.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, H, 2) / H)
    ang = pos_T[:, None, None] * inv
    x1, x2 = x_TNH[..., : H // 2], x_TNH[..., H // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def _np_two_convs(x_LNH, w1, b1, w2, b2):
    """The reference's convs on one document: zero-pad (w1-1)+(w2-1) inputs, two valid convs."""
    k1, k2 = w1.shape[0], w2.shape[0]
    xp = np.concatenate([np.zeros((k1 - 1 + k2 - 1,) + x_LNH.shape[1:]), x_LNH])
    n1 = xp.shape[0] - k1 + 1
    h1 = b1 + sum(w1[i] * xp[i:i + n1] for i in range(k1))
    n2 = h1.shape[0] - k2 + 1
    return b2 + sum(np.einsum("lne,neh->lnh", h1[i:i + n2], w2[i]) for i in range(k2))


def _np_cca_qkv(p, x_LD, pos_L, cfg):
    """float64 q, k, v of one document, written from the module docstring's equations."""
    f = {k: np.asarray(v, np.float64) for k, v in p.items()}
    zeros = lambda s: f.get(s, 0.0)
    q0 = np.einsum("ld,dnh->lnh", x_LD, f["q_kernel"])
    k0 = np.einsum("ld,dkh->lkh", x_LD, f["k_kernel"])
    v0 = np.einsum("ld,dke->lke", x_LD, f["v_kernel"])
    q = _np_two_convs(q0, f["q_conv1"], zeros("q_conv1_bias"), f["q_conv2"], zeros("q_conv2_bias"))
    k = _np_two_convs(k0, f["k_conv1"], zeros("k_conv1_bias"), f["k_conv2"], zeros("k_conv2_bias"))
    G = cfg.latent_heads // cfg.num_kv_heads
    if cfg.qk_mean:
        m = (q0 + np.repeat(k0, G, axis=1)) / 2
        q = q + m
        k = k + m.reshape(m.shape[0], -1, G, m.shape[-1]).mean(2)
    if cfg.value_shift:
        L, K, E = v0.shape
        flat = v0.reshape(L, K * E)
        prev = np.concatenate([np.zeros((1, K * E)), flat[:-1]])
        v0 = np.concatenate([flat[:, : K * E // 2], prev[:, K * E // 2:]], 1).reshape(L, K, E)
    H = q.shape[-1]
    unit = lambda a: a * np.sqrt(H) / np.sqrt(np.sum(a * a, -1, keepdims=True) + cfg.norm_eps)
    q, k = unit(q), unit(k) * f["temperature"][:, None]
    if cfg.rope is not None:
        q, k = _np_rope(q, pos_L, cfg.rope.theta), _np_rope(k, pos_L, cfg.rope.theta)
    return q, k, v0


@pytest.mark.parametrize("name", ["ccgqa_w3", "bare_w1"])
def test_forward_matches_float64_reference(name):
    """Each document run alone through the reference's zero-padded convs, then the oracle."""
    from oracle import reference_attention

    cfg, params, x = CONFIGS[name], _params(name), np.asarray(_x(), np.float64)
    p = params["params"]
    y_ref = np.zeros((B, T, D))
    for b in range(B):
        for s in set(SEG[b].tolist()) - {0}:
            idx = np.nonzero(SEG[b] == s)[0]
            q, k, v = _np_cca_qkv(p, x[b, idx], POS_SEG[b, idx].astype(np.float64), cfg)
            causal = np.tril(np.ones((len(idx), len(idx)), bool))
            o, _ = reference_attention(q[None], k[None], v[None], dense_mask=causal[None, None])
            y_ref[b, idx] = np.einsum("lne,ned->ld", o[0], np.asarray(p["o_kernel"], np.float64))
    y, _ = _apply(cfg, params, jnp.asarray(x, jnp.float32), jnp.asarray(POS_SEG), jnp.asarray(SEG), None)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=3e-5, rtol=3e-5)


# --------------------------------------------------------------------------- decode
@pytest.mark.parametrize("name,segments,chunks", DECODE_CASES,
                         ids=[f"{n}-seg{int(s)}-{'x'.join(map(str, c))}" for n, s, c in DECODE_CASES])
def test_decode_equals_full_forward(name, segments, chunks):
    cfg, params, x = CONFIGS[name], _params(name), _x()
    pos = jnp.asarray(POS_SEG if segments else POS)
    seg = jnp.asarray(SEG) if segments else None
    y_full, none = _apply(cfg, params, x, pos, seg, None)
    assert none is None
    cache = cca.init_cache(cfg, batch=B, max_len=T + 2, dtype=jnp.float32)
    outs, t = [], 0
    for n in chunks:
        y, cache = _apply(cfg, params, x[:, t:t + n], pos[:, t:t + n],
                          None if seg is None else seg[:, t:t + n], cache)
        outs.append(y)
        t += n
    assert int(cache.length) == T
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(y_full),
                               atol=2e-5, rtol=2e-5)


def test_conv_state_matters_in_decode():
    """Decoding with a reset conv state differs: the state really carries the convs."""
    cfg, params, x = CONFIGS["cca"], _params("cca"), _x()
    pos = jnp.asarray(POS)
    cache = cca.init_cache(cfg, batch=B, max_len=T + 2, dtype=jnp.float32)
    _, cache = _apply(cfg, params, x[:, :3], pos[:, :3], None, cache)
    y_ok, _ = _apply(cfg, params, x[:, 3:6], pos[:, 3:6], None, cache)
    fresh = cache.replace(conv=cca.ConvState.zeros(cfg, B, jnp.float32))
    y_reset, _ = _apply(cfg, params, x[:, 3:6], pos[:, 3:6], None, fresh)
    assert not np.allclose(np.asarray(y_ok[:, 0]), np.asarray(y_reset[:, 0]), atol=1e-3)
    # Only the first w1 - 1 + w2 - 1 = 2 tokens of the chunk see the state through the convs,
    # the first one through the value shift; the rest differ only through attention.
    assert cache.conv.q_conv1.shape == (B, 1, 2, 8) and cache.conv.v_prev.shape == (B, 8)


def test_documents_do_not_leak():
    """Changing document 1 (and the padding) changes nothing in document 2 (convs restart)."""
    cfg, params = CONFIGS["ccgqa_w3"], _params("ccgqa_w3")
    pos, seg, x = jnp.asarray(POS_SEG), jnp.asarray(SEG), _x()
    change = np.zeros((B, T, 1), bool)
    change[0, :3] = True  # row 0, document 1
    change[1, :2] = True  # row 1, the padding
    other = jnp.where(change, _x(seed=9), x)
    y, _ = _apply(cfg, params, x, pos, seg, None)
    y2, _ = _apply(cfg, params, other, pos, seg, None)
    np.testing.assert_array_equal(np.asarray(y[0, 3:]), np.asarray(y2[0, 3:]))
    assert not np.allclose(np.asarray(y[0, :3]), np.asarray(y2[0, :3]))
    np.testing.assert_array_equal(np.asarray(y[1, 2:]), np.asarray(y2[1, 2:]))


# --------------------------------------------------------------------------- stats
@pytest.mark.parametrize("name", list(CONFIGS))
def test_stats_match_counted_params_and_cache_bytes(name):
    cfg = CONFIGS[name].replace(dtype="bfloat16")
    params = jax.eval_shape(lambda: nn.unbox(cca.CCA(cfg).init(jax.random.key(0), _x())))
    counted = sum(a.size for a in jax.tree_util.tree_leaves(params))
    s = cca.stats(cfg, seq_len=16)
    assert s["params"] == counted
    batch, max_len = 3, 11
    cache = cca.init_cache(cfg, batch, max_len)
    assert isinstance(cache.kv, KVCache) and cache.kv.k.dtype == jnp.bfloat16
    kv_bytes = cache_nbytes(cache.kv) - cache.kv.length.nbytes
    assert kv_bytes == s["kv_bytes_per_token"] * batch * max_len
    assert cache_nbytes(cache.conv) == s["state_bytes"] * batch
    assert cache_nbytes(cache) - cache.length.nbytes == (
        s["kv_bytes_per_token"] * max_len + s["state_bytes"]) * batch


def test_flops_and_compression():
    mha_like = dict(d_model=64, num_heads=4, dtype="bfloat16")
    s = cca.stats(cca.Config(**mha_like), seq_len=4)
    N, K, H, D = 2, 2, 16, 64
    proj = 2 * (D * N * H + 2 * D * K * H + N * H * D)
    conv = 2 * (N + K) * H * (2 + 2 * H)
    assert s["flops_per_token"] == proj + conv + 2 * N * 2 * H * 2.5
    # CCGQA at the same latent halves the cache; C = 4 halves it again.
    g = cca.stats(cca.Config(**mha_like, num_kv_heads=1), 4)
    assert g["kv_bytes_per_token"] - 8 == (s["kv_bytes_per_token"] - 8) // 2
    c4 = cca.stats(cca.Config(**mha_like, compression=4), 4)
    assert c4["kv_bytes_per_token"] == g["kv_bytes_per_token"]


# --------------------------------------------------------------------------- registry / LM
def test_registry_names_and_defaults():
    common = dict(d_model=64, num_heads=8, dtype="float32", head_dim=None, unrelated=1)
    c = registry.make_config("cca", common)
    assert (c.latent_heads, c.num_kv_heads, c.head_dim) == (4, 4, 8)
    assert registry.make_config("cca", common, {"compression": 4}).num_kv_heads == 2
    g = registry.make_config("ccgqa", common)
    assert (g.latent_heads, g.num_kv_heads) == (4, 2)
    assert registry.make_config("ccgqa", common, {"num_kv_heads": 1}).num_kv_heads == 1
    assert registry.make_config("ccgqa", common, {"compression": 8}).num_kv_heads == 1
    with pytest.raises(ValueError, match="'cca' fixes num_kv_heads=4"):
        registry.make_config("cca", common, {"num_kv_heads": 2})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['kernel'\].*'ccgqa'"):
        registry.make_config("ccgqa", common, {"kernel": 3})


def test_lm_generate_reproduces_forward_logits():
    """LM with "cca,ccgqa" layers: prefill (left padding) + token-by-token decode == forward."""
    from models.transformer import LMConfig, Transformer, generate

    V, P, NEW = 29, 5, 4
    cfg = LMConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, attn="cca,ccgqa",
                   attn_overrides={"ccgqa": {"seq_kernel": 3}}, dtype="float32", scan_layers=True)
    assert [c.num_kv_heads for c in cfg.layer_configs] == [2, 1]
    shapes = jax.eval_shape(lambda: nn.unbox(
        Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
    rng = np.random.default_rng(1)
    # Scanned layout: [1, D] norm gains and [1, K] temperatures near 1, the rest small.
    gain = lambda a: a.ndim == 1 or (a.ndim == 2 and a.shape[0] == cfg.num_repeats)
    variables = {"params": jax.tree_util.tree_map(
        lambda a: jnp.asarray(0.15 * rng.standard_normal(a.shape) + gain(a), a.dtype), shapes)}
    prompt = jax.random.randint(jax.random.key(0), (2, P), 0, V)
    mask = jnp.array([[True] * P, [False, False] + [True] * (P - 2)])
    tokens, logits = generate(cfg, variables, prompt, max_new_tokens=NEW, prompt_mask_BT=mask,
                              return_logits=True)
    full = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
    seg = jnp.concatenate([mask, jnp.ones((2, NEW - 1), bool)], axis=1).astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    ref, _ = jax.jit(lambda v, t, p, s: Transformer(cfg).apply(v, t, positions_BT=p, segment_ids_BT=s))(
        variables, full, pos, seg)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref[:, P - 1:]), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- errors
def test_bad_config_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="compression=3 must divide d_model=32"):
        cca.Config(d_model=32, num_heads=6, compression=3)
    with pytest.raises(ValueError, match="compression=4 must divide num_heads=6"):
        cca.Config(d_model=48, num_heads=6, compression=4)
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide the latent query heads .* = 4"):
        cca.Config(d_model=64, num_heads=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="Config.seq_kernel must be a positive int, got 0"):
        cca.Config(d_model=32, num_heads=4, seq_kernel=0)
    with pytest.raises(ValueError, match="value_shift=True .* K·E=3"):
        cca.Config(d_model=32, num_heads=2, head_dim=3, compression=2, rope=None)
    with pytest.raises(ValueError, match="Config.dtype"):
        cca.Config(d_model=32, num_heads=4, dtype="floaty")
    cfg, params = CONFIGS["cca"], _params("cca")
    layer = cca.CCA(cfg)
    with pytest.raises(ValueError, match="d_model=32"):
        layer.apply(params, jnp.ones((B, T, D + 1)))
    with pytest.raises(ValueError, match="positions_BT is required with a cache"):
        layer.apply(params, _x()[:, :1], cache=cca.init_cache(cfg, B, 4))
    with pytest.raises(ValueError, match="CCACache"):
        layer.apply(params, _x()[:, :1], positions_BT=jnp.zeros((B, 1), jnp.int32),
                    cache=KVCache.create(batch=B, max_len=4, num_kv_heads=2, head_dim=8))
