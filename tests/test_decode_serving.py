"""models.serving: continuous batching over the paged cache equals decoding each request alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attn.errors import UserError
from models.generate import generate_batch
from models.serving import Engine, Request, init_paged_cache
from models.transformer import LMConfig, Transformer


@pytest.fixture(scope="module")
def model():
    cfg = LMConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=4, attn="gqa",
                   attn_overrides={"gqa": {"num_kv_heads": 2}}, dtype="float32")
    v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return cfg, v


def test_greedy_matches_decoding_alone(model):
    """More requests than slots, ragged prompts and budgets, prompts longer than a chunk."""
    cfg, v = model
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [7], [3, 9, 2], [5, 5, 5, 5, 5], [11, 12]]
    budgets = [4, 6, 2, 3, 5]
    eng = Engine(cfg, v, max_batch=2, max_len=16, page_size=4, prefill_chunk=4)
    out = eng.run([Request(p, n) for p, n in zip(prompts, budgets)])
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        alone = generate_batch(cfg, v, [p], max_new_tokens=n)[0]
        assert out[i] == alone, (i, out[i], alone)
    # Every page went back to the pool.
    leaf = eng.cache[0][0]
    assert int(jnp.sum(leaf.refcount)) == 0


def test_streaming_order_eos_and_sampling(model):
    cfg, v = model
    eng = Engine(cfg, v, max_batch=3, max_len=16, page_size=4, prefill_chunk=8)
    first = eng.run([Request([3, 4], 1)])[0][0]
    events = list(eng.stream([Request([3, 4], 8, eos_id=first),
                              Request([1, 2], 4, temperature=1.0, top_k=5, seed=3),
                              Request([1, 2], 4, temperature=1.0, top_k=5, seed=3)]))
    by = {}
    for e in events:
        by.setdefault(e.rid, []).append(e)
    assert [e.token for e in by[0]] == [first] and by[0][-1].done  # stopped at its EOS
    assert [e.token for e in by[1]] == [e.token for e in by[2]]  # same seed, same draws
    assert all(0 <= e.token < cfg.vocab_size for e in events)


def test_bad_requests_do_not_disturb_the_batch(model):
    cfg, v = model
    eng = Engine(cfg, v, max_batch=2, max_len=8, page_size=4, prefill_chunk=4)
    good = [Request([1, 2], 3), Request([4, 5, 6], 2)]
    out = eng.run([good[0], Request(list(range(7)), 5), Request([99], 2), good[1],
                   Request([1], 0)])
    assert "exceeds the cache's max_len=8" in out[1]
    assert "outside the vocab" in out[2]
    assert "must be positive" in out[4]
    assert out[0] == generate_batch(cfg, v, [[1, 2]], max_new_tokens=3)[0]
    assert out[3] == generate_batch(cfg, v, [[4, 5, 6]], max_new_tokens=2)[0]


def test_unsupported_cache_kind_is_refused():
    cfg = LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, attn="mla")
    with pytest.raises(UserError, match="paged cache replaces the full KVCache"):
        init_paged_cache(cfg, 1, 8, 4)


@pytest.mark.parametrize("kind,quant,tol", [("paged", "none", 1e-5), ("dense", "int8", 0.1),
                                            ("dense", "fp8", 0.3)])
def test_make_cache_kinds_match_dense(model, kind, quant, tol):
    """Left-padded prefill + decode through ``Transformer`` with each cache kind."""
    from models.serving import make_cache
    cfg, v = model
    tok = jnp.array([[0, 0, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7]])
    seg = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    pos = jnp.maximum(jnp.cumsum(seg, 1) - 1, 0)

    def run(cache):
        m = Transformer(cfg)
        out, cache = m.apply(v, tok[:, :5], positions_BT=pos[:, :5], segment_ids_BT=seg[:, :5],
                             cache=cache)
        logits = [out[:, -1]]
        for t in range(5, 7):
            out, cache = m.apply(v, tok[:, t:t + 1], positions_BT=pos[:, t:t + 1],
                                 segment_ids_BT=seg[:, t:t + 1], cache=cache)
            logits.append(out[:, 0])
        return jnp.stack(logits, 1)

    ref = run(make_cache(cfg, 2, 10))
    got = run(make_cache(cfg, 2, 10, kv_cache=kind, kv_quant=quant, page_size=4))
    assert float(jnp.max(jnp.abs(got - ref))) < tol


def test_make_cache_bad_names(model):
    from models.serving import make_cache
    cfg, _ = model
    with pytest.raises(UserError, match="unknown KV quantization 'int2'"):
        make_cache(cfg, 1, 8, kv_quant="int2")
    with pytest.raises(UserError, match="unknown kv cache"):
        make_cache(cfg, 1, 8, kv_cache="ring")
