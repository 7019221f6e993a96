"""Kernel grid: implementation x shape x mask x pass, timed against this run's ceilings.

    python -m benchmarks.kernels            # CPU: the small grid; GPU/TPU: the full grid
    python -m benchmarks.kernels --quick    # smallest grid (CPU, < 1 minute)
    python -m benchmarks.kernels --out-dir /tmp/r --impls xla,jax.nn-xla --masks causal

Every row is one (impl, shape, mask, pass). Nothing is dropped: an implementation that
cannot serve a combination is reported with its ``supports()`` reason, a peer library
that is not importable as "not installed", a Pallas ``*_interpret`` kernel above
``--interpret-max-s`` as skipped (interpret mode runs the kernel body in Python).

FLOP convention (documented once, used everywhere):
  * ``visible`` = number of (batch, head, query, key) pairs the mask lets through,
    counted exactly (``visible_pairs``: an O(T) closed form per query row, checked in
    the tests against ``Mask.materialize``). Masked pairs are never counted, so a causal
    kernel that skips masked blocks is not credited for work it did not do.
  * forward = ``2·visible·(H + E)``: q·kᵀ (2·H per pair) plus p·v (2·E per pair).
  * forward+backward = ``3.5 x forward``: the backward pass is the FlashAttention
    papers' 2.5 x forward (dV, dP, dS·K, dSᵀ·Q plus the recomputed q·kᵀ), so the
    figure compares with ``shared/bench/gpu_anchors.py`` and DESIGN §7.
  * decode (T = 1) uses the forward formula: ``2·B·N·S_visible·(H + E)``, i.e.
    ``4·N·H·S_visible`` per sequence when E = H.
Bytes: forward moves q, k, v in and o out once; forward+backward also reads q, k, v,
o, dO and writes dQ, dK, dV; decode counts the same q, k, v, o (K/V dominate).
Ceilings (matmul TFLOP/s, copy GB/s) are measured in the same process, in the same
dtype, just before the grid; ``%mm`` and ``%bw`` are relative to them.
Correctness: ``max_rel_err`` = max|out - ref| / max|ref| against ``attn.core``'s
``xla`` implementation in float32 (the forward output, or dQ/dK/dV for forward+backward).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attn import core
from attn.masks import Mask
from benchmarks import report

try:  # the Pallas kernels register themselves with attn.core on import
    import kernels_pallas.flash.register  # noqa: F401
except ImportError as e:  # pragma: no cover -- reported, never silent
    print(f"kernels_pallas not importable ({e}); its impls are absent from the grid", file=sys.stderr)

FWD_BWD_FACTOR = 3.5  # see the module docstring


# --------------------------------------------------------------------------- shapes
@dataclasses.dataclass(frozen=True)
class Shape:
    """One problem size; decode shapes have ``T = 1`` and the query at position S-1."""

    name: str
    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    E: int

    @property
    def is_decode(self) -> bool:
        return self.T == 1


SHAPES: dict[str, tuple[Shape, ...]] = {
    "quick": (
        Shape("tiny", 1, 64, 64, 2, 1, 32, 32),
        Shape("mha-256", 1, 256, 256, 4, 4, 64, 64),
        Shape("decode-1k", 2, 1, 1024, 8, 2, 64, 64),
    ),
    "cpu": (
        Shape("tiny", 1, 64, 64, 2, 1, 32, 32),
        Shape("mha-512", 1, 512, 512, 4, 4, 64, 64),
        Shape("gqa-512", 1, 512, 512, 8, 2, 64, 64),
        Shape("mla-512", 1, 512, 512, 4, 4, 96, 64),
        Shape("decode-2k", 2, 1, 2048, 8, 2, 64, 64),
    ),
    # DESIGN §7's shapes, so GPU rows line up with the reference table.
    "gpu": (
        Shape("mha-4k", 4, 4096, 4096, 32, 32, 128, 128),
        Shape("gqa-4k", 4, 4096, 4096, 32, 8, 128, 128),
        Shape("mla-8k", 2, 8192, 8192, 16, 16, 192, 128),
        Shape("decode-32k", 8, 1, 32768, 32, 8, 128, 128),
    ),
}
SHAPES["tpu"] = SHAPES["gpu"]


# --------------------------------------------------------------------------- masks
# Each builder: (shape) -> Mask. Decode queries sit at position S-1, so causality and
# windows are evaluated on positions (DESIGN §3), never on array indices.
WINDOW = 128
DOC_LEN = 96  # documents of this length, the last one truncated
BLOCK = 16    # block-sparse granularity; a multiple of every kernel's minimum block


def _q_positions(s: Shape):
    if s.is_decode:
        return jnp.full((s.B, 1), s.S - 1, jnp.int32)
    return None


def _doc_ids(length: int) -> np.ndarray:
    return (np.arange(length) // DOC_LEN + 1).astype(np.int32)


def _documents(s: Shape) -> Mask:
    kv = _doc_ids(s.S)
    q = kv[-1:] if s.is_decode else _doc_ids(s.T)
    return Mask(causal=True, q_positions=_q_positions(s),
                q_segment_ids=jnp.broadcast_to(jnp.asarray(q), (s.B, s.T)),
                kv_segment_ids=jnp.broadcast_to(jnp.asarray(kv), (s.B, s.S)))


def _block_pattern(s: Shape) -> np.ndarray:
    """Deterministic ~50% block pattern, per head (head h keeps blocks with (i+j+h) % 2 == 0
    plus the diagonal), so per-head sparsity is exercised."""
    nq, nk = -(-s.T // BLOCK), -(-s.S // BLOCK)
    i, j, h = np.arange(nq)[None, :, None], np.arange(nk)[None, None, :], np.arange(s.N)[:, None, None]
    return ((i + j + h) % 2 == 0) | (i == j)


def _block_sparse(s: Shape) -> Mask:
    return Mask(q_positions=_q_positions(s), block_mask=jnp.asarray(_block_pattern(s)),
                block_size=(BLOCK, BLOCK))


MASKS: dict[str, Callable[[Shape], Mask]] = {
    "full": lambda s: Mask(q_positions=_q_positions(s)),
    "causal": lambda s: Mask(causal=True, q_positions=_q_positions(s)),
    "window": lambda s: Mask(causal=True, window=(WINDOW, 0), q_positions=_q_positions(s)),
    "documents": _documents,
    "block_sparse": _block_sparse,
}


def _rows_visible_causal_window(q_pos: np.ndarray, S: int, left: int | None) -> int:
    """Sum over query rows of |{k : max(0, p-left) <= k <= min(p, S-1)}|: O(T), exact."""
    hi = np.minimum(q_pos, S - 1)
    lo = np.zeros_like(q_pos) if left is None else np.maximum(0, q_pos - left)
    return int(np.maximum(hi - lo + 1, 0).sum())


def _visible_documents(s: Shape) -> int:
    kv = _doc_ids(s.S)
    q_pos = np.array([s.S - 1]) if s.is_decode else np.arange(s.T)
    starts = (kv[np.minimum(q_pos, s.S - 1)] - 1) * DOC_LEN  # first position of the query's doc
    return int((q_pos - starts + 1).sum()) * s.B * s.N


def _visible_block_sparse(s: Shape) -> int:
    bm = _block_pattern(s)
    rows = np.array([s.S - 1]) if s.is_decode else np.arange(s.T)  # the query's array index is its row
    # Row r of block row r // BLOCK sees every key of each kept key-block (last block may be short).
    widths = np.minimum(BLOCK, s.S - np.arange(bm.shape[2]) * BLOCK)
    per_block_row = (bm * widths[None, None, :]).sum(-1)  # [N, nq]
    q_blk = np.zeros_like(rows) if s.is_decode else rows // BLOCK
    return int(per_block_row[:, q_blk].sum()) * s.B


def _qpos_np(s: Shape) -> np.ndarray:
    return np.array([s.S - 1]) if s.is_decode else np.arange(s.T)


VISIBLE: dict[str, Callable[[Shape], int]] = {
    "full": lambda s: s.B * s.N * s.T * s.S,
    "causal": lambda s: s.B * s.N * _rows_visible_causal_window(_qpos_np(s), s.S, None),
    "window": lambda s: s.B * s.N * _rows_visible_causal_window(_qpos_np(s), s.S, WINDOW),
    "documents": _visible_documents,
    "block_sparse": _visible_block_sparse,
}


def visible_pairs(mask_name: str, s: Shape) -> int:
    """Exact count of visible (b, n, t, s) pairs of ``MASKS[mask_name](s)``, closed form.

    Example:
      >>> visible_pairs("causal", Shape("t", 1, 4, 4, 1, 1, 8, 8))
      10
    """
    return VISIBLE[mask_name](s)


def visible_pairs_materialized(mask: Mask, s: Shape) -> int:
    """The same count from ``Mask.materialize`` (O(T·S) memory: small shapes only).

    Example:
      >>> s = Shape("t", 1, 4, 4, 1, 1, 8, 8)
      >>> visible_pairs_materialized(MASKS["causal"](s), s)
      10
    """
    m = np.asarray(mask.materialize(s.B, s.T, s.S))
    return int(m.sum()) * (s.N if m.shape[1] == 1 else 1)


def attention_flops(mask_name: str, s: Shape) -> int:
    """Forward FLOPs counting only visible pairs: ``2·visible·(H + E)``."""
    return 2 * visible_pairs(mask_name, s) * (s.H + s.E)


# --------------------------------------------------------------------------- impls
@dataclasses.dataclass(frozen=True)
class Runner:
    """How to call one implementation: ``fn(q, k, v, mask) -> o``; ``supports(call, mask_name)``
    returns None or the reason; ``load()`` raises ImportError when the library is missing."""

    fn: Callable
    supports: Callable
    load: Callable[[], None] = lambda: None


def _registered(name: str) -> Runner:
    def fn(q, k, v, mask):
        return core.attention(q, k, v, mask=mask, impl=name)

    return Runner(fn, lambda call, mask_name: core.get_impl(name).supports(call))


def _jax_nn_supports(call: core.AttentionCall, mask_name: str, impl: str) -> str | None:
    if mask_name not in ("full", "causal", "window"):
        return f"jax.nn.dot_product_attention cannot express a {mask_name} mask"
    if call.q_len == 1 and mask_name != "full":
        return "jax.nn masks are index-based; a decode query at position S-1 is not expressible"
    if call.head_dim != call.value_dim:
        return f"jax.nn needs E == H (got H={call.head_dim}, E={call.value_dim})"
    if impl == "cudnn":
        if call.platform != "gpu":
            return f"cuDNN needs an NVIDIA GPU (platform is {call.platform})"
        if call.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"cuDNN takes bf16/fp16, got {call.dtype}"
    return None


def _jax_nn(impl: str) -> Runner:
    def fn(q, k, v, mask):
        window = None if mask.window is None else (mask.window[0], 0)
        return jax.nn.dot_product_attention(q, k, v, is_causal=mask.causal,
                                            local_window_size=window, implementation=impl)

    return Runner(fn, lambda call, m: _jax_nn_supports(call, m, impl))


def _tokamax() -> Runner:
    def fn(q, k, v, mask):
        import tokamax
        return tokamax.dot_product_attention(q, k, v, is_causal=mask.causal)

    def supports(call, mask_name):
        if mask_name not in ("full", "causal") or call.q_len == 1 and mask_name != "full":
            return f"this harness drives tokamax with full/causal masks only, not {mask_name}"
        return None if call.platform == "gpu" else f"tokamax kernels need a GPU (platform is {call.platform})"

    return Runner(fn, supports, load=lambda: importlib.import_module("tokamax"))


def _pallas_triton_mha() -> Runner:
    def fn(q, k, v, mask):
        from jax.experimental.pallas.ops.gpu import attention as plattn
        return plattn.mha(q, k, v, segment_ids=None, causal=mask.causal, sm_scale=q.shape[-1] ** -0.5)

    def supports(call, mask_name):
        if mask_name not in ("full", "causal") or call.q_len == 1:
            return f"jax's Pallas mha example is driven with full/causal prefill only, not {mask_name}"
        if call.num_heads != call.num_kv_heads or call.head_dim != call.value_dim:
            return "jax's Pallas mha example needs N == K and E == H"
        return None if call.platform == "gpu" else f"needs a GPU (platform is {call.platform})"

    return Runner(fn, supports,
                  load=lambda: importlib.import_module("jax.experimental.pallas.ops.gpu.attention"))


PEERS: dict[str, Callable[[], Runner]] = {
    "jax.nn-xla": lambda: _jax_nn("xla"),
    "jax.nn-cudnn": lambda: _jax_nn("cudnn"),
    "tokamax": _tokamax,
    "jax-pallas-triton-mha": _pallas_triton_mha,
}


def all_runners() -> dict[str, Runner]:
    """Every registered ``attn.core`` impl plus every peer (importable or not)."""
    runners = {name: _registered(name) for name in core.registered_impls()}
    runners.update({name: make() for name, make in PEERS.items()})
    return runners


# --------------------------------------------------------------------------- passes
def _fwd(fn):
    return jax.jit(lambda q, k, v, do, mask: fn(q, k, v, mask))


def _fwd_bwd(fn):
    def loss(q, k, v, do, mask):
        return jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * do.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _bytes_fwd(s: Shape, itemsize: int) -> int:
    q, kv, o = s.B * s.T * s.N * s.H, s.B * s.S * s.K * (s.H + s.E), s.B * s.T * s.N * s.E
    return (q + kv + o) * itemsize


def _bytes_fwd_bwd(s: Shape, itemsize: int) -> int:
    q, kv, o = s.B * s.T * s.N * s.H, s.B * s.S * s.K * (s.H + s.E), s.B * s.T * s.N * s.E
    # forward (q,k,v,o) + backward reads (q,k,v,o,dO) + writes (dQ,dK,dV)
    return ((q + kv + o) + (q + kv + 2 * o) + (q + kv)) * itemsize


@dataclasses.dataclass(frozen=True)
class Pass:
    build: Callable  # fn -> jitted (q, k, v, do, mask) -> output(s)
    flops_factor: float
    bytes_fn: Callable[[Shape, int], int]
    decode: bool  # runs on decode shapes (and only there)


PASSES: dict[str, Pass] = {
    "fwd": Pass(_fwd, 1.0, _bytes_fwd, False),
    "fwd_bwd": Pass(_fwd_bwd, FWD_BWD_FACTOR, _bytes_fwd_bwd, False),
    "decode": Pass(_fwd, 1.0, _bytes_fwd, True),
}


def _max_rel_err(out, ref) -> float:
    outs, refs = jax.tree.leaves(out), jax.tree.leaves(ref)
    errs = [float(jnp.max(jnp.abs(o.astype(jnp.float32) - r)) / max(float(jnp.max(jnp.abs(r))), 1e-30))
            for o, r in zip(outs, refs)]
    return max(errs)


# --------------------------------------------------------------------------- grid
def run_grid(shapes, impls, masks, passes, *, dtype, reps: int, interpret_max_s: int,
             ceil: dict, log=print) -> list[dict]:
    """Run every (impl, shape, mask, pass) and return one row each (see module docstring).

    Args:
      shapes: ``Shape`` tuple; impls: runner names (``all_runners()`` keys);
      masks: ``MASKS`` keys; passes: ``PASSES`` keys; dtype: compute dtype;
      reps: timed repetitions (median reported); interpret_max_s: largest S at which
      ``*_interpret`` impls run; ceil: ``report.ceilings()`` of this run.

    Example:
      >>> rows = run_grid(SHAPES["quick"][:1], ["xla"], ["causal"], ["fwd"], dtype=jnp.float32,
      ...                 reps=1, interpret_max_s=0, ceil={"matmul_tflops": 1, "copy_gbs": 1},
      ...                 log=lambda *a: None)
      >>> rows[0]["status"]
      'ok'
    """
    runners = all_runners()
    unknown = sorted(set(impls) - set(runners))
    if unknown:
        raise ValueError(f"unknown impl(s) {unknown}; known: {sorted(runners)}")
    rows = []
    itemsize = jnp.dtype(dtype).itemsize
    for s in shapes:
        keys = jax.random.split(jax.random.key(s.B * 131 + s.S), 4)
        q = jax.random.normal(keys[0], (s.B, s.T, s.N, s.H), jnp.float32)
        k = jax.random.normal(keys[1], (s.B, s.S, s.K, s.H), jnp.float32)
        v = jax.random.normal(keys[2], (s.B, s.S, s.K, s.E), jnp.float32)
        do = jax.random.normal(keys[3], (s.B, s.T, s.N, s.E), jnp.float32)
        args = tuple(x.astype(dtype) for x in (q, k, v, do))
        for mask_name in masks:
            mask = MASKS[mask_name](s)
            call = core.make_call(*args[:3], mask=mask)
            for pass_name in passes:
                p = PASSES[pass_name]
                if p.decode != s.is_decode:
                    continue  # a shape is either a decode shape or a prefill shape
                refs = {}
                for impl in impls:
                    row = dict(impl=impl, shape=s.name, B=s.B, T=s.T, S=s.S, N=s.N, K=s.K, H=s.H,
                               E=s.E, mask=mask_name, pass_=pass_name, dtype=jnp.dtype(dtype).name)
                    row.update(_run_one(runners[impl], impl, s, mask, mask_name, call, p, args,
                                        (q, k, v, do), refs, itemsize, reps, interpret_max_s, ceil))
                    rows.append(row)
                    log(_one_line(row))
    return rows


def _run_one(r: Runner, impl, s, mask, mask_name, call, p: Pass, args, args32, refs,
             itemsize, reps, interpret_max_s, ceil) -> dict:
    """Status + numbers of one cell; exceptions become an ``error`` status with the message."""
    try:
        r.load()
    except ImportError as e:
        return dict(status="not installed", reason=str(e)[:160])
    reason = r.supports(call, mask_name)
    if reason is not None:
        return dict(status="unsupported", reason=reason)
    if impl.endswith("_interpret") and s.S > interpret_max_s:
        return dict(status="skipped", reason=f"interpret mode is Python-speed; runs only at S <= "
                                              f"{interpret_max_s} (--interpret-max-s)")
    try:
        f = p.build(r.fn)
        out = f(*args, mask)
        if "ref" not in refs:  # one float32 xla reference per (shape, mask, pass)
            refs["ref"] = p.build(_registered("xla").fn)(*args32, mask)
        err = _max_rel_err(out, refs["ref"])
        t = report.bench(f, *args, mask, reps=reps, warmup=1)
    except Exception as e:  # noqa: BLE001 -- a failing cell is a result, not a crash
        traceback.print_exc(limit=2)
        return dict(status="error", reason=f"{type(e).__name__}: {str(e)[:200]}")
    flops = attention_flops(mask_name, s) * p.flops_factor
    nbytes = p.bytes_fn(s, itemsize)
    tflops, gbs = flops / t / 1e12, nbytes / t / 1e9
    return dict(status="ok", ms=t * 1e3, tflops=tflops, gbs=gbs,
                pct_matmul=100 * tflops / ceil["matmul_tflops"], pct_bw=100 * gbs / ceil["copy_gbs"],
                max_rel_err=err, visible_frac=visible_pairs(mask_name, s) / (s.B * s.N * s.T * s.S))


def _one_line(r: dict) -> str:
    head = f"{r['impl']:22s} {r['shape']:10s} {r['mask']:12s} {r['pass_']:8s} {r['status']:13s}"
    if r["status"] == "ok":
        return head + f" {r['ms']:9.3f} ms {r['tflops']:8.4f} TF/s {r['gbs']:7.2f} GB/s err {r['max_rel_err']:.1e}"
    return head + " " + r.get("reason", "")[:90]


COLUMNS = ["impl", "shape", "mask", "pass_", "status", "ms", "tflops", "pct_matmul", "gbs", "pct_bw",
           "max_rel_err", "visible_frac", "reason"]


def main(argv=None) -> list[str]:
    """CLI entry; returns the written report paths."""
    platform = jax.default_backend()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the smallest grid")
    ap.add_argument("--grid", choices=sorted(SHAPES), default=None,
                    help=f"shape set (default: 'quick' with --quick, else '{platform}')")
    ap.add_argument("--impls", default=None, help="comma list (default: every registered impl and peer)")
    ap.add_argument("--masks", default=",".join(MASKS))
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 elsewhere")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    ap.add_argument("--interpret-max-s", type=int, default=64)
    ap.add_argument("--out-dir", default=report.DEFAULT_DIR)
    ap.add_argument("--stem", default=None, help="file stem (default <device>-<date>)")
    a = ap.parse_args(argv)
    # Default: the platform's own grid (DESIGN §7 shapes on GPU/TPU), the small one on CPU.
    grid = a.grid or ("quick" if a.quick else platform if platform in SHAPES else "cpu")
    dtype = jnp.dtype(a.dtype or ("float32" if platform == "cpu" else "bfloat16"))
    reps = a.reps or (3 if platform == "cpu" else 20)
    impls = a.impls.split(",") if a.impls else list(all_runners())
    for name, opts in (("masks", MASKS), ("passes", PASSES)):
        bad = sorted(set(getattr(a, name).split(",")) - set(opts))
        if bad:
            ap.error(f"unknown {name} {bad}; choose from {sorted(opts)}")
    ceil = (report.ceilings(dtype=dtype) if platform == "cpu"
            else report.ceilings(matmul_n=8192, copy_mib=2048, dtype=dtype, reps=10))
    print(f"ceilings: {ceil}")
    rows = run_grid(SHAPES[grid], impls, a.masks.split(","), a.passes.split(","), dtype=dtype,
                    reps=reps, interpret_max_s=a.interpret_max_s, ceil=ceil)
    meta = dict(title=f"attnlab kernel grid ({grid}) on {report.device_name()}", grid=grid,
                dtype=dtype.name, reps=reps, ceilings=ceil,
                flops="fwd = 2·visible·(H+E) over exactly-counted visible pairs; fwd_bwd = 3.5 x fwd "
                      "(bwd = 2.5 x fwd, FlashAttention convention); decode = fwd at T=1",
                bytes="fwd/decode: q,k,v,o; fwd_bwd: + q,k,v,o,dO read and dQ,dK,dV written "
                      "(on CPU, %bw exceeds 100 when the working set fits in cache: the copy "
                      "ceiling streams a 64 MiB array)",
                error="max|out-ref|/max|ref| vs attn.core xla in float32 (fwd: o; fwd_bwd: dQ,dK,dV)")
    stem = a.stem or f"{report.device_name()}-{report.today()}"
    paths = report.write(a.out_dir, stem, meta, rows, columns=COLUMNS)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{len(rows)} rows ({ok} timed) -> {paths}")
    return paths


if __name__ == "__main__":
    main()
