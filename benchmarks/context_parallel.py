"""Context parallelism on forced CPU devices: bytes per device from the compiled HLO
next to the analytic formula, wall time, and the error against one device.

    python -m benchmarks.context_parallel                       # B 1, T 2048, N 8, K 2, H 64
    python -m benchmarks.context_parallel --seq 512 --reps 1    # a quick look
    python -m benchmarks.context_parallel --kv-heads 8 --no-time --stem context-parallel-cpu-DATE-mha

For every strategy (all_gather, ring, ulysses, hybrid) and mask (causal, full,
documents = causal + packed documents, window = causal sliding window) it builds one
attention layer, ``train.context_parallel.context_parallel_attention`` on a mesh
``(data 1, fsdp 1, context 8, tensor 1)`` in the zigzag order the trainer uses, and:

1. **Bytes.** Lowers and compiles the forward and the forward + backward (``jax.vjp``
   with a given ``dO``, so no loss reduction adds a collective) with the inputs already
   split along the sequence, and sums what each device *sends* in every collective of
   ``compiled.as_text()`` (``hlo_collective_bytes``). The analytic columns
   (``analytic_bytes``) are derived from the code, term by term, with XLA's merging of
   identical collectives modelled; they agree with the HLO to the byte. ``issued`` counts
   every collective the code issues, before that merging.
2. **Time.** Median wall time of ``--reps`` calls (``benchmarks.report.bench``). On 8
   forced CPU devices sharing a few cores the "links" are memcpy and the devices
   time-share the cores, so this measures overhead and load balance, not a network.
3. **Correctness.** max |o − o₁| and max |dq − dq₁| (same for dk, dv) against
   ``impl="xla"`` on one device in the original token order.

Bytes sent per device, one collective over a group of g devices (the usual ring /
pairwise algorithms; sent = received for these symmetric patterns):
  all-gather ``(g−1)/g · result``; all-to-all ``(g−1)/g · operands``; collective-permute
  ``operand``; reduce-scatter ``(g−1) · result``; all-reduce ``2·(g−1)/g · operand``.
Groups of one device (jax's transpose of an unmapped psum emits them) send nothing.

Results: ``benchmarks/results/context-parallel-<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

DEVICES = 8


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    # 2048: the whole grid (16 cells, 8 timed calls each) takes ~10 min on 2 shared
    # cores; at 4096 one all_gather forward + backward alone took 11 s there.
    p.add_argument("--seq", type=int, default=2048, help="T; divisible by 2·cp (zigzag)")
    p.add_argument("--heads", type=int, default=8, help="N; ulysses needs N %% cp == 0")
    p.add_argument("--kv-heads", type=int, default=2, help="K (GQA); K < u replicates kv heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=256, help="left window of the 'window' mask")
    p.add_argument("--impl", default="xla", help="implementation on the local shards")
    p.add_argument("--reps", type=int, default=3, help="timed calls per cell (median)")
    p.add_argument("--no-time", action="store_true", help="bytes only: compile, do not run")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--stem", default=None, help="file stem (default context-parallel-<device>-<date>)")
    return p.parse_args(argv)


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    # Must precede the first jax import anywhere in the process.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={DEVICES}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from attn.core import attention  # noqa: E402
from attn.masks import Mask  # noqa: E402
from benchmarks import report  # noqa: E402
from train import context_parallel as cpl  # noqa: E402
from train.sharding import MeshConfig, make_mesh  # noqa: E402

STRATEGIES = ("all_gather", "ring", "ulysses", "hybrid")
NOTES = """\
**HLO against the code.** ``formula`` equals the HLO to the byte in every cell once
XLA's CSE is modelled; ``issued`` counts what the code issues before it: self-attention's
q and kv positions (and segment ids) are the same arrays, so Ulysses gathers them once.
The ring's backward sends K/V again, packed into one buffer: shipped exactly as in the
forward, XLA would merge the two sets of shifts and keep every block the forward
received alive until the backward (O(T) K/V memory instead of O(T/r)). Dead values are
dropped: the full mask never reads positions, so none travel; the lse all-to-all is
gone because the layer does not return lse.

**Time.** 8 forced devices time-share the host's cores (here 2, shared with other jobs),
collectives are memcpys: the columns show the work each strategy does and how well
zigzag balances it, not link costs; compare them within one run only."""
MASKS = ("causal", "full", "documents", "window")
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter", "all-reduce")


# --------------------------------------------------------------------------- HLO bytes
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]")
# " all-gather(" etc. after the result type; "-done" carries the result of an async pair
# ("-start" returns a tuple holding the operand too), so starts are skipped.
_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")
_GROUPS = re.compile(r"replica_groups=(\{\{[\d,{}\s]*\}\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)")


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO type string (tuples are summed).

    Example:
      >>> shape_bytes("(bf16[2,512,8,64]{3,2,1,0}, s32[1,4]{1,0}, f32[])")
      1048596
    """
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = math.prod(int(d) for d in dims.split(",") if d)
        total += n * _DTYPE_BYTES.get(dtype, 1)  # f8 variants: one byte
    return total


def _group_size(attrs: str, default: int) -> int:
    """Devices per replica group: ``{{0,1},{2,3}}`` → 2; iota ``[2,4]<=[8]`` → 4."""
    m = _GROUPS.search(attrs)
    if m is None:
        return default
    g = m.group(1)
    if g.startswith("["):
        return int(g[1:g.index("]")].split(",")[-1])
    first = re.match(r"\{\{([\d,\s]*)\}", g).group(1)
    return len([x for x in first.split(",") if x.strip()])


def hlo_collective_bytes(hlo_text: str, num_devices: int) -> dict[str, float]:
    """Bytes each device sends, per collective kind, in a compiled module's text.

    Every computation of the module is scanned, so collectives inside conditionals
    count once each (a collective inside a while loop would count once per program,
    not per iteration: this module's strategies unroll their rings in Python).

    Example:
      >>> hlo = "%ag = f32[8,4]{1,0} all-gather(%p), replica_groups={{0,1,2,3}}, dimensions={0}"
      >>> hlo_collective_bytes(hlo, 4)["all-gather"]
      96.0
    """
    out = {k: 0.0 for k in COLLECTIVES}
    for line in hlo_text.splitlines():
        if "=" not in line:
            continue
        m = _OP.search(line)
        if m is None or m.group(2) == "-start":
            continue
        kind = m.group(1)
        result = shape_bytes(line[line.index("=") + 1:m.start()])
        g = _group_size(line[m.end():], num_devices)
        if kind == "collective-permute":
            out[kind] += result
        elif kind == "reduce-scatter":
            out[kind] += (g - 1) * result
        elif kind == "all-reduce":
            out[kind] += 2 * (g - 1) / g * result
        else:  # all-gather (result = the gathered array), all-to-all (result = operands)
            out[kind] += (g - 1) / g * result
    return out


# --------------------------------------------------------------------------- formulas
def analytic_bytes(strategy: str, *, B: int, T: int, N: int, K: int, H: int, itemsize: int,
                   cp: int, positions: bool, segments: bool, u: int | None = None,
                   return_lse: bool = False, merged: bool = True) -> dict[str, float]:
    """Bytes each device sends for one layer, ``{"fwd", "bwd"}``, read off the code.

    b = ``itemsize`` of q/k/v, a = 4 (float32 dK/dV accumulators, lse), E = H,
    t = T/cp local tokens. ``m`` = int32 arrays travelling with each K/V block:
    positions (when the mask reads them: causal or window) plus segment ids.

    * all_gather: fwd  f·(2·B·T·K·H·b + 4·m·B·T)     gather K, V and their ints, f = (cp−1)/cp
                  bwd  f·2·B·T·K·H·b                 reduce-scatter dK, dV
    * ring / ulysses / hybrid (u Ulysses degree, r = cp/u ring size; ring: u = 1,
      ulysses: u = cp), K_u = lcm(K, u) kv heads after replication, f = (u−1)/u:
        fwd  f·B·t·H·b·(N + 2·K_u + N)               all-to-all q, k, v in, o out
           + f·4·B·N·t                 (return_lse)  all-to-all lse out (float32)
           + f·4·m·B·T/r · (1 | 2)                   all-gather the ints (q's and kv's)
           + (r−1)·(2·B·(T/r)·(K_u/u)·H·b + 4·m·B·T/r)  ring: K/V block + ints, r−1 shifts
        bwd  f·B·t·H·b·(N + N + 2·K_u)               all-to-all dO in; dQ, dK, dV out
           + (r−1)·(2·B·(T/r)·(K_u/u)·H·b + 4·m·B·T/r)  ring: K/V again (packed)
           + r·2·B·(T/r)·(K_u/u)·H·a                    ring: dK/dV accumulators, r shifts

    ``merged`` models what XLA compiles forward and backward in one program into: its
    CSE merges identical collectives, so self-attention's q and kv ints (the same
    arrays) are gathered once. (The ring's backward ships K/V packed into one buffer,
    so its shifts are not identical to the forward's and are always sent: that keeps
    activation memory at O(T/cp).) ``merged=False`` counts every collective the code
    issues.

    Example (ring, cp 8, K 2, float32, causal: 7 shifts of K, V and positions):
      >>> d = analytic_bytes("ring", B=1, T=4096, N=8, K=2, H=64, itemsize=4, cp=8,
      ...                    positions=True, segments=False)
      >>> d["fwd"] == 7 * (2 * 512 * 2 * 64 * 4 + 4 * 512)
      True
    """
    m = int(positions) + int(segments)
    a = 4
    if strategy == "all_gather":
        f = (cp - 1) / cp
        return {"fwd": f * (2 * B * T * K * H * itemsize + 4 * m * B * T),
                "bwd": f * 2 * B * T * K * H * itemsize}
    u = cpl.STRATEGIES[strategy].ulysses_degree(cp, u)
    r, t = cp // u, T // cp
    ku = math.lcm(K, u) if u > 1 and K % u else K
    f = (u - 1) / u
    kv_block = 2 * B * (T // r) * (ku // u) * H
    ring_kv = (r - 1) * (kv_block * itemsize + 4 * m * B * T // r)
    fwd = (f * B * t * H * itemsize * (2 * N + 2 * ku) + f * 4 * B * N * t * return_lse
           + f * 4 * m * B * T / r * (1 if merged else 2) + ring_kv)
    bwd = f * B * t * H * itemsize * (2 * N + 2 * ku)
    if r > 1:
        bwd += r * kv_block * a + ring_kv
    return {"fwd": fwd, "bwd": bwd}


# --------------------------------------------------------------------------- the layer
def _documents(B: int, T: int, seed: int = 0) -> np.ndarray:
    """Segment ids of ~8 packed documents of random lengths (they straddle shards)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, T), size=7, replace=False))
    return np.broadcast_to(np.searchsorted(cuts, np.arange(T), side="right") + 1, (B, T)).astype(np.int32)


def _mask_kwargs(name: str, window: int) -> dict:
    return {"causal": dict(causal=True), "full": dict(causal=False),
            "documents": dict(causal=True), "window": dict(causal=True, window=(window, 0))}[name]


def _inputs(a: argparse.Namespace):
    ks = jax.random.split(jax.random.key(0), 4)
    shape = lambda n: (a.batch, a.seq, n, a.head_dim)  # noqa: E731
    q = jax.random.normal(ks[0], shape(a.heads), jnp.float32)
    k = jax.random.normal(ks[1], shape(a.kv_heads), jnp.float32)
    v = jax.random.normal(ks[2], shape(a.kv_heads), jnp.float32)
    do = jax.random.normal(ks[3], shape(a.heads), jnp.float32)
    return q, k, v, do


def _reference(a, mask_name, q, k, v, do):
    """One device, ``impl="xla"``, original order: (o, (dq, dk, dv)), forward+backward fn."""
    seg = jnp.asarray(_documents(a.batch, a.seq)) if mask_name == "documents" else None
    mask = Mask(**_mask_kwargs(mask_name, a.window), q_segment_ids=seg, kv_segment_ids=seg)

    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask=mask, impl="xla"), q, k, v)
        return o, vjp(do)

    one = jax.devices()[0]
    args = jax.device_put((q, k, v, do), one)
    fn = jax.jit(fwd_bwd)
    return jax.device_get(fn(*args)), fn, args


def run_cell(a, mesh, strategy: str, mask_name: str, inputs, ref) -> dict:
    """Bytes, times and errors of one (strategy, mask) cell."""
    cp = DEVICES
    q, k, v, do = inputs
    perm = cpl.zigzag_permutation(a.seq, cpl.STRATEGIES[strategy].zigzag_chunks(cp))
    inv = np.argsort(perm)
    docs = mask_name == "documents"
    pos = np.broadcast_to(np.arange(a.seq, dtype=np.int32), (a.batch, a.seq))[:, perm]
    seg = _documents(a.batch, a.seq)[:, perm] if docs else None
    split = NamedSharding(mesh, P(None, cpl.CONTEXT_AXIS))  # [B, T, ...] split along T
    put = lambda x: None if x is None else jax.device_put(np.asarray(x), split)  # noqa: E731
    qz, kz, vz, doz = (put(np.asarray(x)[:, perm]) for x in (q, k, v, do))
    pos, seg = put(pos), put(seg)

    def layer(q, k, v, pos, seg):
        mask = Mask(**_mask_kwargs(mask_name, a.window), q_positions=pos, kv_positions=pos,
                    q_segment_ids=seg, kv_segment_ids=seg)
        return cpl.context_parallel_attention(q, k, v, mask=mask, impl=a.impl, strategy=strategy,
                                              mesh=mesh, zigzag=True)

    def fwd_bwd(q, k, v, pos, seg, do):
        o, vjp = jax.vjp(lambda q, k, v: layer(q, k, v, pos, seg), q, k, v)
        return o, vjp(do)

    fwd, fb = jax.jit(layer), jax.jit(fwd_bwd)
    fwd_args, fb_args = (qz, kz, vz, pos, seg), (qz, kz, vz, pos, seg, doz)
    compiled = {"fwd": fwd.lower(*fwd_args).compile(), "fwd_bwd": fb.lower(*fb_args).compile()}
    measured = {name: hlo_collective_bytes(c.as_text(), cp) for name, c in compiled.items()}
    # Per-device scratch of the forward + backward: shows what merged K/V shifts keep alive.
    temp = compiled["fwd_bwd"].memory_analysis().temp_size_in_bytes
    shape = dict(B=a.batch, T=a.seq, N=a.heads, K=a.kv_heads, H=a.head_dim, itemsize=4, cp=cp,
                 positions=mask_name != "full", segments=docs)
    formula, issued = analytic_bytes(strategy, **shape), analytic_bytes(strategy, **shape, merged=False)
    MiB = float(1 << 20)
    hlo_f, hlo_fb = sum(measured["fwd"].values()), sum(measured["fwd_bwd"].values())
    row = {"strategy": strategy, "mask": mask_name,
           "hlo_fwd_MiB": hlo_f / MiB, "formula_fwd_MiB": formula["fwd"] / MiB,
           "hlo_fwd_bwd_MiB": hlo_fb / MiB,
           "formula_fwd_bwd_MiB": (formula["fwd"] + formula["bwd"]) / MiB,
           "issued_fwd_bwd_MiB": (issued["fwd"] + issued["bwd"]) / MiB,
           "temp_fwd_bwd_MiB": temp / MiB}
    if not a.no_time:
        o, grads = jax.device_get(fb(*fb_args))
        o_ref, g_ref = ref
        err = lambda x, y: float(np.max(np.abs(np.asarray(x)[:, inv] - y)))  # noqa: E731
        row |= {"fwd_ms": 1e3 * report.bench(fwd, *fwd_args, reps=a.reps),
                "fwd_bwd_ms": 1e3 * report.bench(fb, *fb_args, reps=a.reps),
                "max_err_o": err(o, o_ref),
                **{f"max_err_d{n}": err(g, r) for n, g, r in zip("qkv", grads, g_ref)}}
    row["hlo_by_kind"] = {"fwd": {k: v for k, v in measured["fwd"].items() if v},
                          "fwd_bwd": {k: v for k, v in measured["fwd_bwd"].items() if v}}
    return row


def main(a: argparse.Namespace) -> list[str]:
    if jax.device_count() < DEVICES:
        sys.exit(f"needs {DEVICES} devices; run as `python -m benchmarks.context_parallel` "
                 f"(it forces {DEVICES} CPU devices) or set XLA_FLAGS yourself")
    mesh = make_mesh(MeshConfig(shape=(1, 1, DEVICES, 1)))
    inputs = _inputs(a)
    rows = []
    for mask_name in MASKS:
        ref, ref_fn, ref_args = (None, None, None) if a.no_time else _reference(a, mask_name, *inputs)
        if not a.no_time:
            t1 = report.bench(ref_fn, *ref_args, reps=a.reps)
            rows.append({"strategy": "one device", "mask": mask_name, "fwd_bwd_ms": 1e3 * t1})
        for strategy in STRATEGIES:
            row = run_cell(a, mesh, strategy, mask_name, inputs, ref)
            print({k: v for k, v in row.items() if k != "hlo_by_kind"}, flush=True)
            rows.append(row)
    meta = {
        "title": f"Context parallelism on {DEVICES} forced CPU devices: one attention layer",
        "shape": dict(B=a.batch, T=a.seq, N=a.heads, K=a.kv_heads, H=a.head_dim),
        "settings": dict(dtype="float32", impl=a.impl, cp=DEVICES, mesh="(1, 1, 8, 1)", zigzag=True,
                         window=a.window, reps=a.reps, hybrid_u=cpl.STRATEGIES["hybrid"].ulysses_degree(DEVICES, None)),
        "bytes": "MiB sent per device per layer; HLO = compiled.as_text() collectives, formula = "
                 "analytic_bytes() (see the module docstring)",
        "time": "median wall ms of one call; 8 devices time-share the machine's cores",
        "reference": "max_err_*: max abs difference to impl=xla on one device, original order",
    }
    columns = ["strategy", "mask", "hlo_fwd_MiB", "formula_fwd_MiB", "hlo_fwd_bwd_MiB", "formula_fwd_bwd_MiB",
               "issued_fwd_bwd_MiB", "temp_fwd_bwd_MiB", "fwd_ms", "fwd_bwd_ms", "max_err_o", "max_err_dq", "max_err_dk", "max_err_dv"]
    stem = a.stem or f"context-parallel-{report.device_name()}-{report.today()}"
    return report.write(a.out or report.DEFAULT_DIR, stem, meta, rows, sections=[("Notes", NOTES)],
                        columns=columns)


if __name__ == "__main__":
    for path in main(ARGS):
        print("wrote", path)
