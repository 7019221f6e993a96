"""Zoology-style MQAR sweep: recall accuracy against cost for every registered mechanism.

    python -m benchmarks.zoo --quick                       # every mechanism, width 64, 64/4
    python -m benchmarks.zoo                               # widths 32,64 x 64/16, 800 steps
    python -m benchmarks.zoo --preset full                 # ... x 64/4 up to 512/64, 1500 steps
    python -m benchmarks.zoo --mechanisms mha,mla --steps 20 --widths 64 --settings 64/4 \
        --out-dir /tmp/zoo

Each cell trains the 2-layer MQAR LM of ``configs/mqar.py`` (loaded by file path, never
imported as a package) for a fixed number of steps through
``train.trainer.train_and_evaluate`` and records:
  * ``accuracy``: eval accuracy on the queried values (the trainer's ``eval/accuracy``);
  * ``attn_params``, ``kv_bytes_per_token``, ``attn_flops_per_token``: the mechanisms'
    ``stats(config, seq_len)`` summed over the model's layers (so a "gqa,mla" hybrid
    counts one layer of each);
  * ``step_ms``: measured train-step time, ``B·T / tokens_per_s`` of the trainer's last
    logging window (logging is set to two windows, so compilation falls in the first).
Outputs: ``<stem>.md`` / ``<stem>.json`` (via ``benchmarks.report``) and two PNGs:
``<stem>-acc-vs-width.png`` and ``<stem>-acc-vs-kv.png``.

Per-mechanism overrides at each width come from each mechanism's own
``small_config(width)`` hook (``registry.small_overrides``), the same ones configs/mqar.py
uses: MLA's latent and head dims scale with the width (its defaults are DeepSeek-V2's
512-rank latent), MoH uses the released code's gate scaling, CCA a compression that
divides the head count. A new mechanism brings its own; nothing here names mechanisms.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time

from benchmarks import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MQAR_CONFIG = os.path.join(REPO, "configs", "mqar.py")
NUM_HEADS = 4
NUM_LAYERS = 2


def head_dim(width: int) -> int:
    """H per width: 32 at width 64 (what configs/mqar.py found recall needs), D/4 above."""
    return max(32, width // NUM_HEADS)


# Sweep presets. "quick" is a plumbing check (< 5 min on 2 CPU cores: compilation
# dominates, and 40 steps are far too few for the recall circuit to form, so accuracies
# sit near chance; ~4 min measured). "default" is sized for < 30 min on 2 CPU cores
# (18 cells; measured 18.6 min on 2 cores shared with other jobs, load average 8-12) and
# chosen to separate mechanisms: 16 key-value pairs in 64 tokens is harder than the main
# job's 8, and 800 steps is about when the recall circuit forms, so the fast learners
# (cca, ccgqa, mha, gqa) reach >= 0.99 while mla stays near 0.09.
# Calibration probes on 2 shared cores: at 64/16, mha learns (0.997 at width 32 after
# 800 steps, 1.0 at width 64 after 1000) while mla does not yet (0.089 at width 32 after
# 800, 0.642 at width 64 after 1000); at 64/4 and 250 steps (the old default) only
# cca/ccgqa had learned; at 128/16 a width-64 step took 163 ms (2-4x 64/16) and after 600
# steps mha was at 0.08, cca at 1.0. Width 128 took 3-5x width 64's step time in the old
# default sweep, so it is left to "full". "full" is the Zoology-like range (64/4 up to
# 512/64) with the step budget configs/mqar.py found recall needs; it is meant for an
# accelerator.
# (The mla probes above used qk 24 + 8 / v 32 at width 64; mla's small_config, shared
# with configs/mqar.py since, gives qk 16 + 8 / v 16: rerun before quoting mla cells.)
PRESETS: dict[str, dict] = {
    "quick": dict(widths=(64,), settings=((64, 4),), steps=40, hybrids=("gqa,mla", "moh,gqa")),
    "default": dict(widths=(32, 64), settings=((64, 16),), steps=800,
                    hybrids=("gqa,mla", "moh,gqa")),
    "full": dict(widths=(64, 128, 256), settings=((64, 4), (128, 8), (256, 16), (512, 64)),
                 steps=1500, hybrids=("gqa,mla", "moh,gqa")),
}


def load_mqar_config(path: str = MQAR_CONFIG):
    """``configs/mqar.py``'s ``get_config``, loaded by file path (configs are not a package)."""
    spec = importlib.util.spec_from_file_location("attnlab_configs_mqar", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load the MQAR config from {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config


def build_config(pattern: str, width: int, seq_len: int, kv: int, steps: int, *,
                 eval_batch: int = 256, eval_steps: int = 4, seed: int = 0):
    """The MQAR config for one cell: configs/mqar.py defaults plus the sweep's overrides.

    Args:
      pattern: registry names, comma separated ("mha", "gqa,mla").
      width: d_model. seq_len, kv: MQAR sequence length and key-value pairs.
      steps: training steps (fixed budget).

    Example:
      >>> c = build_config("gqa,mla", 64, 64, 4, 10)
      >>> c.model.attn, c.model.attn_overrides["mla"]["kv_lora_rank"]
      ('gqa,mla', 32)
    """
    c = load_mqar_config()(f"steps={steps},seed={seed},kv={kv}")
    names = list(dict.fromkeys(pattern.split(",")))
    c.model.attn = pattern
    c.model.d_model = width
    c.model.num_heads = NUM_HEADS
    c.model.head_dim = head_dim(width)
    plen = len(pattern.split(","))
    c.model.num_layers = NUM_LAYERS if NUM_LAYERS % plen == 0 else plen  # a multiple of the pattern
    from attn import registry  # lazily, like model_stats: importing zoo stays cheap

    c.model.attn_overrides = registry.small_overrides(names, width)
    # Keys come from [1, V/2): the vocab must hold kv distinct keys (Zoology uses 8192).
    vocab = max(128, 4 * kv)
    c.model.vocab_size = vocab
    c.data.seq_len = seq_len
    c.data.options.vocab_size = vocab
    c.data.eval_batch_size = eval_batch
    c.train.eval_steps = eval_steps
    c.train.eval_every = 0
    # Two logging windows: the last one excludes compilation, so it gives the step time.
    c.train.log_every = max(1, steps // 2)
    c.train.progress_bar = False
    c.checkpoint.enabled = False
    return c


def model_stats(config) -> dict:
    """Attention ``stats()`` summed over the layers of ``config.model`` (an LMConfig dict)."""
    from attn import registry
    from models.transformer import LMConfig

    lm = LMConfig(**config.model.to_dict())
    pattern = lm.attn.split(",")
    total = {"params": 0, "kv_bytes_per_token": 0, "flops_per_token": 0, "state_bytes": 0}
    for layer in range(lm.num_layers):
        i = layer % len(pattern)
        s = registry.get(pattern[i]).stats(lm.layer_configs[i], config.data.seq_len)
        for k in total:
            total[k] += int(s.get(k, 0))
    return total


def run_cell(pattern, width, seq_len, kv, steps, **kw) -> dict:
    """Train one cell and return its row (accuracy, stats, step time)."""
    from train.trainer import train_and_evaluate

    c = build_config(pattern, width, seq_len, kv, steps, **kw)
    st = model_stats(c)
    work = tempfile.mkdtemp(prefix="zoo-")
    t = time.time()
    try:
        m = train_and_evaluate(c, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tok_s = m.get("train/tokens_per_s", float("nan"))
    return dict(mechanism=pattern, width=width, seq_len=seq_len, kv_pairs=kv, steps=steps,
                accuracy=m["eval/accuracy"], eval_loss=m["eval/loss"], attn_params=st["params"],
                kv_bytes_per_token=st["kv_bytes_per_token"],
                attn_flops_per_token=st["flops_per_token"],
                step_ms=1e3 * c.data.batch_size * seq_len / tok_s, wall_s=time.time() - t)


def plot(rows, out_dir: str, stem: str) -> list[str]:
    """The two PNGs (matplotlib Agg): accuracy vs width, accuracy vs KV bytes per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("accuracy") is not None]
    settings = sorted({(r["seq_len"], r["kv_pairs"]) for r in ok})
    mechs = list(dict.fromkeys(r["mechanism"] for r in ok))
    paths = []
    fig, axes = plt.subplots(1, max(1, len(settings)), figsize=(5 * max(1, len(settings)), 4), squeeze=False)
    for ax, (T, kv) in zip(axes[0], settings):
        for m in mechs:
            pts = sorted((r["width"], r["accuracy"]) for r in ok if r["mechanism"] == m
                         and (r["seq_len"], r["kv_pairs"]) == (T, kv))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        ax.set(title=f"MQAR T={T}, kv={kv}", xlabel="model width", ylabel="eval accuracy", xscale="log",
               ylim=(-0.02, 1.02))
        ax.set_xticks(sorted({r["width"] for r in ok}), labels=[str(w) for w in sorted({r["width"] for r in ok})])
        ax.minorticks_off()  # the log axis would otherwise label 4x10^1, 6x10^1 ...
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{stem}-acc-vs-width.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in mechs:
        pts = [(r["kv_bytes_per_token"], r["accuracy"]) for r in ok if r["mechanism"] == m]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=m)
    ax.set(title="MQAR accuracy against KV-cache bytes per token (all layers)",
           xlabel="KV bytes per token", ylabel="eval accuracy", xscale="log", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{stem}-acc-vs-kv.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


COLUMNS = ["mechanism", "width", "seq_len", "kv_pairs", "steps", "accuracy", "eval_loss", "attn_params",
           "kv_bytes_per_token", "attn_flops_per_token", "step_ms", "wall_s", "error"]


def _settings(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple(tuple(int(x) for x in s.split("/")) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--settings wants seq/kv pairs like 64/4,256/16, got {text!r}")


def main(argv=None) -> list[str]:
    """CLI entry; returns the written paths (json, md, two png)."""
    from attn import registry

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="same as --preset quick (< 5 min on CPU)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--mechanisms", default=None, help="comma list (default: registry.names())")
    ap.add_argument("--hybrids", default=None, help="';'-separated patterns, e.g. 'gqa,mla;moh,gqa'")
    ap.add_argument("--widths", default=None, help="comma list of d_model")
    ap.add_argument("--settings", type=_settings, default=None, help="seq/kv pairs: 64/4,256/16")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-batch", type=int, default=256)
    ap.add_argument("--eval-steps", type=int, default=4)
    ap.add_argument("--out-dir", default=report.DEFAULT_DIR)
    ap.add_argument("--stem", default=None, help="default zoo[-quick]-<device>-<date>")
    a = ap.parse_args(argv)
    preset = "quick" if a.quick else a.preset
    base = PRESETS[preset]
    mechs = a.mechanisms.split(",") if a.mechanisms else list(registry.names())
    unknown = sorted(set(mechs) - set(registry.names()))
    if unknown:
        ap.error(f"unknown mechanism(s) {unknown}; registered: {list(registry.names())}")
    hybrids = (a.hybrids.split(";") if a.hybrids is not None else
               ([] if a.mechanisms else list(base["hybrids"])))
    patterns = mechs + [h for h in hybrids if h]
    widths = tuple(int(w) for w in a.widths.split(",")) if a.widths else base["widths"]
    settings = a.settings or base["settings"]
    steps = a.steps or base["steps"]
    if steps < 2:
        ap.error("--steps must be >= 2 (the step time comes from the second logging window)")

    stem = a.stem or f"zoo-{preset}-{report.device_name()}-{report.today()}"
    meta = dict(title=f"MQAR zoo ({preset}) on {report.device_name()}", preset=preset, steps=steps,
                num_layers=NUM_LAYERS, num_heads=NUM_HEADS,
                stats="attn_params / kv_bytes_per_token / attn_flops_per_token: attention stats() "
                      "summed over layers (embeddings and MLPs excluded)",
                step_ms="B*T / train tokens_per_s of the last logging window (excludes compile)",
                sweep_overrides={m: str(o) + " (at width 64)"
                                 for m, o in registry.small_overrides(mechs, 64).items()})
    rows: list[dict] = []
    for T, kv in settings:
        for w in widths:
            for p in patterns:
                try:
                    row = run_cell(p, w, T, kv, steps, eval_batch=a.eval_batch, eval_steps=a.eval_steps)
                except Exception as e:  # noqa: BLE001 -- a failing cell is reported, the sweep goes on
                    row = dict(mechanism=p, width=w, seq_len=T, kv_pairs=kv, steps=steps,
                               error=f"{type(e).__name__}: {str(e)[:200]}")
                rows.append(row)
                print(" ".join(f"{k}={report._fmt(v)}" for k, v in row.items()), flush=True)
                # Rewritten after every cell: a sweep stopped early still leaves its table.
                report.write(a.out_dir, stem, dict(meta, cells_done=f"{len(rows)} of "
                             f"{len(settings) * len(widths) * len(patterns)}"), rows, columns=COLUMNS)
    pngs = plot(rows, a.out_dir, stem)
    paths = report.write(a.out_dir, stem, meta, rows, columns=COLUMNS,
                         sections=[("Plots", "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                                       for p in pngs))])
    print(f"{len(rows)} cells -> {paths + pngs}")
    return paths + pngs


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
