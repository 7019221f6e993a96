"""Decoder LM: config validation, causality, generate == forward, scan/remat, aux losses."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import mha, registry
from models.transformer import LMConfig, Transformer, generate, init_cache, stack_unit_params

V, P, NEW = 29, 5, 6

# Two layers keep compiles cheap; tests about repeats of the pattern ask for four.
BASE = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4, attn="gqa,mha",
            attn_overrides={"gqa": {"num_kv_heads": 2, "window": 3}}, dtype="float32")


def _cfg(**kw):
    return LMConfig(**{**BASE, **kw})


@functools.lru_cache(maxsize=None)
def _init(cfg):
    """Random params in the model's layout without compiling its initializers (slow on CPU)."""
    shapes = jax.eval_shape(
        lambda: nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
    rng = np.random.default_rng(0)

    def fill(a):
        if a.ndim == 1 or (cfg.scan_layers and a.ndim == 2 and a.shape[0] == cfg.num_repeats):
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(a.shape), a.dtype)  # norm gains
        return jnp.asarray(0.15 * rng.standard_normal(a.shape), a.dtype)

    return {"params": jax.tree_util.tree_map(fill, shapes)}


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, variables, tokens, positions, segments):
    return Transformer(cfg).apply(variables, tokens, positions_BT=positions, segment_ids_BT=segments)[0]


def _tokens(B, T, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


# --------------------------------------------------------------------------- config
def test_config_defaults_and_layers():
    cfg = _cfg()
    assert cfg.pattern == ("gqa", "mha") and cfg.num_repeats == 1
    assert cfg.ffn_dim == 128  # 8/3 * 32 = 85.3, rounded up to a multiple of 64
    gqa_cfg, mha_cfg = cfg.layer_configs
    assert (gqa_cfg.num_kv_heads, gqa_cfg.window, mha_cfg.num_kv_heads, mha_cfg.window) == (2, 3, 4, None)
    assert LMConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2).dtype == jnp.bfloat16
    assert hash(cfg) == hash(_cfg())  # static jit argument


def test_config_errors_name_the_cause():
    with pytest.raises(ValueError, match="num_layers=5 is not a multiple of the attention pattern length 2"):
        _cfg(num_layers=5)
    with pytest.raises(ValueError, match="unknown attention mechanism 'mlx'"):
        _cfg(attn="mlx")
    with pytest.raises(ValueError, match=r"\['windw'\].*'gqa'"):
        _cfg(attn_overrides={"gqa": {"windw": 3}})
    with pytest.raises(ValueError, match="attn_overrides has key 'mqa'"):
        _cfg(attn_overrides={"mqa": {}})
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        _cfg(attn_overrides={"gqa": {"num_kv_heads": 3}})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['num_layer'\]"):
        LMConfig.from_dict(dict(BASE, num_layer=2))
    with pytest.raises(ValueError, match="LMConfig.remat"):
        _cfg(remat="some")
    with pytest.raises(ValueError, match="LMConfig.d_model must be a positive int"):
        _cfg(d_model=0)
    assert LMConfig.from_dict(BASE) == _cfg()


def test_logical_axes_and_dtypes():
    cfg = _cfg(scan_layers=True, dtype="bfloat16", tie_embeddings=False, num_layers=4)
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    specs = nn.get_partition_spec(boxed)["params"]
    assert tuple(specs["embedding"]) == ("vocab", "embed")
    assert tuple(specs["head"]) == ("embed", "vocab")
    blk = specs["units"]["block_0"]
    assert tuple(blk["attn"]["q_kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(blk["attn"]["k_kernel"]) == ("layers", "embed", "kv_heads", "head_dim")
    assert tuple(blk["mlp"]["w_down"]) == ("layers", "mlp", "embed")
    leaves = jax.tree_util.tree_leaves(nn.unbox(boxed))
    assert all(a.dtype == jnp.float32 for a in leaves)
    assert nn.unbox(boxed)["params"]["units"]["block_0"]["attn"]["q_kernel"].shape == (2, 32, 4, 8)


# --------------------------------------------------------------------------- causality
@pytest.mark.parametrize("segments", [False, True])
def test_logits_do_not_depend_on_future_or_other_documents(segments):
    cfg = _cfg(scan_layers=segments)
    variables = _init(cfg)
    T = 8
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]]) if segments else None
    pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4]]) if segments else None
    emb = jax.random.normal(jax.random.key(1), (1, T, 32))
    w = jax.random.normal(jax.random.key(2), (V,))

    def f(e):
        logits, _ = Transformer(cfg).apply(variables, embeddings_BTD=e, positions_BT=pos, segment_ids_BT=seg)
        return logits[0] @ w  # [T]

    jac = np.abs(np.asarray(jax.jit(jax.jacrev(f))(emb))).sum(-1)[:, 0]  # [T (output), T (input)]
    t_out, t_in = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    visible = t_in <= t_out
    if segments:
        s = np.asarray(seg[0])
        visible &= s[t_out] == s[t_in]
    assert np.all(jac[~visible] == 0.0), "information flows from the future or another document"
    assert np.all(jac[visible] > 0.0)


# --------------------------------------------------------------------------- decode
@pytest.mark.parametrize("scan_layers", [False, True])
def test_generate_reproduces_forward_logits(scan_layers):
    cfg = _cfg(scan_layers=scan_layers, num_layers=4)
    variables = _init(cfg)
    prompt = _tokens(2, P)
    # Row 1 is left-padded by two tokens: padding must be invisible.
    mask = jnp.array([[True] * P, [False, False] + [True] * (P - 2)])
    tokens, logits = generate(cfg, variables, prompt, max_new_tokens=NEW, prompt_mask_BT=mask,
                              return_logits=True)
    assert tokens.shape == (2, NEW) and logits.shape == (2, NEW, V)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jnp.argmax(logits, -1)))
    full = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
    seg = jnp.concatenate([mask, jnp.ones((2, NEW - 1), bool)], axis=1).astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    ref = _forward(cfg, variables, full, pos, seg)[:, P - 1:]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_and_default_positions():
    """Appending through the model cache in chunks (positions from the cache) == forward."""
    cfg = _cfg()
    variables = _init(cfg)
    tokens = _tokens(1, 9, seed=3)
    ref = _forward(cfg, variables, tokens, None, None)
    cache = init_cache(cfg, batch=1, max_len=9)
    apply = jax.jit(lambda t, c: Transformer(cfg).apply(variables, t, cache=c))
    outs = []
    for a, b in ((0, 4), (4, 5), (5, 9)):
        y, cache = apply(tokens[:, a:b], cache)
        outs.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(ref), atol=1e-4)


def test_scan_and_unrolled_agree():
    cfg = _cfg(num_layers=4)
    scan_cfg = _cfg(scan_layers=True, num_layers=4)
    variables = _init(cfg)
    stacked = {"params": stack_unit_params(variables["params"], cfg)}
    assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(_init(scan_cfg))
    tokens = _tokens(2, 6, seed=4)
    np.testing.assert_allclose(np.asarray(_forward(scan_cfg, stacked, tokens, None, None)),
                               np.asarray(_forward(cfg, variables, tokens, None, None)), atol=1e-5)


def test_sampling_top1_is_greedy():
    cfg = _cfg(num_layers=4)  # same static arguments as above: the greedy compile is reused
    variables = _init(cfg)
    prompt = _tokens(2, P, seed=5)
    greedy = generate(cfg, variables, prompt, max_new_tokens=NEW)
    top1 = generate(cfg, variables, prompt, max_new_tokens=NEW, temperature=0.7, top_k=1,
                    rng=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(top1))


def test_remat_gradients_match():
    cfg = _cfg(scan_layers=True)
    variables = _init(cfg)
    tokens = _tokens(2, 6, seed=6)

    def loss(cfg, p):
        logits, _ = Transformer(cfg).apply(p, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    g_ref = jax.jit(jax.grad(functools.partial(loss, cfg)))(variables)
    for remat in ("full", "dots"):
        g = jax.jit(jax.grad(functools.partial(loss, _cfg(scan_layers=True, remat=remat))))(variables)
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- aux loss
class _SowingMHA(mha.MHA):
    """MHA that sows a fake auxiliary loss, as a MoE-style layer would."""

    @nn.compact
    def __call__(self, x_BTD, **kw):
        y, cache = super().__call__(x_BTD, **kw)
        # A known value (tied to y so it stays in the graph): the collection must hold
        # exactly one 0.25 per sowing layer, neither dropped nor counted twice.
        self.sow("aux_loss", "y_sq", 0.25 + 0.0 * jnp.mean(y.astype(jnp.float32) ** 2))
        return y, cache


@pytest.mark.parametrize("scan_layers", [False, True])
def test_aux_loss_collection(scan_layers):
    base = registry.get("mha")
    registry.register(registry.Mechanism(
        name="test_sowing", module=_SowingMHA, config_cls=base.config_cls,
        init_cache=base.init_cache, stats=base.stats, make_config=base.make_config))
    try:
        cfg = _cfg(attn="test_sowing,mha", attn_overrides={}, num_layers=4, scan_layers=scan_layers)
        variables = _init(cfg)
        (logits, _), aux = jax.jit(lambda v, t: Transformer(cfg).apply(v, t, mutable=["aux_loss"]))(
            variables, _tokens(1, 4))
        leaves = jax.tree_util.tree_leaves(aux["aux_loss"])
        assert sum(a.size for a in leaves) == 2  # two sowing layers (pattern repeated twice)
        total = sum(jnp.sum(a) for a in leaves)
        assert float(total) == pytest.approx(0.5, abs=1e-7)
    finally:
        registry._REGISTRY.pop("test_sowing")


# --------------------------------------------------------------------------- errors
def test_bad_inputs():
    cfg = _cfg()
    variables = _init(cfg)
    model = Transformer(cfg)
    with pytest.raises(ValueError, match="tokens must be \\[B, T\\]"):
        model.apply(variables, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="tokens must be integers"):
        model.apply(variables, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="embeddings_BTD must be \\[B, T, D=32\\]"):
        model.apply(variables, embeddings_BTD=jnp.zeros((1, 4, 31)))
    with pytest.raises(ValueError, match="positions_BT must have shape"):
        model.apply(variables, jnp.zeros((1, 4), jnp.int32), positions_BT=jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="max_len=4 is smaller"):
        generate(cfg, variables, jnp.zeros((1, 4), jnp.int32), max_new_tokens=3, max_len=4)
    with pytest.raises(ValueError, match="needs rng"):
        generate(cfg, variables, jnp.zeros((1, 4), jnp.int32), max_new_tokens=3, temperature=1.0)
