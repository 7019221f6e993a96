"""What every conversion reports: held-out perplexity and KV-cache bytes per token.

**Held-out perplexity.** The tokens are ``train.data.tokenized_text`` (the pydoc text
through the model's tokenizer, as ``configs/finetune.py`` trains on); the last
5% of them (``train.data.tokenized_text_splits``) is the eval split the fine-tuning run holds out, so a model
healed on the train split is measured on text it has not seen. It is scored in
non-overlapping windows (``models.perplexity.score_windows``). Calibration tokens for
the conversions' PCAs come from the start of the train split.

**KV bytes per token**: the bytes a dense decode cache (``models.serving.make_cache``)
holds per token, over all layers, in the cache dtype (bf16 by default: 2 bytes).

Example:
  >>> from models.transformer import LMConfig
  >>> from models.conversion.common import kv_bytes_per_token
  >>> cfg = LMConfig(vocab_size=8, d_model=32, num_layers=2, num_heads=4, attn="gqa",
  ...                attn_overrides={"gqa": {"num_kv_heads": 2}})
  >>> kv_bytes_per_token(cfg)        # 2 layers x (k + v) x 2 kv heads x 8 dims x 2 bytes
  128
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

def split_tokens(tokenizer: str, text: str = "pydoc") -> tuple[np.ndarray, np.ndarray]:
    """``(train ids, eval ids)``: the split ``configs/finetune.py``'s data source makes."""
    from train.data import tokenized_text_splits

    return tokenized_text_splits(tokenizer, text)


def eval_perplexity(cfg, params, eval_ids, *, window: int = 256, batch: int = 4,
                    max_tokens: int | None = None) -> dict:
    """``{"tokens", "nll", "ppl"}`` of ``eval_ids`` in non-overlapping windows."""
    from models.perplexity import score_windows

    ids = [int(t) for t in (eval_ids[:max_tokens] if max_tokens else eval_ids)]
    n, total = score_windows(cfg, params, ids, window=window, batch=batch)
    return {"tokens": n, "nll": total / n, "ppl": math.exp(total / n)}


def kv_bytes_per_token(cfg, *, dtype=jnp.bfloat16, probe_len: int = 64) -> int:
    """Bytes per token of a dense decode cache for ``cfg``, summed over layers.

    Counts every floating-point cache leaf with a ``probe_len`` axis (keys, values,
    latents, RoPE keys), from the cache's abstract shapes, so it is the layout the model
    really caches; the int32 position / segment bookkeeping, the same for every
    mechanism, is left out.
    """
    from models.serving import make_cache

    shapes = jax.eval_shape(lambda: make_cache(cfg, 1, probe_len, dtype))
    total = 0
    for leaf in jax.tree.leaves(shapes):
        if probe_len in leaf.shape and jnp.issubdtype(leaf.dtype, jnp.floating):
            total += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
    return total // probe_len


def replace_attention(params, lm_config, convert_one, new_name: str, *, inputs=None):
    """Convert every MHA/GQA/MQA layer of an LM with ``convert_one``; rewrite the pattern.

    Args:
      params: the LM's params (``{"params": ...}`` or bare, boxed or not; scanned or not).
      lm_config: its ``LMConfig``.
      convert_one: ``(layer params, layer config, layer input [B, T, D] or None) ->
        (new layer params, new layer config)``, called once per layer (per repeat when
        scanned).
      new_name: the registry name the converted layers take in the pattern.
      inputs: optional ``{unit: {block_j: {"attn_norm": {"__call__": (x,)}}}}`` captured
        attention inputs (``capture_intermediates`` on ``attn_norm``), for calibration.

    Returns:
      ``(params, LMConfig)``. ``ValueError`` when no layer converts;
      ``NotImplementedError`` when the converted layers' configs differ or the pattern
      already uses ``new_name``.
    """
    import dataclasses

    from flax import linen as nn

    from attn import mha, registry

    convertible = lambda n: registry.get(n).module is mha.MHA
    wrapped = "params" in params
    tree = _to_dicts(nn.unbox(params["params"] if wrapped else params))
    cfg = lm_config
    todo = [j for j, n in enumerate(cfg.pattern) if convertible(n)]
    if not todo:
        raise ValueError(f"no GQA/MHA/MQA layer in attn={cfg.attn!r}")
    if new_name in cfg.pattern:
        raise NotImplementedError(f"the pattern already has {new_name!r} layers with their own config")
    units = ["units"] if cfg.scan_layers else [f"unit_{u}" for u in range(cfg.num_repeats)]
    new_cfgs = set()
    for j in todo:
        for unit in units:
            block = tree[unit][f"block_{j}"]
            x = None if inputs is None else inputs[unit][f"block_{j}"]["attn_norm"]["__call__"][0]

            def one(p, xs):
                out, m = convert_one(p, cfg.layer_configs[j], xs)
                new_cfgs.add(m)
                return out

            if cfg.scan_layers:  # leading layer axis: convert each repeat, restack
                outs = [one(jax.tree_util.tree_map(lambda a: a[i], block["attn"]),
                            None if x is None else x[i]) for i in range(cfg.num_repeats)]
                block["attn"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
            else:
                block["attn"] = one(block["attn"], x)
    if len(new_cfgs) != 1:
        raise NotImplementedError(
            "converted layers differ in shape (num_kv_heads / head_dim / window...), but one LM "
            "pattern name carries one config; convert such stacks layer by layer")
    (m,) = new_cfgs
    common = set(cfg.common_attention_fields()) - {"rope", "head_dim"}
    over = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in common}
    overrides = {k: dict(v) for k, v in cfg.attn_overrides.items() if not convertible(k)}
    overrides[new_name] = over
    pattern = ",".join(new_name if convertible(n) else n for n in cfg.pattern)
    new_cfg = dataclasses.replace(cfg, attn=pattern, attn_overrides=overrides)
    assert all(new_cfg.layer_configs[j] == m for j in todo), (new_cfg.layer_configs, m)
    return ({"params": tree} if wrapped else tree), new_cfg


def _to_dicts(tree):
    """Nested mappings (FrozenDict included) as plain dicts, so subtrees can be replaced."""
    if hasattr(tree, "items"):
        return {k: _to_dicts(v) for k, v in tree.items()}
    return tree


# --------------------------------------------------------------------------- command lines
def add_run_flags(p, *, ppl_window_flag: str = "--window") -> None:
    """The flags every conversion command shares: scoring, output, tracebacks."""
    p.add_argument("--model", default="smollm2-135m", help="a models.pretrained name or path")
    p.add_argument("--eval-tokens", type=int, default=None, help="score only the first N eval tokens")
    p.add_argument(ppl_window_flag, dest="ppl_window", type=int, default=256, help="perplexity window")
    p.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    p.add_argument("--results", default=None, help="write the rows as JSON here")
    p.add_argument("--out", default=None, help="save the converted model (one setting only)")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of user errors")


def original_row(pre, eval_ids, args, **extra) -> tuple[dict, dict]:
    """The original model's row (KV bytes, held-out perplexity), printed, and the scoring kwargs."""
    score = dict(window=args.ppl_window, batch=args.batch, max_tokens=args.eval_tokens)
    base = {**extra, "kv_bytes_per_token": kv_bytes_per_token(pre.config),
            **eval_perplexity(pre.config, pre.params, eval_ids, **score)}
    print(f"original kv_bytes/token {base['kv_bytes_per_token']} ppl {base['ppl']:.3f} "
          f"({base['tokens']} eval tokens, windows of {args.ppl_window})", flush=True)
    return base, score


def run_command(argv, prog: str, body) -> int:
    """``body(argv list, prog)`` with user errors as one line and exit code 2."""
    import sys

    from train.cli import guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded(prog, lambda: body(argv, prog), verbose="--verbose" in argv)


def save_converted(pre, cfg, params, out: str, *, source: str, method: str, settings: dict) -> None:
    """Write a converted model as an attnlab directory (``load(out)`` reads it back)."""
    from models import pretrained

    meta = {**pre.metadata, "converted_from": source, method: settings}
    pretrained.export(pretrained.Pretrained(cfg, params, pre.tokenizer, source, meta), out, format="native")
    print(f"saved {out}")


def write_results(path: str | None, model: str, rows: list) -> None:
    """``{"model", "rows"}`` as JSON at ``path`` (nothing when None)."""
    import json

    if path:
        with open(path, "w") as fh:
            json.dump({"model": model, "rows": rows}, fh, indent=2)
