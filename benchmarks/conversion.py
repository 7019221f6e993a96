"""Convert SmolLM2 with TransMLA, heal it, and measure every stage (docs/conversion.md).

One run: the original model's held-out perplexity; the TransMLA conversion at one
setting (``--kv-lora-rank``, ``--freq-fold``, ``--rope-heads``), saved as an attnlab
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

  python -m benchmarks.conversion [--kv-lora-rank 128] [--freq-fold 2] [--steps 100]
      [--modes ce,kd] [--lr 1e-4] [--workdir /tmp/attnlab-heal] [--stem NAME]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time

from benchmarks import report


def main(argv=None) -> int:
    from benchmarks.finetune import add_run_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_flags(p, steps=100, workdir="/tmp/attnlab-heal")
    p.add_argument("--kv-lora-rank", type=int, default=128)
    p.add_argument("--freq-fold", type=int, default=2)
    p.add_argument("--rope-heads", type=int, default=1)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--kd", type=float, default=0.5)
    p.add_argument("--modes", default="ce,kd")
    args = p.parse_args(argv)

    from benchmarks.finetune import plot, trainer_eval_loss, tune_and_measure, write_report
    from configs.finetune import get_config
    from models import pretrained
    from models.conversion import transmla
    from models.conversion.common import eval_perplexity, kv_bytes_per_token, split_tokens
    from train.trainer import parse_config

    stem = args.stem or f"transmla-heal-L{args.kv_lora_rank}-f{args.freq_fold}-{report.device_name()}-{report.today()}"
    os.makedirs(args.workdir, exist_ok=True)
    pre = pretrained.load(args.model)
    train_ids, eval_ids = split_tokens(args.model)
    score = dict(window=args.window)
    t0 = time.time()
    base = eval_perplexity(pre.config, pre.params, eval_ids, **score)
    rows = [{"stage": "original", "steps": 0, "ppl": base["ppl"], "kv_bytes_per_token":
             kv_bytes_per_token(pre.config), "wall_s": round(time.time() - t0, 1)}]
    print(rows[-1], flush=True)

    t0 = time.time()
    cfg, params, conv = transmla.convert_and_measure(
        pre, kv_lora_rank=args.kv_lora_rank, rope_heads=args.rope_heads, freq_fold=args.freq_fold,
        train_ids=train_ids, eval_ids=eval_ids, calib_tokens=args.calib_tokens, window=args.window)
    conv_dir = os.path.join(args.workdir, "converted")
    shutil.rmtree(conv_dir, ignore_errors=True)
    pretrained.export(pretrained.Pretrained(cfg, params, pre.tokenizer, args.model, dict(pre.metadata)),
                      conv_dir, format="native")
    rows.append({"stage": "converted", "steps": 0, "ppl": conv["ppl"],
                 "kv_bytes_per_token": conv["kv_bytes_per_token"], "wall_s": round(time.time() - t0, 1)})
    print(rows[-1], flush=True)

    curves = {}
    for mode in [m for m in args.modes.split(",") if m]:
        spec = (f"init={conv_dir},steps={args.steps},seq_len={args.seq_len},batch={args.batch},lr={args.lr}"
                + (f",teacher={args.model},kd={args.kd}" if mode == "kd" else ""))
        row, curves[mode] = tune_and_measure(spec, os.path.join(args.workdir, f"heal-{mode}"), eval_ids,
                                             start_cfg=cfg, start_params=params, window=args.window)
        rows.append({"stage": f"healed ({mode})", "steps": args.steps,
                     "kv_bytes_per_token": conv["kv_bytes_per_token"], **row})
        print(rows[-1], flush=True)

    png = os.path.join(args.out_dir, stem + ".png")
    exp = parse_config(get_config(f"init={args.model},seq_len={args.seq_len},batch={args.batch}"))
    ratio = conv["kv_bytes_per_token"] / rows[0]["kv_bytes_per_token"]
    plot(curves, math.exp(trainer_eval_loss(pre.config, pre.params, exp)),
         f"TransMLA on {args.model}: L={args.kv_lora_rank}, f={args.freq_fold}, r={args.rope_heads} "
         f"({ratio:.0%} KV)", f"healing steps ({args.batch} x {args.seq_len} tokens)", png)
    write_report(args, stem, f"TransMLA healing on {args.model}", rows, curves, png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
