"""Fine-tune a pretrained (or converted) checkpoint on the embedded English text.

The model is the checkpoint's: ``model.init_from`` names it (``models.pretrained.load``:
"smollm2-135m", a .gguf file, a Hugging Face directory, or an attnlab directory written
by ``attnlab export`` / a conversion such as ``python -m models.conversion.transmla``),
and the run starts from its parameters. The data is the pydoc text (or your UTF-8 file)
through the same checkpoint's tokenizer; the last 5% of the tokens is held out, and the
eval loss is in nats per token (FINAL EVAL LOSS; perplexity = exp(loss)). Progress bar,
tensorboard, checkpoints and resume are the trainer's, as for training from scratch.

    attnlab train --config finetune:steps=100 --workdir runs/ft
    attnlab train --config finetune:init=/path/converted,teacher=smollm2-135m --workdir runs/heal
    attnlab train --config finetune:peft=lora,rank=8 --workdir runs/lora
    attnlab train --config finetune:peft=lofit_scale --workdir runs/lofit1     # LoFiT step 1
    python -m train.lofit --workdir runs/lofit1 --heads 16 --out runs/heads.json
    attnlab train --config finetune:peft=lofit,heads=@runs/heads.json --workdir runs/lofit2
    attnlab export --workdir runs/ft --out runs/ft/export     # safetensors; load() reads it back

Arguments after ``:`` (comma separated key=value):
  init       smollm2-135m | PATH     the checkpoint to start from
  steps      int                     training steps
  seq_len    int                     tokens per window
  batch      int                     windows per step
  lr         float                   peak learning rate (AdamW, warmup, cosine decay)
  trainable  regex | ""              only parameters whose path matches are tuned
                                     (e.g. "attn/"); "" = all
  peft       "" | lora | hydra |     low-rank adapters instead of full tuning (train/peft.py),
             lofit_scale | lofit     or LoFiT's head scales / head offsets (train/lofit.py;
                                     lofit adds zero attention biases to hold the offsets)
  rank       int                     adapter rank (alpha = 2 x rank)
  targets    regex | ""              parameters that get adapters ("" = the method's default)
  heads      "l.h,..." | @FILE       the heads peft=lofit tunes (python -m train.lofit)
  l1         float                   LoFiT's L1 weight on the head scales (peft=lofit_scale)
  teacher    "" | NAME | PATH        distil from this checkpoint too (train.distill_from;
                                     e.g. the original model when healing a conversion)
  kd         float in [0, 1]         the distillation term's share of the loss
  kd_temp    float                   its softmax temperature
  text       pydoc | PATH            the embedded text or a UTF-8 file
  dtype      float32 | bfloat16      compute dtype
  remat      none | full | dots      activation checkpointing
  seed       int                     data seed

Every default lives in this file. On 2 shared CPU cores SmolLM2-135M takes about 10 s
per step of 4 x 256 tokens (10.5 s measured, docs/conversion.md). A resumed run, and
``restore_trained`` / ``attnlab export`` of it, read the config of ``init`` again: keep
that checkpoint where it was.
"""

from ml_collections import ConfigDict

from configs import common
from train.config_args import check_at_least, check_choice, parse_arg_string

ARGS = {
    "init": "smollm2-135m",
    "steps": 100,
    "seq_len": 256,
    "batch": 4,
    "lr": 1e-4,
    "trainable": "",
    "peft": "",
    "rank": 8,
    "targets": "",
    "heads": "",
    "l1": 1e-4,
    "teacher": "",
    "kd": 0.5,
    "kd_temp": 1.0,
    "text": "pydoc",
    "dtype": "float32",
    "remat": "none",
    "seed": 0,
}


def get_config(arg: str | None = None) -> ConfigDict:
    """The fine-tuning run; ``arg`` is ``"steps=200,trainable=attn/"`` style overrides."""
    a = parse_arg_string(arg, ARGS)
    check_choice("dtype", a["dtype"], ("float32", "bfloat16"))
    check_choice("remat", a["remat"], ("none", "full", "dots"))
    for k in ("seq_len", "batch"):
        check_at_least(k, a[k], 1)
    c = ConfigDict()
    c.metric = "loss"
    c.model = ConfigDict(dict(init_from=a["init"], dtype=a["dtype"], remat=a["remat"]))
    if a["peft"] == "lofit":  # the head offsets are folded into the attention output bias
        c.model.attention_bias = True
    c.data = ConfigDict(dict(
        source="tokenized_text", seq_len=a["seq_len"], batch_size=a["batch"], eval_batch_size=a["batch"],
        seed=a["seed"], options=dict(tokenizer=a["init"], text=a["text"], eval_fraction=0.05)))
    # A pretrained model is near a minimum: a small peak rate, short warmup, no decay of
    # the weights toward zero (that would pull them away from the checkpoint).
    c.optim = common.optim(steps=a["steps"], warmup_max=20, warmup_div=10, learning_rate=a["lr"],
                           weight_decay=0.0, trainable=a["trainable"])
    c.train = common.train(steps=a["steps"], seed=0, log_every=5, eval_every=max(a["steps"] // 4, 1),
                           eval_steps=4, distill_from=a["teacher"], distill_weight=a["kd"],
                           distill_temperature=a["kd_temp"])
    c.peft = ConfigDict(dict(method=a["peft"], rank=a["rank"], alpha=2.0 * a["rank"], targets=a["targets"],
                             heads=a["heads"], l1=float(a["l1"])))
    c.mesh = common.mesh()
    c.checkpoint = common.checkpoint(every_steps=max(a["steps"] // 2, 1))
    return c
