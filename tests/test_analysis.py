"""models.analysis: head capture / ablation / patching, needles, retrieval scores.

The probabilities are checked against a float64 numpy forward pass of the whole tiny
model written from the math (RMSNorm, half-split RoPE, grouped-query softmax attention,
SwiGLU), sharing no code with ``attn`` or ``models``; masks at the op level come from
``tests/oracle.mask_from_definition``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from attn.core import attention, route_attention
from attn.errors import UserError
from attn.masks import Mask
from models.analysis import capture as cap
from models.analysis.capture import HeadIntercept, InterceptSpec, head_probs, unscan
from models.analysis.needle import CharTokenizer, make_cases, other_value, with_value
from models.analysis.retrieval import copy_credit, score_runs, top_heads
from models.transformer import LMConfig, Transformer
from tests.oracle import mask_from_definition

L, N, K, D, V = 3, 4, 2, 32, 64


def _cfg(scan: bool) -> LMConfig:
    return LMConfig(vocab_size=V, d_model=D, num_layers=L, num_heads=N, attn="gqa",
                    attn_overrides={"gqa": {"num_kv_heads": K}}, dtype="float32", scan_layers=scan,
                    norm_eps=1e-6)


@pytest.fixture(scope="module")
def tiny():
    """(scanned config, scanned params, unscanned config, unscanned params)."""
    cfg = _cfg(True)
    p = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    # Larger q/k weights make the softmax peaked, a harder test than near-uniform rows.
    p = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 3.0 if any(getattr(k, "key", None) in ("q_kernel", "k_kernel")
                                       for k in path) else a, p)
    ucfg, up = unscan(cfg, p)
    return cfg, p, ucfg, up


def _inputs(T=7, pad=3, seed=1):
    """Two rows: row 0 full, row 1 left-padded by ``pad`` (segment 0)."""
    tok = np.asarray(jax.random.randint(jax.random.key(seed), (2, T), 1, V), np.int32)
    seg = np.ones((2, T), np.int32)
    seg[1, :pad] = 0
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32)
    return tok, pos, seg


# --------------------------------------------------------------------------- float64 oracle
def _np_forward(up, tokens, pos, seg):
    """Float64 numpy forward of the unscanned tiny model: (probs per layer [B,N,T,S], logits)."""
    P = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), up)
    H = D // N

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * scale

    def rope(x):
        inv = 1.0 / (10_000.0 ** (np.arange(0, H, 2) / H))
        ang = pos[..., None].astype(np.float64) * inv  # [B, T, H/2]
        c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
        x1, x2 = x[..., : H // 2], x[..., H // 2:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    x = P["embedding"][tokens]
    B, T = tokens.shape
    vis = (pos[:, None, :, None] >= pos[:, None, None, :]) & (seg[:, None, :, None] == seg[:, None, None, :]) \
        & (seg[:, None, :, None] != 0)
    probs = []
    for l in range(L):
        u = P[f"unit_{l}"]["block_0"]
        a = u["attn"]
        h = rms(x, u["attn_norm"]["scale"])
        q = rope(np.einsum("btd,dnh->btnh", h, a["q_kernel"]))
        k = rope(np.einsum("btd,dkh->btkh", h, a["k_kernel"]))
        v = np.einsum("btd,dkh->btkh", h, a["v_kernel"])
        kv = np.arange(N) // (N // K)  # query head n reads kv head n // G
        s = np.einsum("btnh,bsnh->bnts", q, k[:, :, kv]) / np.sqrt(H)
        s = np.where(vis, s, -np.inf)
        m = np.max(s, -1, keepdims=True)
        e = np.where(vis, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
        z = e.sum(-1, keepdims=True)
        p = np.where(z > 0, e / np.where(z > 0, z, 1.0), 0.0)
        probs.append(p)
        o = np.einsum("bnts,bsnh->btnh", p, v[:, :, kv])
        x = x + np.einsum("btnh,nhd->btd", o, a["o_kernel"])
        h = rms(x, u["mlp_norm"]["scale"])
        g = h @ u["mlp"]["w_gate"]
        x = x + (g / (1 + np.exp(-g)) * (h @ u["mlp"]["w_up"])) @ u["mlp"]["w_down"]
    x = rms(x, P["final_norm"]["scale"])
    return probs, x @ P["embedding"].T


def test_capture_probs_match_float64_oracle(tiny):
    _, _, ucfg, up = tiny
    tok, pos, seg = _inputs()
    ref_probs, ref_logits = _np_forward(up, tok, pos, seg)
    spec = InterceptSpec(probs_layers=range(L))
    logits, rec = cap.capture(ucfg, up, jnp.asarray(tok), positions_BT=jnp.asarray(pos),
                              segment_ids_BT=jnp.asarray(seg), spec=spec)
    real = seg.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], ref_logits[real], atol=2e-4, rtol=1e-4)
    for l in range(L):
        got = np.asarray(rec["probs"][l])
        assert got.shape == (2, N, 7, 7) and np.isfinite(got).all()
        np.testing.assert_allclose(got, ref_probs[l], atol=2e-5)
        assert np.all(got[1, :, :3] == 0)  # padded queries: all zero, never NaN
        np.testing.assert_allclose(got.sum(-1)[real[:, None].repeat(N, 1)], 1.0, atol=1e-5)
    # Selected rows are the same numbers as the full map's last rows.
    _, rec2 = cap.capture(ucfg, up, jnp.asarray(tok), positions_BT=jnp.asarray(pos),
                          segment_ids_BT=jnp.asarray(seg), spec=InterceptSpec(probs_layers=(1,), rows=2))
    np.testing.assert_array_equal(np.asarray(rec2["probs"][1]), np.asarray(rec["probs"][1])[:, :, -2:])


def test_head_probs_options_match_oracle():
    """Op level: sinks, softcap, bias, window, segments with an empty row; p @ v == attention."""
    B, T, S, H = 2, 7, 9, 8
    ks = jax.random.split(jax.random.key(3), 5)
    q = jax.random.normal(ks[0], (B, T, N, H)) * 2
    k = jax.random.normal(ks[1], (B, S, K, H)) * 2
    v = jax.random.normal(ks[2], (B, S, K, H))
    sinks = jax.random.normal(ks[3], (N,))
    bias = jax.random.normal(ks[4], (1, N, T, S))
    qseg = np.ones((B, T), np.int32); qseg[1, 0] = 2  # query with no key of its segment
    kseg = np.ones((B, S), np.int32); kseg[0, -1] = 0
    mask = Mask(causal=True, window=(4, 0), q_positions=jnp.arange(T)[None].repeat(B, 0) + 2,
                q_segment_ids=jnp.asarray(qseg), kv_segment_ids=jnp.asarray(kseg))
    got = np.asarray(head_probs(q, k, mask=mask, softcap=3.0, sinks_N=sinks, bias=bias, scale=0.4))
    vis = mask_from_definition(mask, B, T, S)
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    s = np.einsum("btnh,bsnh->bnts", qn, kn[:, :, np.arange(N) // (N // K)]) * 0.4
    s = 3.0 * np.tanh(s / 3.0) + np.asarray(bias, np.float64)
    e = np.where(vis, np.exp(s), 0.0)
    z = e.sum(-1, keepdims=True) + np.exp(np.asarray(sinks, np.float64))[None, :, None, None]
    np.testing.assert_allclose(got, e / z, atol=1e-5)
    assert np.all(got[1, :, 0] == 0) and np.isfinite(got).all()
    o = attention(q, k, v, mask=mask, softcap=3.0, sinks=sinks, bias=bias, scale=0.4, impl="xla")
    pv = np.einsum("bnts,bsnh->btnh", got, np.asarray(v)[:, :, np.arange(N) // (N // K)])
    np.testing.assert_allclose(pv, np.asarray(o), atol=1e-5)


def test_unscan_is_bit_identical_and_scanned_refused(tiny):
    cfg, p, ucfg, up = tiny
    tok, pos, seg = (jnp.asarray(a) for a in _inputs())
    a = jax.jit(lambda v: Transformer(cfg).apply({"params": v}, tok, positions_BT=pos, segment_ids_BT=seg)[0])(p)
    b = jax.jit(lambda v: Transformer(ucfg).apply({"params": v}, tok, positions_BT=pos, segment_ids_BT=seg)[0])(up)
    c, _ = cap.capture(ucfg, up, tok, positions_BT=pos, segment_ids_BT=seg, spec=InterceptSpec(probs_layers=(0,)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    with pytest.raises(UserError, match="unscan") as e:
        cap.capture(cfg, p, tok, spec=InterceptSpec())
    assert "\n" not in str(e.value)
    for bad in (InterceptSpec(ablate=((L, 0),)), InterceptSpec(patch=((0, N),)), InterceptSpec(probs_layers=(-1,))):
        with pytest.raises(UserError, match="not in"):
            cap.capture(ucfg, up, tok, spec=bad)
    with pytest.raises(UserError, match="mean_o"):
        cap.capture(ucfg, up, tok, spec=InterceptSpec(ablate=((0, 0),), ablate_mode="mean"))


@pytest.mark.parametrize("scan", [True, False])
def test_zero_ablating_a_layer_equals_zero_o_kernel(tiny, scan):
    cfg, p, ucfg, up = tiny
    tok, pos, seg = (jnp.asarray(a) for a in _inputs())
    layer = 1
    if scan:
        ref_cfg = cfg
        ref_p = jax.tree_util.tree_map(lambda a: a, p)
        units = ref_p["units"]["block_0"]["attn"]
        ref_p["units"]["block_0"]["attn"] = {**units, "o_kernel": units["o_kernel"].at[layer].set(0)}
    else:
        ref_cfg, ref_p = ucfg, dict(up)
        blk = ref_p[f"unit_{layer}"]["block_0"]
        ref_p[f"unit_{layer}"] = {"block_0": {**blk, "attn": {**blk["attn"],
                                              "o_kernel": jnp.zeros_like(blk["attn"]["o_kernel"])}}}
    ref = Transformer(ref_cfg).apply({"params": ref_p}, tok, positions_BT=pos, segment_ids_BT=seg)[0]
    c, q = (cfg, p) if scan else (ucfg, up)
    c, q = unscan(c, q)
    got, _ = cap.capture(c, q, tok, positions_BT=pos, segment_ids_BT=seg,
                         spec=InterceptSpec(ablate=[(layer, n) for n in range(N)]))
    # Same math; jit vs eager rounding only (o = 0 and W_o = 0 both add exactly 0).
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)
    plain = Transformer(c).apply({"params": q}, tok, positions_BT=pos, segment_ids_BT=seg)[0]
    assert not np.allclose(np.asarray(got), np.asarray(plain), atol=1e-3)


def test_patching_identity_and_downstream_only(tiny):
    _, _, ucfg, up = tiny
    tok, pos, seg = (jnp.asarray(a) for a in _inputs())
    tok_b = tok.at[:, 4].set((tok[:, 4] + 7) % V)  # run B differs at one token
    rec_all = InterceptSpec(out_layers=range(L), probs_layers=range(L))
    kw = dict(positions_BT=pos, segment_ids_BT=seg)
    la, ra = cap.capture(ucfg, up, tok, spec=rec_all, **kw)
    lb, rb = cap.capture(ucfg, up, tok_b, spec=rec_all, **kw)
    # A into A: the identity, bit for bit.
    same, _ = cap.capture(ucfg, up, tok, spec=InterceptSpec(patch=[(1, n) for n in range(N)]),
                          patch_o=ra["o"], **kw)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(la))
    # B into A at head (1, 2): layers up to 1 see A's values, layer 2 and the logits change.
    spec = InterceptSpec(patch=((1, 2),), out_layers=range(L), probs_layers=range(L))
    lp, rp = cap.capture(ucfg, up, tok, spec=spec, patch_o={1: rb["o"][1]}, **kw)
    for l in (0, 1):
        np.testing.assert_array_equal(np.asarray(rp["o"][l]), np.asarray(ra["o"][l]))
        np.testing.assert_array_equal(np.asarray(rp["probs"][l]), np.asarray(ra["probs"][l]))
    t = 4  # tokens before the changed one see the same inputs in A and B
    assert not np.allclose(np.asarray(rp["o"][2])[:, t:], np.asarray(ra["o"][2])[:, t:], atol=1e-4)
    np.testing.assert_allclose(np.asarray(lp)[:, :t], np.asarray(la)[:, :t], atol=1e-6)
    assert not np.allclose(np.asarray(lp), np.asarray(la), atol=1e-4)
    # patch_rows: rows before the patched ones are untouched (causality).
    lr, _ = cap.capture(ucfg, up, tok, spec=InterceptSpec(patch=((1, 2),), patch_rows=2),
                        patch_o={1: rb["o"][1]}, **kw)
    np.testing.assert_array_equal(np.asarray(lr)[:, :-2], np.asarray(la)[:, :-2])
    assert not np.allclose(np.asarray(lr)[:, -2:], np.asarray(la)[:, -2:], atol=1e-4)


def test_mean_ablation_writes_the_mean(tiny):
    _, _, ucfg, up = tiny
    mean_o = cap.mean_head_outputs(ucfg, up, [[1, 2, 3, 4], [5, 6]], batch=2)
    assert mean_o.shape == (L, N, D // N)
    x = jax.random.normal(jax.random.key(0), (1, 4, N, D // N))
    hi = HeadIntercept(InterceptSpec(ablate=((0, 3),), ablate_mode="mean"), num_layers=1, num_heads=N,
                       mean_o=mean_o[:1])
    with route_attention(hi):
        o = attention(x, x[:, :, :K], x[:, :, :K])
    np.testing.assert_allclose(np.asarray(o[0, :, 3]), np.broadcast_to(np.asarray(mean_o[0, 3]), (4, D // N)))


# --------------------------------------------------------------------------- needles
def test_needle_cases_deterministic_and_span_holds_value():
    tok = CharTokenizer()
    kw = dict(context_len=400, depths=(0.0, 0.5, 1.0), n=3, fmt="qa")
    a, b, c = make_cases(tok, seed=5, **kw), make_cases(tok, seed=5, **kw), make_cases(tok, seed=6, **kw)
    assert a == b and a != c and len(a) == 9
    for case in a:
        s, e = case.needle_span
        assert len(case.prompt_ids) == 400
        assert case.prompt_ids[s:e] == case.answer_ids
        assert tok.decode(case.answer_ids) == " " + case.value and len(case.value) == 7
        assert case.score(case.answer_ids + tuple(tok.encode(". x")))
        assert not case.score(case.answer_ids + tuple(tok.encode("3")))
    zero, mid, one = a[:3]
    assert zero.key == mid.key == one.key and zero.value == one.value
    assert zero.needle_span[0] < mid.needle_span[0] < one.needle_span[0]
    prefix = " The special magic number for %s is" % zero.key
    assert tok.decode(zero.prompt_ids[:len(prefix)]) == prefix  # depth 0: first in the haystack
    tail = tok.decode(one.prompt_ids[one.needle_span[1]:])
    assert tail.startswith(".\n\nQuestion: What is the special magic number for")  # depth 1: last
    d = with_value(zero, tok, other_value(zero.value, np.random.default_rng(0)))
    assert len(d.prompt_ids) == 400 and d.prompt_ids[:zero.needle_span[0]] == zero.prompt_ids[:zero.needle_span[0]]
    assert all(x != y for x, y in zip(d.value, zero.value))
    with pytest.raises(UserError, match="context_len"):
        make_cases(tok, context_len=20, n=1)


# --------------------------------------------------------------------------- retrieval
def test_retrieval_score_on_handmade_attention():
    """Two layers × two heads, 4 generated steps, needle = prompt[3:7] = [11, 12, 13, 14]."""
    prompt = [1, 2, 3, 11, 12, 13, 14, 5, 12]
    gen = [11, 12, 13, 9]
    probs = np.full((2, 2, 4, len(prompt)), 0.01)
    # Head (0, 0) copies every needle token: argmax on 3, 4, 5; step 3 emits 9 (no copy).
    for m, j in enumerate([3, 4, 5, 6]):
        probs[0, 0, m, j] = 0.9
    # Head (0, 1) looks at token 12 outside the span (index 8): never credited.
    probs[0, 1, :, 8] = 0.9
    # Head (1, 0): in the span but the wrong token on step 1 (attends 13 while emitting 12).
    for m, j in enumerate([3, 5, 5, 0]):
        probs[1, 0, m, j] = 0.9
    top = probs.argmax(-1)
    score = copy_credit(top, gen, prompt, (3, 7))
    np.testing.assert_allclose(score, [[3 / 4, 0.0], [2 / 4, 0.0]])
    assert top_heads(score, 2) == [(0, 0), (1, 0)]


def test_score_runs_left_padding_matches_one_by_one(tiny):
    cfg, p, _, _ = tiny
    c = make_cases(CharTokenizer(), context_len=200, depths=(0.5,), n=1, seed=0)[0]
    # Vocabulary 64: fold the character ids into it; two prompts of different lengths.
    fold = lambda ids: tuple(int(t) % V for t in ids)
    short = type(c)(**{**c.__dict__, "prompt_ids": fold(c.prompt_ids[20:]), "answer_ids": fold(c.answer_ids),
                       "needle_span": (c.needle_span[0] - 20, c.needle_span[1] - 20)})
    full = type(c)(**{**c.__dict__, "prompt_ids": fold(c.prompt_ids), "answer_ids": fold(c.answer_ids)})
    s2, g2, _ = score_runs(cfg, p, [full, short], batch=2, max_new_tokens=5)
    s1, g1, _ = score_runs(cfg, p, [full, short], batch=1, max_new_tokens=5)
    assert g1 == g2 and s2.shape == (2, L, N)
    np.testing.assert_array_equal(s1, s2)


# --------------------------------------------------------------------------- one real model
@pytest.fixture(scope="module")
def smollm2():
    from models import pretrained
    from models.pretrained.errors import PretrainedError

    try:
        return pretrained.load("smollm2-135m")
    except PretrainedError as e:
        pytest.skip(str(e))


def test_smollm2_capture_matches_plain_logits(smollm2):
    from models.perplexity import corpus_text

    ids = jnp.asarray([smollm2.tokenizer.encode(corpus_text()[:2000])[:64]], jnp.int32)
    ref = Transformer(smollm2.config).apply({"params": smollm2.params}, ids)[0]
    ucfg, up = unscan(smollm2.config, smollm2.params)
    got, rec = cap.capture(ucfg, up, ids, spec=InterceptSpec(probs_layers=(0, 29), rows=4, out_layers=(3,)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4)
    assert rec["probs"][29].shape == (1, 9, 4, 64) and rec["o"][3].shape == (1, 64, 9, 64)
    np.testing.assert_allclose(np.asarray(rec["probs"][29]).sum(-1), 1.0, atol=1e-5)
