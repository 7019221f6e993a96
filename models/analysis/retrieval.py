"""Retrieval-head scores (Wu et al., "Retrieval Head Mechanistically Explains Long-Context
Factuality", 2024) on needle-in-a-haystack runs.

For one run (a prompt with a needle, ``models.analysis.needle``), the model decodes
greedily; at decoding step ``i`` it emits token ``w_i``. Head ``(l, n)`` *copies* at that
step when its most attended key position ``j = argmax_s probs[l, n, i, s]`` lies in the
needle span and ``prompt[j] == w_i`` (copy-paste). Its score for the run is

    score[l, n] = (number of copying steps) / (needle length in tokens)

and the final score is the mean over runs (the paper's code adds ``1 / needle_len`` per
copying step, as here). How the attention is obtained: greedy generation with
``models.generate.generate_batch`` (KV cache, left padding), then one teacher-forced
forward pass over ``prompt + generated[:-1]`` with a ``HeadIntercept`` recording the
probabilities only at the generated rows. Attention is causal, so row ``P - 1 + i`` of
that pass is exactly the query of decoding step ``i``.

Command line::

  python -m models.analysis.retrieval --model smollm2-135m --context-lens 1024 2048 \\
      --depths 0 0.25 0.5 0.75 1 --n 8 --out DIR [--seed 0] [--batch 1] [--fmt qa]

writes ``DIR/retrieval_scores.json`` (``score`` ``[L][N]``, accuracy, the settings) and
``DIR/retrieval_heads.png`` (layer × head heatmap).

Example (the scoring rule on a hand-made attention argmax):
  >>> import numpy as np
  >>> from models.analysis.retrieval import copy_credit
  >>> top_LNM = np.array([[[2, 3], [0, 0]]])          # L=1, N=2 heads, M=2 steps
  >>> copy_credit(top_LNM, generated=[7, 8], prompt_ids=[1, 1, 7, 8, 1], needle_span=(2, 4)).tolist()
  [[1.0, 0.0]]
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
from models.analysis.capture import InterceptSpec, intercepted_apply, padded_inputs, unscan


def copy_credit(top_LNM, generated: Sequence[int], prompt_ids: Sequence[int],
                needle_span: tuple[int, int]) -> np.ndarray:
    """One run's retrieval score ``[L, N]`` from the argmax key positions of each step.

    Args:
      top_LNM: ``[L, N, M]`` int: for layer l, head n and generated step m, the prompt
        index of the most attended key (``-1``: no real key, e.g. padding).
      generated: the M generated tokens (``w_m``).
      prompt_ids: the prompt; ``needle_span = (a, b)``: the needle is ``prompt_ids[a:b]``.

    Example:
      >>> import numpy as np
      >>> top = np.array([[[5, 6, 6]]])                 # one head; step 2 repeats key 6
      >>> copy_credit(top, [3, 4, 9], [0] * 5 + [3, 4], (5, 7)).tolist()
      [[1.0]]
    """
    top = np.asarray(top_LNM)
    a, b = needle_span
    if not 0 <= a < b <= len(prompt_ids):
        raise UserError(f"copy_credit: needle_span {needle_span} is not inside the prompt of {len(prompt_ids)}")
    if top.ndim != 3 or top.shape[-1] != len(generated):
        raise UserError(f"copy_credit: top_LNM must be [L, N, M={len(generated)}], got {top.shape}")
    prompt = np.asarray(prompt_ids)
    w_M = np.asarray(generated)
    inside = (top >= a) & (top < b)
    copied = inside & (prompt[np.clip(top, 0, len(prompt) - 1)] == w_M)
    return copied.sum(-1) / float(b - a)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("rows",))
def _top_keys(config, params, tokens_BT, positions_BT, segment_ids_BT, *, rows):
    """``(argmax key index [L, B, N, rows], argmax logits [B, rows])`` of the last rows."""
    spec = InterceptSpec(probs_layers=tuple(range(config.num_layers)), rows=rows)
    logits, rec = intercepted_apply(config, params, tokens_BT, positions_BT=positions_BT,
                                    segment_ids_BT=segment_ids_BT, spec=spec)
    # An all-zero row (a padding query) has no key: mark it -1, never a real index.
    top = jnp.stack([jnp.where(rec["probs"][l].max(-1) > 0, jnp.argmax(rec["probs"][l], -1), -1)
                     for l in range(config.num_layers)])
    return top, jnp.argmax(logits[:, -rows:], -1)


def score_runs(gen_config, params, cases, *, eos_ids: Sequence[int] = (), max_new_tokens: int | None = None,
               batch: int = 1, progress: bool = False):
    """Generate greedily for every case and score every head on every run.

    Args:
      gen_config: the model's ``LMConfig`` (scanned or not: generation uses it as is;
        the capture pass uses ``unscan`` of it). params: its parameters.
      cases: ``[NeedleCase]``; prompts may differ in length (left padding).
      eos_ids: end-of-sequence ids for generation.
      max_new_tokens: default ``len(answer_ids) + 1`` of the longest answer.
      batch: cases per forward pass.

    Returns:
      ``(scores [R, L, N] float, generated: list of R token lists, correct [R] bool)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from models.transformer import LMConfig, Transformer
      >>> from models.analysis.needle import make_cases, CharTokenizer
      >>> cfg = LMConfig(vocab_size=128, d_model=16, num_layers=2, num_heads=2, dtype="float32")
      >>> v = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
      >>> cases = make_cases(CharTokenizer(), context_len=200, depths=(0.5,), n=2, seed=0)
      >>> s, gen, ok = score_runs(cfg, v, cases, batch=2)
      >>> s.shape, len(gen[0])
      ((2, 2, 2), 9)
    """
    from models.generate import generate_batch

    params = params["params"] if "params" in params else params
    cap_config, cap_params = unscan(gen_config, params)
    M = max_new_tokens or max(len(c.answer_ids) for c in cases) + 1
    T = max(len(c.prompt_ids) for c in cases) + M - 1  # one fixed shape: one compilation
    scores, gens, correct = [], [], []
    t0 = time.time()
    for i in range(0, len(cases), batch):
        chunk = cases[i:i + batch]
        out = generate_batch(gen_config, params, [list(c.prompt_ids) for c in chunk],
                             max_new_tokens=M, eos_ids=eos_ids)
        seqs = [list(c.prompt_ids) + g[:-1] for c, g in zip(chunk, out)]
        tok, pos, seg = padded_inputs(seqs, T)
        top_LBNM, _ = _top_keys(cap_config, cap_params, jnp.asarray(tok), jnp.asarray(pos),
                                jnp.asarray(seg), rows=M)
        top_LBNM = np.asarray(top_LBNM)
        for b, (c, g) in enumerate(zip(chunk, out)):
            pad = T - len(seqs[b])
            top = top_LBNM[:, b, :, M - len(g):]  # the rows of the len(g) generated steps
            top = np.where(top >= 0, top - pad, -1)  # array index -> prompt index
            scores.append(copy_credit(top, g, c.prompt_ids, c.needle_span))
            gens.append(g)
            correct.append(c.score(g))
        if progress:
            print(f"  {len(gens)}/{len(cases)} runs, {time.time() - t0:.0f}s, accuracy so far "
                  f"{np.mean(correct):.2f}", file=sys.stderr, flush=True)
    return np.stack(scores), gens, np.asarray(correct)


def plot_heatmap(score_LN, path: str, title: str = "retrieval score") -> str:
    """Layer × head heatmap PNG of ``score_LN [L, N]`` (matplotlib, Agg); returns ``path``.

    Example:
      >>> import numpy as np, tempfile, os
      >>> p = plot_heatmap(np.eye(3), os.path.join(tempfile.mkdtemp(), "h.png"))
      >>> os.path.getsize(p) > 0
      True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.asarray(score_LN)
    L, N = s.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * N, 1.0 + 0.22 * L))
    im = ax.imshow(s, aspect="auto", cmap="viridis", origin="upper")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(N))
    ax.set_yticks(range(0, L, max(1, L // 15)))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def top_heads(score_LN, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest-scoring ``(layer, head)`` pairs, best first (ties: lower index).

    Example:
      >>> top_heads([[0.1, 0.5], [0.3, 0.0]], 2)
      [(0, 1), (1, 0)]
    """
    s = np.asarray(score_LN, np.float64)
    order = np.argsort(-s.ravel(), kind="stable")[:k]
    return [(int(i) // s.shape[1], int(i) % s.shape[1]) for i in order]


# --------------------------------------------------------------------------- command line
def build_parser(prog="python -m models.analysis.retrieval") -> argparse.ArgumentParser:
    from models.analysis.needle import DEFAULT_DEPTHS, DEFAULT_FORMAT, FORMATS

    p = argparse.ArgumentParser(prog=prog, description="Retrieval-head scores on needle-in-a-haystack runs.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context-lens", type=int, nargs="+", default=[1024])
    p.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS))
    p.add_argument("--n", type=int, default=8, help="needles per context length (each at every depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fmt", default=DEFAULT_FORMAT, choices=FORMATS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--verbose", action="store_true")
    return p


def _main(argv) -> int:
    from models import pretrained
    from models.analysis.needle import make_cases

    args = build_parser().parse_args(argv)
    if args.n < 1 or args.batch < 1:
        raise UserError("--n and --batch must be >= 1")
    pre = pretrained.load(args.model)
    if any(c > 8192 for c in args.context_lens) and args.model == "smollm2-135m":
        raise UserError("--context-lens: SmolLM2-135M was trained up to 8192 tokens")
    os.makedirs(args.out, exist_ok=True)
    all_scores, per_len = [], {}
    t0 = time.time()
    for ctx in args.context_lens:
        cases = make_cases(pre.tokenizer, context_len=ctx, depths=args.depths, n=args.n,
                           seed=args.seed + ctx, fmt=args.fmt)
        print(f"context {ctx}: {len(cases)} runs", file=sys.stderr, flush=True)
        s, gens, ok = score_runs(pre.config, pre.params, cases, eos_ids=pre.tokenizer.eos_ids,
                                 batch=args.batch, progress=True)
        all_scores.append(s)
        by_depth = {str(d): float(np.mean([o for o, c in zip(ok, cases) if c.depth == d]))
                    for d in args.depths}
        per_len[str(ctx)] = dict(runs=len(cases), accuracy=float(ok.mean()), accuracy_by_depth=by_depth,
                                 score=s.mean(0).round(5).tolist(),
                                 generated_examples=[pre.tokenizer.decode(g) for g in gens[:3]])
        print(f"context {ctx}: accuracy {ok.mean():.3f} by depth {by_depth}", flush=True)
    score = np.concatenate(all_scores).mean(0)
    result = dict(model=args.model, fmt=args.fmt, context_lens=args.context_lens, depths=args.depths,
                  n=args.n, seed=args.seed, runs=int(sum(len(s) for s in all_scores)),
                  seconds=round(time.time() - t0, 1), score=score.round(5).tolist(),
                  top_heads=[dict(layer=l, head=h, score=round(float(score[l, h]), 4))
                             for l, h in top_heads(score, 20)],
                  per_context=per_len, command="python -m models.analysis.retrieval " + " ".join(argv))
    with open(os.path.join(args.out, "retrieval_scores.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_heatmap(score, os.path.join(args.out, "retrieval_heads.png"),
                 f"{args.model} retrieval score ({result['runs']} NIAH runs, ctx {args.context_lens})")
    print("top heads (layer:head score): " + ", ".join(
        f"{d['layer']}:{d['head']} {d['score']:.3f}" for d in result["top_heads"][:10]))
    print(f"wrote {args.out}/retrieval_scores.json and retrieval_heads.png")
    return 0


def main(argv=None) -> int:
    """Entry point of ``python -m models.analysis.retrieval``; a user error prints one line."""
    from train.cli import guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded("python -m models.analysis.retrieval", lambda: _main(argv), verbose="--verbose" in argv)


if __name__ == "__main__":
    sys.exit(main())
