"""Context parallelism on 8 forced CPU devices: every strategy equals one device.

Attention: forward, lse and dq/dk/dv (and dsinks) of ``context_parallel_attention``
against ``impl="xla"`` on the unsplit sequence, for causal / full / window / documents
and GQA/MQA, in the zigzag order the trainer uses. Training: one full step of the LM on
four meshes equals the one-device step. Bad configurations name what does not divide.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.core import attention
from attn.masks import Mask
from train import context_parallel as cpl
from train import trainer
from train.config_args import load_config
from train.data import make_source
from train.sharding import MeshConfig, batch_sharding, make_mesh, put_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, H, E = 2, 64, 16, 12


def _segments():
    # Documents of awkward lengths that straddle every shard boundary; row 1 ends in padding.
    return jnp.asarray(np.stack([np.repeat(np.arange(1, 5), [11, 29, 5, 19]),
                                 np.repeat([1, 2, 0], [37, 23, 4])]), jnp.int32)


MASKS = {
    "causal_docs": dict(causal=True, segments=True),
    "full": dict(causal=False),
    "window": dict(causal=True, window=(9, 0)),
    "bidir_window_docs": dict(causal=False, window=(5, 7), segments=True),
}


def _inputs(N, K, dtype=jnp.float32, sinks=False):
    ks = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), dtype)
    v = jax.random.normal(ks[2], (B, T, K, E), dtype)
    return q, k, v, (jax.random.normal(ks[3], (N,)) if sinks else None)


def _run_both(strategy, mesh_shape, mask_kw, *, N=8, K=2, sinks=False, zigzag=True, u=None):
    """(reference, context-parallel) as (o, lse, grads) in the original token order."""
    mesh = make_mesh(MeshConfig(shape=mesh_shape))
    cp = dict(zip(mesh.axis_names, mesh.axis_sizes))["context"]
    q, k, v, s = _inputs(N, K, sinks=sinks)
    seg = _segments() if mask_kw.get("segments") else None
    causal, window = mask_kw["causal"], mask_kw.get("window")
    perm = (cpl.zigzag_permutation(T, cpl.STRATEGIES[strategy].zigzag_chunks(cp, u)) if zigzag
            else np.arange(T))
    inv = np.argsort(perm)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))

    def ref(q, k, v, s):
        m = Mask(causal=causal, window=window, q_segment_ids=seg, kv_segment_ids=seg)
        return attention(q, k, v, mask=m, sinks=s, return_lse=True, impl="xla")

    def split(q, k, v, s):
        p = lambda x: None if x is None else x[:, perm]  # noqa: E731
        m = Mask(causal=causal, window=window, q_positions=p(pos), kv_positions=p(pos),
                 q_segment_ids=p(seg), kv_segment_ids=p(seg))
        o, lse = cpl.context_parallel_attention(p(q), p(k), p(v), mask=m, sinks=s, return_lse=True,
                                                impl="xla", strategy=strategy, mesh=mesh,
                                                zigzag=zigzag, ulysses_degree=u)
        return o[:, inv], lse[:, :, inv]

    def loss(f):
        def scalar(q, k, v, s):
            o, lse = f(q, k, v, s)
            w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))
            return jnp.sum(o * w) + 0.3 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
        return scalar

    argnums = (0, 1, 2, 3) if sinks else (0, 1, 2)
    out = []
    for f in (ref, jax.jit(split)):
        o, lse = f(q, k, v, s)
        out.append((o, lse, jax.jit(jax.grad(loss(f), argnums))(q, k, v, s)))
    return out


def _assert_close(ref, got, tol=2e-5):
    (o_r, l_r, g_r), (o_c, l_c, g_c) = ref, got
    np.testing.assert_allclose(o_c, o_r, atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.isfinite(l_c), np.isfinite(l_r))  # masked rows: -inf
    np.testing.assert_allclose(np.where(np.isfinite(l_r), l_c, 0), np.where(np.isfinite(l_r), l_r, 0),
                               atol=tol, rtol=tol)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in (o_c, *g_c))
    for a, b in zip(g_c, g_r):
        np.testing.assert_allclose(a, b, atol=5 * tol, rtol=5 * tol)


# Ulysses needs N % cp == 0: it runs on context 4 (2-way data), the others on context 8.
STRATEGY_MESH = {"all_gather": (1, 1, 8, 1), "ring": (1, 1, 8, 1), "ulysses": (2, 1, 4, 1),
                 "hybrid": (1, 1, 8, 1)}


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("strategy", sorted(STRATEGY_MESH))
def test_strategy_matches_one_device(strategy, mask_name):
    _assert_close(*_run_both(strategy, STRATEGY_MESH[strategy], MASKS[mask_name]))


@pytest.mark.parametrize("strategy, mesh_shape, N, K, zigzag", [
    ("ring", (1, 1, 8, 1), 4, 4, False),       # contiguous layout: later blocks skipped
    ("ring", (1, 1, 4, 2), 8, 2, True),        # heads split over tensor, sinks folded once
    ("ulysses", (1, 1, 4, 2), 8, 2, True),     # local K=1 < cp=4: kv heads replicated
    ("hybrid", (1, 1, 8, 1), 8, 1, True),      # MQA through 4-way Ulysses x 2-way ring
    ("all_gather", (2, 1, 4, 1), 6, 3, True),  # heads not divisible by anything
])
def test_gqa_mqa_sinks_and_layouts(strategy, mesh_shape, N, K, zigzag):
    _assert_close(*_run_both(strategy, mesh_shape, MASKS["causal_docs"], N=N, K=K, sinks=True,
                             zigzag=zigzag))


def test_ring_bf16_within_2e3_of_fp32_one_device():
    mesh = make_mesh(MeshConfig(shape=(1, 1, 8, 1)))
    q, k, v, _ = _inputs(8, 2, jnp.bfloat16)
    perm = cpl.zigzag_permutation(T, 16)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))[:, perm]
    ring = jax.jit(lambda q, k, v, pos: cpl.context_parallel_attention(  # one compile, not op by op
        q, k, v, impl="xla", strategy="ring", mask=Mask(causal=True, q_positions=pos, kv_positions=pos),
        mesh=mesh, zigzag=True))
    o = ring(q[:, perm], k[:, perm], v[:, perm], pos)[:, np.argsort(perm)]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = attention(f32(q), f32(k), f32(v), mask=Mask(causal=True), impl="xla")
    one = attention(q, k, v, mask=Mask(causal=True), impl="xla")  # bf16, one device
    rel = lambda x: float(jnp.linalg.norm(f32(x) - ref) / jnp.linalg.norm(ref))  # noqa: E731
    # Relative (Frobenius) error against fp32: a bf16 output's own rounding is up to
    # 2^-9 ≈ 2e-3 of each value, so an absolute 2e-3 bound cannot hold for |o| > 1.
    # Block outputs come back in float32 (Impl.float32_out) and are merged before the
    # one final rounding, so the split costs nothing over the one-device bf16 result.
    assert o.dtype == jnp.bfloat16
    assert rel(o) < 2e-3 and rel(o) < 1.05 * rel(one), (rel(o), rel(one))


def test_activate_routes_layers_and_leaves_cross_attention_alone():
    mesh = make_mesh(MeshConfig(shape=(2, 1, 4, 1)))
    q, k, v, _ = _inputs(4, 2)
    with cpl.activate(cpl.ContextParallelConfig("ulysses"), mesh, zigzag=False):
        routed = jax.jit(lambda q, k, v: attention(q, k, v, mask=Mask(causal=True),
                                                   self_attention=True))(q, k, v)
        cross = attention(q[:, :5], k, v, self_attention=False)  # not sequence-split
    np.testing.assert_allclose(routed, attention(q, k, v, mask=Mask(causal=True), impl="xla"),
                               atol=2e-5, rtol=2e-5)
    assert cross.shape == (B, 5, 4, E)
    hlo = jax.jit(lambda q, k, v: _routed(mesh, q, k, v)).lower(q, k, v).as_text()
    assert "all-to-all" in hlo or "all_to_all" in hlo


def _routed(mesh, q, k, v):
    with cpl.activate(cpl.ContextParallelConfig("ulysses"), mesh, zigzag=False):
        return attention(q, k, v, mask=Mask(causal=True), self_attention=True)


def test_router_follows_the_self_attention_flag_not_the_shapes(monkeypatch, caplog):
    """Cross-attention with T == S stays unsplit; only self_attention=True is routed."""
    monkeypatch.setattr(cpl, "_LOGGED", set())
    seen = []
    real = cpl.context_parallel_attention
    monkeypatch.setattr(cpl, "context_parallel_attention",
                        lambda *a, **kw: seen.append(1) or real(*a, **kw))
    mesh = make_mesh(MeshConfig(shape=(1, 1, 2, 1), num_devices=2))
    x = jax.random.normal(jax.random.key(1), (1, 8, 2, 4))
    y = jax.random.normal(jax.random.key(2), (1, 8, 2, 4))  # another sequence, same length
    with cpl.activate(cpl.ContextParallelConfig("all_gather"), mesh, zigzag=False):
        cross = attention(x, y, y, self_attention=False)
        assert not seen
        with caplog.at_level("WARNING"):
            attention(x, y, y)  # undeclared: unsplit, said once
        assert not seen and "without self_attention=" in caplog.text
        own = attention(x, x, x, self_attention=True)
        assert seen == [1]
    np.testing.assert_allclose(cross, attention(x, y, y, impl="xla"), atol=1e-6)
    np.testing.assert_allclose(own, attention(x, x, x, impl="xla"), atol=1e-6)
    with pytest.raises(ValueError, match=r"self_attention=True needs S == T, got T=8, S=5"):
        attention(x, y[:, :5], y[:, :5], self_attention=True)


def test_ring_refuses_an_impl_without_float32_block_outputs():
    """A block rounded to bf16 before the merge would change the result: refuse, say why."""
    from attn import core
    core.register_impl("test_no_f32_out",
                       lambda q, k, v, **kw: core.xla_attention(q, k, v, **kw),
                       lambda call: None)  # declares no float32_out
    try:
        mesh = make_mesh(MeshConfig(shape=(1, 1, 2, 1), num_devices=2))
        x = jax.random.normal(jax.random.key(1), (1, 8, 2, 4))
        run = lambda x, s: cpl.context_parallel_attention(  # noqa: E731
            x, x, x, impl="test_no_f32_out", strategy=s, mesh=mesh, mask=Mask(causal=True))
        with pytest.raises(NotImplementedError,
                           match=r"ring: impl 'test_no_f32_out' cannot return float32 block outputs"):
            run(x.astype(jnp.bfloat16), "ring")
        run(x, "ring")  # float32 inputs: its outputs already are float32
        run(x.astype(jnp.bfloat16), "all_gather")  # no merge, nothing to refuse
    finally:
        core._IMPLS.pop("test_no_f32_out")


# --------------------------------------------------------------------------- errors
def test_errors_name_what_does_not_divide():
    mesh = make_mesh(MeshConfig(shape=(1, 1, 8, 1)))
    q, k, v, _ = _inputs(4, 2)
    with pytest.raises(ValueError, match=r"T=40 does not divide into 16.*zigzag"):
        cpl.context_parallel_attention(q[:, :40], k[:, :40], v[:, :40], strategy="ring", mesh=mesh,
                                       zigzag=True, mask=Mask(causal=True))
    with pytest.raises(ValueError, match=r"N=4 does not divide by the Ulysses degree 8"):
        cpl.context_parallel_attention(q, k, v, strategy="ulysses", mesh=mesh)
    with pytest.raises(ValueError, match=r"needs 16 devices, have 8"):
        make_mesh(MeshConfig(shape=(2, 1, 8, 1)))
    with pytest.raises(ValueError, match="strategy='nope'"):
        cpl.ContextParallelConfig("nope")
    with pytest.raises(ValueError, match=r"T % \(2·cp\)"):
        cpl.zigzag_permutation(60, 16)


def test_batch_that_does_not_divide_is_refused_with_the_numbers():
    mesh = make_mesh(MeshConfig(shape=(2, 1, 2, 1), num_devices=4))
    x = jnp.ones((3, 8, 2, 4))
    with pytest.raises(ValueError, match=r"batch B=3 does not divide into the 2 batch shards"):
        cpl.context_parallel_attention(x, x, x, strategy="ring", mesh=mesh)
    sharding = batch_sharding(mesh, MeshConfig().logical_rules)
    with pytest.raises(ValueError, match=r"'inputs' has batch size 3, which does not divide into the 2"):
        put_batch({"inputs": np.zeros((3, 8), np.int32)}, sharding)


@pytest.mark.parametrize("strategy, mesh_shape, N, K, says", [
    ("ring", (1, 1, 2, 2), 3, 1, "replicated over it: each of its 2 devices computes all heads"),
    ("ulysses", (1, 1, 4, 1), 4, 2, "K/V are repeated 2x to 4 heads"),
])
def test_replication_is_done_and_said_once(monkeypatch, caplog, strategy, mesh_shape, N, K, says):
    monkeypatch.setattr(cpl, "_LOGGED", set())
    mesh = make_mesh(MeshConfig(shape=mesh_shape, num_devices=int(np.prod(mesh_shape))))
    ks = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(ks[0], (1, 8, N, 4))
    k, v = (jax.random.normal(key, (1, 8, K, 4)) for key in ks[1:])
    with caplog.at_level("WARNING"):
        for _ in range(2):
            o = cpl.context_parallel_attention(q, k, v, strategy=strategy, mesh=mesh,
                                               mask=Mask(causal=True))
    assert caplog.text.count(says) == 1, caplog.text
    np.testing.assert_allclose(o, attention(q, k, v, mask=Mask(causal=True), impl="xla"),
                               atol=2e-6, rtol=2e-6)


# --------------------------------------------------------------------------- training
def _experiment(mesh_shape, strategy, attn="gqa", **cp):
    c = load_config(os.path.join(ROOT, "configs/mqar.py"))
    c.model.update(dict(vocab_size=64, d_model=64, num_layers=2, num_heads=8, head_dim=8,
                        dtype="float32", attn=attn))
    c.data.update(dict(seq_len=64, batch_size=8, eval_batch_size=8))
    c.data.options.update(dict(vocab_size=64, num_kv_pairs=4))
    c.mesh.shape = mesh_shape
    c.mesh.num_devices = int(np.prod(mesh_shape))
    c.context_parallel = dict(strategy=strategy, **cp)
    return trainer.parse_config(c)


def _one_step(exp, state=None):
    c = trainer._build_compiled(exp)
    with jax.set_mesh(c.mesh):
        start = c.init(jax.random.key(0)) if state is None else jax.device_put(state, c.state_shardings)
        batch = put_batch(c.prepare(make_source(exp.data).batch("train", 3, exp.data.batch_size)),
                          c.batch_sharding)
        host_start = jax.device_get(start)  # the step donates its input state
        hlo = c.train_step.lower(start, batch).as_text()
        new, metrics = c.train_step(start, batch)
    return host_start, jax.device_get(new), jax.device_get(metrics), hlo


@pytest.fixture(scope="module")
def one_device_step():
    return _one_step(_experiment((1, 1, 1, 1), "ring"))


@pytest.mark.parametrize("mesh_shape, strategy", [
    ((8, 1, 1, 1), "ring"), ((2, 2, 2, 1), "ring"), ((1, 1, 4, 2), "ulysses"), ((2, 1, 2, 2), "all_gather"),
    ((1, 1, 8, 1), "hybrid"),
])
def test_train_step_matches_one_device(one_device_step, mesh_shape, strategy):
    start, ref_new, ref_m, _ = one_device_step
    _, new, m, hlo = _one_step(_experiment(mesh_shape, strategy), state=start)
    if mesh_shape[2] > 1:  # attention really went through the strategy's collective
        collective = {"ring": "collective_permute", "all_gather": "all_gather"}.get(strategy, "all_to_all")
        assert collective in hlo
    for key in ("loss", "grad_norm", "accuracy"):
        np.testing.assert_allclose(m[key], ref_m[key], rtol=2e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(ref_new["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_zigzag_refused_for_convolutional_mechanisms():
    exp = _experiment((1, 1, 8, 1), "ring", attn="cca", zigzag=True)
    with pytest.raises(ValueError, match="convolutions"):
        trainer._build_compiled(exp)


def test_pallas_kernel_runs_inside_the_ring():
    """Any implementation runs on the local shards: here the Triton kernel, interpreted."""
    mesh = make_mesh(MeshConfig(shape=(1, 1, 2, 1), num_devices=2))
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (1, 64, 2, 32))
    k, v = jax.random.normal(ks[1], (1, 64, 1, 32)), jax.random.normal(ks[2], (1, 64, 1, 32))
    perm = cpl.zigzag_permutation(64, 4)
    pos = jnp.broadcast_to(jnp.arange(64), (1, 64))[:, perm]

    def split(q, k, v):
        o = cpl.context_parallel_attention(q[:, perm], k[:, perm], v[:, perm], impl="pallas_gpu_interpret",
                                           mask=Mask(causal=True, q_positions=pos, kv_positions=pos),
                                           strategy="ring", mesh=mesh, zigzag=True)
        return o[:, np.argsort(perm)]

    def ref(q, k, v):
        return attention(q, k, v, mask=Mask(causal=True), impl="xla")

    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
    for a, b in zip(jax.jit(jax.grad(lambda *x: jnp.sum(split(*x) * w), (0, 1, 2)))(q, k, v),
                    jax.grad(lambda *x: jnp.sum(ref(*x) * w), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(split)(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)


def test_pallas_kernel_in_the_ring_in_bf16_has_one_device_error():
    """bf16 through the ring with a Pallas kernel (Triton, interpreted): its block outputs
    come back in float32 (``out_dtype``), so the split costs nothing over one device.

    Negative control: the same kernel with each block output rounded to bf16 before the
    merge (what the kernels did before ``out_dtype``) is measurably worse (x1.26 here),
    so the bound can fail. No mask: every row merges both blocks, which is where that
    rounding shows (a causal row served by one block rounds the same value twice).
    """
    from attn import core
    Tp, N, K, H = 32, 4, 2, 16
    ks = jax.random.split(jax.random.key(8), 3)
    q = jax.random.normal(ks[0], (1, Tp, N, H), jnp.bfloat16)
    k, v = (jax.random.normal(key, (1, Tp, K, H), jnp.bfloat16) for key in ks[1:])
    mesh = make_mesh(MeshConfig(shape=(1, 1, 2, 1), num_devices=2))
    perm = cpl.zigzag_permutation(Tp, 4)
    pos = jnp.broadcast_to(jnp.arange(Tp), (1, Tp))[:, perm]
    mask = Mask(q_positions=pos, kv_positions=pos)
    kernel = core.get_impl("pallas_triton_interpret")

    def rounded_blocks(q, k, v, *, out_dtype=None, **kw):  # the old behaviour
        o, lse = kernel.fn(q, k, v, **kw)
        return o.astype(out_dtype or o.dtype), lse

    core.register_impl("test_rounded_blocks", rounded_blocks, kernel.supports, float32_out=True)
    try:
        ring = {impl: jax.jit(lambda q, k, v, impl=impl: cpl.context_parallel_attention(
            q[:, perm], k[:, perm], v[:, perm], impl=impl, strategy="ring", mask=mask, mesh=mesh,
            zigzag=True)[:, np.argsort(perm)])(q, k, v)
            for impl in ("pallas_triton_interpret", "test_rounded_blocks")}
    finally:
        core._IMPLS.pop("test_rounded_blocks")
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = attention(f32(q), f32(k), f32(v), impl="xla")
    one = attention(q, k, v, impl="pallas_triton_interpret")  # bf16, one device
    rel = lambda x: float(jnp.linalg.norm(f32(x) - ref) / jnp.linalg.norm(ref))  # noqa: E731
    o, rounded = ring["pallas_triton_interpret"], ring["test_rounded_blocks"]
    assert o.dtype == jnp.bfloat16
    assert rel(o) < 1.05 * rel(one), (rel(o), rel(one))
    assert rel(rounded) > 1.15 * rel(one), (rel(rounded), rel(one))
