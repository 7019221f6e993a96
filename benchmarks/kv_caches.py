"""KV cache kinds on the real SmolLM2-135M: perplexity, bytes per token, decode speed.

For each cache of ``models.serving.make_cache`` (dense, paged, int8, int4, fp8; page /
exact recent tail of ``--page-size`` tokens):

* **perplexity** on the first ``--max-tokens`` tokens of the embedded pydoc text, the
  windows of ``python -m models.perplexity`` (non-overlapping, ``--window``), each fed
  through the cache ``--chunk`` tokens at a time (so later chunks attend to quantized
  earlier ones); the one-pass result of ``models.perplexity`` is the reference;
* **KV bytes per token**: the cache's arrays (all layers) ÷ its token capacity, and for
  the quantized kinds the steady-state pool bytes (codes + scales + position/segment)
  without the full-precision tail;
* **decode tokens/s** at each ``--decode-batch`` after a ``--prompt``-token prompt, greedy,
  ``--steps`` steps, through ``models.generate``'s jitted steps, with transformers'
  forward + ``past_key_values`` in the same run (ratios are what to read: the CPU is shared).

  python -m benchmarks.kv_caches [--skip-decode] [--out benchmarks/results/kv-caches-cpu-DATE.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

KINDS = {"dense": ("dense", "none"), "paged": ("paged", "none"), "int8": ("dense", "int8"),
         "int4": ("dense", "int4"), "fp8": ("dense", "fp8")}


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bytes_per_token(cfg, kind, page_size, max_len=512):
    """(all cache bytes ÷ capacity, steady-state pool bytes per token or None)."""
    from models.serving import make_cache

    kv_cache, kv_quant = KINDS[kind]
    c = jax.eval_shape(lambda: make_cache(cfg, 1, max_len, kv_cache=kv_cache, kv_quant=kv_quant,
                                          page_size=page_size))
    from attn.quant_cache import QuantKVCache

    is_cache = lambda x: isinstance(x, QuantKVCache)
    caches = [x for x in jax.tree.leaves(c, is_leaf=is_cache) if is_cache(x)]
    total = _nbytes(c)
    if kv_quant == "none":
        cap = max_len if kv_cache == "dense" else -(-max_len // page_size) * page_size
        return total / cap, None
    pool = sum(_nbytes(x.pool) for x in caches)
    P, C = caches[0].pool.positions.shape[-2:]
    cap = -(-max_len // page_size) * page_size + page_size
    return total / cap, (pool - sum(_nbytes((x.pool.page_table, x.pool.num_pages)) for x in caches)) / (P * C)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kv_caches")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kinds", nargs="+", default=list(KINDS))
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--decode-kinds", nargs="+", default=["dense", "paged", "int8"])
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--out", default=f"benchmarks/results/kv-caches-cpu-{datetime.date.today()}.md")
    args = p.parse_args(argv)
    from models.generate import _decode, _prefill
    from models.perplexity import corpus_text, score_windows
    from models import pretrained

    pre = pretrained.load("smollm2-135m")
    cfg, params = pre.config, pre.params
    ids = pre.tokenizer.encode(corpus_text(), add_special_tokens=False)[:args.max_tokens]
    lines_out = []
    t = time.perf_counter()
    n, tot = score_windows(cfg, params, ids, window=args.window)
    ref = math.exp(tot / n)
    print(f"one-pass perplexity {ref:.4f} over {n} predictions ({time.perf_counter() - t:.0f} s)",
          flush=True)
    ppl_rows = []
    for kind in args.kinds:
        kv_cache, kv_quant = KINDS[kind]
        t = time.perf_counter()
        n2, tot2 = score_windows(cfg, params, ids, window=args.window, kv_cache=kv_cache,
                                 kv_quant=kv_quant, page_size=args.page_size, chunk=args.chunk)
        assert n2 == n
        ppl = math.exp(tot2 / n)
        all_b, pool_b = bytes_per_token(cfg, kind, args.page_size, args.window)
        ppl_rows.append((kind, ppl, 100 * (ppl / ref - 1), all_b, pool_b))
        print(ppl_rows[-1], f"{time.perf_counter() - t:.0f} s", flush=True)

    dec_rows = []
    if not args.skip_decode:
        import torch
        from benchmarks.pretrained import load_both

        torch.set_num_threads(os.cpu_count())
        _, _, _, hf, _ = load_both()
        variables = {"params": params}
        rng = np.random.default_rng(0)
        for B in args.decode_batch:
            x = rng.integers(0, cfg.vocab_size, (B, args.prompt)).astype(np.int32)
            row = {}
            for kind in args.decode_kinds:
                kv_cache, kv_quant = KINDS[kind]

                def ours():
                    logits, cache, pos = _prefill(
                        cfg, variables, jnp.asarray(x), jnp.ones(x.shape, bool),
                        max_len=args.prompt + args.steps + 1, cache_dtype=None, kv_cache=kv_cache,
                        kv_quant=kv_quant, page_size=args.page_size)
                    tok = jnp.argmax(logits, -1).astype(jnp.int32)
                    jax.block_until_ready(cache)
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        logits, cache = _decode(cfg, variables, tok, pos, cache)
                        tok = jnp.argmax(logits, -1).astype(jnp.int32)
                        pos = pos + 1
                    jax.block_until_ready(tok)
                    return time.perf_counter() - t0

                ours()  # compile
                row[kind] = B * args.steps / ours()
                print(B, kind, f"{row[kind]:.1f} tok/s", flush=True)

            with torch.no_grad():
                out = hf(torch.from_numpy(x.astype(np.int64)), use_cache=True)
                pkv, tk = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    out = hf(tk, past_key_values=pkv, use_cache=True)
                    pkv, tk = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                row["transformers"] = B * args.steps / (time.perf_counter() - t0)
            print(B, row, flush=True)
            dec_rows.append((B, row))

    import transformers

    L = [
        "# KV cache kinds on SmolLM2-135M (CPU)",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"`python -m benchmarks.kv_caches {' '.join(argv if argv is not None else sys.argv[1:])}`.",
        f"Device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with "
        "other jobs while it ran (timings noisy: read the ratios within a row).",
        f"Versions: jax {jax.__version__}, transformers {transformers.__version__}, python "
        f"{platform.python_version()}. Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to "
        "float32), caches in float32.",
        "",
        f"## Perplexity, first {len(ids)} tokens of the pydoc text, windows of {args.window}",
        "",
        f"One pass per window (`python -m models.perplexity --max-tokens {args.max_tokens}`): "
        f"**{ref:.3f}** over {n} predictions. Each cache below is fed {args.chunk} tokens per "
        f"call; page / exact tail = {args.page_size} tokens. Bytes per token: every array of "
        f"the cache over all {cfg.num_layers} layers ÷ its capacity (window {args.window}); "
        "pool: the quantized pages alone (codes + scales + int32 position/segment), the "
        "steady state for long contexts.",
        "",
        "| cache | perplexity | vs one pass | KV bytes/token (all) | KV bytes/token (pool) |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, ppl, rel, all_b, pool_b in ppl_rows:
        L.append(f"| {kind} | {ppl:.3f} | {rel:+.2f}% | {all_b:,.0f} | "
                 f"{'–' if pool_b is None else f'{pool_b:,.0f}'} |")
    if dec_rows:
        names = list(dec_rows[0][1])
        L += ["", f"## Decode tokens/s ({args.steps} greedy steps after a {args.prompt}-token "
              "prompt; attnlab through `models.generate`'s jitted step, transformers' forward "
              "with `past_key_values`)", "",
              "| batch | " + " | ".join(names) + " | " +
              " | ".join(f"{k} ÷ dense" for k in names if k != "dense") + " |",
              "|---|" + "---:|" * (2 * len(names) - 1)]
        for B, row in dec_rows:
            L.append(f"| {B} | " + " | ".join(f"{row[k]:.1f}" for k in names) + " | " +
                     " | ".join(f"{row[k] / row['dense']:.2f}×" for k in names if k != "dense") + " |")
        L += ["", "The paged and quantized caches still go through the layers' dense cache "
              "protocol: each step gathers (paged) or dequantizes (quantized) a full-precision "
              "copy of the cache for `attn.mha`; the copy-free decode kernels "
              "(`kernels_pallas/decode`) are not wired into the layers yet. Timings come from a "
              "shared CPU: read ratios, not absolute tok/s."]
    L.append("")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(L))
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
