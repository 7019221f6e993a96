"""Export a trained or fine-tuned run (or any checkpoint) as a safetensors directory.

``--workdir`` takes a training run (``attnlab train ... --workdir DIR``): its newest good
checkpoint is restored (``train.restore.restore_trained``); when the run started from a
checkpoint (``model.init_from``), that checkpoint's tokenizer and metadata go along, so
the export is a complete model again. ``--model`` takes anything
``models.pretrained.load`` reads instead (a format conversion).

``--format hf`` writes what transformers loads (Llama / Qwen / Mistral layouts),
``native`` attnlab's own directory (any LM: converted attention, MoE, ...), ``auto``
(default) hf when the model has a transformers equivalent, else native. Either kind
loads back with ``models.pretrained.load(DIR)`` and so with ``--model DIR`` of
``attnlab generate`` / ``perplexity`` and ``model.init_from`` of ``configs/finetune.py``.

Command line (``attnlab export`` is the same ``main``)::

  python -m models.export --workdir runs/ft --out runs/ft/export [--format auto|hf|native]
  python -m models.export --model smollm2-135m --out /tmp/smollm2-hf

The last line printed is ``exported <format> <out> (<n> parameters)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def export_run(workdir: str, out_dir: str, *, format: str = "auto") -> tuple[str, int]:
    """Export the newest good checkpoint of ``workdir``; returns ``(format used, parameters)``."""
    import jax

    from models import pretrained
    from train import trainer
    from train.restore import restore_trained

    cfg, variables, step = restore_trained(workdir)
    with open(os.path.join(workdir, trainer.RUN_CONFIG)) as f:
        init_from = (json.load(f).get("model") or {}).get("init_from")
    meta, tok = {"trained_steps": step}, None
    if init_from:
        base = pretrained.load(init_from, config_only=True)
        meta, tok = {**base.metadata, **meta, "init_from": init_from}, base.tokenizer
    params = jax.device_get(variables["params"])
    pre = pretrained.Pretrained(config=cfg, params=params, tokenizer=tok, source=workdir, metadata=meta)
    return _write(pre, out_dir, format)


def export_model(name_or_path: str, out_dir: str, *, format: str = "auto") -> tuple[str, int]:
    """Re-export anything ``models.pretrained.load`` reads; returns ``(format used, parameters)``."""
    from models import pretrained

    return _write(pretrained.load(name_or_path), out_dir, format)


def _write(pre, out_dir: str, format: str) -> tuple[str, int]:
    import jax

    from models import pretrained
    from models.pretrained import PretrainedError, hf

    if format == "auto":
        try:
            hf.hf_config_from_lm(pre.config, pre.metadata)
            format = "hf"
        except PretrainedError:
            format = "native"
    pretrained.export(pre, out_dir, format=format)
    return format, sum(int(x.size) for x in jax.tree.leaves(pre.params))


def main(argv=None, prog: str = "python -m models.export") -> int:
    """Entry point of ``python -m models.export`` / ``attnlab export``; user errors: one line, status 2."""
    from train.cli import guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded(prog, lambda: _main(argv, prog), verbose="--verbose" in argv)


def build_parser(prog: str = "python -m models.export") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Export a run or a checkpoint as safetensors.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run's --workdir (its newest good checkpoint)")
    src.add_argument("--model", help="a models.pretrained name or path")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--format", default="auto", choices=["auto", "hf", "native"])
    p.add_argument("--verbose", action="store_true", help="show tracebacks of user errors")
    return p


def _main(argv: list[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.workdir:
        fmt, n = export_run(args.workdir, args.out, format=args.format)
    else:
        fmt, n = export_model(args.model, args.out, format=args.format)
    print(f"exported {fmt} {args.out} ({n:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
