"""Pallas flash kernels: helpers shared by the backend tests, and what both paths share
(registration in ``attn.core``, ``supports()`` reasons, the GPU kernel resolution).

Every kernel runs in interpret mode on CPU (TPU: ``pltpu.InterpretParams()``, Triton:
``interpret=True``) with small blocks, so several query/key blocks, padding and skipped
blocks occur at the awkward shapes of ``tests/attn_cases.py``.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas.flash.register as flash_register  # registers until attn.core does
from attn import core
from attn.core import make_call
from attn.masks import Mask
from tests.attn_cases import make_case, oracle_kwargs
from tests.oracle import mask_from_definition, reference_attention, reference_grads

F32_TOL = dict(atol=5e-5, rtol=5e-5)


# --------------------------------------------------------------------------- helpers
def run_with_grads(fn, case, **extra):
    """``(o, lse, (dq, dk, dv, dsinks))`` of ``fn`` on ``case`` with a random dlse."""
    sp, kw = case["spec"], case["kwargs"]
    dlse = jax.random.normal(jax.random.key(7), (sp.B, sp.N, sp.T))

    @jax.jit
    def go(q, k, v, sinks, do, dlse):
        f = lambda q, k, v, s: fn(q, k, v, mask=case["mask"], softcap=kw.get("softcap"),
                                  sinks=s, **extra)
        (o, lse), vjp = jax.vjp(f, q, k, v, sinks)
        # Rows with lse = -inf carry no gradient; keep the cotangent finite there.
        return o, lse, vjp((do.astype(o.dtype), jnp.where(jnp.isfinite(lse), dlse, 0.0)))

    return go(case["q"], case["k"], case["v"], kw.get("sinks"), case["do"], dlse), dlse


def sinks_with_dead_rows_case() -> dict:
    """``softcap_sinks`` (T=63 != S=100) plus documents that leave rows seeing nothing.

    Row 0 ends in padding queries (segment 0); row 1 starts with a document that has no
    keys; keys of segment 2 are seen by nobody. With sinks those rows get o = 0 and
    lse = sink, and they feed dsinks.
    """
    case = make_case("softcap_sinks")
    sp = case["spec"]
    q_seg = np.ones((sp.B, sp.T), np.int32)
    q_seg[0, 50:] = 0
    q_seg[1, :20] = 3
    kv_seg = np.ones((sp.B, sp.S), np.int32)
    kv_seg[:, 80:] = 2
    mask = Mask(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
    return dict(case, mask=mask, dense=mask_from_definition(mask, sp.B, sp.T, sp.S, sp.N))


def check_case(fn, name, *, tol=F32_TOL, **extra):
    """Forward, lse and all gradients of ``fn`` against the float64 oracle.

    ``name`` is a case of ``tests/attn_cases.py`` or a case dict.
    """
    case = make_case(name) if isinstance(name, str) else name
    (o, lse, grads), dlse = run_with_grads(fn, case, **extra)
    np64 = lambda x: np.asarray(x, np.float64)
    o_ref, lse_ref = reference_attention(np64(case["q"]), np64(case["k"]), np64(case["v"]),
                                         **oracle_kwargs(case))
    assert o.shape == o_ref.shape and o.dtype == case["q"].dtype
    assert lse.shape == lse_ref.shape and lse.dtype == jnp.float32
    np.testing.assert_allclose(o, o_ref, **tol)
    np.testing.assert_allclose(lse, lse_ref, **tol)  # -inf rows must match exactly
    dead = np.isneginf(lse_ref).transpose(0, 2, 1)  # [B, T, N]: rows that see nothing
    assert np.all(np.asarray(o)[dead] == 0) and not np.any(np.isnan(np.asarray(o)))
    ref = reference_grads(np64(case["q"]), np64(case["k"]), np64(case["v"]), np64(case["do"]),
                          np64(dlse), **oracle_kwargs(case))
    for got, key in zip(grads[:3], ("dq", "dk", "dv")):
        assert np.all(np.isfinite(got)), key
        np.testing.assert_allclose(got, ref[key], err_msg=key, **tol)
    if case["kwargs"].get("sinks") is not None:
        np.testing.assert_allclose(grads[3], ref["dsinks"], err_msg="dsinks", **tol)
    return case, o, lse


def check_skipped_blocks_never_read(fn, block_kv):
    """NaN-poison K/V blocks that no query can see: outputs and gradients stay exact."""
    B, T, S, N, K, H = 1, 24, 4 * block_kv, 2, 1, 16
    ks = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, S, K, H))
    v = jax.random.normal(ks[2], (B, S, K, H))
    do = jax.random.normal(ks[3], (B, T, N, H))
    # Causal with queries at positions 0..T-1: keys of the last two blocks are unseen.
    mask = Mask(causal=True)
    dead = jnp.arange(S) >= 2 * block_kv
    kp = jnp.where(dead[None, :, None, None], jnp.nan, k)
    vp = jnp.where(dead[None, :, None, None], jnp.nan, v)
    f = lambda q, k, v: fn(q, k, v, mask=mask)[0]
    o, vjp = jax.vjp(f, q, kp, vp)
    dq, dk, dv = vjp(do)
    dense = mask_from_definition(mask, B, T, S)
    o_ref, _ = reference_attention(q, k, v, dense_mask=dense)
    ref = reference_grads(q, k, v, do, dense_mask=dense)
    np.testing.assert_allclose(o, o_ref, **F32_TOL)
    np.testing.assert_allclose(dq, ref["dq"], **F32_TOL)
    np.testing.assert_allclose(dk, ref["dk"], **F32_TOL)  # unseen keys: exactly 0
    np.testing.assert_allclose(dv, ref["dv"], **F32_TOL)


def check_mla_bf16(fn):
    """E != H with H = 192 (padded to 256 inside), bfloat16 in / out, float32 inside:
    forward and gradients within bf16 tolerance of the float64 oracle."""
    B, T, N, K, H, E = 1, 20, 4, 2, 192, 128
    ks = jax.random.split(jax.random.key(2), 4)
    q, k, v, do = (jax.random.normal(kk, s, jnp.bfloat16) for kk, s in zip(
        ks, [(B, T, N, H), (B, T, K, H), (B, T, K, E), (B, T, N, E)]))
    mask = Mask(causal=True)
    (o, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask=mask), q, k, v)
    grads = vjp((do, jnp.zeros_like(lse)))
    assert o.dtype == jnp.bfloat16 and o.shape == (B, T, N, E) and lse.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    f64 = lambda x: np.asarray(x, np.float64)
    dense = mask_from_definition(mask, B, T, T)
    o_ref, lse_ref = reference_attention(f64(q), f64(k), f64(v), dense_mask=dense)
    ref = reference_grads(f64(q), f64(k), f64(v), f64(do), dense_mask=dense)
    tol = dict(atol=4e-2, rtol=4e-2)
    np.testing.assert_allclose(f64(o), o_ref, **tol)
    np.testing.assert_allclose(lse, lse_ref, **tol)
    for got, key in zip(grads, ("dq", "dk", "dv")):
        scale = np.abs(ref[key]).max()
        np.testing.assert_allclose(f64(got) / scale, ref[key] / scale, atol=4e-2, err_msg=key)


def check_per_head_block_mask(fn, block_sizes):
    """Per-head block sparsity with G = 2 plus offset positions: forward and gradients.

    Heads of one kv head then walk different visit rows (no head stacking on TPU;
    the dK/dV kernels walk a different transposed row for each of the G heads).
    """
    B, T, S, N, K, H = 1, 40, 70, 4, 2, 24
    ks = jax.random.split(jax.random.key(11), 4)
    q, k, v, do = (jax.random.normal(kk, s) for kk, s in zip(
        ks, [(B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H)]))
    bm = jax.random.bernoulli(jax.random.key(12), 0.6, (N, 3, 3))
    mask = Mask(causal=True, block_mask=bm, block_size=(16, 32),
                q_positions=jnp.arange(T)[None] + 30)
    f = lambda q, k, v: fn(q, k, v, mask=mask, block_sizes=block_sizes)
    (o, lse), vjp = jax.vjp(f, q, k, v)
    dq, dk, dv = vjp((do, jnp.zeros_like(lse)))
    dense = mask_from_definition(mask, B, T, S, N)
    o_ref, lse_ref = reference_attention(q, k, v, dense_mask=dense)
    ref = reference_grads(q, k, v, do, dense_mask=dense)
    np.testing.assert_allclose(o, o_ref, **F32_TOL)
    np.testing.assert_allclose(lse, lse_ref, **F32_TOL)
    for got, key in ((dq, "dq"), (dk, "dk"), (dv, "dv")):
        np.testing.assert_allclose(got, ref[key], err_msg=key, **F32_TOL)


def check_float32_out(fn):
    """bf16 inputs with ``out_dtype=float32``: the float32 accumulator, written out unrounded.

    * the default (bf16) output is exactly its rounding, and the lse is the same: the
      float32 ``o`` is the value the kernel would otherwise have rounded;
    * against the float64 oracle each element lies within the bound of the one rounding
      left inside the kernel, the bf16 ``P`` operand of the ``P·V`` matmul (as in every
      flash kernel: the MXU / tensor cores take P in the input dtype):
      ``|o - o_ref| <= 2^-8 · Σ_s p_s |v_s|`` plus float32 slack, where the sum is the
      oracle run on ``|v|``;
    * its relative error is well below the bf16 output's (the output rounding is gone);
    * gradients with a float32 cotangent come back in the input dtypes and match the
      oracle within bf16 tolerance.

    Shapes: T=24 != S=40, GQA 4/2, E != H, causal at offset positions, sinks.
    """
    B, T, S, N, K, H, E = 1, 24, 40, 4, 2, 16, 24
    ks = jax.random.split(jax.random.key(21), 5)
    q, k, v, do = (jax.random.normal(kk, s, jnp.bfloat16) for kk, s in zip(
        ks, [(B, T, N, H), (B, S, K, H), (B, S, K, E), (B, T, N, E)]))
    sinks = jax.random.normal(ks[4], (N,))
    mask = Mask(causal=True, q_positions=jnp.arange(T)[None] + S - T)
    (o32, lse32), vjp = jax.vjp(lambda q, k, v, s: fn(q, k, v, mask=mask, sinks=s,
                                                      out_dtype=jnp.float32), q, k, v, sinks)
    o16, lse16 = fn(q, k, v, mask=mask, sinks=sinks)
    assert o32.dtype == jnp.float32 and o16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(o32.astype(jnp.bfloat16), np.float32),
                                  np.asarray(o16, np.float32))
    np.testing.assert_array_equal(lse32, lse16)
    f64 = lambda x: np.asarray(x, np.float64)
    dense = mask_from_definition(mask, B, T, S)
    kw = dict(dense_mask=dense, sinks=f64(sinks))
    o_ref, lse_ref = reference_attention(f64(q), f64(k), f64(v), **kw)
    p_abs_v, _ = reference_attention(f64(q), f64(k), np.abs(f64(v)), **kw)  # Σ_s p_s |v_s|
    err = np.abs(f64(o32) - o_ref)
    assert np.all(err <= 2.0 ** -8 * p_abs_v * (1 + 1e-3) + 1e-5), err.max()
    np.testing.assert_allclose(lse32, lse_ref, atol=2e-5, rtol=2e-5)
    rel = lambda o: np.linalg.norm(f64(o) - o_ref) / np.linalg.norm(o_ref)  # noqa: E731
    assert rel(o32) < 0.7 * rel(o16), (rel(o32), rel(o16))
    grads = vjp((do.astype(jnp.float32), jnp.zeros_like(lse32)))
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3 + [jnp.float32]
    ref = reference_grads(f64(q), f64(k), f64(v), f64(do), **kw)
    for got, key in zip(grads, ("dq", "dk", "dv", "dsinks")):
        scale = np.abs(ref[key]).max()
        np.testing.assert_allclose(f64(got) / scale, ref[key] / scale, atol=2e-2, err_msg=key)
    return rel(o32), rel(o16)


# --------------------------------------------------------------------------- registration
def _call(platform="cpu", **kw):
    x = jax.ShapeDtypeStruct((1, 128, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    return make_call(x, kv, kv, platform=platform, **kw)


def test_four_impls_registered_with_reasons():
    names = set(core.registered_impls())
    assert {"pallas_tpu", "pallas_gpu", "pallas_tpu_interpret", "pallas_gpu_interpret"} <= names
    sup = lambda name, **kw: core.get_impl(name).supports(_call(**kw))
    assert "needs a TPU" in sup("pallas_tpu")
    assert "needs a GPU" in sup("pallas_gpu")
    assert sup("pallas_tpu", platform="tpu") is None
    assert sup("pallas_gpu", platform="gpu") is None
    # Interpret mode is part of the contract: accepted on CPU.
    assert sup("pallas_tpu_interpret") is None and sup("pallas_gpu_interpret") is None
    bias = jax.ShapeDtypeStruct((1, 4, 128, 128), jnp.float32)
    for name in ("pallas_tpu_interpret", "pallas_gpu_interpret"):
        assert "bias is not implemented" in sup(name, bias=bias)
        assert "dense" in sup(name, mask=Mask(dense=jnp.ones((1, 1, 128, 128), bool)))
        odd = Mask(block_mask=jnp.ones((1, 3, 3), bool), block_size=(50, 50))
        assert "block" in sup(name, mask=odd)
    assert "float64" in core.get_impl("pallas_tpu").supports(
        make_call(jax.ShapeDtypeStruct((1, 8, 2, 8), jnp.float64),
                  jax.ShapeDtypeStruct((1, 8, 2, 8), jnp.float64),
                  jax.ShapeDtypeStruct((1, 8, 2, 8), jnp.float64), platform="tpu"))


def test_gpu_resolution_prefers_hopper_module_when_it_accepts(monkeypatch):
    call = _call(platform="gpu")
    kernel, reason = flash_register.resolve_gpu_kernel(call)
    assert reason is None and kernel.name == "triton"  # gpu.py refuses off an sm90 GPU
    hopper = types.SimpleNamespace(name="hopper", attention=None,
                                   supports=lambda call, interpret, out_dtype=None: None)
    monkeypatch.setattr(flash_register, "_gpu_candidates",
                        lambda: [hopper, flash_register._TritonKernel])
    assert flash_register.resolve_gpu_kernel(call)[0] is hopper
    hopper.supports = lambda call, interpret, out_dtype=None: "needs sm_90"
    assert flash_register.resolve_gpu_kernel(call)[0].name == "triton"


@pytest.mark.parametrize("impl", ["pallas_tpu_interpret", "pallas_gpu_interpret"])
def test_through_attention_op(impl):
    case = make_case("causal_window")
    o, lse = core.attention(case["q"], case["k"], case["v"], mask=case["mask"], impl=impl,
                            return_lse=True)
    o_ref, lse_ref = reference_attention(np.asarray(case["q"]), np.asarray(case["k"]),
                                         np.asarray(case["v"]), **oracle_kwargs(case))
    np.testing.assert_allclose(o, o_ref, **F32_TOL)
    np.testing.assert_allclose(lse, lse_ref, **F32_TOL)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernels_lower_for_hardware(backend, monkeypatch):
    """Forward + backward lower to Mosaic TPU / Triton IR from this CPU host.

    This checks the hardware code path (block shapes, dtypes, layouts) without a
    device: lowering runs Pallas' Mosaic / Triton lowering rules; only the final
    device compile is left to hardware tests.
    """
    from kernels_pallas.flash.gpu_triton import flash_attention_triton
    from kernels_pallas.flash.tpu import flash_attention_tpu

    if backend == "tpu":
        try:  # Mosaic asks the default device for its TPU generation: pretend v5e.
            from jax._src.pallas.mosaic import tpu_info
            info = tpu_info._get_tpu_info_impl(tpu_info.ChipVersion.TPU_V5E, 1)
        except (ImportError, AttributeError, TypeError) as e:  # private API moved
            pytest.skip(f"cannot fake a TPU device kind on this JAX: {e}")
        monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind, lambda: info)
        fn, platform, target = flash_attention_tpu, "tpu", "tpu_custom_call"
    else:
        fn, platform, target = flash_attention_triton, "cuda", "triton"
    B, T, S, N, K = 2, 300, 700, 8, 2
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    seg = jnp.ones((B, T), jnp.int32)
    mask = Mask(causal=True, window=(256, 0), q_segment_ids=seg, kv_segment_ids=jnp.ones((B, S), jnp.int32),
                q_positions=jnp.broadcast_to(jnp.arange(T) + S - T, (B, T)))

    def loss(q, k, v, sinks, out_dtype):
        o, lse = fn(q, k, v, mask=mask, softcap=30.0, sinks=sinks, out_dtype=out_dtype)
        assert o.dtype == (out_dtype or q.dtype)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    # The float32 output (what the context-parallel ring asks for) lowers too.
    for H, E, out_dtype in ((64, 64, None), (192, 128, None), (64, 64, jnp.float32)):
        grad = jax.grad(functools.partial(loss, out_dtype=out_dtype), argnums=(0, 1, 2, 3))
        lowered = jax.jit(grad).trace(
            bf(B, T, N, H), bf(B, S, K, H), bf(B, S, K, E), jax.ShapeDtypeStruct((N,), jnp.float32)
        ).lower(lowering_platforms=(platform,))
        assert lowered.as_text().count(target) >= 3  # forward, dQ and dK/dV kernels


def test_gpu_kernels_have_their_own_names_and_the_alias_says_why(caplog):
    import logging
    names = set(core.registered_impls())
    assert {"pallas_triton", "pallas_triton_interpret", "pallas_mosaic_gpu"} <= names
    # Mosaic GPU cannot be interpreted on JAX 0.10, so it has no interpret name.
    assert "pallas_mosaic_gpu_interpret" not in names
    sup = lambda name, **kw: core.get_impl(name).supports(_call(**kw))
    assert "needs a GPU" in sup("pallas_triton") and "needs a GPU" in sup("pallas_mosaic_gpu")
    assert sup("pallas_triton_interpret") is None
    flash_register._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="kernels_pallas.flash.register"):
        kernel, _ = flash_register.resolve_gpu_kernel(_call(platform="gpu"), interpret=True)
        flash_register.resolve_gpu_kernel(_call(platform="gpu"), interpret=True)
    assert kernel.name == "triton"
    msgs = [r.getMessage() for r in caplog.records if "resolved to" in r.getMessage()]
    # Logged once, naming the Mosaic GPU kernel's refusal (it was dropped before).
    assert len(msgs) == 1 and "mosaic:" in msgs[0] and "interpret" in msgs[0], msgs
    q = jax.random.normal(jax.random.key(0), (1, 16, 2, 32))
    a = core.attention(q, q, q, mask=Mask(causal=True), impl="pallas_triton_interpret")
    b = core.attention(q, q, q, mask=Mask(causal=True), impl="pallas_gpu_interpret")
    np.testing.assert_array_equal(a, b)


def test_every_pallas_impl_returns_float32_outputs_on_request():
    """``Impl.float32_out`` (the context-parallel ring's requirement) on every Pallas name;
    a bad ``out_dtype`` is one clear error."""
    from attn.errors import UserError

    names = ("pallas_tpu", "pallas_tpu_interpret", "pallas_triton", "pallas_triton_interpret",
             "pallas_mosaic_gpu", "pallas_gpu", "pallas_gpu_interpret")
    assert all(core.get_impl(n).float32_out for n in names)
    x = jax.random.normal(jax.random.key(3), (1, 12, 2, 16), jnp.bfloat16)
    for name in ("pallas_triton_interpret", "pallas_gpu_interpret"):
        o, lse = core.get_impl(name).fn(x, x, x, mask=Mask(causal=True), scale=0.25, softcap=None,
                                        sinks=None, bias=None, return_lse=True,
                                        out_dtype=jnp.float32)
        assert o.dtype == jnp.float32 and lse.dtype == jnp.float32
    from kernels_pallas.flash.gpu_triton import flash_attention_triton
    with pytest.raises(UserError, match="out_dtype=int32: must be a floating dtype"):
        flash_attention_triton(x, x, x, interpret=True, out_dtype=jnp.int32)
