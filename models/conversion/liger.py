"""Liger on a pretrained checkpoint: every softmax layer as gated linear attention, same weights.

``attn/linear/liger.py`` is the layer (the recipe, with its sources); converting is a
change of config only, since Liger keeps the layer's q/k/v/o kernels and adds nothing:
the pattern's MHA/GQA names become "liger" (``--hybrid``: Liger attention, sliding
window ``--window`` + GLA; ``--no-hybrid``: the pure recurrent layer). The model is then
recovered with LoRA (``attnlab train --config finetune:init=DIR,peft=lora``), as the
paper does.

Measured here, next to the original: held-out perplexity, needle-in-a-haystack accuracy
(``models.analysis.needle``, exact match, teacher-forced), and the per-sequence decode
state (the GLA state plus the window's ring buffer; a softmax layer's KV cache instead
grows by ``kv_bytes_per_token``).

Command line::

  python -m models.conversion.liger --model smollm2-135m [--window 64] [--no-hybrid]
      [--needle-len 512] [--needles 4] [--eval-tokens N] [--ppl-window 256] [--results FILE.json]
      [--out DIR]

Example:
  >>> import jax, jax.numpy as jnp
  >>> from models.transformer import LMConfig, Transformer
  >>> from models.conversion.liger import convert_lm, state_bytes
  >>> cfg = LMConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, attn="gqa",
  ...                attn_overrides={"gqa": {"num_kv_heads": 1}}, dtype="float32")
  >>> v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  >>> v2, cfg2 = convert_lm(v, cfg, window=4)
  >>> cfg2.attn, cfg2.layer_configs[0].window, state_bytes(cfg2)   # 2 x (GLA state + ring of 4)
  ('liger', 4, 1344)
"""

from __future__ import annotations

import argparse
import dataclasses


def convert_lm(params, lm_config, *, hybrid: bool = True, window: int | None = None, mix: float = 0.5):
    """``(params, LMConfig)``: the same parameters, every MHA/GQA/MQA layer as "liger"."""
    from attn.linear import liger
    from models.conversion.common import replace_attention

    def one(p, c, _):
        if c.window is not None:
            raise NotImplementedError("Liger conversion: the layer already has a sliding window")
        return p, liger.Config.from_mha(c, hybrid=hybrid, mix=mix, window=window)

    return replace_attention(params, lm_config, one, "liger")


def state_bytes(cfg, *, dtype="bfloat16") -> int:
    """Per-sequence decode state of ``cfg`` summed over layers (0 for softmax layers)."""
    from attn import registry

    total = 0
    for layer, name in zip(cfg.layer_configs, cfg.pattern):
        s = registry.get(name).stats(dataclasses.replace(layer, dtype=dtype), 1)
        total += s.get("state_bytes", 0) * cfg.num_repeats
    return int(total)


def needle_accuracy(cfg, params, tokenizer, *, context_len: int, n: int, seed: int = 0) -> float:
    """Exact-match accuracy over ``n`` needles x 5 depths at ``context_len`` tokens."""
    import numpy as np

    from models.analysis.ablation import needle_accuracy as acc
    from models.analysis.needle import make_cases

    cases = make_cases(tokenizer, context_len=context_len, n=n, seed=seed)
    return float(np.mean(acc(cfg, params, cases)))


def build_parser(prog: str = "python -m models.conversion.liger") -> argparse.ArgumentParser:
    from models.conversion.common import add_run_flags

    p = argparse.ArgumentParser(prog=prog, description="Liger linearization of a pretrained model.")
    p.add_argument("--window", type=int, default=64, help="sliding window of Liger attention")
    p.add_argument("--no-hybrid", dest="hybrid", action="store_false", help="pure gated linear attention")
    p.add_argument("--needle-len", type=int, default=512, help="needle prompt length (0 = skip)")
    p.add_argument("--needles", type=int, default=4, help="needles per depth (5 depths)")
    add_run_flags(p, ppl_window_flag="--ppl-window")
    return p


def main(argv=None, prog: str = "python -m models.conversion.liger") -> int:
    """Entry point; user errors print one line and return 2."""
    from models.conversion.common import run_command

    return run_command(argv, prog, _main)


def measure(cfg, params, tokenizer, eval_ids, args) -> dict:
    """Held-out perplexity, needle accuracy and decode state of one model."""
    from models.conversion.common import eval_perplexity, kv_bytes_per_token

    row = {**eval_perplexity(cfg, params, eval_ids, window=args.ppl_window, batch=args.batch,
                             max_tokens=args.eval_tokens),
           "kv_bytes_per_token": kv_bytes_per_token(cfg), "state_bytes": state_bytes(cfg)}
    if args.needle_len:
        row["needle_acc"] = needle_accuracy(cfg, params, tokenizer, context_len=args.needle_len, n=args.needles)
    return row


def _main(argv: list[str], prog: str) -> int:
    from attn.errors import UserError
    from models import pretrained
    from models.conversion.common import save_converted, split_tokens, write_results

    args = build_parser(prog).parse_args(argv)
    if args.hybrid and args.window < 1:
        raise UserError(f"--window={args.window}: must be >= 1")
    pre = pretrained.load(args.model)
    _, eval_ids = split_tokens(args.model)
    rows = [{"model": "original", **measure(pre.config, pre.params, pre.tokenizer, eval_ids, args)}]
    print(rows[-1], flush=True)
    try:
        params, cfg = convert_lm(pre.params, pre.config, hybrid=args.hybrid, window=args.window)
    except (ValueError, NotImplementedError) as e:
        raise UserError(str(e)) from e
    name = f"liger attention (window {args.window})" if args.hybrid else "liger gla"
    rows.append({"model": name, **measure(cfg, params, pre.tokenizer, eval_ids, args)})
    print(rows[-1], flush=True)
    if args.out:
        save_converted(pre, cfg, params, args.out, source=args.model, method="liger",
                       settings={"hybrid": args.hybrid, "window": args.window})
    write_results(args.results, args.model, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
