"""TransMLA: GQA -> MLA conversion (exact settings, the paper's RoRoPE approximation, LMs)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn import mha, mla
from attn.positions import RopeConfig, YarnScaling
from attn.transmla import convert_gqa_to_mla
from models.transmla_lm import convert_lm

B, T, D = 2, 9, 32
POS = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

# Partial RoPE + YaRN + window + softcap: every term of the conversion is exercised.
AWKWARD = mha.Config(d_model=D, num_heads=4, num_kv_heads=2, head_dim=8, window=3, softcap=6.0,
                     rope=RopeConfig(fraction=0.5, scaling=YarnScaling(2.0, 4)),
                     dtype="float32", impl="xla")


def _gqa_params(cfg, seed=0):
    shapes = jax.eval_shape(lambda: nn.unbox(mha.MHA(cfg).init(jax.random.key(0), jnp.zeros((1, 2, D)))))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype),
                                  shapes)["params"]


def _x(seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _gqa(cfg, p, x):
    return mha.mha_forward(p, x, config=cfg, positions_BT=POS)[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _mla(cfg, absorb, p, x):
    return mla.mla_forward(p, x, config=cfg, positions_BT=POS, absorb=absorb)[0]


@pytest.mark.parametrize("calibrate", [False, True])
def test_exact_when_every_rotated_head_keeps_rope(calibrate):
    """rope_heads = K and L >= K·H + K·(H-R): equal outputs, expanded and absorbed."""
    p, x = _gqa_params(AWKWARD), _x()
    K, H, R = 2, 8, 4
    Z = K * H + K * (H - R)
    calib = _x(seed=5) if calibrate else None
    for L in (Z, Z + 4):  # extra latent dims are zero columns
        mp, m = convert_gqa_to_mla(p, AWKWARD, kv_lora_rank=L, rope_heads=K, calib_x_BTD=calib)
        assert (m.kv_lora_rank, m.qk_rope_head_dim, m.rope_heads, m.kv_norm) == (L, K * R, K, False)
        assert m.window == 3 and m.softcap == 6.0 and m.rope.scaling == AWKWARD.rope.scaling
        y_ref = _gqa(AWKWARD, p, x)
        for absorb in (False, True):
            np.testing.assert_allclose(np.asarray(_mla(m, absorb, mp, x)), np.asarray(y_ref),
                                       atol=2e-5, rtol=2e-5)


def test_mqa_single_rope_head_is_exact_and_decodes():
    """K = 1: the paper's single shared RoPE key loses nothing; cached decode agrees too."""
    cfg = mha.Config(d_model=D, num_heads=4, num_kv_heads=1, head_dim=8, dtype="float32", impl="xla")
    p, x = _gqa_params(cfg), _x()
    mp, m = convert_gqa_to_mla(p, cfg, kv_lora_rank=8, rope_heads=1)
    y_ref = np.asarray(_gqa(cfg, p, x))
    np.testing.assert_allclose(np.asarray(_mla(m, False, mp, x)), y_ref, atol=2e-5, rtol=2e-5)
    cache = mla.init_cache(m, B, T)
    y_dec, cache = jax.jit(lambda p, c: mla.mla_forward(p, x, config=m, positions_BT=POS, cache=c))(mp, cache)
    np.testing.assert_allclose(np.asarray(y_dec), y_ref, atol=2e-5, rtol=2e-5)


def test_paper_rorope_is_approximate_and_pca_concentrates_rope_energy():
    """rope_heads=1 with K=2 drops the rotation of one rotated head: close, not equal."""
    p, x = _gqa_params(AWKWARD), _x()
    y_ref = np.asarray(_gqa(AWKWARD, p, x))
    exact_latent = 2 * 4 + 2 * 4 + 2 * 8   # (K-r)·R + K·(H-R) + K·H
    mp, m = convert_gqa_to_mla(p, AWKWARD, kv_lora_rank=exact_latent, rope_heads=1, calib_x_BTD=x)
    err = np.abs(np.asarray(_mla(m, False, mp, x)) - y_ref).max()
    assert 1e-4 < err < 0.5 * np.abs(y_ref).max(), err
    # RoRoPE's PCA keeps the dominant head: worse if we kept the *least* energetic one.
    k_rope = np.asarray(mp["k_rope_kernel"])
    assert m.qk_rope_head_dim == 4 and k_rope.shape == (D, 4)
    xk = np.asarray(x).reshape(-1, D) @ np.asarray(p["k_kernel"])[:, :, :4].reshape(D, -1)
    rope_energy = np.sum((np.asarray(x).reshape(-1, D) @ k_rope) ** 2)
    assert rope_energy >= 0.5 * np.sum(xk ** 2) - 1e-6


def test_freqfold_keeps_unrotated_logits_and_more_rope_energy():
    """FreqFold (f=2): every channel mixing is orthogonal, so with all channels kept the
    logits without rotation (query and key at the same position) are the GQA ones
    (float64, from the kernels); at rope_heads=1 the RoPE key keeps at least the key
    energy of plain RoRoPE (a PCA over a larger space)."""
    p, x = _gqa_params(AWKWARD), _x()
    K, H, R, N = 2, 8, 4, 4
    Z = K * H + K * (H - R)
    mp, m = convert_gqa_to_mla(p, AWKWARD, kv_lora_rank=Z, rope_heads=K, calib_x_BTD=x, freq_fold=2)
    f64 = lambda a: np.asarray(a, np.float64)
    X = f64(x).reshape(-1, D)
    Wq, Wk = f64(p["q_kernel"]), f64(p["k_kernel"])
    ref = np.einsum("tnh,snh->nts", np.einsum("td,dnh->tnh", X, Wq),
                    np.einsum("td,dkh->tkh", X, Wk)[:, np.arange(N) // (N // K)]) / np.sqrt(H)
    q_nope = np.einsum("td,dnh->tnh", X, f64(mp["q_nope_kernel"]))
    k_nope = np.einsum("tl,lnh->tnh", X @ f64(mp["kv_down_kernel"]), f64(mp["k_up_kernel"]))
    q_rope = np.einsum("td,dnr->tnr", X, f64(mp["q_rope_kernel"]))
    k_rope = X @ f64(mp["k_rope_kernel"])
    got = (np.einsum("tnh,snh->nts", q_nope, k_nope) + np.einsum("tnr,sr->nts", q_rope, k_rope)
           ) * m.softmax_scale
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
    energy = {}
    for f in (1, 2):
        mp1, _ = convert_gqa_to_mla(p, AWKWARD, kv_lora_rank=Z, rope_heads=1, calib_x_BTD=x, freq_fold=f)
        energy[f] = np.sum((X @ f64(mp1["k_rope_kernel"])) ** 2)
    assert energy[2] >= energy[1] * (1 - 1e-6), energy
    with pytest.raises(ValueError, match="freq_fold must be a positive int dividing the 2"):
        convert_gqa_to_mla(p, AWKWARD, kv_lora_rank=8, freq_fold=3)


def test_bad_arguments():
    p = _gqa_params(AWKWARD)
    with pytest.raises(ValueError, match="rope_heads must be an int in \\[1, K=2\\], got 3"):
        convert_gqa_to_mla(p, AWKWARD, kv_lora_rank=8, rope_heads=3)
    with pytest.raises(ValueError, match="kv_lora_rank must be a positive int, got 0"):
        convert_gqa_to_mla(p, AWKWARD, kv_lora_rank=0)
    with pytest.raises(NotImplementedError, match="qk_norm=True"):
        convert_gqa_to_mla(p, AWKWARD.replace(qk_norm=True), kv_lora_rank=8)
    with pytest.raises(NotImplementedError, match="without RoPE"):
        convert_gqa_to_mla(p, AWKWARD.replace(rope=None), kv_lora_rank=8)


# --------------------------------------------------------------------------- a trained LM
V, SEQ = 32, 32


def _lm_cfg(**kw):
    from models.transformer import LMConfig

    base = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4, attn="gqa",
                attn_overrides={"gqa": {"num_kv_heads": 2}}, dtype="float32", impl="xla")
    return LMConfig(**{**base, **kw})


@functools.partial(jax.jit, static_argnums=0)
def _losses(cfg, params, batch):
    """(next-token xent over all positions, MQAR recall xent) in nats."""
    from models.transformer import Transformer

    logits = Transformer(cfg).apply({"params": params}, batch["inputs"])[0]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"]
    return jnp.mean(xent), jnp.sum(xent * w) / jnp.sum(w)


def _train_gqa_lm(cfg, steps=30):
    from models.transformer import Transformer
    from train.data import DataConfig, make_source

    src = make_source(DataConfig(source="mqar", seq_len=SEQ, batch_size=16,
                                 options=dict(vocab_size=V, num_kv_pairs=4)))
    model = Transformer(cfg)
    shapes = jax.eval_shape(
        lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda a: jnp.asarray((a.ndim == 1) + 0.15 * rng.standard_normal(a.shape), a.dtype), shapes)
    opt = optax.adamw(3e-3)

    @jax.jit
    def step(p, s, b):
        g = jax.grad(lambda p: sum(_losses(cfg, p, b)))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    for i in range(steps):
        params, state = step(params, state, src.batch("train", i, 16))
    return params, src


def test_trained_lm_conversion_keeps_the_loss():
    cfg = _lm_cfg()
    params, src = _train_gqa_lm(cfg)
    batch = src.batch("eval", 0, 32)
    calib = jnp.asarray(src.batch("train", 999, 8)["inputs"])
    loss0, recall0 = (float(a) for a in _losses(cfg, params, batch))
    init_loss, init_recall = (float(a) for a in _losses(cfg, _train_gqa_lm(cfg, steps=0)[0], batch))
    assert loss0 < init_loss and recall0 < init_recall - 0.3, (init_loss, loss0, init_recall, recall0)

    gqa_kv = mha.stats(cfg.layer_configs[0], SEQ)["kv_bytes_per_token"]
    report = {"gqa": (loss0, recall0, gqa_kv)}
    settings = {"exact (rope_heads=K=2, L=K·H=16)": (16, 2),
                "paper RoRoPE (rope_heads=1, L=24)": (24, 1),
                "paper RoRoPE + PCA (rope_heads=1, L=16)": (16, 1)}
    for name, (L, r) in settings.items():
        new_params, new_cfg = convert_lm(params, cfg, kv_lora_rank=L, rope_heads=r, calib_tokens_BT=calib)
        assert new_cfg.attn == "mla" and new_cfg.layer_configs[0].kv_lora_rank == L
        loss1, recall1 = (float(a) for a in _losses(new_cfg, new_params, batch))
        kv = mla.stats(new_cfg.layer_configs[0], SEQ)["kv_bytes_per_token"]
        report[name] = (loss1, recall1, kv)
    for name, (loss, recall, kv) in report.items():
        print(f"{name:42s} loss {loss:.6f} nats (diff {(loss - loss0) / math.log(2):+.2e} bits/token)"
              f"  recall loss {recall:.4f} (diff {(recall - recall0) / math.log(2):+.2e} bits)"
              f"  kv bytes/token/layer {kv}")
    exact, lossless_latent, compressed = (report[n] for n in settings)
    assert abs(exact[0] - loss0) / math.log(2) < 1e-5 and abs(exact[1] - recall0) / math.log(2) < 1e-4
    assert exact[2] == gqa_kv == lossless_latent[2]          # same cache size, as the paper says
    assert compressed[2] < gqa_kv                            # (L + Hr) = 24 < 2·K·H = 32 numbers
    assert all(np.isfinite(v[0]) for v in report.values())


def test_convert_scanned_lm_exactly():
    from models.transformer import Transformer

    cfg = _lm_cfg(scan_layers=True, attn="gqa,mha", attn_overrides={"gqa": {"num_kv_heads": 2, "window": 4}})
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    rng = np.random.default_rng(3)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype),
                                       nn.unbox(shapes))
    # Layers with different windows cannot share the single "mla" override entry.
    with pytest.raises(NotImplementedError, match="differ in shape"):
        convert_lm(variables, cfg, kv_lora_rank=32, rope_heads=2)
    cfg = _lm_cfg(scan_layers=True, num_layers=2)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype),
                                       nn.unbox(jax.eval_shape(lambda: Transformer(cfg).init(
                                           jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))))
    new_vars, new_cfg = convert_lm(variables, cfg, kv_lora_rank=16, rope_heads=2)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, V)
    fwd = jax.jit(lambda c, v: Transformer(c).apply(v, tokens)[0], static_argnums=0)
    np.testing.assert_allclose(np.asarray(fwd(new_cfg, new_vars)), np.asarray(fwd(cfg, variables)),
                               atol=1e-4, rtol=1e-4)


def test_attn_never_imports_models():
    """attn/ is the bottom layer: an import of models/ (even inside a function) would make
    ``attn.transmla`` break when a user's own ``models`` package shadows attnlab's."""
    import ast
    import os

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "attn")
    upward = {"models", "train", "configs", "benchmarks"}
    bad = []
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                   for f in fs if f.endswith(".py"))  # subpackages too (attn/kv, attn/linear)
    for name in files:
        with open(os.path.join(root, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"attn/{name}:{node.lineno} imports {m}" for m in mods if m.split(".")[0] in upward]
    assert not bad, bad
    import attn.transmla

    with pytest.raises(AttributeError, match="models.transmla_lm.convert_lm"):
        attn.transmla.convert_lm  # noqa: B018
