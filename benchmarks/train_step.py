"""LM train-step throughput: tokens/s and MFU for a config.

    python -m benchmarks.train_step                                   # configs/mqar.py defaults
    python -m benchmarks.train_step --config configs/mqar.py:attn=gqa --batch 32
    python -m benchmarks.train_step --config configs/text.py --peak-tflops 989

What is timed: one jitted step = the ``Transformer`` forward, the cross-entropy loss,
the backward pass and an AdamW update (optax), parameters donated, median of ``--reps``
steps after a warm-up step, ``block_until_ready`` on the new parameters. The step is
built here (not taken from ``train.trainer``'s private compiled step) so the benchmark
does not break when the trainer's internals change; the model and loss are the same.

FLOPs per token (documented precisely; the "6·N·D" rule with exact attention):
  ``6·N_matmul + 3·Σ_layers ctx_flops``, where
  * ``N_matmul`` = all parameters minus the embedding table (a gather, not a matmul),
    plus ``V·D`` again when embeddings are tied (the tied head is still a matmul);
    this includes the attention projections, so
  * ``ctx_flops`` = ``stats()["flops_per_token"] − 2·stats()["params"]`` per layer: the
    q·kᵀ and p·v work over the visible context that stats() counts on top of its
    projection FLOPs (about 2·params per token). Forward is 1x, backward 2x, hence 3.
  Norms, softmax, RoPE and the optimizer are not counted (standard MFU practice).
Step FLOPs = FLOPs per token · B · T. MFU = achieved FLOP/s / peak, where the peak is
``--peak-tflops``, else ``PEAK_TFLOPS`` for a known accelerator (dense bf16), else (CPU)
the matmul ceiling measured in this run in the compute dtype.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 peak TFLOP/s by device-kind substring (vendor datasheets, no sparsity).
PEAK_TFLOPS: dict[str, float] = {
    "h100": 989.0,
    "h200": 989.0,
    "a100": 312.0,
    "l4": 121.0,
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v6": 918.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """Datasheet peak for ``device_kind`` (case-insensitive substring match), or None.

    Example:
      >>> peak_tflops("NVIDIA H100 80GB HBM3")
      989.0
      >>> peak_tflops("cpu") is None
      True
    """
    kind = device_kind.lower()
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def load_config(spec: str):
    """``path.py[:args]`` -> ConfigDict, loading the file by path (configs are not a package)."""
    path, _, arg = spec.partition(":")
    path = path if os.path.isabs(path) else os.path.join(REPO, path)
    mspec = importlib.util.spec_from_file_location("attnlab_bench_config", path)
    if mspec is None or mspec.loader is None:
        raise FileNotFoundError(f"cannot load config file {path}")
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod.get_config(arg or None)


def flops_per_token(lm, params, seq_len: int) -> dict:
    """Training FLOPs per token of ``Transformer(lm)`` with ``params`` (module docstring).

    Returns dict(n_params, n_matmul, attn_ctx_flops, train_flops_per_token).
    """
    from attn import registry

    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    emb = lm.vocab_size * lm.d_model
    n_matmul = n_params - emb + (emb if lm.tie_embeddings else 0)
    pattern = lm.attn.split(",")
    ctx = 0
    for layer in range(lm.num_layers):
        i = layer % len(pattern)
        s = registry.get(pattern[i]).stats(lm.layer_configs[i], seq_len)
        ctx += s["flops_per_token"] - 2 * s["params"]
    return dict(n_params=n_params, n_matmul=n_matmul, attn_ctx_flops=int(ctx),
                train_flops_per_token=6 * n_matmul + 3 * ctx)


def measure(config, *, batch: int | None = None, reps: int = 5) -> dict:
    """Time the train step of ``config`` (a configs/*.py ConfigDict); returns the row.

    Example:
      >>> import os                                                   # doctest: +SKIP
      >>> measure(load_config("configs/mqar.py"), reps=2)["tokens_per_s"] > 0  # doctest: +SKIP
      True
    """
    from models.transformer import LMConfig, Transformer

    lm = LMConfig(**config.model.to_dict())
    B = batch or config.data.batch_size
    T = config.data.seq_len
    model = Transformer(lm)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, lm.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)
    params = jax.jit(lambda r: model.init(r, tokens)["params"])(jax.random.key(0))
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))  # unbox logical partitioning
    tx = optax.adamw(1e-3)

    def loss_fn(p):
        (logits, _), _ = model.apply({"params": p}, tokens, mutable=["aux_loss"])
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()

    @jax.jit
    def step(p, opt):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    opt = tx.init(params)
    f = flops_per_token(lm, params, T)
    t0 = time.perf_counter()
    params, opt, loss = step(params, opt)
    jax.block_until_ready(params)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        params, opt, loss = step(params, opt)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t)
    t = float(np.median(times))
    achieved = f["train_flops_per_token"] * B * T / t / 1e12
    return dict(attn=lm.attn, d_model=lm.d_model, num_layers=lm.num_layers, batch=B, seq_len=T,
                dtype=jnp.dtype(lm.dtype).name, step_ms=t * 1e3, tokens_per_s=B * T / t,
                achieved_tflops=achieved, first_step_s=compile_s, loss=float(loss), **f)


def main(argv=None) -> list[str]:
    """CLI entry; returns the written report paths."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/mqar.py", help="path.py[:args]")
    ap.add_argument("--batch", type=int, default=None, help="override data.batch_size")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak to compute MFU against (default: table, or measured matmul on CPU)")
    ap.add_argument("--out-dir", default=report.DEFAULT_DIR)
    ap.add_argument("--stem", default=None, help="default train-step-<device>-<date>")
    a = ap.parse_args(argv)
    config = load_config(a.config)
    row = measure(config, batch=a.batch, reps=a.reps)
    kind = str(jax.devices()[0].device_kind)
    peak, source = a.peak_tflops, "--peak-tflops"
    if peak is None and jax.default_backend() != "cpu":
        peak, source = peak_tflops(kind), f"datasheet dense bf16 for {kind!r}"
    ceil = None
    if peak is None:
        ceil = report.ceilings(dtype=jnp.dtype(row["dtype"]))
        peak, source = ceil["matmul_tflops"], f"measured {ceil['matmul_n']}^3 {ceil['matmul_dtype']} matmul"
    row.update(config=a.config, peak_tflops=peak, peak_source=source, mfu=row["achieved_tflops"] / peak)
    print(" ".join(f"{k}={report._fmt(v)}" for k, v in row.items()))
    meta = dict(title=f"LM train step on {report.device_name()}",
                flops="6·N_matmul + 3·Σ_layers (stats.flops_per_token − 2·stats.params) per token",
                **({"ceilings": ceil} if ceil else {}))
    stem = a.stem or f"train-step-{report.device_name()}-{report.today()}"
    return report.write(a.out_dir, stem, meta, [row])


if __name__ == "__main__":
    main()
