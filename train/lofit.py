"""LoFiT: localized fine-tuning of attention heads' outputs (Yin, Ye and Durrett, NeurIPS 2024).

LoFiT freezes the model and tunes two small sets of vectors on attention heads' outputs
``z_i`` (``[H]`` per head i of layer l, before the output projection), in two steps:

1. **Head selection** (``peft.method="lofit_scale"``): learn a scale ``A_i [H]`` per head,
   ``z_i -> (1 + A_i) ⊙ z_i``, with an L1 penalty ``peft.l1 · Σ|A|`` in the loss; then
   keep the K heads whose ``|A_i|_2`` is largest (``python -m train.lofit``).
2. **Bias tuning** (``peft.method="lofit"``, ``peft.heads``): learn an offset ``v_i [H]``
   per chosen head, ``z_i -> z_i + v_i``; only these offsets are kept (K·H parameters).

Both are exact rewrites of the output kernel ``W_O [N, H, D]``, so no model code
changes: the scale is ``W_O[i] ⊙ (1 + A_i)[:, None]``, and the offset adds the constant
``Σ_i v_i W_O[i]`` to the layer's output bias (``o_bias``; a model without attention
biases gets zero ones: ``model.attention_bias=True``, which ``configs/finetune.py`` sets
for ``peft=lofit``). Merged (``train.peft.merge``), a LoFiT model is an ordinary model with
an output bias, which ``attnlab export`` writes as a Llama with ``attention_bias``.

Choices the paper leaves open here: ``A`` and ``v`` start at zero (the run starts exactly
at the pretrained model); ``peft.l1`` defaults to 1e-4.

Command line (step 1 -> the heads for step 2)::

  python -m train.lofit --workdir RUN_DIR --heads K [--out FILE.json]

prints ``layer.head,...`` (the K best heads, best first; give it as ``peft.heads`` or
``@FILE``) and writes every head's score to FILE.json.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jax.sharding import PartitionSpec as P
  >>> from attn.axes import EMBED, HEAD_DIM, HEADS
  >>> from train.peft import PeftConfig, attach, merge
  >>> p = {"unit_0": {"block_0": {"attn": {"o_kernel": jnp.ones((2, 3, 4)), "o_bias": jnp.zeros(4)}}}}
  >>> axes = {"unit_0": {"block_0": {"attn": {"o_kernel": P(HEADS, HEAD_DIM, EMBED), "o_bias": P(EMBED)}}}}
  >>> cfg = PeftConfig(method="lofit", heads="0.1")
  >>> a = attach(p, cfg, jax.random.key(0), axes)
  >>> a["unit_0"]["block_0"]["attn"]["o_kernel"]["head_mask"].tolist()
  [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
  >>> node = a["unit_0"]["block_0"]["attn"]["o_kernel"]
  >>> node["head_bias"] = jnp.full((2, 3), 0.5)
  >>> merge(a, cfg)["unit_0"]["block_0"]["attn"]["o_bias"].tolist()   # head 1 only: 3 x 0.5
  [1.5, 1.5, 1.5, 1.5]
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import jax
import jax.numpy as jnp

from train.peft import Method

_LAYER = re.compile(r"(?:^|/)(unit_(\d+)|units)/block_(\d+)/")


def _layer_index(names):
    """``name -> (unit index or None for scanned, block index)`` and the blocks per unit."""
    found = {n: _LAYER.search(n) for n in names}
    blocks = [int(m.group(3)) for m in found.values() if m]
    per_unit = max(blocks) + 1 if blocks else 1
    return found, per_unit


def parse_heads(spec: str) -> set[tuple[int, int]]:
    """``"3.1,10.7"`` (or ``"@FILE"`` holding that, or a JSON file from this module) as {(layer, head)}.

    Example:
      >>> sorted(parse_heads("3.1, 0.2"))
      [(0, 2), (3, 1)]
    """
    text = spec.strip()
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read().strip()
        if text.startswith("{"):
            text = json.loads(text)["heads"]
    out = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            layer, head = (int(x) for x in part.split("."))
        except ValueError:
            raise ValueError(f"peft.heads: {part!r} is not 'layer.head' (e.g. '3.1')") from None
        out.add((layer, head))
    if not out:
        raise ValueError("peft.heads is empty: give 'layer.head,...' or '@FILE' (python -m train.lofit)")
    return out


def _check_heads_kernel(w, name, lead, I):
    """LoFiT acts on per-head outputs: the kernel must be ``[..., N, H, D]``."""
    if w.ndim - lead != 3 or w.shape[lead] * w.shape[lead + 1] != I:
        raise ValueError(f"peft LoFiT: {name} {tuple(w.shape)} is not a per-head output kernel "
                         "[..., heads, head_dim, d_model] (peft.targets should match attn/o_kernel)")


def _make_scale(w, *, name, lead, I, O, cfg, key, names):
    _check_heads_kernel(w, name, lead, I)
    return {"head_scale": jnp.zeros(w.shape[:-1], w.dtype)}


def _make_bias(w, *, name, lead, I, O, cfg, key, names):
    _check_heads_kernel(w, name, lead, I)
    found, per_unit = _layer_index(names)
    m = found.get(name)
    if m is None:
        raise ValueError(f"peft LoFiT: cannot tell the layer of {name} (expected unit_R/block_J/ or units/block_J/)")
    heads = parse_heads(cfg.heads)
    N = w.shape[lead]
    stacked = m.group(2) is None                         # scanned: leading axis = unit index
    units = range(w.shape[0]) if stacked else [int(m.group(2))]
    mask = jnp.zeros(w.shape[:-1], w.dtype)
    for u in units:
        layer = u * per_unit + int(m.group(3))
        for h in sorted(h for (l, h) in heads if l == layer):
            if not 0 <= h < N:
                raise ValueError(f"peft.heads: layer {layer} has heads 0..{N - 1}, got {layer}.{h}")
            mask = mask.at[(u, h) if stacked else (h,)].set(1.0)
    return {"head_bias": jnp.zeros(w.shape[:-1], w.dtype), "head_mask": mask}


def _fold_scale(node, cfg):
    w = node["base"]
    return w * (1 + node["head_scale"].astype(w.dtype))[..., None], None


def _fold_bias(node, cfg):
    w = node["base"]
    v = (node["head_bias"] * node["head_mask"]).astype(w.dtype)
    return w, jnp.einsum("...nh,...nhd->...d", v, w)


def _l1(node, cfg):
    return cfg.l1 * jnp.sum(jnp.abs(node["head_scale"].astype(jnp.float32)))


_O = r"attn/o_kernel$"
METHODS = {
    "lofit_scale": Method(("head_scale",), _O, _make_scale, _fold_scale, penalty=_l1),
    "lofit": Method(("head_bias",), _O, _make_bias, _fold_bias, frozen=("head_mask",)),
}


def head_scores(params) -> dict[tuple[int, int], float]:
    """``{(layer, head): |A_i|_2}`` over the ``head_scale`` nodes of a ``lofit_scale`` state."""
    from train.optim import param_path

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [param_path(p) for p, _ in leaves]
    found, per_unit = _layer_index(names)
    scores = {}
    for path, x in leaves:
        name = param_path(path)
        if not name.endswith("/head_scale") or found.get(name) is None:
            continue
        m = found[name]
        norms = jnp.linalg.norm(jnp.asarray(x, jnp.float32), axis=-1)       # [..., N]
        stacked = m.group(2) is None
        rows = norms if stacked else norms[None]
        for i, row in enumerate(rows):
            layer = (i if stacked else int(m.group(2))) * per_unit + int(m.group(3))
            for h, s in enumerate(row.tolist()):
                scores[(layer, h)] = float(s)
    if not scores:
        raise ValueError("no LoFiT head scales in these parameters: was the run peft.method='lofit_scale'?")
    return scores


def main(argv=None, prog: str = "python -m train.lofit") -> int:
    """Entry point: the top heads of a ``lofit_scale`` run; user errors print one line, return 2."""
    from train.cli import guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded(prog, lambda: _main(argv, prog), verbose="--verbose" in argv)


def build_parser(prog: str = "python -m train.lofit") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="LoFiT head selection from a lofit_scale run.")
    p.add_argument("--workdir", required=True, help="the lofit_scale run's --workdir")
    p.add_argument("--heads", type=int, required=True, help="K heads to keep")
    p.add_argument("--out", default=None, help="write the heads and every score as JSON here")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of user errors")
    return p


def _main(argv, prog) -> int:
    from attn.errors import UserError
    from train.restore import restore_trained

    args = build_parser(prog).parse_args(argv)
    if args.heads < 1:
        raise UserError(f"--heads={args.heads}: must be >= 1")
    _, variables, step = restore_trained(args.workdir, merged=False)
    try:
        scores = head_scores(variables["params"])
    except ValueError as e:
        raise UserError(f"{args.workdir}: {e}") from e
    best = sorted(scores, key=lambda lh: -scores[lh])[:args.heads]
    heads = ",".join(f"{l}.{h}" for l, h in best)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"workdir": args.workdir, "step": step, "heads": heads,
                       "scores": [[l, h, s] for (l, h), s in sorted(scores.items())]}, f, indent=1)
    print(heads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
