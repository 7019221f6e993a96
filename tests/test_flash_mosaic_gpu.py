"""The Pallas Mosaic GPU (Hopper) flash kernel, checked from a CPU host.

JAX 0.10's GPU interpret mode cannot run these kernels (no rule for transposed
wgmma operands, dynamic-slice reads, ``run_state``, ``layout_cast``), so the CPU
checks are: the plan (blocks, SMEM ring depth, head-dim padding), the
``supports()`` refusals that send calls to Triton, and lowering of forward, dQ and
dK/dV to Mosaic GPU for every mask feature. Numerics on hardware: ``-m gpu``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas.flash.register as flash_register
from attn.core import make_call
from attn.masks import Mask
from kernels_pallas.flash import gpu
from tests.attn_cases import make_case, oracle_kwargs
from tests.oracle import reference_attention, reference_grads
from tests.test_flash_common import check_float32_out

bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)


def test_plan_blocks_and_smem_ring():
    p = gpu.make_plan((4, 4096, 32, 128), (4, 4096, 8, 128), (4, 4096, 8, 128), Mask(causal=True),
                      scale=0.1, softcap=None, has_sinks=False)
    assert (p.cfg.Hp, p.til_f.block_q, p.til_f.block_kv, p.launch_f.nwg) == (128, 128, 128, 2)
    assert p.launch_f.stages >= 2 and p.til_dkv.block_kv == 128
    mla = gpu.make_plan((2, 8192, 16, 192), (2, 8192, 16, 192), (2, 8192, 16, 128), Mask(causal=True),
                        scale=0.1, softcap=None, has_sinks=False)
    assert (mla.cfg.Hp, mla.cfg.Ep, mla.til_f.block_kv) == (192, 128, 64)
    small = gpu.make_plan((1, 40, 4, 72), (1, 40, 2, 72), (1, 40, 2, 40), Mask(), scale=0.1,
                          softcap=None, has_sinks=False)
    assert (small.cfg.Hp, small.cfg.Ep, small.launch_f.nwg, small.launch_dkv.nwg) == (128, 64, 1, 1)


def test_plan_with_float32_out_makes_room_for_the_o_tile():
    """A float32 O gets its own SMEM tile (it cannot reuse bf16 Q's). H = E = 128: the
    forward key block halves to 64 so the K/V ring keeps >= 2 stages; H = E = 192: the
    forward also drops to one compute warpgroup. The backward plan never changes."""
    kw = dict(scale=0.1, softcap=None, has_sinks=False)
    for D, ck, nwg in ((128, 64, 2), (192, 64, 1)):
        shapes = ((4, 4096, 32, D), (4, 4096, 8, D), (4, 4096, 8, D))
        bf16, f32 = (gpu.make_plan(*shapes, Mask(causal=True), out_dtype=dt, **kw)
                     for dt in (None, jnp.float32))
        assert bf16.launch_f.nwg == 2 and bf16.til_f.block_kv == (128 if D == 128 else 64)
        assert (f32.til_f.block_kv, f32.launch_f.nwg, f32.til_f.block_q) == (ck, nwg, 64 * nwg)
        assert f32.out_dtype == jnp.float32 and f32.launch_f.stages >= 2
        assert (f32.til_dq, f32.til_dkv, f32.launch_dq) == (bf16.til_dq, bf16.til_dkv,
                                                              bf16.launch_dq)
    with pytest.raises(NotImplementedError, match="float32 O tile do not fit in shared memory"):
        gpu.make_plan((1, 256, 4, 256), (1, 256, 4, 256), (1, 256, 4, 128), Mask(),
                      out_dtype=jnp.float32, block_sizes=gpu.BlockSizes(warpgroups=2), **kw)


def test_supports_refusals_fall_back_to_triton():
    x = bf(1, 128, 4, 64)
    call = make_call(x, x, x, platform="gpu")
    assert "no GPU device" in gpu.supports(call, interpret=False)  # CPU host: not sm90
    assert "interpret" in gpu.supports(call, interpret=True)
    f32 = jax.ShapeDtypeStruct((1, 128, 4, 64), jnp.float32)
    assert "float32" in gpu.supports(make_call(f32, f32, f32, platform="gpu"), interpret=False)
    bias = jax.ShapeDtypeStruct((1, 4, 128, 128), jnp.float32)
    assert "bias" in gpu.supports(make_call(x, x, x, bias=bias, platform="gpu"), interpret=False)
    with pytest.raises(NotImplementedError, match="block_size"):
        gpu.make_plan((1, 300, 4, 64), (1, 300, 4, 64), (1, 300, 4, 64),
                      Mask(block_mask=jnp.ones((1, 10, 10), bool), block_size=(30, 30)),
                      scale=0.1, softcap=None, has_sinks=False)
    kernel, reason = flash_register.resolve_gpu_kernel(call)
    assert reason is None and kernel.name == "triton"
    kernel, _ = flash_register.resolve_gpu_kernel(call, interpret=True)
    assert kernel.name == "triton"


@pytest.mark.parametrize("H,E,out_dtype", [(64, 64, None), (192, 128, None),
                                           (128, 128, jnp.float32)])
def test_kernels_lower_to_mosaic_gpu(H, E, out_dtype):
    """Forward, dQ and dK/dV lower to Mosaic GPU with every mask feature, from CPU (also
    with a float32 o: its own swizzled float32 SMEM tile, TMA-stored)."""
    B, T, S, N, K = 2, 300, 700, 8, 2
    mask = Mask(causal=True, window=(256, 0), q_segment_ids=jnp.ones((B, T), jnp.int32),
                kv_segment_ids=jnp.ones((B, S), jnp.int32),
                q_positions=jnp.broadcast_to(jnp.arange(T) + S - T, (B, T)))

    def loss(q, k, v, sinks):
        o, lse = gpu.flash_attention_mosaic(q, k, v, mask=mask, softcap=30.0, sinks=sinks,
                                            out_dtype=out_dtype)
        assert o.dtype == (out_dtype or q.dtype)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(
        bf(B, T, N, H), bf(B, S, K, H), bf(B, S, K, E), jax.ShapeDtypeStruct((N,), jnp.float32)
    ).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("mosaic_gpu") >= 3


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["segments", "softcap_sinks", "offset_chunk"])
def test_on_hopper(name):
    if jax.default_backend() != "gpu" or gpu.device_reason():
        pytest.skip("needs an sm90 GPU")
    case = make_case(name, dtype=jnp.bfloat16)
    kw = case["kwargs"]
    f = lambda q, k, v: gpu.flash_attention_mosaic(q, k, v, mask=case["mask"],
                                                   softcap=kw.get("softcap"), sinks=kw.get("sinks"))
    (o, lse), vjp = jax.vjp(f, case["q"], case["k"], case["v"])
    dq, dk, dv = vjp((case["do"].astype(o.dtype), jnp.zeros_like(lse)))
    f64 = lambda x: np.asarray(x, np.float64)
    o_ref, lse_ref = reference_attention(f64(case["q"]), f64(case["k"]), f64(case["v"]),
                                         **oracle_kwargs(case))
    ref = reference_grads(f64(case["q"]), f64(case["k"]), f64(case["v"]), f64(case["do"]),
                          **oracle_kwargs(case))
    np.testing.assert_allclose(f64(o), o_ref, atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(lse, lse_ref, atol=3e-2, rtol=3e-2)
    for got, key in ((dq, "dq"), (dk, "dk"), (dv, "dv")):
        scale = np.abs(ref[key]).max()
        np.testing.assert_allclose(f64(got) / scale, ref[key] / scale, atol=4e-2, err_msg=key)


@pytest.mark.gpu
def test_float32_out_on_hopper():
    if jax.default_backend() != "gpu" or gpu.device_reason():
        pytest.skip("needs an sm90 GPU")
    check_float32_out(gpu.flash_attention_mosaic)
