"""Needle accuracy with heads ablated or patched (``HeadIntercept``), and its command line.

* **Accuracy** is greedy exact match, measured by one teacher-forced pass over
  ``prompt + answer`` (``needle.teacher_forced_correct``): greedy decoding reproduces the
  value exactly when each answer row's argmax is the next answer token and the row after
  the value does not continue the number.
* **Ablation**: the top-k retrieval heads (from ``retrieval_scores.json``), zero- or
  mean-ablated (the mean output of each head over the real tokens of the evaluation
  prompts, ``capture.mean_head_outputs``), against k random heads drawn from the heads
  *outside* the top-k (several draws), against none.
* **Activation patching**: for a case with value ``a``, a copy with another value ``b``
  of the same length (every digit different) gives aligned runs. The outputs of a head
  set are recorded on ``prompt_b + answer_b`` and written into the run on
  ``prompt_a + answer_b`` at the answer rows only (the last ``len(answer) + 1`` rows:
  the question's last token and the answer tokens), so the only path by which ``b`` can
  reach the prediction is through the patched heads. ``flip``: the fraction of cases
  whose greedy answer becomes exactly ``b`` (teacher-forced on ``b``, which is the greedy
  path whenever the answer is ``b``); ``digits_b`` / ``digits_a``: the fraction of digit
  rows whose argmax is ``b``'s / ``a``'s digit.

Command line::

  python -m models.analysis.ablation --scores DIR/retrieval_scores.json --model smollm2-135m \\
      --context-len 1024 --n 4 --ks 5 10 20 --draws 2 --modes zero mean [--patch] --out DIR

prints a markdown table and writes ``DIR/ablation.json`` and ``DIR/ablation.md``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> from models.transformer import LMConfig, Transformer
  >>> from models.analysis.needle import make_cases, CharTokenizer
  >>> from models.analysis.capture import InterceptSpec
  >>> cfg = LMConfig(vocab_size=128, d_model=16, num_layers=2, num_heads=2, dtype="float32")
  >>> v = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
  >>> cases = make_cases(CharTokenizer(), context_len=200, depths=(0.5,), n=2, seed=0)
  >>> needle_accuracy(cfg, v["params"], cases, spec=InterceptSpec(ablate=((0, 1),))).shape
  (2,)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attn.errors import UserError
from models.analysis.capture import InterceptSpec, intercepted_apply, mean_head_outputs, padded_inputs, unscan
from models.analysis.needle import NeedleCase, other_value, teacher_forced_correct, with_value


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("spec", "rows"))
def _answer_rows(config, params, tokens_BT, positions_BT, segment_ids_BT, mean_o, patch_o, *, spec, rows):
    """``(argmax [B, rows] of the last rows, records)`` of one intercepted pass."""
    logits, rec = intercepted_apply(config, params, tokens_BT, positions_BT=positions_BT,
                                    segment_ids_BT=segment_ids_BT, spec=spec, mean_o=mean_o,
                                    patch_o=patch_o)
    return jnp.argmax(logits[:, -rows:], -1), rec


def _forced(cases: Sequence[NeedleCase], answers: Sequence[Sequence[int]]):
    """Left-padded ``prompt + answer`` inputs of one batch and the row count."""
    rows = max(len(a) for a in answers) + 1
    seqs = [list(c.prompt_ids) + list(a) for c, a in zip(cases, answers)]
    return [jnp.asarray(x) for x in padded_inputs(seqs)], rows


def answer_argmax(config, params, cases, *, answers=None, spec: InterceptSpec = InterceptSpec(),
                  mean_o=None, patch_o=None):
    """Teacher-forced argmax at the answer rows: ``([B, len(answer) + 1] int, records)``.

    ``answers`` (default each case's ``answer_ids``) are appended to the prompts; rows
    are those predicting each answer token and the one after. All cases must have
    equal answer lengths. ``config`` must be unscanned (``capture.unscan``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from models.transformer import LMConfig, Transformer
      >>> from models.analysis.needle import make_cases, CharTokenizer
      >>> cfg = LMConfig(vocab_size=128, d_model=16, num_layers=1, num_heads=2, dtype="float32")
      >>> v = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
      >>> c = make_cases(CharTokenizer(), context_len=200, depths=(1.0,), n=1, seed=0)
      >>> answer_argmax(cfg, v["params"], c)[0].shape
      (1, 9)
    """
    answers = [c.answer_ids for c in cases] if answers is None else answers
    if len({len(a) for a in answers}) != 1:
        raise UserError("answer_argmax: answers in one batch must have equal token lengths")
    (tok, pos, seg), rows = _forced(cases, answers)
    top, rec = _answer_rows(config, params, tok, pos, seg, mean_o, patch_o, spec=spec, rows=rows)
    return np.asarray(top), rec


def needle_accuracy(config, params, cases, *, spec: InterceptSpec = InterceptSpec(), mean_o=None,
                    batch: int = 1) -> np.ndarray:
    """Greedy exact-match correctness ``[R]`` bool of every case under ``spec``.

    Example: see the module docstring.
    """
    params = params["params"] if "params" in params else params
    config, params = unscan(config, params)
    out = []
    for i in range(0, len(cases), batch):
        chunk = cases[i:i + batch]
        top, _ = answer_argmax(config, params, chunk, spec=spec, mean_o=mean_o)
        out += [teacher_forced_correct(t, c) for t, c in zip(top, chunk)]
    return np.asarray(out)


def patch_flip(config, params, cases, tokenizer, heads, *, seed: int = 0) -> dict:
    """Patch ``heads`` from the run with another value into each case (module docstring).

    Returns ``dict(flip=fraction answering b exactly, digits_b=..., digits_a=...)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from models.transformer import LMConfig, Transformer
      >>> from models.analysis.needle import make_cases, CharTokenizer
      >>> cfg = LMConfig(vocab_size=128, d_model=16, num_layers=2, num_heads=2, dtype="float32")
      >>> v = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
      >>> c = make_cases(CharTokenizer(), context_len=200, depths=(1.0,), n=1, seed=0)
      >>> sorted(patch_flip(cfg, v["params"], c, CharTokenizer(), [(1, 0)]))
      ['digits_a', 'digits_b', 'flip']
    """
    params = params["params"] if "params" in params else params
    config, params = unscan(config, params)
    heads = tuple(tuple(h) for h in heads)
    layers = tuple(sorted({l for l, _ in heads}))
    rng = np.random.default_rng(seed)
    flips, dig_b, dig_a = [], [], []
    for c in cases:
        b_case = with_value(c, tokenizer, other_value(c.value, rng))
        _, rec = answer_argmax(config, params, [b_case], spec=InterceptSpec(out_layers=layers))
        A = len(c.answer_ids)
        spec = InterceptSpec(patch=heads, patch_rows=A + 1)
        top, _ = answer_argmax(config, params, [c], answers=[b_case.answer_ids], spec=spec,
                               patch_o=rec["o"])
        flips.append(teacher_forced_correct(top[0], b_case))
        pred = top[0][:A]
        is_digit = np.array([t in c.digit_ids for t in b_case.answer_ids])
        dig_b.append(np.mean((pred == np.array(b_case.answer_ids))[is_digit]))
        dig_a.append(np.mean((pred == np.array(c.answer_ids))[is_digit]))
    return dict(flip=float(np.mean(flips)), digits_b=float(np.mean(dig_b)), digits_a=float(np.mean(dig_a)))


def random_heads(k: int, num_layers: int, num_heads: int, exclude, rng) -> list[tuple[int, int]]:
    """``k`` distinct random ``(layer, head)`` pairs not in ``exclude``.

    Example:
      >>> random_heads(3, 2, 2, [(0, 0)], np.random.default_rng(0)) == sorted(random_heads(
      ...     3, 2, 2, [(0, 0)], np.random.default_rng(0)))
      True
    """
    pool = [(l, n) for l in range(num_layers) for n in range(num_heads) if (l, n) not in set(exclude)]
    if k > len(pool):
        raise UserError(f"random_heads: k={k} but only {len(pool)} heads are outside the excluded set")
    pick = rng.choice(len(pool), size=k, replace=False)
    return sorted(pool[i] for i in pick)


# --------------------------------------------------------------------------- command line
def build_parser(prog="python -m models.analysis.ablation") -> argparse.ArgumentParser:
    from models.analysis.needle import DEFAULT_DEPTHS, DEFAULT_FORMAT, FORMATS

    p = argparse.ArgumentParser(prog=prog, description="Needle accuracy with retrieval heads ablated / patched.")
    p.add_argument("--scores", required=True, help="retrieval_scores.json of models.analysis.retrieval")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context-len", type=int, default=1024)
    p.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS))
    p.add_argument("--n", type=int, default=4, help="needles (each at every depth)")
    p.add_argument("--seed", type=int, default=1000, help="needle seed (default differs from the scoring runs)")
    p.add_argument("--fmt", default=DEFAULT_FORMAT, choices=FORMATS)
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--draws", type=int, default=2, help="random head sets per k")
    p.add_argument("--modes", nargs="+", default=["zero", "mean"], choices=["zero", "mean"])
    p.add_argument("--random-modes", nargs="+", default=["zero"], choices=["zero", "mean"])
    p.add_argument("--patch", action="store_true", help="also run activation patching")
    p.add_argument("--patch-ks", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--patch-n", type=int, default=None, help="patch only the first N cases (default all)")
    p.add_argument("--out", required=True)
    p.add_argument("--verbose", action="store_true")
    return p


def _main(argv) -> int:
    from models import pretrained
    from models.analysis.needle import make_cases
    from models.analysis.retrieval import top_heads

    args = build_parser().parse_args(argv)
    try:
        with open(args.scores) as f:
            score = np.asarray(json.load(f)["score"])
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"--scores {args.scores}: cannot read a retrieval score: {e}") from None
    pre = pretrained.load(args.model)
    L, N = pre.config.num_layers, pre.config.num_heads
    if score.shape != (L, N):
        raise UserError(f"--scores: score has shape {score.shape}, the model has [L, N]=({L}, {N})")
    os.makedirs(args.out, exist_ok=True)
    cfg, params = unscan(pre.config, pre.params)
    cases = make_cases(pre.tokenizer, context_len=args.context_len, depths=args.depths, n=args.n,
                       seed=args.seed, fmt=args.fmt)
    rng = np.random.default_rng(args.seed)
    rows, t0 = [], time.time()

    def run(name, k, mode, heads):
        spec = InterceptSpec(ablate=heads, ablate_mode="mean" if mode == "mean" else "zero")
        ok = needle_accuracy(cfg, params, cases, spec=spec, mean_o=mean_o if mode == "mean" else None)
        rows.append(dict(condition=name, k=k, mode=mode, accuracy=float(ok.mean()), heads=heads))
        print(f"  {name:<10} k={k:<3} {mode:<5} accuracy {ok.mean():.3f}  ({time.time() - t0:.0f}s)",
              file=sys.stderr, flush=True)

    mean_o = None
    if "mean" in args.modes + args.random_modes:
        mean_o = mean_head_outputs(cfg, params, [list(c.prompt_ids) for c in cases[::len(args.depths)]], batch=1)
    run("none", 0, "-", [])
    for k in args.ks:
        top = top_heads(score, k)
        for mode in args.modes:
            run("top", k, mode, top)
        for d in range(args.draws):
            heads = random_heads(k, L, N, top, rng)
            for mode in args.random_modes:
                run(f"random#{d}", k, mode, heads)
    patch_rows = []
    if args.patch:
        for k in args.patch_ks:
            for name, heads in [("top", top_heads(score, k)),
                                ("random", random_heads(k, L, N, top_heads(score, k), rng))]:
                r = patch_flip(cfg, params, cases[:args.patch_n], pre.tokenizer, heads, seed=args.seed)
                patch_rows.append(dict(condition=name, k=k, heads=heads, **r))
                print(f"  patch {name:<7} k={k:<3} flip {r['flip']:.3f} digits_b {r['digits_b']:.3f} "
                      f"digits_a {r['digits_a']:.3f} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    md = _table(rows, patch_rows, args, len(cases))
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(dict(settings=vars(args), cases=len(cases), ablation=rows, patching=patch_rows,
                       seconds=round(time.time() - t0, 1),
                       command="python -m models.analysis.ablation " + " ".join(argv)), f, indent=1)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


def _table(rows, patch_rows, args, n_cases) -> str:
    """Markdown: accuracy per (k, condition), random draws averaged and listed."""
    base = next(r["accuracy"] for r in rows if r["condition"] == "none")
    out = [f"Needle accuracy, {n_cases} cases at {args.context_len} tokens (none: {base:.3f})", "",
           "| k | top-k zero | top-k mean | random zero (draws) | random mean (draws) |", "|---|---|---|---|---|"]
    for k in args.ks:
        def cell(cond, mode):
            acc = [r["accuracy"] for r in rows if r["k"] == k and r["mode"] == mode and r["condition"].startswith(cond)]
            if not acc:
                return "-"
            return f"{acc[0]:.3f}" if cond == "top" else f"{np.mean(acc):.3f} ({', '.join(f'{a:.2f}' for a in acc)})"
        out.append(f"| {k} | {cell('top', 'zero')} | {cell('top', 'mean')} | {cell('random', 'zero')} | "
                   f"{cell('random', 'mean')} |")
    if patch_rows:
        n_patch = n_cases if args.patch_n is None else min(args.patch_n, n_cases)
        out += ["", f"Activation patching, {n_patch} cases (answer rows, from the run with another value b)", "",
                "| k | heads | flip to b | digits = b | digits = a |", "|---|---|---|---|---|"]
        out += [f"| {r['k']} | {r['condition']} | {r['flip']:.3f} | {r['digits_b']:.3f} | {r['digits_a']:.3f} |"
                for r in patch_rows]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    """Entry point of ``python -m models.analysis.ablation``; a user error prints one line."""
    from train.cli import guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded("python -m models.analysis.ablation", lambda: _main(argv), verbose="--verbose" in argv)


if __name__ == "__main__":
    sys.exit(main())
