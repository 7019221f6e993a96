"""Convert SmolLM2 (TransMLA, X-EcoMLA or MoH), heal it, and measure every stage (docs/conversion.md).

One run: the original model's held-out perplexity; the conversion at one setting
(``--method``: ``transmla`` with ``--kv-lora-rank``, ``--freq-fold``, ``--rope-heads``;
``xecomla`` with ``--kv-lora-rank``, ``--rope-dim``, ``--q-lora-rank``; ``moh`` with
``--shared-heads``, ``--top-k``), saved as an attnlab
directory; then for each healing mode a ``configs/finetune.py`` run from that directory
(``ce``: next-token cross-entropy only; ``kd``: half cross-entropy, half KL to the
original model, ``train.distill_from``), ``--steps`` steps of ``--batch`` x ``--seq-len``
tokens of the train split. Measured:

* **held-out perplexity** (``models.conversion.common.eval_perplexity``: the eval split
  that fine-tuning never sees, non-overlapping windows of ``--window``): original,
  converted, healed;
* **the healing curve**: the trainer's own eval (the same 4 fixed random windows of the
  eval split at every eval step; step 0 computed here on the same windows), as
  perplexity = exp(eval loss), plotted to ``<stem>.png``;
* KV bytes per token (dense bf16 cache), trainable parameters, wall time per stage.

  python -m benchmarks.conversion [--method transmla] [--kv-lora-rank 128] [--freq-fold 2]
      [--steps 100] [--modes ce,kd] [--kd 0.5] [--lr 1e-4] [--workdir /tmp/attnlab-heal] [--stem NAME]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time

from benchmarks import report


def _transmla(args, pre, train_ids, eval_ids):
    import jax.numpy as jnp

    from models.transmla_lm import convert_lm

    calib = jnp.asarray(train_ids[:args.calib_tokens], jnp.int32)[None]
    params, cfg = convert_lm(pre.params, pre.config, kv_lora_rank=args.kv_lora_rank,
                             rope_heads=args.rope_heads, freq_fold=args.freq_fold, calib_tokens_BT=calib)
    return cfg, params, f"L{args.kv_lora_rank}-f{args.freq_fold}", (
        f"L={args.kv_lora_rank}, f={args.freq_fold}, r={args.rope_heads}")


def _xecomla(args, pre, train_ids, eval_ids):
    from models.conversion import xecomla

    params, cfg = xecomla.convert_lm(pre.params, pre.config, kv_lora_rank=args.kv_lora_rank,
                                     rope_dim=args.rope_dim, q_lora_rank=args.q_lora_rank)
    return cfg, params, f"L{args.kv_lora_rank}-r{args.rope_dim}", (
        f"L={args.kv_lora_rank}, Hr={args.rope_dim}, Lq={args.q_lora_rank}")


def _moh(args, pre, train_ids, eval_ids):
    from models.conversion import moh

    params, cfg = moh.convert_lm(pre.params, pre.config, num_shared_heads=args.shared_heads,
                                 top_k=args.top_k, router="query_norm")
    A, N = args.shared_heads + args.top_k, pre.config.num_heads
    return cfg, params, f"{A}of{N}", f"h_s={args.shared_heads}, top_k={args.top_k} ({A}/{N} heads)"


def _liger(args, pre, train_ids, eval_ids):
    from models.conversion import liger

    params, cfg = liger.convert_lm(pre.params, pre.config, hybrid=args.window_attn > 0,
                                   window=args.window_attn or None)
    label = f"w{args.window_attn}" if args.window_attn else "gla"
    return cfg, params, label, (f"Liger attention, window {args.window_attn}" if args.window_attn
                                else "Liger GLA")


# --method -> (args, pretrained, train ids, eval ids) -> (config, params, file label, title label)
CONVERTERS = {"transmla": _transmla, "xecomla": _xecomla, "moh": _moh, "liger": _liger}


def _needles(args, cfg, params, tokenizer) -> float:
    from models.conversion.liger import needle_accuracy

    return needle_accuracy(cfg, params, tokenizer, context_len=args.needle_len, n=args.needles)


def main(argv=None) -> int:
    from benchmarks.finetune import add_run_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_flags(p, steps=100, workdir="/tmp/attnlab-heal")
    p.add_argument("--method", default="transmla", choices=sorted(CONVERTERS))
    p.add_argument("--kv-lora-rank", type=int, default=128)
    p.add_argument("--freq-fold", type=int, default=2)
    p.add_argument("--rope-heads", type=int, default=1)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--rope-dim", type=int, default=32, help="xecomla: Hr")
    p.add_argument("--q-lora-rank", type=int, default=None, help="xecomla: Lq")
    p.add_argument("--shared-heads", type=int, default=4, help="moh: h_s")
    p.add_argument("--top-k", type=int, default=2, help="moh: routed heads per token")
    p.add_argument("--window-attn", type=int, default=64, help="liger: sliding window (0 = pure GLA)")
    p.add_argument("--peft", default="", help="heal with adapters instead of all weights (lora, hydra)")
    p.add_argument("--rank", type=int, default=8, help="--peft rank")
    p.add_argument("--needle-len", type=int, default=0, help="also score needles of this length (0 = no)")
    p.add_argument("--needles", type=int, default=4, help="needles per depth (5 depths)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--kd", type=float, default=0.5)
    p.add_argument("--modes", default="ce,kd")
    args = p.parse_args(argv)

    from benchmarks.finetune import plot, trainer_eval_loss, tune_and_measure, write_report
    from configs.finetune import get_config
    from models import pretrained
    from models.conversion.common import eval_perplexity, kv_bytes_per_token, split_tokens
    from train.trainer import parse_config

    os.makedirs(args.workdir, exist_ok=True)
    pre = pretrained.load(args.model)
    train_ids, eval_ids = split_tokens(args.model)
    score = dict(window=args.window)
    t0 = time.time()
    base = eval_perplexity(pre.config, pre.params, eval_ids, **score)
    rows = [{"stage": "original", "steps": 0, "ppl": base["ppl"], "kv_bytes_per_token":
             kv_bytes_per_token(pre.config), "wall_s": round(time.time() - t0, 1)}]
    if args.needle_len:
        rows[-1]["needle_acc"] = _needles(args, pre.config, pre.params, pre.tokenizer)
    print(rows[-1], flush=True)

    t0 = time.time()
    cfg, params, label, title = CONVERTERS[args.method](args, pre, train_ids, eval_ids)
    stem = args.stem or f"{args.method}-heal-{label}-{report.device_name()}-{report.today()}"
    conv = {"ppl": eval_perplexity(cfg, params, eval_ids, **score)["ppl"],
            "kv_bytes_per_token": kv_bytes_per_token(cfg)}
    conv_dir = os.path.join(args.workdir, "converted")
    shutil.rmtree(conv_dir, ignore_errors=True)
    pretrained.export(pretrained.Pretrained(cfg, params, pre.tokenizer, args.model, dict(pre.metadata)),
                      conv_dir, format="native")
    rows.append({"stage": "converted", "steps": 0, "ppl": conv["ppl"],
                 "kv_bytes_per_token": conv["kv_bytes_per_token"], "wall_s": round(time.time() - t0, 1)})
    if args.needle_len:
        rows[-1]["needle_acc"] = _needles(args, cfg, params, pre.tokenizer)
    print(rows[-1], flush=True)

    curves = {}
    for mode in [m for m in args.modes.split(",") if m]:
        spec = (f"init={conv_dir},steps={args.steps},seq_len={args.seq_len},batch={args.batch},lr={args.lr}"
                + (f",teacher={args.model},kd={args.kd}" if mode == "kd" else "")
                + (f",peft={args.peft},rank={args.rank}" if args.peft else ""))
        row, curves[mode] = tune_and_measure(spec, os.path.join(args.workdir, f"heal-{mode}"), eval_ids,
                                             start_cfg=cfg, start_params=params, window=args.window)
        rows.append({"stage": f"healed ({mode})", "steps": args.steps,
                     "kv_bytes_per_token": conv["kv_bytes_per_token"], **row})
        if args.needle_len:
            from train.restore import restore_trained

            hcfg, hvars, _ = restore_trained(os.path.join(args.workdir, f"heal-{mode}"))
            rows[-1]["needle_acc"] = _needles(args, hcfg, hvars["params"], pre.tokenizer)
        print(rows[-1], flush=True)

    png = os.path.join(args.out_dir, stem + ".png")
    exp = parse_config(get_config(f"init={args.model},seq_len={args.seq_len},batch={args.batch}"))
    ratio = conv["kv_bytes_per_token"] / rows[0]["kv_bytes_per_token"]
    plot(curves, math.exp(trainer_eval_loss(pre.config, pre.params, exp)),
         f"{args.method} on {args.model}: {title} ({ratio:.0%} KV)",
         f"healing steps ({args.batch} x {args.seq_len} tokens)", png)
    write_report(args, stem, f"{args.method} healing on {args.model}", rows, curves, png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
