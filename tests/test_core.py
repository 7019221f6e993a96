"""The op contract: every CPU implementation against the float64 oracle."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import core
from attn.chunked import chunked_attention
from attn.core import attention, make_call, select_impl
from attn.masks import Mask
from tests.attn_cases import CASES, make_case, oracle_kwargs
from tests.oracle import mask_from_definition, reference_attention, reference_grads


def _small_chunks(q, k, v, *, mask, return_lse, **kw):
    # Chunk 32 forces several key blocks and a padded last block at S = 37, 63, 100.
    return chunked_attention(q, k, v, mask=mask, chunk_size=32, **kw)


IMPLS = {
    "xla": lambda q, k, v, **kw: attention(q, k, v, impl="xla", **kw),
    "xla_chunked": lambda q, k, v, **kw: attention(q, k, v, impl="xla_chunked", **kw),
    "chunked_c32": _small_chunks,
}


def _run(impl, case, q=None, k=None, v=None, sinks=None, bias=None):
    kw = dict(case["kwargs"])
    if sinks is not None:
        kw["sinks"] = sinks
    if bias is not None:
        kw["bias"] = bias
    return IMPLS[impl](case["q"] if q is None else q, case["k"] if k is None else k,
                       case["v"] if v is None else v, mask=case["mask"], return_lse=True, **kw)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_lse_match_oracle(impl, name):
    case = make_case(name)
    o, lse = jax.jit(lambda: _run(impl, case))()
    o_ref, lse_ref = reference_attention(np.asarray(case["q"]), np.asarray(case["k"]),
                                         np.asarray(case["v"]), **oracle_kwargs(case))
    assert o.shape == o_ref.shape and lse.shape == lse_ref.shape and lse.dtype == jnp.float32
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, lse_ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_oracle(impl, name):
    case = make_case(name)
    kw = case["kwargs"]
    dlse = jax.random.normal(jax.random.key(7), (case["spec"].B, case["spec"].N, case["spec"].T))

    def loss(q, k, v, sinks, bias):
        o, lse = _run(impl, case, q, k, v, sinks, bias)
        return jnp.sum(o * case["do"]) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * dlse, 0.0))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(
        case["q"], case["k"], case["v"], kw.get("sinks"), kw.get("bias"))
    ref = reference_grads(np.asarray(case["q"]), np.asarray(case["k"]), np.asarray(case["v"]),
                          np.asarray(case["do"]), np.asarray(dlse), **oracle_kwargs(case))
    for got, want in zip(grads[:3], (ref["dq"], ref["dk"], ref["dv"])):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)
    if kw.get("sinks") is not None:
        np.testing.assert_allclose(grads[3], ref["dsinks"], atol=5e-5, rtol=5e-5)
    if kw.get("bias") is not None:
        b = kw["bias"]
        axes = tuple(i for i, n in enumerate(b.shape) if n == 1)
        want = ref["dbias"].sum(axis=axes, keepdims=True).reshape(b.shape)
        np.testing.assert_allclose(grads[4], want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bf16_close_to_float64(impl):
    case = make_case("segments", dtype=jnp.bfloat16)
    o, lse = jax.jit(lambda: _run(impl, case))()
    assert o.dtype == jnp.bfloat16
    o_ref, lse_ref = reference_attention(np.asarray(case["q"], np.float64),
                                         np.asarray(case["k"], np.float64),
                                         np.asarray(case["v"], np.float64), **oracle_kwargs(case))
    np.testing.assert_allclose(np.asarray(o, np.float32), o_ref, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(lse, lse_ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_fully_masked_rows_are_zero_not_nan(impl):
    B, T, S, N, K, H = 2, 9, 13, 4, 2, 8
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, S, K, H))
    v = jax.random.normal(ks[2], (B, S, K, H))
    q_seg = jnp.array([[1] * 5 + [0] * 4, [2] * 9], jnp.int32)   # padded queries in row 0
    kv_seg = jnp.array([[1] * 13, [1] * 13], jnp.int32)          # row 1: no matching document
    mask = Mask(causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg)

    def f(q, k, v):
        o, lse = IMPLS[impl](q, k, v, mask=mask, return_lse=True)
        return jnp.sum(o ** 2), (o, lse)

    grads, (o, lse) = jax.grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    dead = np.zeros((B, T), bool)
    dead[0, 5:] = True
    dead[1, :] = True
    assert np.all(np.asarray(o)[dead] == 0)
    assert np.all(np.isneginf(np.asarray(lse).transpose(0, 2, 1)[dead]))
    assert not np.any(np.isnan(np.asarray(o)))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    # With a sink the row is not empty: lse is the sink, output still 0.
    sinks = jnp.full((N,), 0.5)
    o, lse = IMPLS[impl](q, k, v, mask=mask, sinks=sinks, return_lse=True)
    assert np.all(np.asarray(o)[dead] == 0)
    np.testing.assert_allclose(np.asarray(lse).transpose(0, 2, 1)[dead], 0.5, rtol=1e-6)


def test_chunked_memory_is_linear_in_sequence_length():
    """Compile-time temp memory of forward+backward grows with T·C, not T·S."""
    N, H, C = 2, 32, 256

    def temp_bytes(S):
        x = jax.ShapeDtypeStruct((1, S, N, H), jnp.float32)

        def loss(q, k, v):
            return jnp.sum(chunked_attention(q, k, v, mask=Mask(causal=True), chunk_size=C)[0])

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, big = temp_bytes(4096), temp_bytes(8192)
    block_bytes = 8192 * C * N * 4                   # one [T, C] logits block per head
    assert big < 2.6 * small, (small, big)           # T·S would be 4x
    # A handful of live [T, C] blocks (logits, probabilities, their gradients), never [T, S].
    assert big < 8 * block_bytes < 8192 * 8192 * N * 4, (big, block_bytes)


def test_auto_picks_xla_on_cpu_and_logs_once(caplog):
    q = jnp.ones((1, 4, 2, 8))
    core._AUTO_LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="attn.core"):
        attention(q, q, q)
        attention(q, q, q)
    chosen = [r for r in caplog.records if "chose" in r.getMessage()]
    assert len(chosen) == 1 and "'xla'" in chosen[0].getMessage()


def test_auto_prefers_chunked_for_huge_logits():
    big = jax.ShapeDtypeStruct((8, 32768, 16, 64), jnp.bfloat16)
    call = make_call(big, big, big, mask=Mask(causal=True), platform="cpu")
    assert select_impl(call).name == "xla_chunked"


def test_cudnn_refuses_what_it_cannot_do_correctly():
    x = jax.ShapeDtypeStruct((1, 128, 4, 64), jnp.bfloat16)
    reason = lambda **kw: core.get_impl("cudnn").supports(make_call(x, x, x, **kw))
    assert "GPU" in reason(platform="cpu")
    assert "is_causal=False" in reason(mask=Mask(window=(16, 16)), platform="gpu")
    assert "lse" in reason(return_lse=True, platform="gpu")
    assert "softcap" in reason(softcap=30.0, platform="gpu")
    assert reason(mask=Mask(causal=True, window=(16, 0)), platform="gpu") is None
    with pytest.raises(NotImplementedError, match="cudnn"):
        attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)),
                  impl="cudnn")


def test_works_under_jit_with_traced_positions():
    q = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))
    k = jax.random.normal(jax.random.key(1), (2, 11, 2, 8))

    @jax.jit
    def f(q, k, qp, kp):
        m = Mask(causal=True, window=(3, None), q_positions=qp, kv_positions=kp)
        return attention(q, k, k, mask=m, impl="xla_chunked")

    qp = jnp.broadcast_to(jnp.arange(5) + 6, (2, 5))
    kp = jnp.broadcast_to(jnp.arange(11), (2, 11))
    got = f(q, k, qp, kp)
    want = attention(q, k, k, mask=Mask(causal=True, window=(3, None), q_positions=qp,
                                        kv_positions=kp), impl="xla")
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (((1, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {}, "rank 4"),
        (((1, 4, 3, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {}, "multiple of K"),
        (((1, 4, 4, 8), (1, 4, 2, 6), (1, 4, 2, 8)), {}, "head dim"),
        (((1, 4, 4, 8), (1, 5, 2, 8), (1, 4, 2, 8)), {}, "agree"),
        (((2, 4, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {}, "batch"),
        (((1, 4, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {"impl": "nope"}, "unknown attention impl"),
        (((1, 4, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {"sinks": (3,)}, "sinks"),
        (((1, 4, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {"bias": (1, 4, 5, 4)}, "bias"),
        (((1, 4, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8)),
         {"mask": Mask(q_segment_ids=jnp.ones((1, 4), jnp.int32))}, "both"),
        (((1, 4, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8)),
         {"mask": Mask(q_positions=jnp.ones((1, 3), jnp.int32))}, "q_positions"),
        (((1, 4, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {"impl": "xla", "mask": Mask(
            dense=jnp.ones((1, 1, 4, 5), bool))}, "dense"),
    ],
)
def test_bad_input_gets_a_clear_error(args, kwargs, match):
    q, k, v = (jnp.ones(s) for s in args)
    kwargs = dict(kwargs)
    for name in ("sinks", "bias"):
        if name in kwargs:
            kwargs[name] = jnp.ones(kwargs[name])
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kwargs)


def test_bad_window_rejected_at_construction():
    with pytest.raises(ValueError, match="window"):
        Mask(window=(-1, 0))
    with pytest.raises(ValueError, match="window"):
        Mask(window=5)


def test_block_mask_and_dense_in_reference():
    B, T, S, N = 1, 10, 12, 2
    q = jax.random.normal(jax.random.key(0), (B, T, N, 8))
    bm = jnp.array([[[1, 0, 1], [0, 1, 1], [1, 1, 0]], [[1, 1, 1], [1, 0, 0], [0, 0, 1]]], bool)
    mask = Mask(causal=True, block_mask=bm, block_size=(4, 4))
    dense = np.asarray(mask.materialize(B, T, S))
    k = q[:, :S] if S <= T else jax.random.normal(jax.random.key(1), (B, S, N, 8))
    for impl in ("xla", "xla_chunked"):
        o, lse = attention(q, k, k, mask=mask, return_lse=True, impl=impl)
        o_ref, lse_ref = reference_attention(np.asarray(q), np.asarray(k), np.asarray(k),
                                             dense_mask=dense)
        np.testing.assert_allclose(o, o_ref, atol=2e-5)
        np.testing.assert_allclose(lse, lse_ref, atol=2e-5)
    o = attention(q, k, k, mask=Mask(dense=jnp.asarray(dense)), impl="xla")
    np.testing.assert_allclose(o, reference_attention(np.asarray(q), np.asarray(k),
                                                      np.asarray(k), dense_mask=dense)[0],
                               atol=2e-5)


# --------------------------------------------------------------------------- issue 12
def test_chunked_float64_gradients_are_float64_accurate():
    # The saved lse used to be cast to float32, capping float64 gradients at ~1e-7.
    case = make_case("softcap_sinks")
    f64 = lambda x: np.asarray(x, np.float64)
    q, k, v, do = (f64(case[n])[:1, :9] if n in ("q", "do") else f64(case[n])[:1, :11]
                   for n in ("q", "k", "v", "do"))
    sinks = f64(case["kwargs"]["sinks"])
    with jax.enable_x64(True):
        def loss(q, k, v, sinks):
            o, lse = chunked_attention(q, k, v, mask=Mask(causal=True, window=(4, 3)),
                                       chunk_size=4, softcap=5.0, sinks=sinks)
            return jnp.sum(o * do) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
        got = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)
    dense = mask_from_definition(Mask(causal=True, window=(4, 3)), 1, 9, 11)
    ref = reference_grads(q, k, v, do, np.ones((1, q.shape[2], 9)), dense_mask=dense,
                          softcap=5.0, sinks=sinks)
    for g, name in zip(got, ("dq", "dk", "dv", "dsinks")):
        assert g.dtype == jnp.float64
        np.testing.assert_allclose(g, ref[name], rtol=1e-12, atol=1e-12)


def test_auto_never_picks_a_kernel_without_hardware_results():
    # No Pallas kernel has a hardware run or benchmark in benchmarks/results/.
    assert not any(n.startswith("pallas") for row in core.AUTO_PREFERENCE.values() for n in row)
    x = jax.ShapeDtypeStruct((1, 128, 4, 64), jnp.bfloat16)
    assert select_impl(make_call(x, x, x, mask=Mask(causal=True), platform="gpu")).name == "cudnn"
    lse_call = make_call(x, x, x, mask=Mask(causal=True), return_lse=True, platform="gpu")
    assert select_impl(lse_call).name == "xla"  # cuDNN cannot return the lse
    assert select_impl(make_call(x, x, x, platform="tpu")).name == "xla"


def test_unknown_platform_warns_once(caplog):
    x = jax.ShapeDtypeStruct((1, 4, 2, 8), jnp.float32)
    core._UNKNOWN_PLATFORM_LOGGED.discard("weird")
    with caplog.at_level(logging.WARNING, logger="attn.core"):
        assert select_impl(make_call(x, x, x, platform="weird")).name == "xla"
        select_impl(make_call(x, x, x, platform="weird"))
    warned = [r for r in caplog.records if "'weird'" in r.getMessage()]
    assert len(warned) == 1 and "cpu" in warned[0].getMessage()


def test_dead_mask_helpers_are_gone():
    import attn.masks as masks
    assert not hasattr(masks, "causal_mask") and not hasattr(Mask, "has_extra_range")


@pytest.mark.parametrize("seed", range(6))
def test_oracle_mask_agrees_with_materialize(seed):
    # The oracle's mask is written from the definition; Mask.materialize is the code
    # under test. Random small cases over every field.
    rng = np.random.default_rng(seed)
    B, T, S, N = 2, int(rng.integers(1, 7)), int(rng.integers(1, 9)), 2
    side = lambda: None if rng.random() < 0.3 else int(rng.integers(0, 4))
    kw = dict(causal=bool(rng.random() < 0.6),
              window=None if rng.random() < 0.3 else (side(), side()))
    if rng.random() < 0.7:
        kw["q_positions"] = jnp.asarray(rng.integers(0, 10, (B, T)), jnp.int32)
        kw["kv_positions"] = jnp.asarray(rng.integers(0, 10, (B, S)), jnp.int32)
    if rng.random() < 0.6:
        kw["q_segment_ids"] = jnp.asarray(rng.integers(0, 3, (B, T)), jnp.int32)
        kw["kv_segment_ids"] = jnp.asarray(rng.integers(0, 3, (B, S)), jnp.int32)
    if rng.random() < 0.6:
        lo = rng.integers(0, 10, (B, T))
        kw["q_extra_range"] = jnp.asarray(np.stack([lo, lo + rng.integers(-2, 4, (B, T))], -1),
                                          jnp.int32)
    if rng.random() < 0.6:
        cq, ck = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        kw["block_size"] = (cq, ck)
        kw["block_mask"] = jnp.asarray(rng.random((N, -(-T // cq), -(-S // ck))) < 0.7)
    if rng.random() < 0.4:
        kw["dense"] = jnp.asarray(rng.random((1, N, T, S)) < 0.8)
    mask = Mask(**kw)
    want = mask_from_definition(mask, B, T, S, N)
    got = np.broadcast_to(np.asarray(mask.materialize(B, T, S)), (B, N, T, S))
    np.testing.assert_array_equal(got, np.broadcast_to(want, (B, N, T, S)), err_msg=str(kw))
