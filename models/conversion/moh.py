"""MoH conversion of a pretrained checkpoint: every MHA/GQA layer into Mixture-of-Head attention.

The MoH-LLaMA3 recipe (Jin et al. 2024, §4.4, and the released
``MoH-LLaMA3/Inference_code``): the first ``h_s`` query heads of every layer become
shared heads, the others routed heads, of which each token uses ``top_k``, chosen by the
parameter-free router ``attn.moh`` calls ``router="query_norm"`` (a head's query norm over
the routed heads' std, binary gates). No parameter is added, so the converted model is
the original with ``N - h_s - top_k`` heads dropped per token, and continued training
(``attnlab train --config finetune:init=DIR``, all parameters) adapts it. The paper
continue-tunes LLaMA3-8B with 50% shared heads and 75% of heads active
(``h_s = N/2``, ``top_k = N/4``); on SmolLM2 (N = 9) that is ``h_s = 4, top_k = 2``.

``--router learned`` instead adds §3.2's routers (zero, so the routed choice starts at
the lowest-index heads) with the released code's gate scaling (every active head starts
at weight 1): the control that shows what a content-based choice is worth.

Command line::

  python -m models.conversion.moh --model smollm2-135m --shared-heads 4 --top-k 5,3,2,1 \\
      [--router query_norm|learned] [--eval-tokens N] [--window 256] [--results FILE.json] \\
      [--out DIR]

One line per setting: ``h_s <h> top_k <k> active <A>/<N> ppl <p>``, after the original.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from models.transformer import LMConfig, Transformer
  >>> from models.conversion.moh import convert_lm
  >>> cfg = LMConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=4, attn="gqa",
  ...                attn_overrides={"gqa": {"num_kv_heads": 2}}, dtype="float32")
  >>> v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  >>> v_all, cfg_all = convert_lm(v, cfg, num_shared_heads=2, top_k=2)   # every head active
  >>> t = jnp.arange(3)[None]
  >>> cfg_all.attn, bool(jnp.allclose(Transformer(cfg).apply(v, t)[0],
  ...                                 Transformer(cfg_all).apply(v_all, t)[0], atol=1e-5))
  ('moh', True)
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from attn import mha, registry


def _convertible(name: str) -> bool:
    return registry.get(name).module is mha.MHA


def convert_lm(params, lm_config, *, num_shared_heads: int, top_k: int, router: str = "query_norm"):
    """``(params, LMConfig)`` with every MHA/GQA/MQA layer of ``lm_config`` as MoH.

    Args:
      params: the LM's params (``{"params": ...}`` or bare; scanned or not).
      lm_config: its ``models.transformer.LMConfig``.
      num_shared_heads, top_k: ``attn.moh.Config`` fields (h_s, routed heads per token).
      router: "query_norm" (no new parameters) or "learned" (zero routers, official gate
        scaling, so every active head starts at weight 1).

    ``ValueError`` when no layer converts, or the pattern already has "moh" layers.
    """
    from flax import linen as nn

    from models.transformer import Transformer

    cfg = lm_config
    if not any(_convertible(n) for n in cfg.pattern):
        raise ValueError(f"MoH conversion: no MHA/GQA/MQA layer in attn={cfg.attn!r}")
    if "moh" in cfg.pattern:
        raise ValueError("MoH conversion: the pattern already has 'moh' layers with their own config")
    layer_cfgs = {cfg.layer_configs[j] for j, n in enumerate(cfg.pattern) if _convertible(n)}
    if len(layer_cfgs) != 1:
        raise ValueError("MoH conversion: the converted layers differ (num_kv_heads / window ...), "
                         "but one pattern name carries one config")
    (base,) = layer_cfgs
    common = set(cfg.common_attention_fields()) - {"head_dim"}
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name not in common}
    fields.update(num_shared_heads=num_shared_heads, top_k=top_k, router=router,
                  gate_scaling="official")
    overrides = {k: dict(v) for k, v in cfg.attn_overrides.items() if not _convertible(k)}
    overrides["moh"] = fields
    new_cfg = dataclasses.replace(
        cfg, attn=",".join("moh" if _convertible(n) else n for n in cfg.pattern), attn_overrides=overrides)
    wrapped = "params" in params
    old = nn.unbox(params["params"] if wrapped else params)
    want = jax.eval_shape(lambda: nn.unbox(Transformer(new_cfg).init(
        jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"])
    old_flat = dict(jax.tree_util.tree_flatten_with_path(old)[0])

    def fill(path, leaf):  # attention weights carry over; new routers start at zero
        if path in old_flat:
            return old_flat[path]
        if not str(path[-1].key).endswith("router_kernel"):
            raise ValueError(f"MoH conversion: no value for {jax.tree_util.keystr(path)}")
        return jnp.zeros(leaf.shape, leaf.dtype)

    tree = jax.tree_util.tree_map_with_path(fill, want)
    return ({"params": tree} if wrapped else tree), new_cfg


def build_parser(prog: str = "python -m models.conversion.moh") -> argparse.ArgumentParser:
    from models.conversion.common import add_run_flags

    p = argparse.ArgumentParser(prog=prog, description="MoH conversion of a pretrained model.")
    p.add_argument("--shared-heads", type=int, default=None, help="h_s (default: half the heads)")
    p.add_argument("--top-k", default=None, help="routed heads per token, comma separated "
                   "(default: a quarter of the heads)")
    p.add_argument("--router", default="query_norm", choices=("query_norm", "learned"))
    add_run_flags(p)
    return p


def main(argv=None, prog: str = "python -m models.conversion.moh") -> int:
    """Entry point; user errors print one line and return 2."""
    from models.conversion.common import run_command

    return run_command(argv, prog, _main)


def _main(argv: list[str], prog: str) -> int:
    from attn.errors import UserError
    from models import pretrained
    from models.conversion.common import (eval_perplexity, original_row, save_converted, split_tokens,
                                          write_results)
    from models.conversion.transmla import _ints

    args = build_parser(prog).parse_args(argv)
    ks = None if args.top_k is None else _ints("--top-k", args.top_k)
    if args.out and ks and len(ks) != 1:
        raise UserError("--out saves one conversion: give one --top-k")
    pre = pretrained.load(args.model)
    N = pre.config.num_heads
    hs = N // 2 if args.shared_heads is None else args.shared_heads
    ks = ks or [max(1, N // 4)]
    _, eval_ids = split_tokens(args.model)
    base, score = original_row(pre, eval_ids, args, num_shared_heads=None, active_heads=N)
    rows = [base]
    for k in ks:
        t0 = time.time()
        try:
            params, cfg = convert_lm(pre.params, pre.config, num_shared_heads=hs, top_k=k, router=args.router)
        except ValueError as e:
            raise UserError(str(e)) from e
        row = {"num_shared_heads": hs, "top_k": k, "router": args.router, "active_heads": hs + k,
               "active_fraction": (hs + k) / N, "convert_s": round(time.time() - t0, 1),
               **eval_perplexity(cfg, params, eval_ids, **score)}
        rows.append(row)
        print(f"h_s {hs} top_k {k} active {hs + k}/{N} router {args.router} ppl {row['ppl']:.3f}", flush=True)
        if args.out:
            save_converted(pre, cfg, params, args.out, source=args.model, method="moh",
                           settings={k_: row[k_] for k_ in ("num_shared_heads", "top_k", "router")})
    write_results(args.results, args.model, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
