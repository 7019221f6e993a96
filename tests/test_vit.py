"""ViT: the forward against a float64 numpy reference (every pooling, patch shapes,
mixed mechanisms, another resolution), position embeddings, bidirectional layers of
every mechanism, bad input, the data sources and a short digits training run."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import registry
from models.vit import (VARIANTS, ViT, ViTConfig, patchify, resample_pos_emb, sincos_2d)
from train import train_and_evaluate, trainer
from train.config_args import load_config
from train.data import DataConfig, make_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**kw):
    base = dict(image_size=8, channels=1, patch_size=2, width=16, depth=1, num_heads=2,
                num_classes=10, dtype="float32")
    return ViTConfig(**{**base, **kw})


def numpy_params(model, *args, seed=0, scale=0.3):
    """Random N(0, scale²) parameters in the model's tree, drawn with numpy.

    Shapes come from ``jax.eval_shape`` of ``init``: nothing is compiled for the
    initialisation (on CPU, XLA compiles every threefry draw of a linen ``init``, which
    cost most of these tests' time), and every parameter, the zero-initialised head and
    LayerNorm scales included, is non-trivial, so a reference comparison sees them all.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype), shapes)


# ------------------------------------------------ float64 numpy reference of the ViT
def _ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):  # flax's nn.gelu default: the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _mlp(x, p):
    return _gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _softmax_attention(q_BTNH, k_BSKH, v_BSKH):
    """Bidirectional attention, K/V head ``n // (N/K)`` for query head n, written out."""
    N, K = q_BTNH.shape[2], k_BSKH.shape[2]
    k = np.repeat(k_BSKH, N // K, axis=2)
    v = np.repeat(v_BSKH, N // K, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q_BTNH, k) / np.sqrt(q_BTNH.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", w, v)


def reference_vit(variables, cfg, images, pos_grid=None):
    """The ViT forward in float64 from the definitions (patches cut by slicing)."""
    import flax.linen as nn

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables))["params"]
    x = np.asarray(images, np.float64)
    B, Hi, Wi, _ = x.shape
    ph, pw = cfg.patch_size
    gh, gw = Hi // ph, Wi // pw
    patches = np.stack([x[:, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].reshape(B, -1)
                        for i in range(gh) for j in range(gw)], axis=1)
    h = patches @ p["patch_embed"]["kernel"] + p["patch_embed"]["bias"]
    if cfg.pos_emb == "learned":
        pos = p["pos_embedding"] if pos_grid is None else np.asarray(pos_grid, np.float64)
        h = h + pos.reshape(gh * gw, -1)
    if cfg.pool == "cls":
        h = np.concatenate([np.broadcast_to(p["cls"], (B, 1, cfg.width)), h], axis=1)
    for i in range(cfg.depth):
        b = p[f"block_{i}"]
        a = b["attn"]
        assert sorted(a) == ["k_kernel", "o_kernel", "q_kernel", "v_kernel"], sorted(a)
        y = _ln(h, b["attn_norm"], cfg.norm_eps)
        o = _softmax_attention(*(np.einsum("btd,dnh->btnh", y, a[f"{n}_kernel"]) for n in "qkv"))
        h = h + np.einsum("btnh,nhd->btd", o, a["o_kernel"])
        h = h + _mlp(_ln(h, b["mlp_norm"], cfg.norm_eps), b["mlp"])
    h = _ln(h, p["final_norm"], cfg.norm_eps)
    if cfg.pool == "none":
        return h
    if cfg.pool == "cls":
        pooled = h[:, 0]
    elif cfg.pool == "gap":
        pooled = h.mean(1)
    else:  # "map": one learned probe query over the tokens, then a residual MLP
        m = p["map"]
        q = np.broadcast_to(np.einsum("d,dnh->nh", m["probe"], m["q_kernel"]), (B, 1) + m["q_kernel"].shape[1:])
        o = _softmax_attention(q, *(np.einsum("btd,dnh->btnh", h, m[f"{n}_kernel"]) for n in "kv"))
        y = np.einsum("bnh,nhd->bd", o[:, 0], m["o_kernel"])
        pooled = y + _mlp(_ln(y, m["norm"], cfg.norm_eps), m["mlp"])
    return pooled @ p["head"]["kernel"] + p["head"]["bias"]


# A 4x6 two-channel image (rows != columns, so a transposed raster order shows), every
# pooling, pixel tokens, square and rectangular patches, two mechanisms in one stack, remat.
REFERENCE_CASES = {
    "cls-pixels-mha,gqa-remat": dict(pool="cls", patch_size=1, attn="mha,gqa", depth=2, remat="full",
                                     attn_overrides={"gqa": {"num_kv_heads": 2}}),
    "gap-patch2": dict(pool="gap", patch_size=2),
    "map-patch2x3": dict(pool="map", patch_size=(2, 3), pos_emb="none"),
    "none-patch2": dict(pool="none", patch_size=2),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_forward_matches_float64_reference(case):
    kw = dict(image_size=(4, 6), channels=2, width=16, depth=1, num_heads=4, num_classes=3,
              dtype="float32")
    cfg = ViTConfig(**{**kw, **REFERENCE_CASES[case]})
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 6, 2)), jnp.float32)
    v = numpy_params(ViT(cfg), x)
    out = jax.jit(ViT(cfg).apply)(v, x)
    P = (4 // cfg.patch_size[0]) * (6 // cfg.patch_size[1])
    assert out.shape == ((2, P, 16) if cfg.pool == "none" else (2, 3))
    np.testing.assert_allclose(np.asarray(out), reference_vit(v, cfg, x), rtol=2e-4, atol=2e-5)


def test_other_resolution_uses_the_resampled_learned_grid():
    cfg = ViTConfig(image_size=(4, 6), channels=2, patch_size=2, width=16, depth=1, num_heads=4,
                    pool="none", dtype="float32")
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 6, 2)), jnp.float32)  # grid 4x3, not 2x3
    v = numpy_params(ViT(cfg), x[:, :4])
    out = jax.jit(ViT(cfg).apply)(v, x)
    pos = v["params"]["pos_embedding"]
    grid = jax.image.resize(getattr(pos, "value", pos), (4, 3, 16), method="bilinear")
    np.testing.assert_allclose(np.asarray(out), reference_vit(v, cfg, x, pos_grid=grid), rtol=2e-4, atol=2e-5)


def test_patchify_is_raster_order_and_pixel_tokens():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    p1, grid1 = patchify(x, 1, 1)
    np.testing.assert_array_equal(p1, x.reshape(2, 16, 3))  # pixel tokens = raster pixels
    p2, grid2 = patchify(x, 2, 2)
    assert grid2 == (2, 2) and p2.shape == (2, 4, 12)
    np.testing.assert_array_equal(p2[0, 3].reshape(2, 2, 3), x[0, 2:4, 2:4])


def test_resample_and_sincos_values():
    grid = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4, 5)), jnp.float32)
    same = resample_pos_emb(grid, (4, 4))
    assert same is grid
    up = np.asarray(resample_pos_emb(grid, (8, 8), "bilinear"))
    # Bilinear values are convex combinations of neighbours: inside the original range.
    g = np.asarray(grid)
    assert (up.min((0, 1)) >= g.min((0, 1)) - 1e-6).all() and (up.max((0, 1)) <= g.max((0, 1)) + 1e-6).all()
    np.testing.assert_allclose(up.mean((0, 1)), g.mean((0, 1)), atol=0.1)
    assert resample_pos_emb(grid, (7, 3), "bicubic").shape == (7, 3, 5)
    # Constant embeddings stay constant under any resampling.
    np.testing.assert_allclose(resample_pos_emb(jnp.ones((3, 3, 2)), (5, 7)), 1.0, atol=1e-6)
    # big_vision's posemb_sincos_2d at D = 8: frequencies 1 and 1e-4, [sin x, cos x, sin y, cos y].
    pe = np.asarray(sincos_2d((2, 3), 8))
    assert pe.shape == (2, 3, 8)
    np.testing.assert_allclose(pe[0, 0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
    s, c = np.sin, np.cos
    np.testing.assert_allclose(pe[1, 2], [s(2), s(2e-4), c(2), c(2e-4), s(1), s(1e-4), c(1), c(1e-4)],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_position_embedding_tells_tokens_apart(pos):
    # A constant image gives identical patches: only the position embedding can make the
    # tokens differ, and with "none" they are all the same.
    outs = {}
    for p in (pos, "none"):
        cfg = tiny(pos_emb=p, pool="none", image_size=4, patch_size=1, width=8)
        x = jnp.ones((1, 4, 4, 1))
        outs[p] = np.asarray(jax.jit(ViT(cfg).apply)(numpy_params(ViT(cfg), x), x))[0]
    np.testing.assert_allclose(outs["none"], outs["none"][:1].repeat(16, 0), rtol=1e-5, atol=1e-6)
    assert np.abs(outs[pos] - outs[pos][:1]).max(1)[1:].min() > 1e-3


BIDIRECTIONAL = [n for n in registry.names()
                 if "causal" in {f.name for f in dataclasses.fields(registry.get(n).config_cls)}]


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_every_layer_config_is_bidirectional(name):
    # Token 0's output must change when the last token does; a causal layer (the LM
    # default) keeps it exactly. The whole-ViT reference test covers mha/gqa numerically;
    # this covers every mechanism that has a causal field, one layer each (a 3-token
    # input, a 16-wide layer: a causal leak shows at any size).
    cfg = tiny(attn=name, num_heads=4, attn_overrides=registry.small_overrides([name], 16))
    layer = registry.get(name).module(cfg.layer_configs[0])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 16)), jnp.float32)
    v = numpy_params(layer, x)
    f = jax.jit(lambda v, x: layer.apply(v, x)[0])
    y0, y1 = f(v, x), f(v, x.at[:, -1].add(1.0))
    assert float(jnp.abs(y1[:, 0] - y0[:, 0]).max()) > 1e-4, f"{name}: token 0 does not see the last token"


def test_mechanism_per_layer_and_causal_only_are_refused():
    # Structure only (eval_shape: nothing compiles): block i holds the parameters of the
    # mechanism at pattern position i, the one its standalone layer has.
    pattern = ["mha", "gqa", "mla", "moh"]
    cfg = tiny(attn=",".join(pattern), depth=4, num_heads=4, width=32,
               attn_overrides=registry.small_overrides(pattern, 32))
    assert all(not c.causal for c in cfg.layer_configs)
    x = jnp.ones((2, 8, 8, 1))
    tree = jax.eval_shape(ViT(cfg).init, jax.random.key(0), x)["params"]
    names = lambda t: sorted(jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(t))
    for i, name in enumerate(pattern):
        layer = registry.get(name).module(cfg.layer_configs[i])
        want = jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((1, 4, 32)))["params"]
        assert names(tree[f"block_{i}"]["attn"]) == names(want), name
    assert jax.eval_shape(ViT(cfg).apply, {"params": tree}, x).shape == (2, 10)
    for name in set(registry.names()) - set(BIDIRECTIONAL):
        with pytest.raises(NotImplementedError, match=f"{name!r} has no causal=False"):
            tiny(attn=name)


def test_variants_table():
    assert VARIANTS["B"] == dict(width=768, depth=12, num_heads=12, mlp_dim=3072)
    cfg = ViTConfig(image_size=224, channels=3, patch_size=16, variant="S")
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.grid) == (384, 12, 6, 1536, (14, 14))


def test_bad_input_errors_are_clear():
    with pytest.raises(ValueError, match=r"image_size=\(8, 8\) is not divisible by patch_size=\(3, 3\)"):
        tiny(patch_size=3)
    cfg = tiny()
    v = numpy_params(ViT(cfg), jnp.ones((1, 8, 8, 1)))  # the checks run before any compute
    with pytest.raises(ValueError, match=r"image size \(9, 8\) is not divisible by patch_size"):
        ViT(cfg).apply(v, jnp.ones((1, 9, 8, 1)))
    with pytest.raises(ValueError, match="3 channels, but ViTConfig.channels=1"):
        ViT(cfg).apply(v, jnp.ones((1, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, C\]"):
        ViT(cfg).apply(v, jnp.ones((8, 8, 1)))
    with pytest.raises(ValueError, match="ViTConfig.pool must be one of"):
        tiny(pool="max")


def test_digits_source_split_is_deterministic_and_disjoint():
    src = make_source(DataConfig(source="digits", batch_size=8))
    (tr_x, tr_y), (te_x, te_y) = src.splits["train"], src.splits["eval"]
    assert tr_x.shape[1:] == (8, 8, 1) and len(tr_y) + len(te_y) == 1797 and len(te_y) == 359
    assert set(np.unique(te_y)) == set(range(10))
    b1, b2 = src.batch("train", 3, 8), src.batch("train", 3, 8)
    np.testing.assert_array_equal(b1["images"], b2["images"])
    ev = src.batch("eval", 2, 128)  # rows 256..383: 103 real, 25 padding
    assert ev["weights"].sum() == 103


def test_image_folder_source_reads_pngs(tmp_path):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / cls)
        for i in range(5):
            mpimg.imsave(str(tmp_path / cls / f"{i}.png"), rng.random((6, 6, 3)))
    src = make_source(DataConfig(source="image_folder", batch_size=4, options=dict(
        root=str(tmp_path), image_size=(6, 6), channels=3, test_fraction=0.4)))
    assert src.classes == ["cat", "dog"] and src.num_classes == 2 and src.image_shape == (6, 6, 3)
    b = src.batch("train", 0, 4)
    assert b["images"].shape == (4, 6, 6, 3) and 0.0 <= b["images"].min() <= b["images"].max() <= 1.0
    assert len(src.splits["eval"][1]) == 4
    with pytest.raises(ValueError, match=r"expected data.options.image_size=\(8, 8\)"):
        make_source(DataConfig(source="image_folder", options=dict(root=str(tmp_path), image_size=(8, 8))))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_source(DataConfig(source="image_folder", options=dict(root=str(tmp_path / "nowhere"))))


def test_digits_training_smoke(tmp_path):
    c = load_config(os.path.join(ROOT, "configs/vit_digits.py:steps=40"))
    c.model.update(dict(width=32, depth=1, mlp_dim=64))
    c.data.update(dict(batch_size=32, eval_batch_size=128))
    c.train.update(dict(log_every=20, eval_every=20, progress_bar=False))
    c.checkpoint.update(dict(every_steps=20))
    result = train_and_evaluate(c, str(tmp_path))
    # It must learn: chance is 0.1 (sd 0.016 on the 359 eval digits); 40 steps measured
    # 0.287 (16 steps were still at chance, 0.114), so 0.2 fails a model that does not learn.
    assert result["step"] == 40 and result["eval/accuracy"] > 0.2
    assert result["eval/loss"] < np.log(10)  # below the uniform guess
    assert max(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == 40
    # Resuming a finished run restores and only evaluates.
    again = train_and_evaluate(c, str(tmp_path))
    assert again["eval/accuracy"] == result["eval/accuracy"]
    assert trainer.parse_config(c).task == "classify"
