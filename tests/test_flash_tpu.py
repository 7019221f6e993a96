"""The Pallas Mosaic TPU flash kernel in interpret mode (``pltpu.InterpretParams()``).

Forward output, lse, dq, dk, dv and dsinks against the float64 oracle on the awkward
shapes of ``tests/attn_cases.py``. Blocks are small (32 query rows, 64 keys; the
backward swaps them on purpose) so the cases have several blocks, padding, partial,
full and skipped blocks, and the forward/backward tilings differ. Causal-only cases
are covered through ``segments`` / ``offset_chunk`` (both causal) to keep CPU time low.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.masks import Mask
from kernels_pallas.flash import tpu
from kernels_pallas.flash.tpu import BlockSizes, flash_attention_tpu
from tests.attn_cases import make_case, oracle_kwargs
from tests.oracle import reference_attention
from tests.test_flash_common import (check_case, check_float32_out, check_mla_bf16,
                                     check_per_head_block_mask, check_skipped_blocks_never_read,
                                     sinks_with_dead_rows_case)

SMALL = BlockSizes(block_q=32, block_kv=64, block_q_bwd=64, block_kv_bwd=32)
kernel = functools.partial(flash_attention_tpu, block_sizes=SMALL, interpret=True)


@pytest.mark.parametrize("name", ["full", "segments", "decode_t1", "offset_chunk"])
def test_matches_oracle(name):
    check_case(kernel, name)


def test_window_with_heads_split_across_blocks():
    # Non-causal two-sided window; G = 4 heads per kv head, two per block, which
    # exercises the head-block grid axis of all three kernels.
    blocks = dataclasses.replace(SMALL, heads_per_block=2)
    check_case(functools.partial(flash_attention_tpu, block_sizes=blocks, interpret=True),
               "window")


def test_per_head_block_mask_with_gqa():
    check_per_head_block_mask(functools.partial(flash_attention_tpu, interpret=True), BlockSizes(16, 32))


def test_mla_head_dims_and_bf16():
    check_mla_bf16(kernel)


def test_float32_out_is_the_unrounded_accumulator():
    # bf16 in, float32 o (what the context-parallel ring asks for); blocks 8 / 16.
    check_float32_out(functools.partial(flash_attention_tpu, block_sizes=BlockSizes(8, 16, 16, 8),
                                        interpret=True))


def test_sinks_softcap_and_rows_that_see_nothing():
    # Fully masked rows: o = 0 (never NaN), lse = the sink, finite gradients, dsinks.
    check_case(kernel, sinks_with_dead_rows_case())


def test_skipped_blocks_are_never_read():
    check_skipped_blocks_never_read(kernel, block_kv=64)


def test_default_plan_follows_hardware_rules():
    # Real TPU blocks: query rows a multiple of 16 (bf16 sublanes), keys of 128 lanes,
    # the whole GQA group stacked, H=64 kept unpadded and 192 padded to 256.
    plan = tpu.make_plan((2, 3000, 32, 64), (2, 3000, 8, 64), (2, 3000, 8, 64), Mask(causal=True),
                         scale=0.125, softcap=None, has_sinks=False)
    assert plan.cfg.Gb == 4 and plan.cfg.Hp == 64
    for til in (plan.til_f, plan.til_b):
        assert til.block_q % 128 == 0 and til.block_kv % 128 == 0
        assert til.max_kv_visits == til.num_kv_blocks  # causal: the last row sees all
    decode = tpu.make_plan((8, 1, 32, 192), (8, 4096, 8, 192), (8, 4096, 8, 128), Mask(),
                           scale=0.1, softcap=None, has_sinks=False)
    assert decode.til_f.block_q == 16 and decode.cfg.Gb == 4
    assert decode.cfg.Hp == 256 and decode.cfg.Ep == 128
    local = tpu.make_plan((1, 8192, 8, 128), (1, 8192, 8, 128), (1, 8192, 8, 128),
                          Mask(causal=True, window=(256, 0)), scale=0.1, softcap=None,
                          has_sinks=False)
    assert local.til_f.max_kv_visits <= 2  # sliding window: the grid walks 2 blocks, not 16


@pytest.mark.tpu
def test_on_tpu_hardware():
    if jax.default_backend() != "tpu":
        pytest.skip("needs a TPU")
    case = make_case("segments", dtype=jnp.bfloat16)
    o, lse = flash_attention_tpu(case["q"], case["k"], case["v"], mask=case["mask"])
    o_ref, lse_ref = reference_attention(np.asarray(case["q"], np.float64),
                                         np.asarray(case["k"], np.float64),
                                         np.asarray(case["v"], np.float64), **oracle_kwargs(case))
    np.testing.assert_allclose(np.asarray(o, np.float32), o_ref, atol=3e-2, rtol=3e-2)
