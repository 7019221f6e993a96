"""{MHA, MLA} x {dense SwiGLU, MoE at equal active parameters} x {AdamW, Muon} on the embedded text.

Every cell trains ``configs/moe.py`` (byte-level LM on pydoc text) for the same token
budget, for each learning-rate multiplier in ``--lr_scales`` (applied to both the Adam and
the Muon rates), and keeps its best final eval bits per byte. The MoE replaces every
layer's FFN (``dense_first=0``) with ``experts`` routed experts, top-``top_k``, one
shared expert, each of width ``ffn_dim // (top_k + 1)``: the active FFN parameters per
token equal the dense SwiGLU's (the router's ``D·E`` aside). The committed MoE cells
balanced with the Switch auxiliary loss (``balance=aux``), run before the trainer
carried the ``moe_state`` collection that DeepSeek-V3's bias rule needs; ``--balance
bias`` is available now.

Run (the committed result used the short budget below on 2 shared CPU cores):

    python -m benchmarks.moe_study --steps 150 --lr_scales 1 --out benchmarks/results/moe_study_cpu

Writes ``<out>.json`` (every run) and ``<out>.md`` (the table, device, versions, command).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time

import jax


def _cell_config(attn: str, ffn: str, optim: str, steps: int, lr_scale: float, seed: int,
                 balance: str = "aux"):
    from configs import moe as moe_config

    c = moe_config.get_config(f"attn={attn},ffn={ffn},dense_first=0,optim={optim},steps={steps},seed={seed},"
                              f"balance={balance}")
    c.optim.learning_rate = c.optim.learning_rate * lr_scale
    c.optim.muon_learning_rate = c.optim.muon_learning_rate * lr_scale
    c.checkpoint.enabled = False
    c.train.progress_bar = False
    c.train.eval_every = 0
    return c


def _model_figures(c) -> dict:
    """KV bytes per token (all layers) and active / total FFN parameters per layer."""
    from attn import registry
    from models import ffn
    from models.transformer import LMConfig

    cfg = LMConfig.from_dict(c.model)
    reps = cfg.num_repeats
    kv = sum(registry.get(n).stats(lc, c.data.seq_len)["kv_bytes_per_token"]
             for n, lc in zip(cfg.pattern, cfg.layer_configs)) * reps
    f = [ffn.get(n).stats(fc) for n, fc in cfg.ffn_configs]
    return dict(kv_bytes_per_token=int(kv), ffn_active_params=int(sum(s["active_params"] for s in f) * reps),
                ffn_params=int(sum(s["params"] for s in f) * reps))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr_scales", type=str, default="0.5,1,2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balance", type=str, default="aux", choices=["aux", "bias", "none"],
                   help="MoE load balancing (the committed table used aux)")
    p.add_argument("--attn", type=str, default="mha,mla")
    p.add_argument("--ffn", type=str, default="swiglu,moe")
    p.add_argument("--optim", type=str, default="adamw,muon")
    p.add_argument("--out", type=str, default="benchmarks/results/moe_study_cpu")
    a = p.parse_args(argv)
    from train.trainer import train_and_evaluate

    scales = [float(s) for s in a.lr_scales.split(",")]
    runs = []
    for attn, ffn_name, optim in itertools.product(a.attn.split(","), a.ffn.split(","), a.optim.split(",")):
        for scale in scales:
            c = _cell_config(attn, ffn_name, optim, a.steps, scale, a.seed, a.balance)
            t0 = time.time()
            with tempfile.TemporaryDirectory() as wd:
                m = train_and_evaluate(c, wd)
            run = dict(attn=attn, ffn=ffn_name, optim=optim, lr_scale=scale, steps=a.steps,
                       tokens=a.steps * c.data.batch_size * c.data.seq_len,
                       bits_per_byte=float(m["eval/bits_per_byte"]), tokens_per_s=float(m["train/tokens_per_s"]),
                       wall_s=time.time() - t0, **_model_figures(c))
            print(json.dumps(run), flush=True)
            runs.append(run)
            with open(a.out + ".json", "w") as f:
                json.dump(dict(command=" ".join(sys.argv), runs=runs), f, indent=1)
    best = {}
    for r in runs:
        key = (r["attn"], r["ffn"], r["optim"])
        if key not in best or r["bits_per_byte"] < best[key]["bits_per_byte"]:
            best[key] = r
    lines = [f"# MoE x MLA x Muon study (short budget: {a.steps} steps, "
             f"{runs[0]['tokens'] if runs else 0} tokens per run; lr scales {scales})", "",
             f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({platform.processor() or 'cpu'}), "
             f"jax {jax.__version__}, python {platform.python_version()}", "",
             f"command: `python -m benchmarks.moe_study {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| attn | ffn | optim | best lr scale | eval bits/byte | tokens/s | KV bytes/token | FFN active / total params |",
             "|---|---|---|---|---|---|---|---|"]
    for (attn, ffn_name, optim), r in sorted(best.items()):
        lines.append(f"| {attn} | {ffn_name} | {optim} | {r['lr_scale']:g} | {r['bits_per_byte']:.4f} | "
                     f"{r['tokens_per_s']:.0f} | {r['kv_bytes_per_token']} | "
                     f"{r['ffn_active_params']} / {r['ffn_params']} |")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
