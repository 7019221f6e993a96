"""The Pallas Triton flash kernel (portable GPU path) in interpret mode (``interpret=True``).

Forward output, lse, dq, dk, dv and dsinks against the float64 oracle on the awkward
shapes of ``tests/attn_cases.py``. Blocks are small (32 query rows, 64 keys; the
backward swaps them on purpose) so the cases have several blocks, padding, partial,
full and skipped blocks, and the forward/backward tilings differ. Causal-only cases
are covered through ``segments`` / ``offset_chunk`` (both causal) to keep CPU time low.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.masks import Mask
from kernels_pallas.flash import gpu_triton
from kernels_pallas.flash.gpu_triton import BlockSizes, flash_attention_triton
from tests.attn_cases import make_case, oracle_kwargs
from tests.oracle import reference_attention
from tests.test_flash_common import (check_case, check_float32_out, check_mla_bf16,
                                     check_per_head_block_mask, check_skipped_blocks_never_read,
                                     sinks_with_dead_rows_case)

SMALL = BlockSizes(block_q=32, block_kv=64, block_q_bwd=64, block_kv_bwd=32)
kernel = functools.partial(flash_attention_triton, block_sizes=SMALL, interpret=True)


@pytest.mark.parametrize("name", ["full", "window", "segments", "decode_t1",
                                  "offset_chunk"])
def test_matches_oracle(name):
    check_case(kernel, name)


def test_per_head_block_mask_with_gqa():
    check_per_head_block_mask(functools.partial(flash_attention_triton, interpret=True), BlockSizes(16, 32))


def test_mla_head_dims_and_bf16():
    check_mla_bf16(kernel)


def test_float32_out_is_the_unrounded_accumulator():
    # bf16 in, float32 o (what the context-parallel ring asks for); blocks 8 / 16.
    check_float32_out(functools.partial(flash_attention_triton, block_sizes=BlockSizes(8, 16, 16, 8),
                                        interpret=True))


def test_sinks_softcap_and_rows_that_see_nothing():
    # Fully masked rows: o = 0 (never NaN), lse = the sink, finite gradients, dsinks.
    check_case(kernel, sinks_with_dead_rows_case())


def test_skipped_blocks_are_never_read():
    check_skipped_blocks_never_read(kernel, block_kv=64)


def test_default_plan_follows_triton_rules():
    # Power-of-two blocks >= 16 and head dims (72 -> 128, 192 -> 256); defaults by head dim.
    plan = gpu_triton.make_plan((2, 1000, 8, 72), (2, 1000, 2, 72), (2, 1000, 2, 40),
                                Mask(causal=True), scale=0.1, softcap=None, has_sinks=False)
    assert (plan.cfg.Hp, plan.cfg.Ep) == (128, 64)
    for til in (plan.til_f, plan.til_b):
        for c in (til.block_q, til.block_kv):
            assert c >= 16 and c & (c - 1) == 0
    decode = gpu_triton.make_plan((8, 1, 32, 192), (8, 4096, 8, 192), (8, 4096, 8, 128), Mask(),
                                  scale=0.1, softcap=None, has_sinks=False)
    assert decode.til_f.block_q == 16 and decode.cfg.Hp == 256


@pytest.mark.gpu
def test_on_gpu_hardware():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    case = make_case("segments", dtype=jnp.bfloat16)
    o, lse = flash_attention_triton(case["q"], case["k"], case["v"], mask=case["mask"])
    o_ref, lse_ref = reference_attention(np.asarray(case["q"], np.float64),
                                         np.asarray(case["k"], np.float64),
                                         np.asarray(case["v"], np.float64), **oracle_kwargs(case))
    np.testing.assert_allclose(np.asarray(o, np.float32), o_ref, atol=3e-2, rtol=3e-2)
