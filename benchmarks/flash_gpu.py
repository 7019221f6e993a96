"""Flash attention on one GPU, side by side: attnlab's ``pallas_gpu`` against its peers.

    python -m benchmarks.flash_gpu --list                 # the selected cases; runs anywhere
    python -m benchmarks.flash_gpu --quick                # DESIGN §7 shapes + a window and a documents case
    python -m benchmarks.flash_gpu --cases s4k-h128 --tag s4k-h128
    python -m benchmarks.flash_gpu --cases 'mha-*-causal,mla' --peers attnlab,cudnn,tokamax-mosaic
    python -m benchmarks.flash_gpu --out-dir $OUT         # on the device machine (see below)

Every case is timed for every implementation in the same process, on the same inputs:

* ``attnlab``: ``attention(..., impl="pallas_gpu")``; the ``kernel`` column says which
  kernel ``register.resolve_gpu_kernel`` picked (``mosaic`` on sm90, else ``triton``);
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``;
* ``tokamax-mosaic``, ``tokamax-triton``: ``tokamax.dot_product_attention`` (optional:
  "not installed" when it does not import);
* ``pallas-mha``: ``jax.experimental.pallas.ops.gpu.attention.mha`` (Triton);
* ``xla``: ``attention(..., impl="xla")`` (dense logits; skipped above 8 GiB of them).

A peer that cannot express a case is recorded as "unsupported" with the reason, a cell
that raises as "error" with the exception text: no cell aborts the run. ``jax.nn`` and
tokamax have no segment-id argument, so they get documents as a dense ``[B, 1, T, S]``
boolean mask (their only public way; the ``note`` column says so).

Cases (bf16): MHA N32 and GQA N32/K8 at B4 S4k and B1 S16k, H ∈ {64, 128}, each with
the masks full, causal, window (causal, 1024 keys back) and documents (causal within
packed documents of random length 512-4096); plus MLA qk192/v128 causal at B2 N16 S8k.
Passes: ``fwd`` and ``fwd_bwd`` (grad of sum(o · dO) w.r.t. q, k, v, fixed random dO).

Numbers:
* ``ms``: median of ``--reps`` calls after ``--warmup`` (``report.bench``: every call
  blocks until ready, and the first call, which compiles, is never timed).
* ``tflops``: FLOPs over visible (unmasked) pairs only, counted exactly per query row
  (``visible_pairs``): forward ``2·visible·(H + E)``, forward+backward 3.5 x that
  (``benchmarks.kernels``' convention, the one DESIGN §7 and
  ``shared/bench/gpu_anchors.py`` use).
* ``pct_mm``: percent of a bf16 8192³ matmul timed at the start of the same run.
* ``rel_err``: ‖out − ref‖ / ‖ref‖ against ``impl="xla_chunked"`` on float32 copies of
  the same inputs, at "highest" matmul precision (by default XLA may run float32 dots
  on a GPU as TF32), computed in the same run; for ``fwd_bwd`` the largest of dQ, dK,
  dV. The chunked reference serves every case because dense float32 logits do not fit
  at S16k. A cell above ``ERR_TOL`` is "inaccurate" and never counts as the fastest.

Output: ``<out-dir>/flash-gpu-<device>-<date>[-quick][-<tag>].{json,md}``, rewritten
after every case so a run cut short keeps what it measured. The markdown ends with
attnlab's speedup over the best peer of this run and the DESIGN §7 figures beside it.

Device time: the device tool allows 10 minutes per command, less than the full grid
(about 400 cells) takes, so split it by ``--cases`` and ``--tag``, e.g. ``s4k-h128``,
``s4k-h64``, ``s16k-h128``, ``s16k-h64``, ``mla``. tokamax comes from carried wheels
and an ``xprof`` stub on ``PYTHONPATH`` (``shared/GPU.md``). A kernel that hangs hangs
the run: the device tool's time limit is the only guard.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import importlib
import importlib.metadata
import sys
import traceback
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from attn import core
from attn.masks import Mask
from benchmarks import kernels, report
from kernels_pallas.flash import register

WINDOW = 1024               # keys back from the query (Mask.window left side; causal)
DOC_LENGTHS = (512, 4096)   # documents' random length range, inclusive
MASKS = ("full", "causal", "window", "documents")
PASSES = ("fwd", "fwd_bwd")
XLA_MAX_LOGITS_BYTES = 8 << 30  # dense float32 logits above this: xla is skipped (OOM, and minutes)
ERR_TOL = 5e-2              # bf16 lands at 1e-3..1e-2; far above means a wrong result
REASON_CHARS = 300
DENSE_NOTE = "documents as a dense [B,1,T,S] bool mask (no segment-id API)"

# DESIGN §7 (H100, bf16, JAX 0.11.2), TFLOP/s by case name, pass and peer.
DESIGN_TARGETS: dict[tuple[str, str], dict[str, float]] = {
    ("mha-b4-s4k-h128-full", "fwd"): {"cudnn": 560, "tokamax-mosaic": 604, "pallas-mha": 380, "xla": 112},
    ("mha-b4-s4k-h128-causal", "fwd"): {"cudnn": 480, "tokamax-mosaic": 521, "pallas-mha": 316, "xla": 41},
    ("mha-b4-s4k-h128-full", "fwd_bwd"): {"cudnn": 529, "tokamax-mosaic": 488, "pallas-mha": 125},
    ("mha-b4-s4k-h128-causal", "fwd_bwd"): {"cudnn": 446, "tokamax-mosaic": 436, "pallas-mha": 132},
    ("gqa-b4-s4k-h128-causal", "fwd"): {"cudnn": 469, "tokamax-mosaic": 460},
    ("gqa-b4-s4k-h128-causal", "fwd_bwd"): {"cudnn": 431, "tokamax-mosaic": 429},
    ("mla-b2-s8k-qk192-v128-causal", "fwd"): {"tokamax-mosaic": 578},
    ("mla-b2-s8k-qk192-v128-causal", "fwd_bwd"): {"tokamax-mosaic": 422},
}


# --------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One shape with one mask (self-attention: T == S)."""

    shape: kernels.Shape
    mask: str

    @property
    def name(self) -> str:
        return f"{self.shape.name}-{self.mask}"


def all_cases() -> list[Case]:
    """The full grid, in run order (the 4k shapes first: they carry the §7 targets).

    Example:
      >>> [c.name for c in all_cases()][:2]
      ['mha-b4-s4k-h128-full', 'mha-b4-s4k-h128-causal']
    """
    cases = []
    for B, S in ((4, 4096), (1, 16384)):
        for kind, K in (("mha", 32), ("gqa", 8)):
            for H in (128, 64):
                s = kernels.Shape(f"{kind}-b{B}-s{S // 1024}k-h{H}", B, S, S, 32, K, H, H)
                cases += [Case(s, m) for m in MASKS]
    cases.append(Case(kernels.Shape("mla-b2-s8k-qk192-v128", 2, 8192, 8192, 16, 16, 192, 128), "causal"))
    return cases


QUICK = ("mha-b4-s4k-h128-full", "mha-b4-s4k-h128-causal", "gqa-b4-s4k-h128-causal",
         "mla-b2-s8k-qk192-v128-causal", "gqa-b4-s4k-h128-window", "gqa-b4-s4k-h128-documents")


def select_cases(patterns: str | None, quick: bool = False) -> list[Case]:
    """Cases whose name contains any comma-separated ``patterns`` (shell wildcards allowed).

    Example:
      >>> [c.name for c in select_cases("mla")]
      ['mla-b2-s8k-qk192-v128-causal']
    """
    cases = [c for c in all_cases() if not quick or c.name in QUICK]
    if patterns:
        pats = [p.strip() for p in patterns.split(",") if p.strip()]
        cases = [c for c in cases if any(fnmatch.fnmatchcase(c.name, f"*{p}*") for p in pats)]
    return cases


def document_ids(B: int, S: int, *, lengths=DOC_LENGTHS, seed: int = 0) -> np.ndarray:
    """``[B, S]`` int32 segment ids 1, 2, ...: documents of uniform random length in
    ``lengths`` (inclusive), packed back to back, the last one cut at S. Deterministic.

    Example:
      >>> document_ids(1, 10, lengths=(4, 4)).tolist()
      [[1, 1, 1, 1, 2, 2, 2, 2, 3, 3]]
    """
    rng = np.random.default_rng(seed)
    ids = np.empty((B, S), np.int32)
    for b in range(B):
        start, doc = 0, 1
        while start < S:
            n = int(rng.integers(lengths[0], lengths[1] + 1))
            ids[b, start:start + n] = doc
            start, doc = start + n, doc + 1
    return ids


def make_mask(mask_name: str, s: kernels.Shape, *, window: int = WINDOW, doc_lengths=DOC_LENGTHS) -> Mask:
    """The ``attn.masks.Mask`` of a case; ``window`` / ``doc_lengths`` shrink it for tests."""
    if mask_name == "full":
        return Mask()
    if mask_name == "causal":
        return Mask(causal=True)
    if mask_name == "window":
        return Mask(causal=True, window=(window, 0))
    if mask_name == "documents":
        seg = jnp.asarray(document_ids(s.B, s.S, lengths=doc_lengths))
        return Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    raise ValueError(f"unknown mask {mask_name!r}; choose from {MASKS}")


# --------------------------------------------------------------------------- FLOPs
def _run_bounds(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of the run of equal ids holding each position (``[B, S]`` each)."""
    B, S = seg.shape
    idx = np.broadcast_to(np.arange(S), (B, S))
    starts = np.ones((B, S), bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    ends = np.ones((B, S), bool)
    ends[:, :-1] = starts[:, 1:]
    if any(starts[b].sum() != np.unique(seg[b]).size for b in range(B)):
        raise ValueError("visible_pairs needs each segment id to be one contiguous run (packed documents)")
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, idx, S - 1)[:, ::-1], axis=1)[:, ::-1]
    return first, last


def visible_pairs(mask: Mask, s: kernels.Shape) -> int:
    """Exact number of visible ``(b, n, t, s)`` pairs of a self-attention ``mask``, O(B·T).

    Every query row sees one contiguous run of keys: ``[0, S-1]`` cut by causality, the
    window and the row's document, so its count is that interval's length; no ``[T, S]``
    array is ever built, which keeps S16k cheap. Positions must be the defaults.

    Example:
      >>> visible_pairs(Mask(causal=True, window=(1, 0)), kernels.Shape("t", 1, 4, 4, 2, 2, 8, 8))
      14
    """
    for field in ("q_positions", "kv_positions", "q_extra_range", "block_mask", "dense"):
        if getattr(mask, field, None) is not None:
            raise ValueError(f"visible_pairs counts causal/window/segment masks only, not {field}")
    if s.T != s.S:
        raise ValueError(f"visible_pairs is for self-attention (T={s.T} != S={s.S})")
    t = np.arange(s.T)[None, :]
    lo, hi = np.zeros_like(t), np.full_like(t, s.S - 1)
    if mask.causal:
        hi = np.minimum(hi, t)
    left, right = mask.window or (None, None)
    if left is not None:
        lo = np.maximum(lo, t - left)
    if right is not None:
        hi = np.minimum(hi, t + right)
    live = np.ones_like(t, bool)
    if mask.has_segments:
        seg = np.asarray(mask.kv_segment_ids)
        if not np.array_equal(np.asarray(mask.q_segment_ids), seg):
            raise ValueError("visible_pairs needs the same segment ids for queries and keys")
        first, last = _run_bounds(seg)
        lo, hi, live = np.maximum(lo, first), np.minimum(hi, last), seg != 0  # 0 = padding
    per_row = np.where(live, np.maximum(hi - lo + 1, 0), 0)
    return int(np.broadcast_to(per_row, (s.B, s.T)).sum()) * s.N


def attention_flops(mask: Mask, s: kernels.Shape, pass_name: str) -> float:
    """``2·visible·(H + E)`` for ``fwd``, times ``kernels.FWD_BWD_FACTOR`` for ``fwd_bwd``."""
    return 2 * visible_pairs(mask, s) * (s.H + s.E) * kernels.PASSES[pass_name].flops_factor


# --------------------------------------------------------------------------- peers
@dataclasses.dataclass(frozen=True)
class Peer:
    """One implementation.

    ``fn(case, q, k, v, aux) -> o``; ``aux(case, mask)`` builds its mask inputs (device
    arrays, handed to ``jit`` as arguments so they are never baked in as constants);
    ``supports(case, mask)`` is None or why it cannot run the case; ``load()`` raises
    ImportError when the library is missing; ``kernel(case, mask)`` names the kernel that
    runs, where that is a choice; ``dense_documents``: documents arrive as a dense mask.
    """

    fn: Callable
    supports: Callable[[Case, Mask], str | None]
    aux: Callable[[Case, Mask], Any] = lambda case, mask: mask
    load: Callable[[], Any] = lambda: None
    kernel: Callable[[Case, Mask], str] | None = None
    dense_documents: bool = False


def _call(case: Case, mask: Mask) -> core.AttentionCall:
    """The ``AttentionCall`` of a case in bf16 on this backend (what ``supports()`` sees)."""
    s = case.shape
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    return core.make_call(sds(s.B, s.T, s.N, s.H), sds(s.B, s.S, s.K, s.H), sds(s.B, s.S, s.K, s.E),
                          mask=mask)


def _registered(impl: str) -> Callable:
    def fn(case, q, k, v, mask):
        return core.attention(q, k, v, mask=mask, impl=impl)
    return fn


def _resolved_kernel(case: Case, mask: Mask) -> str:
    kernel, reason = register.resolve_gpu_kernel(_call(case, mask))
    return kernel.name if kernel is not None else f"none ({reason})"


def _xla_supports(case: Case, mask: Mask) -> str | None:
    s = case.shape
    nbytes = s.B * s.N * s.T * s.S * 4
    if nbytes > XLA_MAX_LOGITS_BYTES:
        return (f"dense float32 logits would take {nbytes / 2**30:.0f} GiB "
                f"(limit {XLA_MAX_LOGITS_BYTES >> 30} GiB)")
    return None


def _causal_window(case: Case) -> dict:
    """``is_causal`` / ``local_window_size`` for jax.nn and tokamax, matching ``make_mask``:
    every mask but "full" is causal, and ``(WINDOW, 0)`` means what ``Mask.window`` means."""
    return dict(is_causal=case.mask != "full",
                local_window_size=(WINDOW, 0) if case.mask == "window" else None)


def _dense_documents(case: Case, mask: Mask):
    """``[B, 1, T, S]`` same-document mask for peers without segment ids (causality via is_causal)."""
    if not mask.has_segments:
        return None
    seg = mask.q_segment_ids
    return (seg[:, None, :, None] == mask.kv_segment_ids[:, None, None, :]) & (seg[:, None, :, None] > 0)


def _needs_e_eq_h(case: Case, mask: Mask) -> str | None:
    s = case.shape
    return None if s.H == s.E else f"jax.nn needs E == H (got H={s.H}, E={s.E})"


def _cudnn_fn(case, q, k, v, dense):
    return jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="cudnn", **_causal_window(case))


def _tokamax(implementation: str) -> Peer:
    def fn(case, q, k, v, dense):
        import tokamax
        return tokamax.dot_product_attention(q, k, v, mask=dense, implementation=implementation,
                                             **_causal_window(case))

    return Peer(fn, lambda case, mask: None, aux=_dense_documents,
                load=lambda: importlib.import_module("tokamax"), dense_documents=True)


def _pallas_mha_fn(case, q, k, v, segment_ids):
    from jax.experimental.pallas.ops.gpu import attention as plattn
    return plattn.mha(q, k, v, segment_ids=segment_ids, sm_scale=case.shape.H ** -0.5,
                      causal=case.mask != "full")


def _pallas_mha_supports(case: Case, mask: Mask) -> str | None:
    s = case.shape
    if s.N != s.K:
        return f"mha indexes K/V by query head: needs N == K (got N={s.N}, K={s.K})"
    if s.H != s.E:
        return f"mha needs E == H (got H={s.H}, E={s.E})"
    if mask.window is not None:
        return "mha has no sliding-window argument"
    return None


PEERS: dict[str, Peer] = {
    "attnlab": Peer(_registered("pallas_gpu"),
                    lambda case, mask: core.get_impl("pallas_gpu").supports(_call(case, mask)),
                    kernel=_resolved_kernel),
    "cudnn": Peer(_cudnn_fn, _needs_e_eq_h, aux=_dense_documents, dense_documents=True),
    "tokamax-mosaic": _tokamax("mosaic"),
    "tokamax-triton": _tokamax("triton"),
    "pallas-mha": Peer(_pallas_mha_fn, _pallas_mha_supports, aux=lambda case, mask: mask.q_segment_ids,
                       load=lambda: importlib.import_module("jax.experimental.pallas.ops.gpu.attention")),
    "xla": Peer(_registered("xla"), _xla_supports),
}
REFERENCE = _registered("xla_chunked")  # float32 inputs, "highest" precision: see the docstring


# --------------------------------------------------------------------------- running
def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ (Frobenius, float32), the largest over matching leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> rel_err(jnp.array([3.0, 4.0]), jnp.array([3.0, 4.5]))  # doctest: +ELLIPSIS
      0.0924...
    """
    return max(float(jnp.linalg.norm(o.astype(jnp.float32) - r) / jnp.linalg.norm(r))
               for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:REASON_CHARS]}"


def _reference(case: Case, mask: Mask, pass_name: str, args32):
    """float32 chunked reference of one pass, at "highest" precision (see the docstring)."""
    with jax.default_matmul_precision("highest"):  # read when the jitted function traces
        f = kernels.PASSES[pass_name].build(functools.partial(REFERENCE, case))
        return jax.block_until_ready(f(*args32, mask))


def run_cell(name: str, case: Case, mask: Mask, pass_name: str, args, ref, *, reps: int, warmup: int,
             flops: float, ceil: dict) -> dict:
    """Status and numbers of one (peer, case, pass); an exception becomes an ``error`` row."""
    peer = PEERS[name]
    row: dict = {}
    try:
        peer.load()
    except ImportError as e:
        return dict(status="not installed", reason=_short(e))
    reason = peer.supports(case, mask)
    if reason is not None:
        return dict(status="unsupported", reason=reason)
    if peer.kernel is not None:
        row["kernel"] = peer.kernel(case, mask)
    if peer.dense_documents and case.mask == "documents":
        row["note"] = DENSE_NOTE
    try:
        aux = peer.aux(case, mask)
        f = kernels.PASSES[pass_name].build(functools.partial(peer.fn, case))
        err = rel_err(f(*args, aux), ref)  # the first call compiles: checked, never timed
        t = report.bench(f, *args, aux, reps=reps, warmup=warmup)
    except Exception as e:  # noqa: BLE001 -- a failing cell is a result, not a crash
        traceback.print_exc(limit=3, chain=False)
        return row | dict(status="error", reason=_short(e))
    tflops = flops / t / 1e12
    status = "ok" if err <= ERR_TOL else "inaccurate"  # NaN fails the comparison too
    return row | dict(status=status, ms=t * 1e3, tflops=tflops,
                      pct_mm=100 * tflops / ceil["matmul_tflops"], rel_err=err)


def run_case(case: Case, peers, passes, *, reps: int, warmup: int, ceil: dict, log=print) -> list[dict]:
    """Every (peer, pass) of one case on one set of random inputs; one row each."""
    s = case.shape
    mask = make_mask(case.mask, s)
    keys = jax.random.split(jax.random.key(zlib.crc32(case.name.encode())), 4)
    shapes = ((s.B, s.T, s.N, s.H), (s.B, s.S, s.K, s.H), (s.B, s.S, s.K, s.E), (s.B, s.T, s.N, s.E))
    args = tuple(jax.random.normal(kk, sh, jnp.float32).astype(jnp.bfloat16) for kk, sh in zip(keys, shapes))
    # The reference sees the very bf16 values the kernels see, upcast: the error is the kernels'.
    args32 = tuple(x.astype(jnp.float32) for x in args)
    base = dict(case=case.name, B=s.B, T=s.T, N=s.N, K=s.K, H=s.H, E=s.E, mask=case.mask,
                visible_frac=visible_pairs(mask, s) / (s.B * s.N * s.T * s.S))
    rows = []
    for pass_name in passes:
        flops = attention_flops(mask, s, pass_name)
        try:
            ref = _reference(case, mask, pass_name, args32)
        except Exception as e:  # noqa: BLE001 -- without a reference no cell of this pass can be checked
            traceback.print_exc(limit=3, chain=False)
            rows.append(base | dict(impl="reference", pass_=pass_name, status="error", reason=_short(e)))
            log(_one_line(rows[-1]))
            continue
        for name in peers:
            rows.append(base | dict(impl=name, pass_=pass_name) |
                        run_cell(name, case, mask, pass_name, args, ref, reps=reps, warmup=warmup,
                                 flops=flops, ceil=ceil))
            log(_one_line(rows[-1]))
        del ref
    return rows


def _one_line(r: dict) -> str:
    head = f"{r['case']:34s} {r['pass_']:8s} {r['impl']:15s} {r['status']:13s}"
    if "ms" in r:
        return head + f" {r['ms']:9.3f} ms {r['tflops']:7.1f} TF/s {r['pct_mm']:5.1f}% err {r['rel_err']:.1e}"
    return head + " " + r.get("reason", "")[:100]


# --------------------------------------------------------------------------- report
def _fastest(rows, exclude: str) -> dict | None:
    ok = [r for r in rows if r["status"] == "ok" and r["impl"] != exclude]
    return max(ok, key=lambda r: r["tflops"]) if ok else None


def summary(rows: list[dict]) -> tuple[str, str]:
    """Markdown: attnlab vs the best peer of this run per (case, pass), and DESIGN §7 beside it.

    Example:
      >>> rows = [dict(case="c", pass_="fwd", impl="attnlab", kernel="mosaic", status="ok",
      ...              tflops=2.0, pct_mm=1.0),
      ...         dict(case="c", pass_="fwd", impl="cudnn", status="ok", tflops=1.0, pct_mm=0.5)]
      >>> "| c | fwd | mosaic | 2 | 1 | cudnn | 1 | 2 |" in summary(rows)[0]
      True
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["pass_"]), []).append(r)
    vs, design = [], []
    for (case, pass_name), grp in groups.items():
        ours = next((r for r in grp if r["impl"] == "attnlab"), None)
        best = _fastest(grp, exclude="attnlab")
        target = DESIGN_TARGETS.get((case, pass_name), {})
        t_name = max(target, key=target.get) if target else None
        mine = ours["tflops"] if ours is not None and ours["status"] == "ok" else None
        vs.append({"case": case, "pass": pass_name,
                   "attnlab kernel": None if ours is None else ours.get("kernel"),
                   "attnlab TF/s": mine if mine is not None else (ours or {}).get("status"),
                   "attnlab %mm": None if mine is None else ours["pct_mm"],
                   "best peer": None if best is None else best["impl"],
                   "peer TF/s": None if best is None else best["tflops"],
                   "speedup": None if mine is None or best is None else mine / best["tflops"],
                   "§7 best": t_name, "§7 TF/s": target.get(t_name),
                   "vs §7": None if mine is None or t_name is None else mine / target[t_name]})
        measured = {r["impl"]: r for r in grp}
        for peer, tf in target.items():
            m = measured.get(peer)
            here = None if m is None else m["tflops"] if m["status"] == "ok" else m["status"]
            design.append({"case": case, "pass": pass_name, "peer": peer, "§7 TF/s": float(tf),
                           "this run TF/s": here,
                           "this run / §7": here / tf if isinstance(here, float) else None})
    return (report.markdown_table(vs),
            report.markdown_table(design) if design else "(no DESIGN §7 case selected)")


COLUMNS = ["case", "pass_", "impl", "kernel", "status", "ms", "tflops", "pct_mm", "rel_err", "visible_frac",
           "note", "reason"]


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _split(value: str, allowed, what: str, ap: argparse.ArgumentParser) -> list[str]:
    items = [x for x in value.split(",") if x]
    bad = sorted(set(items) - set(allowed))
    if bad:
        ap.error(f"unknown {what} {bad}; choose from {list(allowed)}")
    return items


def main(argv=None) -> list[str]:
    """CLI entry (see the module docstring); returns the written report paths."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--cases", default=None, help="comma list of name patterns (substrings, wildcards)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma list from " + ",".join(PEERS))
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--reps", type=int, default=10, help="timed calls per cell (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls after the compiling one")
    ap.add_argument("--list", action="store_true", help="print the selected cases and exit (no GPU needed)")
    ap.add_argument("--out-dir", default=report.DEFAULT_DIR)
    ap.add_argument("--tag", default=None, help="appended to the file stem (split runs: one tag each)")
    a = ap.parse_args(argv)
    peers = _split(a.peers, PEERS, "peers", ap)
    passes = _split(a.passes, PASSES, "passes", ap)
    cases = select_cases(a.cases, a.quick)
    if not cases:
        ap.error(f"no case matches {a.cases!r}; see --list")
    if a.list:
        for c in cases:
            print(c.name)
        print(f"{len(cases)} cases x {len(peers)} peers x {len(passes)} passes")
        return []
    if jax.default_backend() != "gpu":
        sys.exit(f"benchmarks.flash_gpu needs an NVIDIA GPU; JAX's backend here is "
                 f"'{jax.default_backend()}' ({jax.devices()[0].device_kind}). --list runs anywhere.")

    ceil = report.ceilings(matmul_n=8192, copy_mib=2048, dtype=jnp.bfloat16, reps=10)
    print(f"ceilings: {ceil}", flush=True)
    meta = dict(
        title=f"Flash attention side by side on {report.device_name()}",
        compute_capability=str(getattr(jax.devices()[0], "compute_capability", "?")),
        tokamax=_package_version("tokamax"), peers=",".join(peers), reps=a.reps, warmup=a.warmup,
        ceilings=ceil,
        flops="visible pairs counted exactly per row; fwd = 2·visible·(H+E), fwd_bwd = 3.5 x fwd; "
              "pct_mm = % of this run's bf16 8192³ matmul",
        error=f"‖out−ref‖/‖ref‖ vs impl='xla_chunked' on float32 copies at 'highest' precision "
              f"(fwd: o; fwd_bwd: max of dQ, dK, dV); above {ERR_TOL}: 'inaccurate', never the fastest",
        masks=f"window = causal, {WINDOW} keys back; documents = causal within packed documents of "
              f"random length {DOC_LENGTHS[0]}-{DOC_LENGTHS[1]}",
        speedup="attnlab TFLOP/s over the fastest 'ok' peer of this run (> 1: attnlab is faster)",
        targets="DESIGN §7: H100, JAX 0.11.2, shared/bench/gpu_anchors.py (its xla is jax.nn's, "
                "this run's is attn.core's)",
    )
    stem = "-".join(["flash-gpu", report.device_name(), report.today()] + ["quick"] * a.quick +
                    ([a.tag] if a.tag else []))
    rows, paths = [], []
    for case in cases:
        rows += run_case(case, peers, passes, reps=a.reps, warmup=a.warmup, ceil=ceil)
        vs, design = summary(rows)
        # Rewritten after every case: a run cut short by the device's time limit keeps its rows.
        paths = report.write(a.out_dir, stem, meta, rows, columns=COLUMNS,
                             sections=[("attnlab vs the best peer of this run", vs),
                                       ("DESIGN §7 figures beside this run", design)])
    print("\n" + summary(rows)[0])
    print(f"{len(rows)} rows -> {paths}")
    return paths


if __name__ == "__main__":
    main()
