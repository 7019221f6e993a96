"""Eviction and channel policies: H2O, Scissorhands, Keyformer, ThinK, xKV.

Every oracle is float64 numpy written from the paper's rule, not from attn/kv:
H2O = probabilities summed over all prompt queries; Scissorhands = count of P > 1/t over
the last `history` queries; Keyformer = Gumbel softmax (x + ζ)/τ summed over queries (ζ
taken from ``gumbel_noise``: the noise is an input of the rule); all group-averaged, with
the newest r_b tokens forced in; ThinK = ‖Q_obs[:, c]‖·‖K[:, c]‖ top channels, and
decoding logits with the pruned channels of q·k zeroed; xKV = numpy SVD of the stacked
layers. Shapes: B=2 rows of 13 and 9 real tokens (left padding), N=4, K=2, H=8.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.errors import UserError
from attn.kv import xkv
from attn.kv.head_cache import HeadKVCache, PolicyPrefillCache
from attn.kv.keyformer import gumbel_noise
from attn.kv.policy import Observation, make_policy, policy_names
from models.generate import generate_batch
from models.transformer import LMConfig, Transformer

B, S, N, K, H = 2, 13, 4, 2, 8
G = N // K
BUDGET = np.array([6, 5])


def _rand(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _obs(budget=BUDGET, layer_state=None, seed=0):
    seg = np.ones((B, S), np.int32)
    seg[1, :4] = 0
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32)
    q, k, v = _rand(seed, (B, S, N, H)) * 1.5, _rand(seed + 1, (B, S, K, H)), _rand(seed + 2, (B, S, K, H))
    return Observation(q=q, k=k, v=v, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg),
                       budget_B=jnp.asarray(budget, jnp.int32), layer_state=layer_state)


def _jit_scores(policy, obs):
    return jax.jit(policy.scores)(obs)


def _np(obs):
    return (np.asarray(obs.q, np.float64), np.asarray(obs.k, np.float64),
            np.asarray(obs.segment_ids), np.asarray(obs.positions))


def _logits(obs):
    """float64 [B, N, T, S] logits with -inf where query t does not see key s."""
    q, k, seg, pos = _np(obs)
    x = np.full((B, N, S, S), -np.inf)
    for b in range(B):
        for n in range(N):
            for t in range(S):
                if seg[b, t] == 0:
                    continue
                vis = (seg[b] != 0) & (pos[b] <= pos[b, t])
                x[b, n, t, vis] = k[b, vis, n // G] @ q[b, t, n] / np.sqrt(H)
    return x


def _softmax(x):
    out = np.zeros_like(x)
    ok = np.isfinite(x).any(-1)
    m = np.where(ok, np.max(np.where(np.isfinite(x), x, -1e300), -1), 0)
    e = np.where(np.isfinite(x), np.exp(x - m[..., None]), 0.0)
    z = e.sum(-1, keepdims=True)
    out[ok] = (e / np.where(z > 0, z, 1))[ok]
    return out


def _expected_keep(importance, seg, budget, recent):
    """The newest recent[b] real tokens + the top (budget − recent) others by importance."""
    keep = np.zeros((B, K, S), bool)
    for b in range(B):
        real = np.flatnonzero(seg[b])
        rec = real[len(real) - recent[b]:] if recent[b] else real[:0]
        rest = [s for s in real if s not in set(rec)]
        for kh in range(K):
            keep[b, kh, rec] = True
            order = sorted(rest, key=lambda s: (-importance[b, kh, s], s))
            keep[b, kh, order[:budget[b] - recent[b]]] = True
    return keep


def _check_selection(policy, obs, importance, recent):
    seg = np.asarray(obs.segment_ids)
    keep, got = jax.jit(lambda o: (policy.select(o).keep, policy.scores(o)))(obs)
    keep, got = np.asarray(keep), np.asarray(got)
    budget = np.asarray(obs.budget_B)
    assert keep.sum(-1).tolist() == [[budget[b]] * K for b in range(B)]  # exact counts
    assert not keep[1, :, :4].any()  # padding is never kept
    for b in range(B):  # the recent window is kept
        real = np.flatnonzero(seg[b])
        if recent[b]:
            assert keep[b, :, real[-recent[b]:]].all()
    np.testing.assert_array_equal(keep, _expected_keep(importance, seg, budget, recent))
    # Scores agree with the oracle on every real, non-recent token.
    idx = np.cumsum(seg, 1) - 1
    free = (seg != 0) & (idx < (seg.sum(1) - np.asarray(recent))[:, None])
    np.testing.assert_allclose(got[np.broadcast_to(free[:, None], got.shape)],
                               importance[np.broadcast_to(free[:, None], got.shape)], rtol=1e-5, atol=1e-6)


def test_h2o_matches_oracle_and_is_block_invariant():
    obs = _obs()
    acc = _softmax(_logits(obs)).sum(2).reshape(B, K, G, S).mean(2)  # sum over all queries
    _check_selection(make_policy("h2o", recent=2, block=4), obs, acc, recent=[2, 2])
    _check_selection(make_policy("h2o", recent=0, block=64), obs, acc, recent=[0, 0])
    # recent_ratio: half of each row's budget (floor), the paper's even split.
    _check_selection(make_policy("h2o"), obs, acc, recent=[3, 2])
    np.testing.assert_allclose(np.asarray(_jit_scores(make_policy("h2o", block=1), obs)),
                               np.asarray(_jit_scores(make_policy("h2o", block=100), obs)), rtol=1e-6)


def test_scissorhands_matches_oracle():
    obs = _obs()
    hist = 5
    p = _softmax(_logits(obs))
    seg = np.asarray(obs.segment_ids)
    cnt = np.zeros((B, N, S))
    for b in range(B):
        for t in np.flatnonzero(seg[b])[-hist:]:  # the last `history` real queries
            tvis = np.isfinite(_logits(obs)[b, 0, t]).sum()
            cnt[b] += p[b, :, t] > 1.0 / tvis
    imp = cnt.reshape(B, K, G, S).mean(2)
    _check_selection(make_policy("scissorhands", history=hist, recent=1, block=2), obs, imp, recent=[1, 1])
    _check_selection(make_policy("scissorhands", history=hist, recent_ratio=0.4), obs, imp, recent=[2, 2])


def test_keyformer_matches_oracle():
    layer, seed, tau = 3, 7, 1.5
    obs = _obs(layer_state=jnp.int32(layer))
    x = _logits(obs)
    pos = np.asarray(obs.positions)
    zeta = np.asarray(jax.jit(gumbel_noise)(seed, layer, np.arange(N)[None, :, None, None],
                                            pos[:, None, :, None], pos[:, None, None, :]), np.float64)
    f = _softmax(np.where(np.isfinite(x), (x + zeta) / tau, -np.inf))
    imp = f.sum(2).reshape(B, K, G, S).mean(2)
    pol = make_policy("keyformer", tau=tau, seed=seed, recent=2, block=3)
    _check_selection(pol, obs, imp, recent=[2, 2])
    _check_selection(make_policy("keyformer", tau=tau, seed=seed), obs, imp, recent=[1, 1])  # 30%
    # The noise is a function of positions: another seed or layer selects differently.
    other = np.asarray(_jit_scores(make_policy("keyformer", tau=tau, seed=seed + 1, recent=2), obs))
    assert not np.allclose(other, np.asarray(_jit_scores(pol, obs)))
    z = np.asarray(jax.jit(gumbel_noise)(1, 0, 0, np.arange(300)[:, None], np.arange(300)[None]))
    assert abs(z.mean() - 0.5772) < 0.02 and abs(z.std() - np.pi / np.sqrt(6)) < 0.03


def _np_channels(obs, window, ratio, keep_tokens=None):
    q, k, seg, _ = _np(obs)
    kept = H - int(H * ratio)
    ch = np.zeros((B, K, kept), np.int64)
    for b in range(B):
        real = np.flatnonzero(seg[b])
        win = real[-window:]
        for kh in range(K):
            qo = q[b][win][:, kh * G:(kh + 1) * G].reshape(-1, H)  # window queries of the group
            score = np.linalg.norm(qo, axis=0) * np.linalg.norm(k[b, real, kh], axis=0)
            ch[b, kh] = np.sort(sorted(range(H), key=lambda c: (-score[c], c))[:kept])
    return ch


def test_think_channels_and_decode_logits_match_oracle():
    obs = _obs()
    pol = make_policy("think", ratio=0.4, window=3)
    sel = jax.jit(pol.select)(obs)
    ch = _np_channels(obs, 3, 0.4)
    assert sel.channels.shape == (B, K, 5)
    np.testing.assert_array_equal(np.asarray(sel.channels), ch)
    assert np.asarray(sel.keep).sum(-1).tolist() == [[13, 13], [9, 9]]  # tokens: all real ones
    # Composed with a token policy: its selection, unchanged, plus the channels.
    comp = make_policy("think", ratio=0.5, window=3, tokens="h2o", tokens_args="recent=1,block=4")
    csel = jax.jit(comp.select)(obs)
    np.testing.assert_array_equal(np.asarray(csel.keep),
                                  np.asarray(jax.jit(make_policy("h2o", recent=1, block=4).select)(obs).keep))
    np.testing.assert_array_equal(np.asarray(csel.channels), _np_channels(obs, 3, 0.5))
    assert comp.max_keep(13, 6) == 6 and pol.max_keep(13, 6) == 13

    # Through the cache: prefill keeps the selection, a decode step's logits use only the
    # kept channels at the full head dim's scale.
    pre = PolicyPrefillCache(budget_B=obs.budget_B, policy=comp, max_new=2, page_size=4, max_keep=6)
    _, cache = jax.jit(lambda *a: pre.attend(*a, impl="xla"))(obs.q, obs.k, obs.v, obs.positions,
                                                               obs.segment_ids)
    assert isinstance(cache, HeadKVCache) and cache.kept_BK().tolist() == [[6, 6], [5, 5]]
    qd, kd, vd = _rand(10, (B, 1, N, H)), _rand(11, (B, 1, K, H)), _rand(12, (B, 1, K, H))
    pos_new = obs.positions[:, -1:] + 1
    o, cache2 = jax.jit(lambda c, *a: c.attend(*a, impl="xla"))(cache, qd, kd, vd, pos_new,
                                                                 jnp.ones((B, 1), jnp.int32))
    keep = np.asarray(csel.keep)
    chn = _np_channels(obs, 3, 0.5)
    k64, v64 = np.asarray(obs.k, np.float64), np.asarray(obs.v, np.float64)
    kstore, _, _, sstore = cache2.paged.gather_dense()
    kstore, sstore = np.asarray(kstore, np.float64), np.asarray(sstore)
    for b in range(B):
        for n in range(N):
            kh = n // G
            idx = np.flatnonzero(keep[b, kh])
            keys = np.concatenate([k64[b, idx, kh], np.asarray(kd, np.float64)[b, :, kh]])
            vals = np.concatenate([v64[b, idx, kh], np.asarray(vd, np.float64)[b, :, kh]])
            mask = np.zeros(H)
            mask[chn[b, kh]] = 1.0
            logits = (keys * mask) @ (np.asarray(qd, np.float64)[b, 0, n] * mask) / np.sqrt(H)
            # the stored keys hold only the kept channels; their logits are the oracle's
            live = sstore[b * K + kh] != 0
            got_logits = kstore[b * K + kh][live][:, 0] @ np.asarray(qd, np.float64)[b, 0, n, chn[b, kh]] / np.sqrt(H)
            np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-5)
            pr = np.exp(logits - logits.max())
            np.testing.assert_allclose(np.asarray(o[b, 0, n]), (pr / pr.sum()) @ vals, rtol=1e-5, atol=1e-5)
    # Key bytes shrink: 4 of 8 channels stored.
    assert cache2.paged.k.shape[-1] == 4


@functools.partial(jax.jit, static_argnames=("rank", "group"))
def _xkv_err(x, seg, *, rank, group):
    return xkv.relative_error(x, xkv.compress_layers(x, seg, rank=rank, group=group), seg)


def test_xkv_matches_numpy_svd_and_refuses_the_cache():
    L, Sx = 4, 12
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((B, Sx, 3))
    # Layers sharing a rank-3 token subspace, plus a little noise.
    x = np.stack([basis @ rng.standard_normal((3, K * H)) for _ in range(L)]).reshape(L, B, Sx, K, H)
    x = x + 0.01 * rng.standard_normal(x.shape)
    seg = np.ones((B, Sx), np.int32)
    seg[1, :5] = 0
    xj = jnp.asarray(x, jnp.float32)
    for group, rank in ((2, 3), (4, 5), (1, 2), (3, 4)):
        err = np.asarray(_xkv_err(xj, jnp.asarray(seg), rank=rank, group=group))
        want = []
        xm = np.where(seg[None, :, :, None, None] != 0, x, 0.0)
        rec = np.zeros_like(xm)
        for g0 in range(0, L, group):
            ls = list(range(g0, min(g0 + group, L)))
            for b in range(B):
                X = np.concatenate([xm[l, b].reshape(Sx, K * H) for l in ls], axis=1)
                U, s, Vt = np.linalg.svd(X, full_matrices=False)
                Xr = (U[:, :rank] * s[:rank]) @ Vt[:rank]
                for i, l in enumerate(ls):
                    rec[l, b] = Xr[:, i * K * H:(i + 1) * K * H].reshape(Sx, K, H)
        for l in range(L):
            want.append(np.linalg.norm(xm[l] - rec[l]) / np.linalg.norm(xm[l]))
        np.testing.assert_allclose(err, want, rtol=2e-3, atol=1e-5)
    # A shared subspace: the cross-layer rank-3 basis of 4 layers is (nearly) exact.
    assert np.asarray(_xkv_err(xj, None, rank=3, group=4)).max() < 0.02
    assert xkv.factor_bytes(S=Sx, L=L, K=K, H=H, rank=3, group=4, itemsize=1) == Sx * 3 + L * 3 * K * H
    r = xkv.rank_for_fraction(0.25, S=1024, K=K, H=H, group=4)
    assert xkv.factor_bytes(S=1024, L=4, K=K, H=H, rank=r, group=4) <= 0.25 * 4 * 1024 * K * H * 2
    assert "xkv" in policy_names()
    with pytest.raises(UserError, match="across layers"):
        make_policy("xkv").select(_obs())


def test_knob_errors():
    with pytest.raises(UserError, match="recent must be"):
        make_policy("h2o", recent=-1)
    with pytest.raises(UserError, match="history must be"):
        make_policy("scissorhands", history=0)
    with pytest.raises(UserError, match="tau must be"):
        make_policy("keyformer", tau=0.0)
    with pytest.raises(UserError, match="ratio must be"):
        make_policy("think", ratio=1.0)
    with pytest.raises(UserError, match="unknown KV policy 'nope'"):
        make_policy("think", tokens="nope")


# --------------------------------------------------------------------------- end to end
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [4, 5, 6, 7], [9, 8, 7, 6, 5]]


def _tiny(scan):
    cfg = LMConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=4, attn="gqa",
                   attn_overrides={"gqa": {"num_kv_heads": 2}}, dtype="float32", scan_layers=scan)
    return cfg, Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


# Each generate call compiles a prefill per policy (~4 s on 2 cores), so the policies are
# split over the two layer layouts; both layouts run the per-head cache end to end.
@pytest.mark.parametrize("scan,names", [(False, ("h2o", "think")), (True, ("keyformer", "scissorhands"))])
def test_generate_full_budget_equals_full_cache(scan, names):
    cfg, v = _tiny(scan)
    gen = lambda prompts, **kw: generate_batch(cfg, v, prompts, max_new_tokens=4, **kw)
    want = gen(PROMPTS)
    pols = {"h2o": make_policy("h2o", block=4), "scissorhands": make_policy("scissorhands", history=4),
            "keyformer": make_policy("keyformer", seed=1),
            "think": make_policy("think", ratio=0.0)}  # all channels, through the channel path
    for name in names:
        assert gen(PROMPTS, kv_policy=pols[name], kv_budget=1.0) == want, name
    if scan:
        # A small budget (3 of 9, 1 of 4 tokens per head) runs for every row. Keyformer's
        # noise depends on positions only, so a row decodes the same alone as in the batch.
        small = dict(kv_policy=pols["keyformer"], kv_budget=0.25)
        got = gen(PROMPTS, **small)
        assert [len(r) for r in got] == [4, 4, 4]
        assert got[1:2] == gen(PROMPTS[1:2], **small)
