"""TransMLA on a pretrained checkpoint: convert every GQA layer to MLA, measure, save.

For each requested latent size L (``--kv-lora-rank``, several allowed) and FreqFold
``f`` (``--freq-fold``), the model is converted with ``models.transmla_lm.convert_lm``
(RoRoPE with ``--rope-heads`` RoPE blocks, FreqFold, BKV-PCA calibrated on the first
``--calib-tokens`` tokens of the train split), and its held-out perplexity and KV-cache
bytes per token are measured next to the original's (``models.conversion.common``).
``--out DIR`` (one L and f only) writes the converted model as an attnlab directory,
which ``attnlab train --config finetune:init=DIR`` heals and ``attnlab perplexity
--model DIR`` scores.

Exactness: with ``--rope-heads`` = K (every kv head keeps RoPE) and L >= K·H the
conversion is exact (perplexity unchanged to float rounding); ``--rope-heads 1`` (the
paper's single RoPE key) drops the rotation of K - 1 rotated heads, and L below the
width of the NoPE key + value content compresses it (``attn/transmla.py``).

Command line::

  python -m models.conversion.transmla --model smollm2-135m --kv-lora-rank 256,128,64 \\
      [--rope-heads 1] [--freq-fold 1,4] [--calib-tokens 2048] [--eval-tokens N] \\
      [--window 256] [--results FILE.json] [--out DIR]

One line per conversion: ``L <L> f <f> kv_bytes/token <b> (<ratio> of original) ppl <p>``,
after one line for the original model.
"""

from __future__ import annotations

import argparse
import sys
import time


def convert_and_measure(pre, *, kv_lora_rank: int, rope_heads: int, freq_fold: int, train_ids,
                        eval_ids, calib_tokens: int = 2048, window: int = 256, batch: int = 4):
    """``(converted config, params, measurement row)`` for one TransMLA setting."""
    import jax.numpy as jnp

    from models.conversion.common import eval_perplexity, kv_bytes_per_token
    from models.transmla_lm import convert_lm

    t0 = time.time()
    calib = jnp.asarray(train_ids[:calib_tokens], jnp.int32)[None]
    params, cfg = convert_lm(pre.params, pre.config, kv_lora_rank=kv_lora_rank, rope_heads=rope_heads,
                             freq_fold=freq_fold, calib_tokens_BT=calib)
    convert_s = time.time() - t0
    row = {"kv_lora_rank": kv_lora_rank, "rope_heads": rope_heads, "freq_fold": freq_fold,
           "calib_tokens": int(calib.shape[1]), "kv_bytes_per_token": kv_bytes_per_token(cfg),
           "convert_s": round(convert_s, 1),
           **eval_perplexity(cfg, params, eval_ids, window=window, batch=batch)}
    return cfg, params, row


def main(argv=None, prog: str = "python -m models.conversion.transmla") -> int:
    """Entry point; user errors print one line and return 2."""
    from models.conversion.common import run_command

    return run_command(argv, prog, _main)


def _ints(flag: str, text: str) -> list[int]:
    from attn.errors import UserError

    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}={text!r}: expected comma-separated integers") from None
    if not out or min(out) < 1:
        raise UserError(f"{flag}={text!r}: expected positive integers")
    return out


def build_parser(prog: str = "python -m models.conversion.transmla") -> argparse.ArgumentParser:
    from models.conversion.common import add_run_flags

    p = argparse.ArgumentParser(prog=prog, description="TransMLA (GQA -> MLA) on a pretrained model.")
    p.add_argument("--kv-lora-rank", required=True, help="latent size(s) L, comma separated")
    p.add_argument("--rope-heads", type=int, default=1, help="RoPE key blocks r (1 = the paper)")
    p.add_argument("--freq-fold", default="1", help="FreqFold group size(s) f, comma separated")
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens (train split)")
    add_run_flags(p)
    return p


def _main(argv: list[str], prog: str) -> int:
    from attn.errors import UserError
    from models import pretrained
    from models.conversion.common import original_row, save_converted, split_tokens, write_results

    args = build_parser(prog).parse_args(argv)
    ranks, folds = _ints("--kv-lora-rank", args.kv_lora_rank), _ints("--freq-fold", args.freq_fold)
    if args.out and len(ranks) * len(folds) != 1:
        raise UserError("--out saves one conversion: give one --kv-lora-rank and one --freq-fold")
    for flag, v, low in (("--calib-tokens", args.calib_tokens, 1), ("--window", args.ppl_window, 2),
                         ("--batch", args.batch, 1)):
        if v < low:
            raise UserError(f"{flag}={v}: must be >= {low}")
    pre = pretrained.load(args.model)
    train_ids, eval_ids = split_tokens(args.model)
    base, score = original_row(pre, eval_ids, args, kv_lora_rank=None)
    rows = [base]
    for L in ranks:
        for f in folds:
            try:
                cfg, params, row = convert_and_measure(
                    pre, kv_lora_rank=L, rope_heads=args.rope_heads, freq_fold=f, train_ids=train_ids,
                    eval_ids=eval_ids[:args.eval_tokens] if args.eval_tokens else eval_ids,
                    calib_tokens=args.calib_tokens, window=args.ppl_window, batch=args.batch)
            except (ValueError, NotImplementedError) as e:
                raise UserError(f"TransMLA L={L} f={f}: {e}") from e
            row["kv_ratio"] = row["kv_bytes_per_token"] / base["kv_bytes_per_token"]
            rows.append(row)
            print(f"L {L} f {f} r {args.rope_heads} kv_bytes/token {row['kv_bytes_per_token']} "
                  f"({row['kv_ratio']:.3f} of original) ppl {row['ppl']:.3f}", flush=True)
            if args.out:
                save_converted(pre, cfg, params, args.out, source=args.model, method="transmla", settings={
                    k: row[k] for k in ("kv_lora_rank", "rope_heads", "freq_fold", "calib_tokens")})
    write_results(args.results, args.model, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
