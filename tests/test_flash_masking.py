"""The block-mask machinery shared by the flash kernels (``kernels_pallas.flash.masking``).

Block classification against the dense mask built from the mask's definition
(``tests/oracle.mask_from_definition``, not ``Mask.materialize``): SKIP only when a
block is provably empty, FULL only when provably all-visible, and exact for position
rules (causal / window / offsets); the visit tables; the static visit bounds; and the
kernels' own in-kernel count of processed blocks (debug output) against the tables.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.masks import Mask
from kernels_pallas.flash import masking
from kernels_pallas.flash.gpu_triton import BlockSizes as TritonBlocks
from kernels_pallas.flash.gpu_triton import flash_attention_triton
from kernels_pallas.flash.masking import FULL, PARTIAL, SKIP
from kernels_pallas.flash.tpu import BlockSizes as TpuBlocks
from kernels_pallas.flash.tpu import flash_attention_tpu
from tests.oracle import mask_from_definition

B, T, S, N = 2, 100, 75, 3
rng = np.random.default_rng(0)


def _docs(L, pad):
    """Packed documents per batch row (random lengths), 0 = padding at the tail."""
    out = np.zeros((B, L), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, L - pad), size=3 + b, replace=False))
        seg = np.searchsorted(cuts, np.arange(L), side="right") + 1
        out[b] = np.where(np.arange(L) < L - pad * (b + 1), seg, 0)
    return jnp.asarray(out)


def _masks():
    offs = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + 40, (B, T))
    shuffled = jnp.asarray(np.stack([rng.permutation(S) for _ in range(B)]).astype(np.int32))
    return {
        "none": (Mask(), True),
        "causal": (Mask(causal=True), True),
        "window": (Mask(window=(9, 4)), True),
        "causal_window_offset": (Mask(causal=True, window=(20, None), q_positions=offs), True),
        "left_only_offset": (Mask(window=(30, None), q_positions=offs), True),
        "segments": (Mask(causal=True, q_segment_ids=_docs(T, 9), kv_segment_ids=_docs(S, 5)), False),
        "shuffled_kv_positions": (Mask(causal=True, kv_positions=shuffled), False),
        "block_mask": (Mask(window=(40, 40), block_mask=jnp.asarray(rng.random((N, 7, 3)) < 0.6),
                            block_size=(16, 32)), False),
    }


MASKS = _masks()


@functools.lru_cache(maxsize=None)
def _dense(name):
    return mask_from_definition(MASKS[name][0], B, T, S, N)


# Kernel blocks must lie inside block-mask blocks (16, 32): other sizes for that one.
CLASSIFY_PARAMS = [(name, blocks) for name in MASKS for blocks in (
    [(16, 16), (16, 32), (8, 32)] if name == "block_mask" else [(16, 16), (32, 64), (8, 128)])]


@pytest.mark.parametrize("name,blocks", CLASSIFY_PARAMS)
def test_classification_is_conservative_and_exact_for_positions(name, blocks):
    mask, exact_expected = MASKS[name]
    til = masking.make_tiling(mask, batch=B, q_len=T, kv_len=S, num_heads=N,
                              block_q=blocks[0], block_kv=blocks[1])
    assert masking.block_mask_fits(mask, T, S, *blocks) is None
    kind = np.asarray(jax.jit(lambda m: masking.classify(m, til))(mask))
    exact = masking.exact_kinds(_dense(name), til)
    exact = np.broadcast_to(exact, kind.shape)
    assert kind.shape == (B, til.mask_heads, til.num_q_blocks, til.num_kv_blocks)
    assert np.all(exact[kind == SKIP] == SKIP), "a block with visible pairs was skipped"
    assert np.all(exact[kind == FULL] == FULL), "a block with hidden pairs was called full"
    if exact_expected:  # linear position rules: block corners make min/max bounds tight
        np.testing.assert_array_equal(kind, exact)
    # Blocks with padded keys always mask (padding is hidden by index, not by rule).
    pad = (np.arange(til.num_kv_blocks) + 1) * til.block_kv > S
    assert not np.any(kind[..., pad] == FULL)


def test_segments_skip_across_documents():
    # Two documents per row, boundary on a block edge: cross-document blocks are skipped.
    seg = jnp.asarray(np.repeat([[1] * 32 + [2] * 32], 2, axis=0).astype(np.int32))
    mask = Mask(q_segment_ids=seg, kv_segment_ids=seg)
    til = masking.make_tiling(mask, batch=2, q_len=64, kv_len=64, num_heads=1, block_q=16,
                              block_kv=16)
    kind = np.asarray(masking.classify(mask, til))[0, 0]
    expect = np.kron(np.eye(2, dtype=np.int32), np.ones((2, 2), np.int32)) * FULL
    np.testing.assert_array_equal(kind, expect)


def test_visit_tables_list_visited_blocks_in_order():
    kind = jnp.asarray(rng.integers(0, 3, size=(2, 3, 5, 7)).astype(np.int32))
    kind = kind.at[0, 0, 0].set(SKIP)  # an empty row
    fwd, bwd = jax.jit(lambda k: (masking.visit_table(k, 7),
                                  masking.visit_table(jnp.swapaxes(k, -1, -2), 5)))(kind)
    fwd, bwd = np.asarray(fwd), np.asarray(bwd)
    kind = np.asarray(kind)
    for table, kd in ((fwd, kind), (bwd, np.swapaxes(kind, -1, -2))):
        for idx in np.ndindex(kd.shape[:-1]):
            row, ks = table[idx], kd[idx]
            visited = np.nonzero(ks)[0]
            n = row[0]
            assert n == len(visited)
            np.testing.assert_array_equal(row[1:1 + n] // 2, visited)  # ascending
            np.testing.assert_array_equal(row[1:1 + n] % 2, ks[visited] == PARTIAL)
            # Past the count: the last visited block again, no partial bit (no new DMA).
            if n:
                assert np.all(row[1 + n:] == 2 * visited[-1])


def test_static_visit_bounds():
    def til(mask, T=1024, S=1024, c=(128, 128)):
        return masking.make_tiling(mask, batch=1, q_len=T, kv_len=S, num_heads=1,
                                   block_q=c[0], block_kv=c[1])

    assert til(Mask()).max_kv_visits == 8 and til(Mask()).max_q_visits == 8
    assert til(Mask(causal=True)).max_kv_visits == 8
    local = til(Mask(causal=True, window=(100, 0)))
    assert (local.max_kv_visits, local.max_q_visits) == (2, 2)
    wide = til(Mask(window=(200, 200)), c=(128, 64))
    kind = np.asarray(masking.classify(Mask(window=(200, 200)), wide))
    assert wide.max_kv_visits == (kind > 0).sum(-1).max()
    # Explicit positions are only known on device: the bound is the block count.
    qp = jnp.zeros((1, 1024), jnp.int32)
    assert til(Mask(causal=True, window=(100, 0), q_positions=qp)).max_kv_visits == 8


def test_choose_block():
    cb = masking.choose_block
    assert cb(512, 100, multiple=128, single_multiple=16) == 112  # one block, rounded
    assert cb(512, 3000, multiple=128, single_multiple=16) == 512
    assert cb(512, 3000, multiple=128, single_multiple=16, mask_block=384) == 384
    assert cb(512, 3000, multiple=128, single_multiple=16, mask_block=100) is None
    assert cb(128, 1000, multiple=16, single_multiple=16, pow2=True, mask_block=96) == 32
    assert cb(128, 5, multiple=16, single_multiple=16, pow2=True) == 16


KERNELS = {
    "tpu": functools.partial(flash_attention_tpu, block_sizes=TpuBlocks(16, 16), interpret=True),
    "triton": functools.partial(flash_attention_triton, block_sizes=TritonBlocks(16, 16),
                                interpret=True),
}


@pytest.mark.parametrize("backend", list(KERNELS))
def test_kernel_processes_exactly_the_visited_blocks(backend):
    """The kernels count, in-kernel, the key blocks they process (debug output)."""
    Tq, Sk, Nh, Kh, H = 64, 80, 4, 2, 16
    seg_q = jnp.asarray(np.repeat([[1] * 30 + [2] * 34], 2, axis=0).astype(np.int32))
    seg_k = jnp.asarray(np.repeat([[1] * 30 + [2] * 40 + [0] * 10], 2, axis=0).astype(np.int32))
    mask = Mask(causal=True, window=(40, 0), q_segment_ids=seg_q, kv_segment_ids=seg_k)
    q = jnp.ones((2, Tq, Nh, H))
    k = jnp.ones((2, Sk, Kh, H))
    _, _, info = KERNELS[backend](q, k, k, mask=mask, debug=True)
    til = masking.make_tiling(mask, batch=2, q_len=Tq, kv_len=Sk, num_heads=Nh, block_q=16,
                              block_kv=16)
    kind = np.asarray(masking.classify(mask, til))  # [B, 1, nQ, nK]
    visited = np.broadcast_to((kind > SKIP).sum(-1), (2, Nh, til.num_q_blocks))
    partial = np.broadcast_to((kind == PARTIAL).sum(-1), visited.shape)
    np.testing.assert_array_equal(info["visited"], visited)
    np.testing.assert_array_equal(info["partial"], partial)
    assert visited.max() < til.num_kv_blocks  # something really was skipped
    assert (kind == FULL).any()  # and some blocks ran without mask code
