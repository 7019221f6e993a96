"""Attention maps of chosen heads: one PNG per head (query × key probabilities).

Command line::

  python -m models.analysis.maps --model smollm2-135m --prompt "The capital of France is Paris." \\
      --heads 3:1 14:5 --out DIR [--chat] [--last-rows N]

writes ``DIR/L<layer>_H<head>.png`` per head. Prompts up to ``--label-max`` tokens (48)
get their tokens on both axes; longer ones get indices. ``--last-rows N`` draws only the
last N query rows (long prompts).

Example:
  >>> import jax, jax.numpy as jnp, os, tempfile
  >>> from flax import linen as nn
  >>> from models.transformer import LMConfig, Transformer
  >>> from models.analysis.maps import head_maps, plot_map
  >>> cfg = LMConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, dtype="float32")
  >>> v = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  >>> maps = head_maps(cfg, v, [1, 2, 3, 4], [(1, 0)])
  >>> maps[(1, 0)].shape
  (4, 4)
  >>> os.path.exists(plot_map(maps[(1, 0)], os.path.join(tempfile.mkdtemp(), "m.png"), list("abcd")))
  True
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from attn.errors import UserError
from models.analysis.capture import InterceptSpec, capture, parse_heads, unscan


def head_maps(config, params, token_ids: Sequence[int], heads, *, rows=None) -> dict:
    """``{(layer, head): probs [T_sel, T]}`` float32 for one prompt (scanned or not).

    Args:
      config, params: the model (``unscan`` is applied when needed).
      token_ids: the prompt ``[T]``. heads: ``(layer, head)`` pairs.
      rows: query rows (``capture.row_indices``): None all, int the last n.

    Example: see the module docstring.
    """
    cfg, p = unscan(config, params)
    heads = [tuple(h) for h in heads]
    if not heads:
        raise UserError("head_maps: give at least one LAYER:HEAD")
    spec = InterceptSpec(probs_layers=tuple(sorted({l for l, _ in heads})), rows=rows)
    spec.validate(cfg.num_layers, cfg.num_heads)
    for l, n in heads:
        if not 0 <= n < cfg.num_heads:
            raise UserError(f"head {l}:{n}: head must be in [0, {cfg.num_heads})")
    _, rec = capture(cfg, p, jnp.asarray([list(token_ids)], jnp.int32), spec=spec)
    return {(l, n): np.asarray(rec["probs"][l][0, n]) for l, n in heads}


def plot_map(probs_TS, path: str, labels: Sequence[str] | None = None, title: str = "",
             row_offset: int = 0) -> str:
    """Draw ``probs_TS [T_sel, S]`` (queries down, keys across) to a PNG; returns ``path``.

    ``labels``: the S token strings (the query axis uses the last ``T_sel`` of them).

    Example: see the module docstring.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    P = np.asarray(probs_TS)
    T, S = P.shape
    side = min(14.0, 3.0 + 0.22 * S)
    fig, ax = plt.subplots(figsize=(side, min(14.0, 2.5 + 0.22 * T) if labels is not None else side * T / S + 1))
    im = ax.imshow(P, cmap="magma", vmin=0.0, vmax=max(float(P.max()), 1e-6), aspect="auto")
    if labels is not None:
        show = [repr(s)[1:-1] for s in labels]
        ax.set_xticks(range(S))
        ax.set_xticklabels(show, rotation=90, fontsize=7)
        ax.set_yticks(range(T))
        ax.set_yticklabels(show[S - T:], fontsize=7)
    else:
        ax.set_ylabel(f"query (rows from {row_offset})")
    ax.set_xlabel("key")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser(prog="python -m models.analysis.maps") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Attention maps of chosen heads, one PNG each.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", required=True)
    p.add_argument("--heads", nargs="+", required=True, help="LAYER:HEAD ...")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--last-rows", type=int, default=None, help="only the last N query rows")
    p.add_argument("--label-max", type=int, default=48, help="label axes with tokens up to this length")
    p.add_argument("--out", required=True)
    p.add_argument("--verbose", action="store_true")
    return p


def _main(argv) -> int:
    from models import pretrained

    args = build_parser().parse_args(argv)
    heads = parse_heads(args.heads)
    pre = pretrained.load(args.model)
    text = (pre.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
            if args.chat else args.prompt)
    ids = pre.tokenizer.encode(text)
    if not ids:
        raise UserError("--prompt: encodes to no tokens")
    if args.last_rows is not None and not 1 <= args.last_rows <= len(ids):
        raise UserError(f"--last-rows={args.last_rows}: must be in [1, {len(ids)}]")
    maps = head_maps(pre.config, pre.params, ids, heads, rows=args.last_rows)
    os.makedirs(args.out, exist_ok=True)
    labels = [pre.tokenizer.decode([t], skip_special_tokens=False) for t in ids] \
        if len(ids) <= args.label_max else None
    for (l, n), P in maps.items():
        path = plot_map(P, os.path.join(args.out, f"L{l}_H{n}.png"), labels,
                        title=f"{args.model} layer {l} head {n} ({len(ids)} tokens)",
                        row_offset=len(ids) - P.shape[0])
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    """Entry point of ``python -m models.analysis.maps``; a user error prints one line."""
    from train.cli import guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded("python -m models.analysis.maps", lambda: _main(argv), verbose="--verbose" in argv)


if __name__ == "__main__":
    sys.exit(main())
