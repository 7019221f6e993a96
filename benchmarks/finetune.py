"""Full fine-tuning vs LoRA vs Hydra vs LoFiT on SmolLM2, same steps and tokens (docs/conversion.md).

The task built from embedded data: adapt SmolLM2-135M-Instruct to the pydoc text (its
train split, through ``configs/finetune.py``); scored by held-out perplexity on the eval
split it never trains on (``models.conversion.common.eval_perplexity``), before and
after. Every method gets the same ``--steps`` x ``--batch`` x ``--seq-len`` tokens; the
learning rate is each method's usual one (``--lr-full``, ``--lr-adapter``, ``--lr-lofit``).
Also reported: trainable parameters, wall time, the healing curve of the trainer's eval.

``lofit`` runs LoFiT's two steps (``train/lofit.py``): ``--lofit-select-steps`` of head
scales with the L1 penalty (its own row, ``lofit_scale``), the ``--lofit-heads`` best
heads, then ``--steps`` of offsets on those heads only (the ``lofit`` row).

  python -m benchmarks.finetune [--methods full,lora,hydra,lofit] [--steps 100] [--rank 8]
      [--lofit-heads 16] [--lofit-select-steps 25] [--workdir /tmp/attnlab-ft] [--stem NAME]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time

import jax

from benchmarks import report


def trainer_eval_loss(cfg, params, exp) -> float:
    """The trainer's eval (its fixed eval windows of the eval split) on ``params``."""
    from models.transformer import Transformer
    from train.data import make_source
    from train.metrics import weighted_sums

    source = make_source(exp.data)
    B = exp.data.eval_batch_size or exp.data.batch_size
    apply = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x)[0])
    loss = weight = 0.0
    for i in range(exp.train.eval_steps):
        b = source.batch("eval", i, B)
        s = weighted_sums(apply(params, b["inputs"]), b["targets"], b["weights"])
        loss, weight = loss + float(s["loss_sum"]), weight + float(s["weight_sum"])
    return loss / weight


def tune_and_measure(spec: str, workdir: str, eval_ids, *, start_cfg, start_params, window: int = 256):
    """Run ``configs/finetune.py:<spec>`` in ``workdir`` and measure it.

    Returns ``(row, curve)``: held-out perplexity after, trainable parameters, wall
    time; the curve is ``[(step, exp(trainer eval loss))]`` from step 0 (computed here on
    ``start_params``, the same windows) to the end (the run's tensorboard).
    """
    from configs.finetune import get_config
    from models.conversion.common import eval_perplexity
    from train import peft
    from train.metrics import read_scalars
    from train.restore import restore_trained
    from train.trainer import _compiled_for, parse_config, train_and_evaluate

    config = get_config(spec)
    config.checkpoint.async_save = False
    exp = parse_config(config)
    start = trainer_eval_loss(start_cfg, start_params, exp)
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.time()
    out = train_and_evaluate(config, workdir)
    wall = time.time() - t0
    c = _compiled_for(exp)
    trainable = sum(int(a.size) for a, t in zip(jax.tree.leaves(c.abstract_state["params"]),
                                                jax.tree.leaves(c.trainable)) if t)
    cfg, variables, _ = restore_trained(workdir)
    after = eval_perplexity(cfg, jax.device_get(variables["params"]), eval_ids, window=window)
    # Adapter parameters of the trained state (a LoFiT mask's chosen heads need values).
    adapter = peft.count(restore_trained(workdir, merged=False)[1]["params"])[0] if exp.peft.method else 0
    tb = read_scalars(os.path.join(workdir, "tb")).get("eval/loss", [])
    curve = [(0, math.exp(start))] + [(s, math.exp(v)) for s, v in tb]
    row = {"ppl": after["ppl"], "trainable": trainable, "adapter": adapter,
           "wall_s": round(wall, 1),
        "s_per_step": round(wall / exp.train.num_steps, 2), "final_train_loss": out.get("train/loss")}
    return row, curve


def plot(curves: dict, baseline: float | None, title: str, xlabel: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        xs, ys = zip(*sorted(set(pts)))
        ax.plot(xs, ys, marker="o", label=name)
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", label="original model")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("eval perplexity (trainer's eval windows)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def add_run_flags(p: argparse.ArgumentParser, *, steps: int, workdir: str) -> None:
    """The flags both fine-tuning benchmarks share (model, budget, scoring, output)."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--window", type=int, default=256, help="held-out perplexity window")
    p.add_argument("--workdir", default=workdir)
    p.add_argument("--out-dir", default=os.path.join(report.DEFAULT_DIR, "conversion"))
    p.add_argument("--stem", default=None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_flags(p, steps=100, workdir="/tmp/attnlab-ft")
    p.add_argument("--methods", default="full,lora,hydra")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr-full", type=float, default=1e-4)
    p.add_argument("--lr-adapter", type=float, default=1e-3)
    p.add_argument("--lr-lofit", type=float, default=5e-3)
    p.add_argument("--lofit-heads", type=int, default=16, help="K heads LoFiT tunes")
    p.add_argument("--lofit-select-steps", type=int, default=25)
    p.add_argument("--lofit-l1", type=float, default=1e-4)
    args = p.parse_args(argv)

    from models import pretrained
    from models.conversion.common import eval_perplexity, split_tokens

    stem = args.stem or f"finetune-methods-{report.device_name()}-{report.today()}"
    pre = pretrained.load(args.model)
    _, eval_ids = split_tokens(args.model)
    base = eval_perplexity(pre.config, pre.params, eval_ids, window=args.window)
    rows = [{"method": "none (original)", "steps": 0, "ppl": base["ppl"]}]
    print(rows[-1], flush=True)
    curves = {}
    for m in [x for x in args.methods.split(",") if x]:
        common = f"init={args.model},steps={args.steps},seq_len={args.seq_len},batch={args.batch}"
        extra = {}
        if m == "full":
            spec = f"{common},lr={args.lr_full}"
        elif m == "lofit":
            heads, row, curves["lofit_scale"] = lofit_select(args, pre, eval_ids)
            rows.append(row)
            print(rows[-1], flush=True)
            spec, extra = f"{common},lr={args.lr_lofit},peft=lofit,heads={heads}", {"heads": row["heads"]}
        else:
            spec = f"{common},lr={args.lr_adapter},peft={m},rank={args.rank}"
        row, curves[m] = tune_and_measure(spec, os.path.join(args.workdir, m), eval_ids,
                                          start_cfg=pre.config, start_params=pre.params, window=args.window)
        rows.append({"method": m, "steps": args.steps, **row, **extra})
        print(rows[-1], flush=True)
        # Written after every method: a long run stopped early keeps what it measured.
        png = os.path.join(args.out_dir, stem + ".png")
        plot(curves, None, f"Fine-tuning {args.model} on the pydoc text ({args.batch} x {args.seq_len} "
             "tokens/step)", "steps", png)
        write_report(args, stem, f"Fine-tuning methods on {args.model}", rows, curves, png)
    return 0


def lofit_select(args, pre, eval_ids):
    """LoFiT step 1: head scales with L1, then the best ``--lofit-heads`` heads ("l.h,...")."""
    from train.lofit import head_scores
    from train.restore import restore_trained

    steps = args.lofit_select_steps
    spec = (f"init={args.model},steps={steps},seq_len={args.seq_len},batch={args.batch},"
            f"lr={args.lr_lofit},peft=lofit_scale,l1={args.lofit_l1}")
    workdir = os.path.join(args.workdir, "lofit_scale")
    row, curve = tune_and_measure(spec, workdir, eval_ids, start_cfg=pre.config,
                                  start_params=pre.params, window=args.window)
    scores = head_scores(restore_trained(workdir, merged=False)[1]["params"])
    best = sorted(scores, key=lambda lh: -scores[lh])[:args.lofit_heads]
    heads = ",".join(f"{l}.{h}" for l, h in best)
    path = os.path.join(args.workdir, "lofit_heads.txt")  # the arg string splits on commas
    with open(path, "w") as f:
        f.write(heads)
    return "@" + path, {"method": "lofit_scale", "steps": steps, **row, "heads": heads}, curve


def write_report(args, stem: str, title: str, rows: list, curves: dict, png: str) -> None:
    """``<stem>.json`` / ``.md`` beside the plot: rows, the curves and every flag of the run."""
    meta = {"title": title, "setting": vars(args),
            "curves": {m: [list(x) for x in c] for m, c in curves.items()}, "plot": os.path.basename(png)}
    for path in report.write(args.out_dir, stem, meta, rows):
        print("wrote", path)
    print("wrote", png)


if __name__ == "__main__":
    raise SystemExit(main())
