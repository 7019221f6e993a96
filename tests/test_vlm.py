"""VLM: image tokens at the placeholders, masks vs hand-built dense masks (and the
float64 oracle), RoPE angles per image token, decode with images vs the full forward,
bad input, the shapes source, a training smoke run and a short mutual-mask run."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.core import attention
from attn.masks import Mask
from models.vlm import (MASK_RULES, VLM, VLMConfig, check_placeholders, generate, pool_2x2,
                        reference_mask)
from tests.oracle import reference_attention, reference_grads
from train import train_and_evaluate
from train.config_args import load_config
from train.data import DataConfig, make_source
from train.shapes import IMG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG_ID = 3
QEND = 6  # the token that ends a question ("?") for mask="mutual"


def tiny(mask="causal", **lm):
    return VLMConfig(
        vision=dict(image_size=8, channels=3, patch_size=2, width=16, depth=1, num_heads=2),
        lm=dict(dict(vocab_size=16, d_model=16, num_layers=2, num_heads=2, dtype="float32"), **lm),
        image_token_id=IMG_ID, mask=mask, question_end_id=QEND)


# Two rows, two images of M=4 tokens each, at different offsets; text in between.
# Row 0: image, question "5 ?", image, then "7 8" with no question end (that image
# stays causal under "mutual"). Row 1: two images back to back, question "5 ?", answer 7.
TOKENS = jnp.array([[1, 3, 3, 3, 3, 5, 6, 3, 3, 3, 3, 7, 8],
                    [1, 9, 3, 3, 3, 3, 3, 3, 3, 3, 5, 6, 7]])
IMAGES = jax.random.uniform(jax.random.key(1), (2, 2, 8, 8, 3))


def _init(cfg, tokens=TOKENS, images=IMAGES, seed=0, scale=0.3):
    """Random N(0, scale²) parameters drawn with numpy into the shapes of ``VLM.init``.

    ``jax.eval_shape`` compiles nothing; a real ``init`` on CPU compiled every threefry
    draw, most of these tests' time. Every parameter (zero-initialised heads included)
    is non-trivial, so equalities below are not met by zeros.
    """
    shapes = jax.eval_shape(VLM(cfg).init, jax.random.key(0), tokens, images)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype), shapes)


def test_image_tokens_land_at_the_placeholders():
    cfg = tiny()
    v = _init(cfg)
    x, pos, _ = VLM(cfg).apply(v, TOKENS, IMAGES, method=VLM.embed_inputs)
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


def _hand_dense(kind, tokens, M, qend=QEND):
    """Visibility [B, T, T] written out with loops, independent of models/vlm.py.

    "mutual" is AKI's modality-mutual attention: causal, plus image query -> the text
    after its image up to the question end (inclusive); image -> image stays causal,
    and the text after the question end (the answer) stays hidden. With several images,
    an image sees the text run right after it (images directly after it skipped), up to
    the next image or the question end.
    """
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    out = np.zeros((B, T, T), bool)
    for b in range(B):
        img_of, k = {}, 0
        for t in range(T):
            if tokens[b, t] == IMG_ID:
                img_of[t] = k // M
                k += 1
        sees_question = {}  # image number -> text positions it may also see
        for i in set(img_of.values()):
            t = max(p for p, j in img_of.items() if j == i) + 1
            while t < T and t in img_of:
                t += 1
            run = []
            while t < T and t not in img_of:
                run.append(t)
                if tokens[b, t] == qend:
                    break
                t += 1
            ends = any(tokens[b, p] == qend for p in range(run[0] if run else T, T) if p not in img_of)
            sees_question[i] = set(run) if ends else set()
        for q in range(T):
            for s in range(T):
                vis = s <= q
                if kind == "prefix" and q in img_of and s in img_of:
                    vis |= img_of[q] == img_of[s]
                if kind == "mutual" and q in img_of:
                    vis |= s in sees_question[img_of[q]]
                out[b, q, s] = vis
    return out


def _model_mask(cfg, v, tokens=TOKENS, images=IMAGES):
    """The mask every layer builds from the VLM's positions and extra ranges (attn/mha.py)."""
    _, pos, extra = VLM(cfg).apply(v, tokens, images, method=VLM.embed_inputs)
    B, T = tokens.shape
    return Mask(causal=True, q_positions=pos, kv_positions=pos,
                q_extra_range=extra).materialize(B, T, T)[:, 0], pos


@pytest.mark.parametrize("kind", ["causal", "prefix", "mutual"])
def test_mask_options_equal_hand_built_dense_masks(kind):
    cfg = tiny(kind)
    got, pos = _model_mask(cfg, _init(cfg))
    want = _hand_dense(kind, TOKENS, 4)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(
        reference_mask(kind, TOKENS, image_token_id=IMG_ID, tokens_per_image=4,
                       question_end_id=QEND), want)
    # Every option keeps one position, hence one RoPE angle, per token.
    np.testing.assert_array_equal(np.asarray(pos), np.broadcast_to(np.arange(13), (2, 13)))


def test_mutual_mask_is_the_papers_definition_on_the_example_rows():
    m = _hand_dense("mutual", TOKENS, 4)
    causal = np.tril(np.ones((13, 13), bool))
    extra = m & ~causal
    # Row 0: the first image (1..4) sees "5 ?" (5, 6) and nothing else; the second image
    # has no question end after it and stays causal.
    assert {(q, s) for q, s in zip(*np.nonzero(extra[0]))} == {(q, s) for q in range(1, 5) for s in (5, 6)}
    # Row 1: both images (2..9) see the question (10, 11), not the answer (12), not each other.
    assert {(q, s) for q, s in zip(*np.nonzero(extra[1]))} == {(q, s) for q in range(2, 10) for s in (10, 11)}


@pytest.mark.parametrize("seed", range(6))
def test_mutual_and_prefix_rules_match_the_loops_on_random_rows(seed):
    """Random rows: images anywhere (back to back, at the ends), questions or not."""
    rng = np.random.default_rng(seed)
    cfg = tiny("mutual")
    rows = []
    for _ in range(4):
        parts = []
        for _ in range(rng.integers(0, 4)):
            parts += [[IMG_ID] * 4] + [list(rng.choice([1, 5, 7, 8, QEND], rng.integers(0, 4)))]
        rows.append(sum(parts, [1]))
    T = max(map(len, rows)) + 1
    tokens = np.array([r + [0] * (T - len(r)) for r in rows])
    for kind in ("prefix", "mutual"):
        extra = MASK_RULES[kind](jnp.asarray(tokens), jnp.asarray(tokens == IMG_ID), cfg)
        got = Mask(causal=True, q_extra_range=extra).materialize(4, T, T)[:, 0]
        np.testing.assert_array_equal(np.asarray(got), _hand_dense(kind, tokens, 4))
        np.testing.assert_array_equal(
            reference_mask(kind, tokens, image_token_id=IMG_ID, tokens_per_image=4,
                           question_end_id=QEND), _hand_dense(kind, tokens, 4))


@pytest.mark.parametrize("impl", ["xla", "xla_chunked"])
def test_mutual_mask_attention_matches_float64_oracle(impl):
    """attention() with the mutual extra ranges equals the float64 oracle on the dense mask."""
    cfg = tiny("mutual")
    extra = MASK_RULES["mutual"](TOKENS, TOKENS == IMG_ID, cfg)
    dense = _hand_dense("mutual", TOKENS, 4)[:, None]
    B, T, N, K, H = 2, 13, 4, 2, 8
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, T, K, H))
    v = jax.random.normal(ks[2], (B, T, K, H))
    do = jax.random.normal(ks[3], (B, T, N, H))
    mask = Mask(causal=True, q_extra_range=extra)
    o = attention(q, k, v, mask=mask, impl=impl)
    o_ref, _ = reference_attention(np.asarray(q), np.asarray(k), np.asarray(v), dense_mask=dense)
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=2e-5)
    grads = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask=mask, impl=impl) * do),
                     argnums=(0, 1, 2))(q, k, v)
    ref = reference_grads(np.asarray(q), np.asarray(k), np.asarray(v), np.asarray(do), dense_mask=dense)
    for got, want in zip(grads, (ref["dq"], ref["dk"], ref["dv"])):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


def test_kernels_refuse_the_extra_range_with_a_reason():
    from attn.core import make_call, select_impl
    x = jnp.ones((1, 8, 2, 8))
    call = make_call(x, x, x, mask=Mask(causal=True, q_extra_range=jnp.zeros((1, 8, 2), jnp.int32)))
    for impl in ("pallas_gpu_interpret", "pallas_tpu_interpret"):
        with pytest.raises(NotImplementedError, match="q_extra_range"):
            select_impl(call, impl)
    with pytest.raises(ValueError, match=r"q_extra_range has shape \(1, 7, 2\)"):
        attention(x, x, x, mask=Mask(q_extra_range=jnp.zeros((1, 7, 2), jnp.int32)), impl="xla")


def test_mutual_needs_a_question_end():
    with pytest.raises(ValueError, match="needs question_end_id"):
        VLMConfig(vision=dict(image_size=8, channels=3, patch_size=2, width=16, depth=1, num_heads=2),
                  lm=dict(vocab_size=16, d_model=16, num_layers=1, num_heads=2),
                  image_token_id=IMG_ID, mask="mutual")


def _reach(cfg, v, row=0):
    """reach[t, s]: d logits[t] / d x[s] != 0 through the LM (2 layers compose masks)."""
    x, pos, extra = VLM(cfg).apply(v, TOKENS, IMAGES, method=VLM.embed_inputs)
    sl = slice(row, row + 1)
    lm = lambda e: VLM(cfg).apply(
        v, None, embeddings_BTD=e, positions_BT=pos[sl],
        extra_range_BT2=None if extra is None else extra[sl],
        method=lambda m, *a, **k: m.lm(*a, **k))[0]
    jac = jax.jacrev(lambda e: lm(e)[0].sum(-1))(x[sl])  # [T, 1, T, D]
    return np.abs(np.asarray(jac)).sum((1, 3)) > 0


def test_prefix_mask_in_the_model_image_tokens_see_later_ones_text_stays_causal():
    cfg = tiny("prefix")
    reach = _reach(cfg, _init(cfg))
    assert reach[1, 4]        # first image token sees the last token of its image
    assert not reach[5, 6]    # text never sees the future
    assert not reach[4, 7]    # nor does an image token see the next image


def test_mutual_mask_in_the_model_images_see_the_question_not_the_answer():
    # One layer, so reach is the mask itself (two layers compose: "5" would see "?"
    # through an image token, which is why the loss belongs after the question end).
    cfg = tiny("mutual", num_layers=1)
    v = _init(cfg)
    reach = _reach(cfg, v, row=1)
    assert reach[2, 11] and reach[9, 10]    # image tokens see the question "5 ?"
    assert not reach[2, 12]                 # never the answer after "?"
    assert not reach[2, 3]                  # image -> image stays causal
    assert not reach[10, 11]                # text stays causal
    assert reach[11, 2]                     # "?" sees the image (which saw the question)
    cfg2 = tiny("mutual")
    assert not _reach(cfg2, _init(cfg2), row=1)[:12, 12].any()  # the answer, through 2 layers
    # Gradients of a loss through the whole VLM (ViT, connector, LM) are finite.
    def loss(params):
        logits, _ = VLM(cfg).apply({"params": params}, TOKENS, IMAGES)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    grads = jax.grad(loss)(v["params"])
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads["vision"]))


def test_prefix_mask_gives_image_tokens_distinct_rope_angles():
    """The reported problem: one RoPE angle per image made its tokens indistinguishable
    to the LM's attention. With one position per token, swapping two image tokens'
    features changes what a text token attends to."""
    cfg = tiny("prefix")
    v = _init(cfg)
    x, pos, extra = VLM(cfg).apply(v, TOKENS, IMAGES, method=VLM.embed_inputs)
    assert len(set(np.asarray(pos[0, 1:5]).tolist())) == 4
    lm = lambda e: VLM(cfg).apply(v, None, embeddings_BTD=e, positions_BT=pos, extra_range_BT2=extra,
                                  method=lambda m, *a, **k: m.lm(*a, **k))[0]
    swapped = x.at[:, 1].set(x[:, 2]).at[:, 2].set(x[:, 1])
    # Token 5 (text after the first image): under a shared angle, attention is
    # permutation-invariant within the image and this difference would be ~0.
    assert float(jnp.abs(lm(x)[0, 5] - lm(swapped)[0, 5]).max()) > 1e-4


# Prompts for decoding: each ends with its question's "?" (mutual needs the question
# complete in the prompt); row 0's second image has its own question "7 ?".
PROMPT = jnp.array([[1, 3, 3, 3, 3, 5, 6, 3, 3, 3, 3, 7, 6],
                    [1, 9, 3, 3, 3, 3, 3, 3, 3, 3, 5, 8, 6]])
DECODE_LMS = {
    "gqa,mha": dict(attn="gqa,mha", attn_overrides={"gqa": {"num_kv_heads": 1}}),
    "mla,cca,moh": dict(attn="mla,cca,moh", num_layers=3),
}


@pytest.mark.parametrize("lm", list(DECODE_LMS))
@pytest.mark.parametrize("kind", ["causal", "prefix", "mutual"])
def test_decode_with_images_equals_full_forward(kind, lm):
    cfg = tiny(kind, **DECODE_LMS[lm])
    v = _init(cfg, PROMPT)
    n = 4
    toks, logits = generate(cfg, v, PROMPT, IMAGES, max_new_tokens=n, return_logits=True)
    # Fed back into the full forward a generated placeholder id would become an image slot.
    assert not bool(jnp.any(toks[:, :-1] == IMG_ID)), "pick other seeds: a placeholder was generated"
    full = jnp.concatenate([PROMPT, toks[:, :-1]], axis=1)
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
    # It must learn: the same model untrained (learning rate 1e-12) scores eval loss
    # 3.73 on these 16 eval rows; 8 steps measured 3.31 (accuracy is still 0 here).
    assert result["step"] == 8 and result["eval/loss"] < 3.6, result


@pytest.mark.slow
def test_vlm_shapes_with_the_mutual_mask_still_learns(tmp_path):
    """150 steps of a narrowed configs/vlm_shapes.py with mask=mutual (about 20-30 s on 2
    shared CPU cores). Guessing within the question's answer type scores about 0.28 on
    the 512 held-out questions; measured 0.418 here (causal at the same budget: 0.449)."""
    c = load_config(os.path.join(ROOT, "configs/vlm_shapes.py:mask=mutual,steps=150"))
    assert c.model.mask == "mutual" and c.model.question_end_id is not None
    c.model.vision.update(dict(width=32, depth=1, mlp_dim=64, num_heads=2))
    c.model.lm.update(dict(d_model=32, num_layers=2, num_heads=2))
    c.model.connector_dim = 64
    c.optim.learning_rate = 3e-3
    c.train.update(dict(log_every=1000, eval_every=0, eval_steps=2, progress_bar=False))
    c.checkpoint.update(dict(enabled=False))
    t0 = time.time()
    result = train_and_evaluate(c, str(tmp_path))
    assert result["step"] == 150 and np.isfinite(result["eval/loss"])
    assert result["eval/loss"] < 1.3, result  # from ~ln(22) = 3.1 at initialisation
    assert result["eval/accuracy"] > 0.34, result
    print(f"mutual-mask shapes QA: accuracy {result['eval/accuracy']:.3f} in {time.time() - t0:.1f} s")
