"""KV-cache overflow: jit can only drop tokens, so the host raises with the numbers.

A full cache appended past ``max_len`` under ``jit`` (traced ``length``) drops the extra
tokens; ``overflow_state`` carries (appended, capacity) out of the traced function and
``check_overflow`` raises on the host. ``generate`` does so after its jitted loop.
"""

import jax
import jax.numpy as jnp
import pytest

from attn.cache import KVCache, RingKVCache, check_overflow, overflow_state
from models import transformer as tf


def _append(cache, n):
    x = jnp.ones((1, n, 1, 2))
    pos = jnp.arange(n)[None]
    return cache.append(x, x, pos, jnp.ones_like(pos))[-1]


def test_overflow_under_jit_raises_at_the_host_boundary():
    cache = KVCache.create(batch=1, max_len=4, num_kv_heads=1, head_dim=2)

    @jax.jit
    def decode(cache):  # a traced length: append cannot raise here, only drop
        for _ in range(3):
            cache = _append(cache, 2)
        return cache, overflow_state({"layers": (cache, RingKVCache.create(
            batch=1, window=2, num_kv_heads=1, head_dim=2))})

    cache, state = decode(cache)
    assert state.tolist() == [6, 4]
    msg = r"decode: KV cache overflow: 6 tokens appended to a cache of max_len=4; the last 2"
    with pytest.raises(ValueError, match=msg):
        check_overflow(state, where="decode")
    with pytest.raises(ValueError, match=msg):
        check_overflow(cache, where="decode")  # the cache pytree itself works too
    ok = jax.jit(lambda c: _append(c, 4))(KVCache.create(batch=1, max_len=4, num_kv_heads=1,
                                                         head_dim=2))
    check_overflow(ok)  # exactly full is not an overflow


def test_generate_raises_when_a_cache_overflowed(monkeypatch):
    """A cache smaller than generate's budget (here: forced) must not drop tokens silently."""
    cfg = tf.LMConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=2, dtype="float32")
    v = tf.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
    prompt = jnp.ones((1, 3), jnp.int32)
    tokens = tf.generate(cfg, v, prompt, max_new_tokens=3)  # within budget: fine
    assert tokens.shape == (1, 3)
    real = tf.init_cache
    monkeypatch.setattr(tf, "init_cache", lambda c, b, n, d=None: real(c, b, n - 3, d))
    with pytest.raises(ValueError, match=r"generate: KV cache overflow: 5 tokens appended to a "
                                         r"cache of max_len=4"):
        tf.generate(cfg, v, prompt, max_new_tokens=3, max_len=7)  # a new trace: 4 slots
