"""Shared random attention cases with awkward shapes, for every implementation's tests.

``CASES`` names a shape plus mask features; ``make_case(name, dtype)`` returns the
inputs, the ``Mask``, the keyword options and the dense mask the oracle needs.
Inputs are random normals, never zeros; shapes are awkward (T = 1, 63, 100; H = 72;
N != K; E != H).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from attn.masks import Mask
from tests.oracle import mask_from_definition


@dataclasses.dataclass(frozen=True)
class Spec:
    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    E: int
    causal: bool = False
    window: tuple | None = None
    segments: bool = False
    offset: bool = False      # decode-style: queries sit at the end of the keys
    softcap: float | None = None
    sinks: bool = False
    bias: tuple | None = None  # bias shape (broadcastable to [B,N,T,S])


CASES: dict[str, Spec] = {
    "full": Spec(2, 63, 63, 4, 2, 72, 40),
    "causal": Spec(2, 100, 100, 6, 3, 72, 72, causal=True),
    "window": Spec(1, 100, 100, 4, 1, 72, 48, window=(17, 5)),
    "causal_window": Spec(2, 63, 63, 6, 2, 72, 40, causal=True, window=(9, None)),
    "segments": Spec(2, 100, 100, 4, 2, 72, 40, causal=True, segments=True),
    "decode_t1": Spec(3, 1, 63, 8, 2, 72, 40, causal=True, offset=True),
    "offset_chunk": Spec(2, 37, 100, 4, 4, 72, 72, causal=True, window=(40, 0), offset=True),
    "softcap_sinks": Spec(2, 63, 100, 6, 2, 72, 40, softcap=5.0, sinks=True),
    "bias": Spec(2, 63, 37, 4, 2, 16, 24, bias=(1, 4, 63, 37)),
    "bias_causal_sinks": Spec(1, 100, 100, 2, 1, 72, 40, causal=True, sinks=True, softcap=3.0,
                              bias=(1, 1, 1, 100)),
}


def _segments(rng, B, L, pad_tail):
    """Packed documents of random lengths, with 0 (padding) at the tail of some rows."""
    out = np.zeros((B, L), np.int32)
    for b in range(B):
        pos, seg = 0, 1
        end = L - (pad_tail if b % 2 == 0 else 0)
        while pos < end:
            n = int(rng.integers(1, max(2, L // 3)))
            out[b, pos:min(end, pos + n)] = seg
            pos += n
            seg += 1
    return out


def make_case(name: str, dtype=jnp.float32, seed: int = 0) -> dict:
    """Inputs for case ``name``: q, k, v, mask, kwargs (scale/softcap/sinks/bias), dense."""
    sp = CASES[name]
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (sp.B, sp.T, sp.N, sp.H), dtype)
    k = jax.random.normal(keys[1], (sp.B, sp.S, sp.K, sp.H), dtype)
    v = jax.random.normal(keys[2], (sp.B, sp.S, sp.K, sp.E), dtype)
    mask_kw = dict(causal=sp.causal, window=sp.window)
    if sp.offset:
        mask_kw["q_positions"] = jnp.broadcast_to(
            jnp.arange(sp.T, dtype=jnp.int32) + (sp.S - sp.T), (sp.B, sp.T))
    if sp.segments:
        rng = np.random.default_rng(seed)
        seg = jnp.asarray(_segments(rng, sp.B, sp.T, pad_tail=7))
        mask_kw["q_segment_ids"] = seg
        mask_kw["kv_segment_ids"] = seg
    mask = Mask(**mask_kw)
    kw = dict(softcap=sp.softcap)
    if sp.sinks:
        kw["sinks"] = jax.random.normal(keys[3], (sp.N,), jnp.float32)
    if sp.bias is not None:
        kw["bias"] = jax.random.normal(keys[4], sp.bias, jnp.float32)
    # The oracle's mask comes from the Mask's definition, not from Mask.materialize
    # (the code under test).
    dense = mask_from_definition(mask, sp.B, sp.T, sp.S, sp.N)
    return dict(spec=sp, q=q, k=k, v=v, mask=mask, kwargs=kw, dense=dense,
                do=jax.random.normal(keys[5], (sp.B, sp.T, sp.N, sp.E), jnp.float32))


def oracle_kwargs(case: dict) -> dict:
    """The case's options in the form ``tests.oracle`` takes (numpy, float64)."""
    kw = case["kwargs"]
    return dict(dense_mask=case["dense"], softcap=kw.get("softcap"),
                sinks=None if kw.get("sinks") is None else np.asarray(kw["sinks"]),
                bias=None if kw.get("bias") is None else np.asarray(kw["bias"]))
