"""attn.paged_cache: allocation, release, prefix sharing, overflow, and use by layers / kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.cache import KVCache, check_overflow, overflow_state
from attn.errors import UserError
from attn.masks import Mask
from attn.paged_cache import PagedKVCache
from kernels_pallas.decode.api import decode_attention
from tests.oracle import mask_from_definition, reference_attention


def _tokens(rng, B, T, K=2, H=4, start=0):
    k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    pos = jnp.tile(jnp.arange(start, start + T), (B, 1)).astype(jnp.int32)
    return k, v, pos, jnp.ones((B, T), jnp.int32)


def test_append_matches_dense_cache():
    rng = np.random.default_rng(0)
    pc = PagedKVCache.create(batch=2, num_pages=12, page_size=4, max_pages=5, num_kv_heads=2,
                             head_dim=4)
    dc = KVCache.create(batch=2, max_len=20, num_kv_heads=2, head_dim=4)
    step = jax.jit(lambda c, *a: c.append(*a))
    for T, start in ((7, 0), (1, 7), (3, 8), (1, 11)):
        args = _tokens(rng, 2, T, start=start)
        kp, vp, posp, segp, pc = step(pc, *args)
        kd, vd, posd, segd, dc = step(dc, *args)
        n = int(dc.length)
        np.testing.assert_array_equal(kp[:, :n], kd[:, :n])
        np.testing.assert_array_equal(posp[:, :n], posd[:, :n])
        assert np.all(segp[:, :n] == 1) and np.all(segp[:, n:] == 0)
    assert pc.lengths.tolist() == [12, 12] and pc.num_pages.tolist() == [3, 3]
    assert int(jnp.sum(pc.refcount)) == 6
    check_overflow(pc)  # nothing dropped


def test_layer_decode_with_paged_cache_matches_forward():
    from attn.mha import MHA, Config
    cfg = Config(d_model=32, num_heads=4, num_kv_heads=2, dtype="float32")
    layer = MHA(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 11, 32))
    pos = jnp.tile(jnp.arange(11), (2, 1))
    params = layer.init(jax.random.key(1), x, positions_BT=pos)
    y_full, _ = layer.apply(params, x, positions_BT=pos)
    cache = PagedKVCache.for_max_len(batch=2, max_len=16, page_size=4, num_kv_heads=2, head_dim=8)
    y, cache = layer.apply(params, x[:, :6], positions_BT=pos[:, :6], cache=cache)
    outs = [y]
    for t in range(6, 11):
        y, cache = layer.apply(params, x[:, t:t + 1], positions_BT=pos[:, t:t + 1], cache=cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y_full, rtol=2e-5, atol=2e-5)


def _oracle_decode(q, cache, qp, b_rows):
    kd, vd, pd, sd = (np.asarray(a, np.float64) for a in cache.gather_dense())
    B, T = qp.shape
    mask = Mask(causal=True, q_positions=qp, kv_positions=pd.astype(int),
                q_segment_ids=np.ones((B, T), int), kv_segment_ids=sd.astype(int))
    dm = mask_from_definition(mask, B, T, kd.shape[1])
    return reference_attention(np.asarray(q), kd, vd, dense_mask=dm)


@pytest.mark.parametrize("backend,interpret", [("xla", False), ("pallas_tpu", True)])
def test_kernels_read_the_pool_after_release_and_reuse(backend, interpret):
    """Row 0 is released and its pages go to row 1; stale slots are never visible."""
    rng = np.random.default_rng(1)
    c = PagedKVCache.create(batch=2, num_pages=6, page_size=4, max_pages=4, num_kv_heads=2,
                            head_dim=4)
    *_, c = c.append(*_tokens(rng, 2, 10))  # 3 pages each
    c = c.release(jnp.array([True, False]))
    assert int(jnp.sum(c.refcount > 0)) == 3
    # Row 1 grows by 5 tokens: it takes a freed page of row 0, whose 4 stale slots must
    # not show up.
    *_, c = c.append(*_tokens(rng, 2, 2, start=10))  # row 0 restarts at slot 0 (positions 10, 11)
    assert c.num_pages.tolist() == [1, 3]
    q = jnp.asarray(rng.normal(size=(2, 1, 4, 4)), jnp.float32)
    qp = np.array([[11], [11]], np.int32)
    o, lse = decode_attention(q, c.view(), q_positions=jnp.asarray(qp), backend=backend,
                              interpret=interpret, num_splits=2)
    o_ref, lse_ref = _oracle_decode(q, c, qp, None)
    np.testing.assert_allclose(o, o_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, lse_ref, rtol=2e-5, atol=2e-5)
    seg = np.asarray(c.gather_dense()[3])
    assert seg[0].sum() == 2  # the reused page holds only row 0's two new tokens


def test_prefix_sharing():
    rng = np.random.default_rng(2)
    c = PagedKVCache.create(batch=3, num_pages=10, page_size=4, max_pages=4, num_kv_heads=2,
                            head_dim=4)
    k, v, pos, seg = _tokens(rng, 3, 10)
    *_, c = c.append(k, v, pos, seg)
    c = c.release(jnp.array([False, True, True]))
    c = c.share_prefix(0, 1, 10)  # two full pages shared, the 2-token tail copied
    assert c.lengths.tolist()[:2] == [10, 10]
    shared = np.asarray(c.page_table[0, :2])
    assert c.page_table[1, :2].tolist() == shared.tolist()
    assert c.refcount[shared].tolist() == [2, 2]
    assert c.page_table[1, 2] != c.page_table[0, 2]
    kd = c.gather_dense()
    np.testing.assert_array_equal(kd[0][1, :10], kd[0][0, :10])
    # The two rows now diverge: row 1's new tokens do not touch row 0.
    k2, v2, pos2, seg2 = _tokens(rng, 3, 3, start=10)
    *_, c2 = c.append(k2, v2, pos2, seg2)
    kd2 = c2.gather_dense()
    np.testing.assert_array_equal(kd2[0][0, 10:13], k2[0])
    np.testing.assert_array_equal(kd2[0][1, 10:13], k2[1])
    np.testing.assert_array_equal(kd2[0][0, :10], k[0])
    # Releasing row 0 keeps the shared pages alive for row 1.
    c3 = c2.release(jnp.array([True, False, False]))
    assert c3.refcount[shared].tolist() == [1, 1]


def test_overflow_is_an_error_at_the_host_boundary():
    rng = np.random.default_rng(3)
    c = PagedKVCache.create(batch=2, num_pages=3, page_size=4, max_pages=4, num_kv_heads=2,
                            head_dim=4)
    step = jax.jit(lambda c, *a: c.append(*a)[-1])
    c = step(c, *_tokens(rng, 2, 5))  # row 0 gets 2 pages, row 1 needs 2 but 1 is left
    # All or nothing per row: row 1 gets no page, its 5 tokens are counted as dropped.
    assert c.lengths.tolist() == [5, 0] and c.dropped.tolist() == [0, 5]
    state = jax.jit(overflow_state)({"layer0": c})
    with pytest.raises(ValueError, match="overflow"):
        check_overflow(state, where="decode")
    # Past max_pages for a row is an overflow too, even with free pages.
    c = PagedKVCache.create(batch=1, num_pages=8, page_size=4, max_pages=2, num_kv_heads=2,
                            head_dim=4)
    c = step(c, *_tokens(rng, 1, 9))
    assert c.dropped.tolist() == [1]
    with pytest.raises(ValueError, match="overflow"):
        check_overflow(c)


def test_bad_input():
    with pytest.raises(UserError, match="page_size=5 must divide max_len=16"):
        PagedKVCache.for_max_len(batch=1, max_len=16, page_size=5, num_kv_heads=1, head_dim=4)
    with pytest.raises(UserError, match="num_pages"):
        PagedKVCache.create(batch=1, num_pages=0, page_size=4, max_pages=1, num_kv_heads=1,
                            head_dim=4)
    c = PagedKVCache.create(batch=1, num_pages=2, page_size=4, max_pages=2, num_kv_heads=1,
                            head_dim=4)
    with pytest.raises(UserError, match="cache expects"):
        c.append(jnp.ones((1, 1, 2, 4)), jnp.ones((1, 1, 2, 4)), jnp.zeros((1, 1), jnp.int32),
                 jnp.ones((1, 1), jnp.int32))
