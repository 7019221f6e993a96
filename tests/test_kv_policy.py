"""attn.kv: the policy interface, the per-head cache and generation through them.

Oracles are float64 numpy, written from the definitions: attention of each (row, kv
head) over exactly the tokens that head kept; StreamingLLM = first sinks + newest;
SnapKV = summed observation-window probabilities, group mean, max pool, window kept.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.cache import check_overflow, overflow_state
from attn.errors import UserError
from attn.kv.head_cache import HeadKVCache, PolicyPrefillCache
from attn.kv.policy import (Observation, ScorePolicy, budgets, make_policy, parse_knobs,
                            policy_names)
from models.generate import generate_batch
from models.transformer import LMConfig, Transformer

B, S, N, K, H = 2, 13, 4, 2, 8
G = N // K


def _rand(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _ragged_prompt():
    """Row 0 has 13 real tokens, row 1 has 9 (left padded with 4)."""
    seg = np.ones((B, S), np.int32)
    seg[1, :4] = 0
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32)
    return jnp.asarray(pos), jnp.asarray(seg)


def _oracle_decode(q, k, v, keep, k_new, v_new, channels=None):
    """float64: per (b, kv head) attention of the new query over kept prompt keys + the new key."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    k_new, v_new = np.asarray(k_new, np.float64), np.asarray(v_new, np.float64)
    out = np.zeros((q.shape[0], 1, N, v.shape[-1]))
    for b in range(q.shape[0]):
        for n in range(N):
            kh = n // G
            idx = np.flatnonzero(np.asarray(keep)[b, kh])
            keys = np.concatenate([k[b, idx, kh], k_new[b, :, kh]])
            vals = np.concatenate([v[b, idx, kh], v_new[b, :, kh]])
            qq = q[b, 0, n]
            if channels is not None:
                ch = np.asarray(channels)[b, kh]
                keys, qq = keys[:, ch], qq[ch]
            s = keys @ qq / np.sqrt(H)
            p = np.exp(s - s.max())
            out[b, 0, n] = (p / p.sum()) @ vals
    return out


@pytest.mark.parametrize("with_channels", [False, True])
def test_head_cache_decode_matches_oracle(with_channels):
    pos, seg = _ragged_prompt()
    k, v = _rand(0, (B, S, K, H)), _rand(1, (B, S, K, H))
    keep = np.array(jax.random.bernoulli(jax.random.key(2), 0.5, (B, K, S)))
    keep[:, :, -1] = True
    keep &= np.asarray(seg)[:, None, :] != 0
    channels = jnp.asarray(np.stack([np.stack([np.sort(np.random.default_rng(b * K + kh).choice(
        H, 5, replace=False)) for kh in range(K)]) for b in range(B)]).astype(np.int32)) \
        if with_channels else None
    c = HeadKVCache.build(k, v, pos, seg, jnp.asarray(keep), max_new=3, page_size=4,
                          channels_BKC=channels)
    assert c.kept_BK().tolist() == keep.sum(-1).tolist()
    q, kn, vn = _rand(3, (B, 1, N, H)), _rand(4, (B, 1, K, H)), _rand(5, (B, 1, K, H))
    o, c2 = c.attend(q, kn, vn, pos[:, -1:] + 1, jnp.ones((B, 1), jnp.int32), impl="xla")
    np.testing.assert_allclose(np.asarray(o), _oracle_decode(q, k, v, keep, kn, vn, channels),
                               rtol=1e-5, atol=1e-5)
    assert c2.kept_BK().tolist() == (keep.sum(-1) + 1).tolist()
    # Held bytes are the live pages only: far below the pool when little is kept.
    assert int(c2.held_bytes()) <= c2.reserved_bytes()


def test_prefill_cache_is_exact_and_keeps_the_selection():
    pos, seg = _ragged_prompt()
    q, k, v = _rand(0, (B, S, N, H)), _rand(1, (B, S, K, H)), _rand(2, (B, S, K, H))
    pol = make_policy("streaming", sinks=2)
    pre = PolicyPrefillCache(budget_B=jnp.array([5, 4]), policy=pol, max_new=2, page_size=4,
                             max_keep=5)
    o, cache = pre.attend(q, k, v, pos, seg, impl="xla")
    # Prefill output: exact causal attention (float64) over each row's real tokens.
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    segn, posn = np.asarray(seg), np.asarray(pos)
    for b in range(B):
        for t in np.flatnonzero(segn[b]):
            for n in range(N):
                vis = (segn[b] != 0) & (posn[b] <= posn[b, t])
                s = kn[b, vis, n // G] @ qn[b, t, n] / np.sqrt(H)
                p = np.exp(s - s.max())
                np.testing.assert_allclose(np.asarray(o[b, t, n]), (p / p.sum()) @ vn[b, vis, n // G],
                                           rtol=1e-5, atol=1e-5)
    assert cache.kept_BK().tolist() == [[5, 5], [4, 4]]
    # Row 1's kept positions: sinks 0, 1 and the newest two of its 9 tokens.
    p1 = np.asarray(cache.paged.gather_dense()[2])[K * 1]
    s1 = np.asarray(cache.paged.gather_dense()[3])[K * 1]
    assert sorted(p1[s1 != 0].tolist()) == [0, 1, 7, 8]


def _np_probs_last(q, k, seg, pos, W):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    out = np.zeros((B, N, W, S))
    for b in range(B):
        for i, t in enumerate(range(S - W, S)):
            if seg[b, t] == 0:
                continue
            for n in range(N):
                vis = (seg[b] != 0) & (pos[b] <= pos[b, t])
                s = np.where(vis, k[b, :, n // G] @ q[b, t, n] / np.sqrt(H), -np.inf)
                p = np.exp(s - s[vis].max())
                out[b, n, i] = p / p.sum()
    return out


def test_snapkv_scores_match_oracle():
    pos, seg = _ragged_prompt()
    q, k = _rand(0, (B, S, N, H)), _rand(1, (B, S, K, H))
    W, ker = 3, 3
    obs = Observation(q=q, k=k, v=k, positions=pos, segment_ids=seg, budget_B=jnp.array([6, 6]))
    got = np.asarray(make_policy("snapkv", window=W, kernel=ker).scores(obs))
    votes = _np_probs_last(q, k, np.asarray(seg), np.asarray(pos), W).sum(2)  # [B, N, S]
    votes = votes.reshape(B, K, G, S).mean(2)
    pad = np.pad(votes, ((0, 0), (0, 0), (1, 1)), constant_values=-np.inf)
    pooled = np.max(np.stack([pad[..., i:i + S] for i in range(ker)]), 0)
    real_idx = np.cumsum(np.asarray(seg), 1) - 1
    n = np.asarray(seg).sum(1)
    win = real_idx >= (n - W)[:, None]
    np.testing.assert_allclose(np.where(win[:, None], 0, got), np.where(win[:, None], 0, pooled),
                               rtol=1e-5, atol=1e-7)
    keep = np.asarray(make_policy("snapkv", window=W, kernel=ker).select(obs).keep)
    assert keep.sum(-1).tolist() == [[6, 6], [6, 6]]
    assert not keep[1, :, :4].any()  # padding never kept
    assert keep[np.broadcast_to(win[:, None], keep.shape)].all()  # the window is always kept


def _tiny(scan):
    cfg = LMConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=4, attn="gqa",
                   attn_overrides={"gqa": {"num_kv_heads": 2}}, dtype="float32", scan_layers=scan)
    return cfg, Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [4, 5, 6, 7], [9, 8, 7, 6, 5, 4]]


@pytest.mark.parametrize("scan", [False, True])
def test_generate_full_budget_equals_full_cache(scan):
    cfg, v = _tiny(scan)
    want = generate_batch(cfg, v, PROMPTS, max_new_tokens=6)
    for name in ("streaming", "snapkv"):
        got = generate_batch(cfg, v, PROMPTS, max_new_tokens=6, kv_policy=make_policy(name),
                             kv_budget=1.0)
        assert got == want, name
    # A small budget runs, row by row, and a row alone decodes as it does in the batch.
    small = generate_batch(cfg, v, PROMPTS, max_new_tokens=6, kv_policy=make_policy("streaming", sinks=1),
                           kv_budget=0.4)
    alone = [generate_batch(cfg, v, [p], max_new_tokens=6, kv_policy=make_policy("streaming", sinks=1),
                            kv_budget=0.4)[0] for p in PROMPTS]
    assert small == alone


class _Greedy(ScorePolicy):
    """A misbehaving policy: keeps everything whatever the budget."""

    name = "keep-all"

    def scores(self, obs):
        return jnp.zeros(obs.k.shape[:1] + (obs.num_kv_heads, obs.k.shape[1]))

    def select(self, obs):
        from attn.kv.policy import Selection
        return Selection(keep=jnp.broadcast_to(obs.real_BS[:, None], obs.k.shape[:1] + (obs.num_kv_heads, obs.k.shape[1])))


def test_policy_over_its_pool_is_an_error_not_a_silent_drop():
    pos, seg = _ragged_prompt()
    k = _rand(0, (B, S, K, H))
    pre = PolicyPrefillCache(budget_B=jnp.array([2, 2]), policy=_Greedy(), max_new=1, page_size=2,
                             max_keep=2)
    _, cache = pre.attend(_rand(1, (B, S, N, H)), k, k, pos, seg, impl="xla")
    with pytest.raises(ValueError, match="overflow"):
        check_overflow(overflow_state({"l": cache}))


def test_budgets_knobs_and_errors():
    assert budgets([100, 37, 1], 0.05).tolist() == [5, 2, 1]
    assert budgets([10], 1.0).tolist() == [10]
    with pytest.raises(UserError, match="fraction"):
        budgets([10], 0.0)
    assert {"streaming", "snapkv"} <= set(policy_names())
    with pytest.raises(UserError, match="unknown KV policy 'nope'"):
        make_policy("nope")
    with pytest.raises(UserError, match="no knob 'size'.*window"):
        make_policy("snapkv", size=3)
    with pytest.raises(UserError, match="window must be"):
        make_policy("snapkv", window=0)
    assert parse_knobs(["sinks=2"]) == {"sinks": 2}
    with pytest.raises(UserError, match="NAME=VALUE"):
        parse_knobs(["sinks"])


def test_serving_with_a_policy_decodes_like_generate():
    """Requests join a running batch through the policy; each decodes as it would alone
    (scanned layers, as the imported checkpoints use)."""
    from models.serving import Engine, Request

    cfg, v = _tiny(True)
    pol = make_policy("snapkv", window=2, kernel=3)
    eng = Engine(cfg, v, max_batch=2, max_len=24, page_size=4, kv_policy=pol, kv_budget=0.5)
    budgets_new = [5, 3, 4]
    out = eng.run([Request(p, n) for p, n in zip(PROMPTS, budgets_new)])
    for i, (p, n) in enumerate(zip(PROMPTS, budgets_new)):
        assert out[i] == generate_batch(cfg, v, [p], max_new_tokens=n, kv_policy=pol,
                                        kv_budget=0.5)[0], i
    # Every page went back to the pool when the requests finished.
    leaves = jax.tree_util.tree_leaves(eng.cache, is_leaf=lambda x: isinstance(x, HeadKVCache))
    assert all(int(jnp.sum(c.paged.refcount)) == 0 for c in leaves)


def test_one_prefill_many_policies_equals_prefill_per_policy():
    """``PolicyPrefillCache(policy=None)`` hands back the observation; a cache built from it
    equals the one the policy builds during prefill. Held bytes count stacked layers."""
    import dataclasses

    from models.serving import make_policy_cache

    cfg, v = _tiny(True)
    toks = jnp.asarray([[3, 5, 7, 9, 11, 13, 2, 4]])
    pos = jnp.arange(8)[None]
    seg = jnp.ones_like(pos)
    pol = make_policy("snapkv", window=2, kernel=1)
    direct = make_policy_cache(cfg, pol, jnp.array([3]), max_keep=3, max_new=2, page_size=2)
    _, want = Transformer(cfg).apply(v, toks, positions_BT=pos, segment_ids_BT=seg, cache=direct)
    obs_cache = jax.tree_util.tree_map(lambda c: c.replace(policy=None), direct,
                                       is_leaf=lambda x: isinstance(x, PolicyPrefillCache))
    _, obs = Transformer(cfg).apply(v, toks, positions_BT=pos, segment_ids_BT=seg, cache=obs_cache)
    got = jax.vmap(lambda o: HeadKVCache.from_observation(
        dataclasses.replace(o, budget_B=jnp.array([3])), pol, max_new=2, page_size=2,
        max_keep=3))(obs[0])
    for a, b in zip(jax.tree_util.tree_leaves(want[0]), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # 2 layers x (B*K = 2 rows) x ceil(3 / 2) = 2 pages of 2 slots, each 2 x 8 floats + 8 B.
    assert int(got.held_bytes()) == 2 * 2 * 2 * 2 * (2 * 8 * 4 + 8)
