"""Decode attention: bytes per step from the compiled HLO against the K/V formula, and time.

For SmolLM2-135M's attention shape (N = 9 query heads, K = 3 kv heads, H = 64) it compiles
one decode call (T = 1) over a cache of S slots per implementation and reads XLA's
``cost_analysis()["bytes accessed"]``, next to the formula ``B·S·K·(H+E)·itemsize`` (each
K/V byte read once: GQA must not multiply it by G = 3), and times the call on this host.
Implementations: the dense ``xla`` op, the split-K ``xla_decode`` reference, and the
reference on int8 / int4 / fp8 pages (``attn.kv_quant``). The Pallas kernels need a TPU /
GPU to be timed (interpret mode measures nothing); their numbers are owed.

  python -m benchmarks.decode [--out benchmarks/results/decode-cpu-DATE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import jax
import jax.numpy as jnp

from attn import core
from attn.kv_quant import quantize_pages
from attn.masks import Mask
from kernels_pallas.decode.common import from_dense
from kernels_pallas.decode.reference import decode_reference

N, K, H = 9, 3, 64


def _time(fn, *args, reps=20):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def _bytes(fn, *args):
    ca = fn.lower(*args).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("bytes accessed", float("nan")))


def run(batches=(1, 8), lengths=(512, 4096), dtype=jnp.bfloat16):
    rows = []
    for B in batches:
        for S in lengths:
            ks = jax.random.split(jax.random.key(0), 3)
            q = jax.random.normal(ks[0], (B, 1, N, H), dtype)
            k = jax.random.normal(ks[1], (B, S, K, H), dtype)
            v = jax.random.normal(ks[2], (B, S, K, H), dtype)
            kp = jnp.tile(jnp.arange(S, dtype=jnp.int32), (B, 1))
            seg = jnp.ones((B, S), jnp.int32)
            qp = jnp.full((B, 1), S - 1, jnp.int32)
            mask = Mask(causal=True, q_positions=qp, kv_positions=kp,
                        q_segment_ids=jnp.ones((B, 1), jnp.int32), kv_segment_ids=seg)
            formula = B * S * K * 2 * H * jnp.dtype(dtype).itemsize
            cases = {}
            for impl in ("xla", "xla_decode"):
                f = jax.jit(lambda q, k, v, m, impl=impl: core.attention(q, k, v, mask=m, impl=impl))
                cases[impl] = (f, (q, k, v, mask))
            kv = from_dense(k, v, kp, seg, page_size=64)
            for fmt in ("int8", "int4", "fp8"):
                qkv = quantize_pages(kv, fmt)
                f = jax.jit(lambda q, pages, qp: decode_reference(q, pages, q_positions=qp)[0])
                cases[f"xla_decode+{fmt}"] = (f, (q, qkv, qp))
            for name, (f, args) in cases.items():
                rows.append(dict(impl=name, B=B, S=S, hlo_bytes=_bytes(f, *args),
                                 kv_formula_bytes=formula if "+" not in name else None,
                                 ms=1e3 * _time(f, *args)))
                print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    a = p.parse_args(argv)
    rows = run()
    meta = dict(device=jax.devices()[0].device_kind, platform=platform.platform(),
                jax=jax.__version__, command="python -m benchmarks.decode",
                date=datetime.date.today().isoformat(), shape=dict(N=N, K=K, H=H, T=1),
                dtype="bfloat16")
    if a.out:
        with open(a.out + ".json", "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)
        lines = [f"# decode attention, {meta['device']} ({meta['date']})", "",
                 f"jax {meta['jax']}; `{meta['command']}`; N={N} K={K} H={H} T=1 bf16 "
                 "(SmolLM2-135M attention); HLO bytes = XLA cost_analysis 'bytes accessed'", "",
                 "| impl | B | S | HLO bytes | K+V formula | HLO / formula | ms |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            f = r["kv_formula_bytes"]
            ratio = f"{r['hlo_bytes'] / f:.2f}" if f else "—"
            lines.append(f"| {r['impl']} | {r['B']} | {r['S']} | {r['hlo_bytes']:.3g} | "
                         f"{f if f else '—'} | {ratio} | {r['ms']:.3f} |")
        with open(a.out + ".md", "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
