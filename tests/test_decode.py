"""Decode kernels (kernels_pallas/decode) against the float64 oracle.

Every backend (XLA split-K reference, Mosaic TPU kernel in ``pltpu.InterpretParams()``
mode, Triton kernel with ``interpret=True``) is checked on paged caches with shuffled
page tables, ragged lengths (per-sequence page counts and half-filled last pages), GQA
/ MQA / MHA packing, T_q in {1, 2, 7}, sliding windows, sinks, softcap, MLA mode (values
are a slice of the latent), fully masked rows (o = 0, lse = -inf, no NaN) and NaN-poisoned
pages that no sequence owns. The oracle sees the gathered dense K/V and the dense mask
built by ``tests.oracle.mask_from_definition`` from an ``attn.masks.Mask``.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import core
from attn.errors import UserError
from attn.masks import Mask
from kernels_pallas.decode import common
from kernels_pallas.decode.api import decode_attention
from kernels_pallas.decode.common import PagedKV, from_dense
from tests.oracle import mask_from_definition, reference_attention

BACKENDS = [("xla", False), ("pallas_tpu", True), ("pallas_triton", True)]
TOL = dict(rtol=2e-5, atol=2e-5)


def make_paged(rng, *, B, T, N, K, H, E, C, max_pages, lengths, mla=False, poison=True,
               q_seg=None, pos_offset=None):
    """A random pool with shuffled pages, the decode queries, and the oracle's dense view.

    ``lengths[b]`` tokens are cached for row b (its last page half full when C does not
    divide it); the T queries of row b sit at positions ``lengths[b] - T .. lengths[b]-1``
    (their own tokens are already in the cache, as the layers append before attending).
    """
    pages_needed = [-(-n // C) for n in lengths]
    P = sum(pages_needed) + 3  # three spare pages that nobody owns (poisoned)
    perm = rng.permutation(P)
    Hk = H
    k = rng.normal(size=(P, C, K, Hk)).astype(np.float32)
    v = None if mla else rng.normal(size=(P, C, K, E)).astype(np.float32)
    pos = np.zeros((P, C), np.int32)
    seg = np.zeros((P, C), np.int32)
    table = np.zeros((B, max_pages), np.int32)
    used = 0
    off = np.zeros(B, np.int64) if pos_offset is None else np.asarray(pos_offset)
    for b, n in enumerate(lengths):
        for j in range(pages_needed[b]):
            p = perm[used]
            used += 1
            table[b, j] = p
            for c in range(C):
                t = j * C + c
                if t < n:
                    pos[p, c], seg[p, c] = t + off[b], 1
    spare = perm[used:]
    if poison:
        k[spare] = np.nan
        if v is not None:
            v[spare] = np.nan
    # Entries past num_pages stay 0: physical page 0, which may be a poisoned spare.
    kv = PagedKV(k=jnp.asarray(k), v=None if mla else jnp.asarray(v), positions=jnp.asarray(pos),
                 segment_ids=jnp.asarray(seg), page_table=jnp.asarray(table),
                 num_pages=jnp.asarray(pages_needed, jnp.int32), value_dim=E if mla else None)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    qp = np.stack([np.arange(n - T, n) + off[b] for b, n in enumerate(lengths)]).astype(np.int32)
    qs = np.ones((B, T), np.int32) if q_seg is None else np.asarray(q_seg, np.int32)
    # Oracle view: logical pages in order, slots past num_pages empty.
    S = max_pages * C
    kd = np.zeros((B, S, K, Hk)); vd = np.zeros((B, S, K, E))
    pd = np.zeros((B, S), np.int32); sd = np.zeros((B, S), np.int32)
    for b in range(B):
        for j in range(pages_needed[b]):
            p = table[b, j]
            sl = slice(j * C, (j + 1) * C)
            kd[b, sl], pd[b, sl], sd[b, sl] = k[p], pos[p], seg[p]
            vd[b, sl] = k[p][..., :E] if mla else v[p]
    return kv, q, qp, qs, (kd, vd, pd, sd)


def oracle(q, qp, qs, dense, *, window=None, softcap=None, sinks=None, scale=None):
    kd, vd, pd, sd = dense
    B, T = qp.shape
    mask = Mask(causal=True, window=window, q_positions=qp, kv_positions=pd, q_segment_ids=qs,
                kv_segment_ids=sd)
    dm = mask_from_definition(mask, B, T, kd.shape[1])
    return reference_attention(q, kd, vd, dense_mask=dm, softcap=softcap, sinks=sinks, scale=scale)


def check(backend, interpret, kv, q, qp, qs, dense, **kw):
    o, lse = decode_attention(jnp.asarray(q), kv, q_positions=jnp.asarray(qp),
                              q_segment_ids=jnp.asarray(qs), backend=backend,
                              interpret=interpret, **kw)
    kw.pop("num_splits", None)
    if kw.get("sinks") is not None:
        kw["sinks"] = np.asarray(kw["sinks"])
    o_ref, lse_ref = oracle(q, qp, qs, dense, **kw)
    assert np.all(np.isfinite(np.asarray(o))), "NaN/inf in o"
    np.testing.assert_allclose(np.asarray(o), o_ref, **TOL)
    np.testing.assert_allclose(np.asarray(lse), lse_ref, **TOL)
    return o, lse


CASES = {
    # name: (B, T, N, K, H, E, C, max_pages, lengths, options)
    "gqa_t1_ragged": (3, 1, 8, 2, 16, 16, 8, 7, [41, 9, 56], {}),
    "mqa_t2_window_sinks": (2, 2, 4, 1, 16, 8, 8, 8, [64, 37], dict(window=(13, 0), sinks=True)),
    "mha_t7_softcap": (2, 7, 4, 4, 8, 8, 16, 4, [50, 23], dict(softcap=2.5)),
    "gqa_t1_many_splits": (1, 1, 6, 2, 16, 16, 8, 9, [70], dict(num_splits=4, window=(20, 0))),
}


@pytest.mark.parametrize("backend,interpret", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_matches_oracle(backend, interpret, case):
    B, T, N, K, H, E, C, maxP, lengths, opt = CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    kv, q, qp, qs, dense = make_paged(rng, B=B, T=T, N=N, K=K, H=H, E=E, C=C, max_pages=maxP,
                                      lengths=lengths)
    kw = dict(window=opt.get("window"), softcap=opt.get("softcap"),
              num_splits=opt.get("num_splits", 3))
    if opt.get("sinks"):
        kw["sinks"] = jnp.asarray(rng.normal(size=N), jnp.float32)
    check(backend, interpret, kv, q, qp, qs, dense, **kw)


@pytest.mark.parametrize("backend,interpret", BACKENDS)
def test_mla_latent_mode(backend, interpret):
    """K = 1 latent holding [c_kv, k_rope] (L = 16, Hr = 8); v = its first L columns."""
    rng = np.random.default_rng(7)
    kv, q, qp, qs, dense = make_paged(rng, B=2, T=2, N=8, K=1, H=24, E=16, C=8, max_pages=6,
                                      lengths=[45, 19], mla=True)
    check(backend, interpret, kv, q, qp, qs, dense, num_splits=2, scale=0.2)


@pytest.mark.parametrize("backend,interpret", BACKENDS)
def test_fully_masked_rows_are_zero(backend, interpret):
    """A padding query (segment 0), a window that reaches no slot, a row with no pages."""
    rng = np.random.default_rng(3)
    kv, q, qp, qs, dense = make_paged(rng, B=3, T=2, N=4, K=2, H=8, E=8, C=8, max_pages=4,
                                      lengths=[20, 30, 9], q_seg=[[0, 1], [1, 1], [1, 1]])
    kv = kv.replace(num_pages=kv.num_pages.at[2].set(0))  # row 2 owns no page at all
    dense[3][2] = 0
    qp = qp.copy()
    qp[1] += 40  # row 1: queries far after its keys; window (5, 0) reaches none of them
    o, lse = check(backend, interpret, kv, q, qp, qs, dense, window=(5, 0), num_splits=2)
    o, lse = np.asarray(o), np.asarray(lse)
    assert np.all(o[0, 0] == 0) and np.all(np.isneginf(lse[0, :, 0]))
    assert np.all(o[1] == 0) and np.all(o[2] == 0) and np.all(np.isneginf(lse[2]))
    # With sinks nothing is empty: lse = sink, o = 0.
    sinks = jnp.asarray(rng.normal(size=4), jnp.float32)
    o, lse = check(backend, interpret, kv, q, qp, qs, dense, window=(5, 0), sinks=sinks,
                   num_splits=2)
    np.testing.assert_allclose(np.asarray(lse)[2], np.broadcast_to(np.asarray(sinks)[:, None],
                                                                   (4, 2)), rtol=1e-6)


@pytest.mark.parametrize("backend,interpret", BACKENDS[1:])
def test_bf16_within_tolerance(backend, interpret):
    rng = np.random.default_rng(11)
    kv, q, qp, qs, dense = make_paged(rng, B=2, T=1, N=8, K=2, H=16, E=16, C=16, max_pages=4,
                                      lengths=[60, 33], poison=False)
    bkv = kv.replace(k=kv.k.astype(jnp.bfloat16), v=kv.v.astype(jnp.bfloat16))
    o, lse = decode_attention(jnp.asarray(q, jnp.bfloat16), bkv, q_positions=jnp.asarray(qp),
                              backend=backend, interpret=interpret, num_splits=2)
    assert o.dtype == jnp.bfloat16
    o_ref, lse_ref = oracle(q, qp, qs, dense)
    np.testing.assert_allclose(np.asarray(o, np.float32), o_ref, rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(np.asarray(lse), lse_ref, rtol=2e-2, atol=2e-2)


def test_live_pages_skip_empty_and_out_of_window():
    pos = jnp.tile(jnp.arange(32), (2, 1))
    seg = jnp.asarray(np.arange(32)[None] < np.array([[30], [5]]), jnp.int32)
    kv = from_dense(jnp.ones((2, 32, 1, 2)), jnp.ones((2, 32, 1, 2)), pos, seg, page_size=8)
    cfg = common.make_cfg((2, 1, 1, 2), kv, causal=True, window=(9, 0), scale=None,
                          softcap=None, num_splits=1)
    pages, count = common.live_pages(kv, jnp.array([[29], [4]]), jnp.ones((2, 1), jnp.int32), cfg)
    # Row 0 sees positions 20..29: pages 2 and 3. Row 1 sees 0..4: page 0 (physical 4).
    assert count.tolist() == [2, 1]
    assert pages[0, :2].tolist() == [2, 3] and pages[1, 0] == 4


# --------------------------------------------------------------------------- op contract
@pytest.mark.parametrize("impl", ["xla_decode", "pallas_decode_tpu_interpret",
                                  "pallas_decode_triton_interpret"])
def test_through_attention_op(impl):
    """The layers' decode call: a dense cache [B, S, K, H] with positions and segments."""
    rng = np.random.default_rng(5)
    B, T, S, N, K, H = 2, 2, 44, 8, 2, 16
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    lengths = np.array([40, 13])
    kp = np.tile(np.arange(S), (B, 1)).astype(np.int32)
    ks = (kp < lengths[:, None]).astype(np.int32)
    qp = np.stack([np.arange(n - T, n) for n in lengths]).astype(np.int32)
    qs = np.ones((B, T), np.int32)
    mask = Mask(causal=True, window=(17, 0), q_positions=jnp.asarray(qp), kv_positions=jnp.asarray(kp),
                q_segment_ids=jnp.asarray(qs), kv_segment_ids=jnp.asarray(ks))
    sinks = jnp.asarray(rng.normal(size=N), jnp.float32)
    o, lse = core.attention(q, k, v, mask=mask, softcap=4.0, sinks=sinks, impl=impl,
                            return_lse=True, self_attention=False)
    dm = mask_from_definition(Mask(causal=True, window=(17, 0), q_positions=qp, kv_positions=kp,
                                   q_segment_ids=qs, kv_segment_ids=ks), B, T, S)
    o_ref, lse_ref = reference_attention(np.asarray(q), np.asarray(k), np.asarray(v),
                                         dense_mask=dm, softcap=4.0, sinks=np.asarray(sinks))
    np.testing.assert_allclose(o, o_ref, **TOL)
    np.testing.assert_allclose(lse, lse_ref, **TOL)
    assert lse.dtype == jnp.float32


def test_registration_and_auto():
    x = jax.ShapeDtypeStruct((2, 1, 8, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((2, 64, 2, 16), jnp.float32)
    for platform in ("cpu", "gpu", "tpu"):
        call = core.make_call(x, kv, kv, mask=Mask(causal=True), platform=platform)
        chosen = core.select_impl(call, "auto").name
        assert "decode" not in chosen  # never run on hardware: not in AUTO_PREFERENCE
    call = core.make_call(x, kv, kv, platform="cpu")
    assert core.get_impl("xla_decode").supports(call) is None
    assert "TPU" in core.get_impl("pallas_decode_tpu").supports(call) or "tpu" in \
        core.get_impl("pallas_decode_tpu").supports(call)
    assert core.get_impl("pallas_decode_tpu_interpret").supports(call) is None
    long_q = jax.ShapeDtypeStruct((2, 40, 8, 16), jnp.float32)
    assert "T=40" in core.get_impl("xla_decode").supports(core.make_call(long_q, kv, kv))
    # The combined name routes prefill to the flash impl, decode to the decode impl.
    assert core.get_impl("xla+decode").supports(core.make_call(long_q, kv, kv)) is None
    with pytest.raises(NotImplementedError, match="bias"):
        core.select_impl(core.make_call(x, kv, kv, bias=jnp.zeros((1, 1, 1, 64))), "xla_decode")


def test_layer_decode_with_decode_impl_matches_forward():
    """MHA (GQA, window, sinks) decoding step by step with impl='xla+decode' equals the
    full forward pass; one step through the TPU kernel in interpret mode agrees too."""
    from attn.mha import MHA, Config, init_cache
    cfg = Config(d_model=32, num_heads=4, num_kv_heads=2, dtype="float32", sinks=True,
                 impl="xla+decode")
    layer = MHA(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 9, 32))
    pos = jnp.tile(jnp.arange(9), (2, 1))
    params = layer.init(jax.random.key(1), x, positions_BT=pos)
    params = jax.tree_util.tree_map(lambda a: a + 0.3 if a.ndim == 1 else a, params)
    y_full, _ = layer.apply(params, x, positions_BT=pos)
    cache = init_cache(cfg, batch=2, max_len=24)
    y, cache = layer.apply(params, x[:, :5], positions_BT=pos[:, :5], cache=cache)  # prefill
    outs = [y]
    for t in range(5, 9):
        y, cache = layer.apply(params, x[:, t:t + 1], positions_BT=pos[:, t:t + 1], cache=cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y_full, rtol=2e-5, atol=2e-5)
    kcfg = cfg.replace(impl="pallas_decode_tpu_interpret", num_kv_heads=2, head_dim=8)
    y_k, _ = MHA(kcfg).apply(params, x[:, 8:9], positions_BT=pos[:, 8:9],
                             cache=_prefilled(layer, params, cfg, x, pos))
    np.testing.assert_allclose(y_k, y_full[:, 8:9], rtol=2e-5, atol=2e-5)


def _prefilled(layer, params, cfg, x, pos):
    from attn.mha import init_cache
    cache = init_cache(cfg, batch=2, max_len=24)
    _, cache = layer.apply(params, x[:, :8], positions_BT=pos[:, :8], cache=cache)
    return cache


def test_bad_input_errors():
    kv = from_dense(jnp.ones((1, 16, 2, 8)), jnp.ones((1, 16, 2, 8)), jnp.arange(16)[None],
                    jnp.ones((1, 16), jnp.int32), page_size=8)
    qp = jnp.array([[3]])
    with pytest.raises(UserError, match="multiple of K"):
        decode_attention(jnp.ones((1, 1, 3, 8)), kv, q_positions=qp)
    with pytest.raises(UserError, match="head dim"):
        decode_attention(jnp.ones((1, 1, 2, 4)), kv, q_positions=qp)
    with pytest.raises(UserError, match="T=17"):
        decode_attention(jnp.ones((1, 17, 2, 8)), kv, q_positions=jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(UserError, match="unknown backend"):
        decode_attention(jnp.ones((1, 1, 2, 8)), kv, q_positions=qp, backend="cuda")
    with pytest.raises(UserError, match="page_size"):
        from_dense(jnp.ones((1, 16, 2, 8)), None, qp, qp, page_size=0)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernels_lower_for_hardware(backend, monkeypatch):
    """bf16 GQA and MLA (576/512) decode lower to Mosaic TPU / Triton IR from this host."""
    from kernels_pallas.decode.tpu import decode_tpu
    from kernels_pallas.decode.triton import decode_triton

    if backend == "tpu":
        try:  # Mosaic asks the default device for its TPU generation: pretend v5e.
            from jax._src.pallas.mosaic import tpu_info
            info = tpu_info._get_tpu_info_impl(tpu_info.ChipVersion.TPU_V5E, 1)
        except (ImportError, AttributeError, TypeError) as e:  # private API moved
            pytest.skip(f"cannot fake a TPU device kind on this JAX: {e}")
        monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind, lambda: info)
        fn, platform, target = decode_tpu, "tpu", "tpu_custom_call"
    else:
        fn, platform, target = decode_triton, "cuda", "triton"
    sds = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
    B, T, P, C, maxP = 4, 2, 64, 64, 16
    for N, K, H, E, mla in ((8, 2, 64, 64, False), (16, 1, 576, 512, True)):
        def f(q, k, v, pos, seg, tab, npg, qp, sinks):
            kv = PagedKV(k=k, v=None if mla else v, positions=pos, segment_ids=seg,
                         page_table=tab, num_pages=npg, value_dim=E if mla else None)
            return fn(q, kv, q_positions=qp, window=(100, 0), softcap=30.0, sinks=sinks,
                      num_splits=4)
        i32 = lambda *s: sds(*s, dt=jnp.int32)
        lowered = jax.jit(f).trace(sds(B, T, N, H), sds(P, C, K, H), sds(P, C, K, E), i32(P, C),
                                   i32(P, C), i32(B, maxP), i32(B), i32(B, T),
                                   sds(N, dt=jnp.float32)).lower(lowering_platforms=(platform,))
        assert target in lowered.as_text()
    from attn.kv_quant import quantize_pages
    for fmt in ("int8", "int4", "fp8"):  # quantized pages, dequantized inside the kernel
        def fq(q, k, v, pos, seg, tab, npg, qp):
            kv = PagedKV(k=k, v=v, positions=pos, segment_ids=seg, page_table=tab, num_pages=npg)
            return fn(q, quantize_pages(kv, fmt), q_positions=qp, num_splits=4)
        lowered = jax.jit(fq).trace(sds(B, 1, 8, 64), sds(P, C, 2, 64), sds(P, C, 2, 64),
                                    i32(P, C), i32(P, C), i32(B, maxP), i32(B), i32(B, 1),
                                    ).lower(lowering_platforms=(platform,))
        assert target in lowered.as_text()
