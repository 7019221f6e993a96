"""MLA layer: oracle, absorbed == expanded, decode == forward, stats, LM use, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn import mla, registry
from attn.cache import cache_nbytes
from attn.positions import RopeConfig, YarnScaling

B, T, D = 2, 7, 32

SEG = np.array([[1, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1]], np.int32)
POS_SEG = np.array([[0, 1, 2, 0, 1, 2, 3], [0, 0, 0, 1, 2, 3, 4]], np.int32)
POS = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))

SMALL = dict(d_model=D, num_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=6, dtype="float32", impl="xla")
CONFIGS = {
    "base": mla.Config(**SMALL),
    # Low-rank query, YaRN, a two-block RoPE key (TransMLA) and softcapping.
    "everything": mla.Config(**{**SMALL, "qk_rope_head_dim": 8}, q_lora_rank=12, rope_heads=2,
                             softcap=4.0, rope=RopeConfig(scaling=YarnScaling(2.0, 4))),
    "window": mla.Config(**SMALL, window=2, kv_norm=False),
}


@functools.lru_cache(maxsize=None)
def _params(name):
    """Random params in the layer's layout (norm gains near 1), without compiling initializers."""
    cfg = CONFIGS[name]
    shapes = jax.eval_shape(lambda: nn.unbox(mla.MLA(cfg).init(jax.random.key(0), jnp.zeros((B, T, D)))))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray((0.3 if a.ndim < 2 else 0.25) * rng.standard_normal(a.shape)
                              + (a.ndim < 2), a.dtype), shapes)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(cfg, absorb, params, x, pos, seg, cache):
    return mla.mla_forward(params["params"], x, config=cfg, positions_BT=pos, segment_ids_BT=seg,
                           cache=cache, absorb=absorb)


def _x():
    return jax.random.normal(jax.random.key(2), (B, T, D), jnp.float32)


@pytest.mark.parametrize("name", ["everything", "window"])
def test_forward_matches_oracle(name):
    """Projections from the layer; up-projection, mask and attention written out in float64."""
    from oracle import reference_attention

    cfg, params, x = CONFIGS[name], _params(name), _x()
    p = {k: np.asarray(v, np.float64) for k, v in params["params"].items()}
    project = jax.jit(lambda p, x, pos: (mla.project_queries(p, x, pos, cfg),
                                         mla.project_latent(p, x, pos, cfg)))
    (q_nope, q_rope), (c_kv, k_rope) = project(params["params"], x, jnp.asarray(POS_SEG))
    c_kv, k_rope = np.asarray(c_kv, np.float64), np.asarray(k_rope, np.float64)
    k_nope = np.einsum("bsl,lnh->bsnh", c_kv, p["k_up_kernel"])
    v = np.einsum("bsl,lne->bsne", c_kv, p["v_up_kernel"])
    q = np.concatenate([np.asarray(q_nope), np.asarray(q_rope)], -1)
    k = np.concatenate([k_nope, np.repeat(k_rope[:, :, None], cfg.num_heads, 2)], -1)
    W = np.inf if cfg.window is None else cfg.window
    dq, dk = POS_SEG[:, :, None], POS_SEG[:, None, :]
    vis = (dk <= dq) & (dk >= dq - W) & (SEG[:, :, None] == SEG[:, None, :]) & (SEG[:, :, None] > 0)
    o, _ = reference_attention(q, k, v, dense_mask=vis[:, None], softcap=cfg.softcap,
                               scale=(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5)
    y_ref = np.einsum("btne,ned->btd", o, p["o_kernel"])
    for absorb in (False, True):
        y, _ = _apply(cfg, absorb, params, x, jnp.asarray(POS_SEG), jnp.asarray(SEG), None)
        np.testing.assert_allclose(np.asarray(y), y_ref, atol=3e-5, rtol=3e-5)


def test_absorbed_equals_expanded_forward_and_gradients():
    cfg, params, x = CONFIGS["base"], _params("base"), _x()
    y_exp, _ = _apply(cfg, False, params, x, jnp.asarray(POS), None, None)
    y_abs, _ = _apply(cfg, True, params, x, jnp.asarray(POS), None, None)
    np.testing.assert_allclose(np.asarray(y_abs), np.asarray(y_exp), atol=2e-5, rtol=2e-5)
    def loss(p, absorb):
        return jnp.sum(mla.mla_forward(p, x, config=cfg, positions_BT=jnp.asarray(POS), absorb=absorb)[0] ** 2)

    g_exp, g_abs = (jax.jit(jax.grad(loss), static_argnums=1)(params["params"], a) for a in (False, True))
    for name in g_exp:
        np.testing.assert_allclose(np.asarray(g_abs[name]), np.asarray(g_exp[name]), atol=2e-4, rtol=2e-4)
    assert mla.use_absorbed("auto", has_cache=True) and not mla.use_absorbed("auto", has_cache=False)
    assert mla.use_absorbed(False, has_cache=True) is False
    # Sanity: the rope part matters (positions enter the logits).
    y_shift, _ = _apply(cfg, False, params, x, jnp.asarray(POS) * 3, None, None)
    assert not np.allclose(np.asarray(y_shift), np.asarray(y_exp), atol=1e-3)


DECODE_CASES = [  # (config, segments, chunks, absorb)
    ("base", False, [1] * T, True),
    ("base", True, [3, 1, 3], False),
    ("everything", True, [2, 4, 1], True),
    ("window", False, [1] * T, True),
    ("window", True, [3, 1, 3], False),  # a chunk longer than the ring (capacity 2)
]


@pytest.mark.parametrize("name,segments,chunks,absorb", DECODE_CASES,
                         ids=[f"{n}-seg{int(s)}-{'x'.join(map(str, c))}-abs{int(a)}"
                              for n, s, c, a in DECODE_CASES])
def test_decode_equals_full_forward(name, segments, chunks, absorb):
    cfg, params, x = CONFIGS[name], _params(name), _x()
    pos = jnp.asarray(POS_SEG if segments else POS)
    seg = jnp.asarray(SEG) if segments else None
    y_full, _ = _apply(cfg, False, params, x, pos, seg, None)
    cache = mla.init_cache(cfg, batch=B, max_len=T + 1, dtype=jnp.float32)
    assert isinstance(cache, mla.LatentRingCache if cfg.window is not None else mla.LatentCache)
    outs, t = [], 0
    for n in chunks:
        y, cache = _apply(cfg, absorb, params, x[:, t:t + n], pos[:, t:t + n],
                          None if seg is None else seg[:, t:t + n], cache)
        outs.append(y)
        t += n
    assert int(cache.length) == T
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(y_full),
                               atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("name", ["base", "everything", "window"])
def test_stats_match_counted_params_and_cache_bytes(name):
    cfg = CONFIGS[name].replace(dtype="bfloat16")
    params = jax.eval_shape(lambda: nn.unbox(mla.MLA(cfg).init(jax.random.key(0), _x())))
    assert mla.stats(cfg, 16)["params"] == sum(a.size for a in jax.tree_util.tree_leaves(params))
    s = mla.stats(cfg, seq_len=16)
    assert s["state_bytes"] == 0
    assert s["kv_bytes_per_token"] == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 + 8
    batch, max_len = 3, 11
    cache = mla.init_cache(cfg, batch, max_len)
    slots = cfg.window if cfg.window is not None else max_len
    assert cache.capacity == slots and cache.c_kv.dtype == jnp.bfloat16
    per_slot = cache_nbytes(cache) - cache.length.nbytes
    assert per_slot == s["kv_bytes_per_token"] * batch * slots


def test_flops_formula():
    cfg = mla.Config(d_model=64, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                     qk_rope_head_dim=8, v_head_dim=16)
    s = mla.stats(cfg, seq_len=4)
    shared = 64 * 4 * 24 + 64 * 32 + 64 * 8 + 4 * 16 * 64
    assert s["flops_per_token"] == 2 * (shared + 32 * 4 * 32) + 2 * 4 * 40 * 2.5
    assert s["flops_per_token_absorbed"] == 2 * (shared + 4 * 16 * 32 + 4 * 32 * 16) + 2 * 4 * 72 * 2.5


# --------------------------------------------------------------------------- in the LM
LM_OVERRIDES = {"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}


def _lm_cfg(**kw):
    from models.transformer import LMConfig

    base = dict(vocab_size=32, d_model=32, num_layers=2, num_heads=4, attn="mla",
                attn_overrides={"mla": LM_OVERRIDES}, dtype="float32", impl="xla")
    return LMConfig(**{**base, **kw})


def _lm_params(cfg):
    """Random LM params (norm gains near 1) without compiling the initializers."""
    from models.transformer import Transformer

    shapes = jax.eval_shape(lambda: nn.unbox(
        Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray((1.0 if a.ndim == 1 else 0.0) + 0.15 * rng.standard_normal(a.shape),
                              a.dtype), shapes)


def test_registered_and_built_by_the_lm():
    assert "mla" in registry.names() and registry.get("mla").module is mla.MLA
    cfg = _lm_cfg()
    layer = cfg.layer_configs[0]
    assert isinstance(layer, mla.Config) and layer.kv_lora_rank == 16 and layer.d_model == 32
    with pytest.raises(ValueError, match="unknown config key.*'head_dimm'.*'mla'"):
        _lm_cfg(attn_overrides={"mla": {"head_dimm": 3}})


def test_lm_generate_reproduces_forward():
    from models.transformer import Transformer, generate

    cfg = _lm_cfg(attn="mla,gqa", attn_overrides={"mla": LM_OVERRIDES, "gqa": {"num_kv_heads": 2}})
    variables = {"params": _lm_params(cfg)}
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 32)
    mask = jnp.array([[True] * 5, [False, False] + [True] * 3])
    new = 4
    tokens, logits = generate(cfg, variables, prompt, max_new_tokens=new, prompt_mask_BT=mask,
                              return_logits=True)
    full = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
    seg = jnp.concatenate([mask, jnp.ones((2, new - 1), bool)], axis=1).astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    forward = jax.jit(lambda v, t, p, s: Transformer(cfg).apply(v, t, positions_BT=p, segment_ids_BT=s)[0])
    ref = forward(variables, full, pos, seg)[:, 4:]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-4, rtol=1e-4)


def test_mqar_training_lowers_loss():
    """A few AdamW steps of a tiny MLA LM on MQAR lower the recall loss."""
    from models.transformer import Transformer
    from train.data import DataConfig, make_source

    cfg = _lm_cfg(vocab_size=32)
    src = make_source(DataConfig(source="mqar", seq_len=32, batch_size=16,
                                 options=dict(vocab_size=32, num_kv_pairs=4)))
    model = Transformer(cfg)
    params = _lm_params(cfg)
    opt = optax.adamw(3e-3)

    def loss_fn(p, b):
        logits = model.apply({"params": p}, b["inputs"])[0]
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])
        return jnp.sum(xent * b["weights"]) / jnp.sum(b["weights"])

    @jax.jit
    def step(p, s, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state = opt.init(params)
    losses = []
    for i in range(25):
        params, state, loss = step(params, state, src.batch("train", i, 16))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses


# --------------------------------------------------------------------------- errors
def test_bad_config_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="kv_lora_rank must be a positive int, got 0"):
        mla.Config(d_model=32, num_heads=4, kv_lora_rank=0)
    with pytest.raises(ValueError, match="q_lora_rank must be a positive int, got -3"):
        mla.Config(d_model=32, num_heads=4, q_lora_rank=-3)
    with pytest.raises(ValueError, match="rope_heads=3 must divide qk_rope_head_dim=64"):
        mla.Config(d_model=32, num_heads=4, rope_heads=3)
    with pytest.raises(ValueError, match="qk_rope_head_dim=6.*even"):
        mla.Config(d_model=32, num_heads=4, qk_rope_head_dim=6, rope_heads=2)
    with pytest.raises(ValueError, match="absorb must be 'auto', True or False, got 'yes'"):
        mla.Config(d_model=32, num_heads=4, absorb="yes")
    with pytest.raises(ValueError, match="Config.dtype: not a dtype"):
        mla.Config(d_model=32, num_heads=4, dtype="floaty")
    with pytest.raises(ValueError, match="window must be a non-negative int"):
        mla.Config(d_model=32, num_heads=4, window=-2)
    cfg, params = CONFIGS["base"], _params("base")
    layer = mla.MLA(cfg)
    with pytest.raises(ValueError, match="x must be \\[B, T, D\\] with D=d_model=32"):
        layer.apply(params, jnp.ones((B, T, D + 1)))
    with pytest.raises(ValueError, match="positions_BT must have shape"):
        layer.apply(params, _x(), positions_BT=jnp.zeros((B, T + 1), jnp.int32))
    with pytest.raises(ValueError, match="positions_BT is required with a cache"):
        layer.apply(params, _x(), cache=mla.init_cache(cfg, B, 8))
    other = mla.init_cache(cfg.replace(kv_lora_rank=8), B, 8)
    with pytest.raises(ValueError, match="cache holds \\(L, Hr\\)=\\(8, 4\\), config needs \\(16, 4\\)"):
        layer.apply(params, _x()[:, :1], positions_BT=jnp.zeros((B, 1), jnp.int32), cache=other)
