"""VLM: image tokens at the placeholders, masks vs hand-built dense masks, decode with
images vs the full forward, bad input, the shapes source and a training smoke run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.masks import Mask
from models.vlm import (VLM, VLMConfig, check_placeholders, generate, pool_2x2,
                        prefix_positions, reference_mask)
from train import train_and_evaluate
from train.config_args import load_config
from train.data import DataConfig, make_source
from train.shapes import IMG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG_ID = 3


def tiny(mask="causal", **lm):
    return VLMConfig(
        vision=dict(image_size=8, channels=3, patch_size=2, width=16, depth=1, num_heads=2),
        lm=dict(dict(vocab_size=16, d_model=16, num_layers=2, num_heads=2, dtype="float32"), **lm),
        image_token_id=IMG_ID, mask=mask)


# Two rows, two images of M=4 tokens each, at different offsets; text in between.
TOKENS = jnp.array([[1, 3, 3, 3, 3, 5, 6, 3, 3, 3, 3, 7, 8],
                    [1, 9, 3, 3, 3, 3, 3, 3, 3, 3, 5, 6, 7]])
IMAGES = jax.random.uniform(jax.random.key(1), (2, 2, 8, 8, 3))


def _init(cfg, tokens=TOKENS, images=IMAGES):
    return VLM(cfg).init(jax.random.key(0), tokens, images)


def test_image_tokens_land_at_the_placeholders():
    cfg = tiny()
    v = _init(cfg)
    x, pos = VLM(cfg).apply(v, TOKENS, IMAGES, method=VLM.embed_inputs)
    feats, M = VLM(cfg).apply(v, IMAGES.reshape(4, 8, 8, 3), method=VLM.encode_images)
    assert M == cfg.tokens_per_image == 4
    feats = np.asarray(feats).reshape(2, 8, -1)
    emb = np.asarray(v["params"]["lm"]["embedding"].unbox() if hasattr(v["params"]["lm"]["embedding"], "unbox")
                     else v["params"]["lm"]["embedding"])
    for b in range(2):
        ph = np.flatnonzero(np.asarray(TOKENS[b]) == IMG_ID)
        np.testing.assert_allclose(np.asarray(x[b, ph]), feats[b], rtol=1e-6)
        text = np.flatnonzero(np.asarray(TOKENS[b]) != IMG_ID)
        np.testing.assert_allclose(np.asarray(x[b, text]), emb[np.asarray(TOKENS[b, text])], rtol=1e-6)


def test_pool_2x2_groups_neighbouring_patches():
    f = jnp.arange(2 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 3)  # 4x4 grid
    out = pool_2x2(f, (4, 4))
    assert out.shape == (2, 4, 12)
    grid = np.asarray(f).reshape(2, 4, 4, 3)
    np.testing.assert_array_equal(out[1, 3].reshape(2, 2, 3), grid[1, 2:4, 2:4])


def _hand_dense(kind, tokens, M):
    """Visibility [B, T, T] written out with loops, independent of models/vlm.py."""
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    out = np.zeros((B, T, T), bool)
    for b in range(B):
        img_of, k = {}, 0
        for t in range(T):
            if tokens[b, t] == IMG_ID:
                img_of[t] = k // M
                k += 1
        for q in range(T):
            for s in range(T):
                vis = s <= q
                if kind in ("prefix", "mutual") and q in img_of and s in img_of:
                    vis |= img_of[q] == img_of[s]
                if kind == "mutual" and q in img_of and s not in img_of:
                    vis |= s > q
                out[b, q, s] = vis
    return out


@pytest.mark.parametrize("kind", ["causal", "prefix"])
def test_mask_options_equal_hand_built_dense_masks(kind):
    cfg = tiny(kind)
    v = _init(cfg)
    _, pos = VLM(cfg).apply(v, TOKENS, IMAGES, method=VLM.embed_inputs)
    # What every layer builds from these positions (see attn/mha.py): causal on positions.
    got = Mask(causal=True, q_positions=pos, kv_positions=pos).materialize(2, 13, 13)[:, 0]
    want = _hand_dense(kind, TOKENS, 4)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(reference_mask(kind, TOKENS == IMG_ID, 4), want)


def test_mutual_mask_is_reference_only_and_refused_by_the_model():
    np.testing.assert_array_equal(reference_mask("mutual", TOKENS == IMG_ID, 4),
                                  _hand_dense("mutual", TOKENS, 4))
    with pytest.raises(NotImplementedError, match="mask='mutual' needs a dense mask"):
        tiny("mutual")


def test_prefix_mask_in_the_model_image_tokens_see_later_ones_text_stays_causal():
    cfg = tiny("prefix")
    v = _init(cfg)
    x, pos = VLM(cfg).apply(v, TOKENS, IMAGES, method=VLM.embed_inputs)
    lm = lambda e: VLM(cfg).apply(v, None, embeddings_BTD=e, positions_BT=pos[:1],
                                  method=lambda m, *a, **k: m.lm(*a, **k))[0]
    # d logits[t] / d x[s]: non-zero exactly where the mask (through 2 layers) allows.
    jac = jax.jacrev(lambda e: lm(e)[0].sum(-1))(x[:1])  # [T, 1, T, D]
    reach = np.abs(np.asarray(jac)).sum((1, 3)) > 0
    assert reach[1, 4]        # first image token sees the last token of its image
    assert not reach[5, 6]    # text never sees the future
    assert not reach[4, 7]    # nor does an image token see the next image


@pytest.mark.parametrize("kind", ["causal", "prefix"])
def test_decode_with_images_equals_full_forward(kind):
    cfg = tiny(kind, attn="gqa,mha", attn_overrides={"gqa": {"num_kv_heads": 1}})
    v = _init(cfg)
    n = 4
    toks, logits = generate(cfg, v, TOKENS, IMAGES, max_new_tokens=n, return_logits=True)
    full = jnp.concatenate([TOKENS, toks[:, :-1]], axis=1)
    want, _ = VLM(cfg).apply(v, full, IMAGES)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want[:, -n:]), atol=2e-5, rtol=2e-5)


def test_bad_input_errors_are_clear():
    cfg = tiny()
    v = _init(cfg)
    apply = lambda t, im: VLM(cfg).apply(v, t, im)
    with pytest.raises(ValueError, match="missing placeholder: row 0"):
        apply(jnp.array([[1, 5, 6, 7]]), IMAGES[:1, :1])
    with pytest.raises(ValueError, match="more images than placeholders: row 0 has 4"):
        apply(TOKENS[:1, :6], IMAGES[:1])
    with pytest.raises(ValueError, match="only 1 image"):
        apply(TOKENS[:1], IMAGES[:1, :1])
    with pytest.raises(ValueError, match="2 channels, but ViTConfig.channels=3"):
        apply(TOKENS, IMAGES[..., :2])
    with pytest.raises(ValueError, match=r"image size \(9, 8\) is not divisible by patch_size"):
        apply(TOKENS, jnp.ones((2, 2, 9, 8, 3)))
    with pytest.raises(ValueError, match=r"images must be \[B, I, H, W, C\]"):
        apply(TOKENS, IMAGES[:, 0])
    with pytest.raises(ValueError, match="patch grid"):
        VLMConfig(vision=dict(image_size=6, channels=3, patch_size=2, width=16, depth=1, num_heads=2),
                  lm=dict(vocab_size=16, d_model=16, num_layers=1, num_heads=2), image_token_id=3)
    check_placeholders(np.array([[3, 3, 3, 3]]), 1, 4, 3)  # a matching row passes


def test_shapes_source_rows_and_answers():
    src = make_source(DataConfig(source="shapes", seq_len=20, batch_size=4))
    b = src.batch("train", 0, 4)
    assert b["images"].shape == (4, 1, 12, 12, 3) and (b["inputs"] == IMG).sum(1).tolist() == [9] * 4
    assert b["weights"].sum(1).tolist() == [1.0] * 4
    for row in range(4):
        t = int(np.flatnonzero(b["weights"][row])[0])
        assert src.decode([b["inputs"][row, t]]) == ["?"]
        assert src.decode([b["targets"][row, t]])[0] in (
            "red", "green", "blue", "yellow", "circle", "square", "triangle",
            "topleft", "topright", "bottomleft", "bottomright")
    np.testing.assert_array_equal(src.batch("eval", 3, 4)["images"], src.batch("eval", 3, 4)["images"])


def test_vlm_training_smoke(tmp_path):
    c = load_config(os.path.join(ROOT, "configs/vlm_shapes.py:steps=8,captions=0.5"))
    c.model.vision.update(dict(width=16, depth=1, mlp_dim=32, num_heads=2))
    c.model.lm.update(dict(d_model=16, num_layers=1, num_heads=2))
    c.model.connector_dim = 32
    c.data.update(dict(batch_size=8, eval_batch_size=16))
    c.train.update(dict(log_every=4, eval_every=0, eval_steps=1, progress_bar=False))
    c.checkpoint.update(dict(every_steps=8))
    result = train_and_evaluate(c, str(tmp_path))
    assert result["step"] == 8 and np.isfinite(result["eval/loss"])
    assert 0.0 <= result["eval/accuracy"] <= 1.0
