"""Shared report writer and timing helpers for every benchmark.

A report is one JSON file (machine-readable: environment + rows) and one markdown file
(the same rows as tables), both named ``<stem>.json`` / ``<stem>.md`` in an output
directory. The environment block records what a reader needs to trust a number: the
device, the jax/jaxlib/flax versions, the exact command line and the UTC date.

Example:
  >>> import tempfile
  >>> from benchmarks import report
  >>> d = tempfile.mkdtemp()
  >>> paths = report.write(d, "demo", {"title": "demo"}, [{"a": 1, "b": 2.5}])
  >>> sorted(p.rsplit(".", 1)[1] for p in paths)
  ['json', 'md']
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_DIR = os.path.join(os.path.dirname(__file__), "results")


def device_name() -> str:
    """Sanitized device kind for file names: ``"cpu"``, ``"nvidia-h100-80gb-hbm3"``, ...

    Example:
      >>> isinstance(device_name(), str)
      True
    """
    d = jax.devices()[0]
    kind = "cpu" if d.platform == "cpu" else str(d.device_kind)
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or d.platform


def today() -> str:
    """UTC date ``YYYY-MM-DD`` (result files are named by it)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def environment() -> dict:
    """Device, versions, command and date, recorded in every report."""
    import flax

    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except Exception:  # noqa: BLE001 -- a version string is informational only
        jaxlib_version = "unknown"
    d = jax.devices()[0]
    return {
        "device": device_name(),
        "device_kind": str(d.device_kind),
        "platform": d.platform,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "command": " ".join([_launcher()] + sys.argv[1:]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _launcher() -> str:
    """``python -m benchmarks.kernels`` when run as a module; ``python <script>`` otherwise."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0] if sys.argv else '?'}"


def bench(fn: Callable, *args, reps: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn(*args)`` after ``warmup`` calls.

    ``block_until_ready`` on every call: JAX dispatch is asynchronous, so without it we
    would time the enqueue, not the work.

    Example:
      >>> import jax.numpy as jnp
      >>> bench(lambda x: x + 1, jnp.ones(4), reps=2) > 0
      True
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def ceilings(matmul_n: int = 1024, copy_mib: int = 64, dtype=jnp.float32, reps: int = 5) -> dict:
    """Measured matmul TFLOP/s and copy GB/s on this device, in this run.

    Percent-of-ceiling columns divide by these, so every number is relative to what
    the same process could reach at the same moment (CPU load from other users moves
    both together). ``dtype`` should match the benchmark's compute dtype.

    Args:
      matmul_n: an ``n x n @ n x n`` matmul (2·n³ FLOPs).
      copy_mib: size of the array read and written by ``x * 1.0001`` (2 passes).

    Example:
      >>> c = ceilings(matmul_n=64, copy_mib=1, reps=1)
      >>> c["matmul_tflops"] > 0 and c["copy_gbs"] > 0
      True
    """
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (matmul_n, matmul_n), dtype)
    b = jax.random.normal(k2, (matmul_n, matmul_n), dtype)
    t_mm = bench(jax.jit(lambda a, b: a @ b), a, b, reps=reps)
    n_el = copy_mib * (1 << 20) // jnp.dtype(dtype).itemsize
    x = jnp.ones((n_el,), dtype)
    t_cp = bench(jax.jit(lambda x: x * 1.0001), x, reps=reps)
    return {
        "matmul_n": matmul_n,
        "matmul_dtype": jnp.dtype(dtype).name,
        "matmul_tflops": 2 * matmul_n**3 / t_mm / 1e12,
        "copy_mib": copy_mib,
        "copy_gbs": 2 * x.nbytes / t_cp / 1e9,
    }


def _fmt(v: Any) -> str:
    """Markdown cell: 3 significant digits for floats, '' for None."""
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.2e}"
        return f"{v:.3g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a markdown table (columns: union of keys in first-seen order).

    Example:
      >>> print(markdown_table([{"a": 1, "b": 0.5}]))
      | a | b |
      |---|---|
      | 1 | 0.5 |
    """
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(out_dir: str, stem: str, meta: dict, rows: Sequence[dict],
          sections: Iterable[tuple[str, str]] = (), columns: Sequence[str] | None = None) -> list[str]:
    """Write ``<out_dir>/<stem>.json`` and ``.md``; returns the two paths.

    Args:
      out_dir: created if missing.
      stem: file name without extension, e.g. ``"cpu-2026-11-22"``.
      meta: free-form run facts (title, ceilings, conventions); ``meta["title"]`` heads
        the markdown. The environment block is added under ``"env"``.
      rows: the result rows (JSON-serialisable dicts).
      sections: extra ``(heading, markdown body)`` pairs appended after the table.
      columns: markdown column order (default: all keys).
    """
    os.makedirs(out_dir, exist_ok=True)
    env = environment()
    doc = {"env": env, "meta": meta, "rows": list(rows)}
    jpath = os.path.join(out_dir, stem + ".json")
    with open(jpath, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    md = [f"# {meta.get('title', stem)}", ""]
    md += [f"- **{k}**: `{v}`" for k, v in env.items()]
    md += [f"- **{k}**: {v}" for k, v in meta.items() if k != "title" and not isinstance(v, (dict, list))]
    for k, v in meta.items():
        if isinstance(v, dict):
            md.append(f"- **{k}**: " + ", ".join(f"{kk}={_fmt(vv)}" for kk, vv in v.items()))
    md += ["", markdown_table(rows, columns), ""]
    for heading, body in sections:
        md += [f"## {heading}", "", body, ""]
    mpath = os.path.join(out_dir, stem + ".md")
    with open(mpath, "w") as f:
        f.write("\n".join(md))
    return [jpath, mpath]
