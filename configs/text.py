"""Byte-level LM on Python's own ``pydoc_data.topics`` (about 466k bytes; nothing downloaded).

Run (about two minutes on 2 CPU cores; reports eval bits per byte):

    python -m train --config configs/text.py:size=S --workdir runs/text

Arguments after ``:`` (comma separated key=value):
  attn    a registry name (mha, gqa, mqa, ...)   attention of every layer
  size    S | M                                  model size (S is the CPU default)
  steps   int                                    training steps
  seed    int                                    init and data seed
  dtype   float32 | bfloat16                     compute dtype (float32 is faster on CPU)

The last 5% of the corpus is held out; eval uses the same random windows every time.
Every default lives in this file.
"""

from ml_collections import ConfigDict

from train.config_args import check_choice, parse_arg_string

ARGS = {
    "attn": "mha",
    "size": "S",
    "steps": 600,
    "seed": 0,
    "dtype": "float32",
}

# d_model, num_layers, num_heads, seq_len, batch_size
SIZES = {
    "S": (128, 2, 4, 128, 16),
    "M": (256, 6, 8, 256, 32),
}


def get_config(arg: str | None = None) -> ConfigDict:
    """The byte-level text experiment; ``arg`` is ``"size=M,steps=2000"`` style overrides."""
    a = parse_arg_string(arg, ARGS)
    check_choice("size", a["size"], tuple(SIZES))
    check_choice("dtype", a["dtype"], ("float32", "bfloat16"))
    d_model, num_layers, num_heads, seq_len, batch_size = SIZES[a["size"]]

    c = ConfigDict()
    c.model = ConfigDict(dict(
        vocab_size=256,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        attn=a["attn"],
        attn_overrides={},
        tie_embeddings=True,
        remat="none",
        scan_layers=False,
        dtype=a["dtype"],
        param_dtype="float32",
    ))
    c.data = ConfigDict(dict(
        source="text",
        seq_len=seq_len,
        batch_size=batch_size,
        eval_batch_size=64,
        seed=a["seed"],
        options=dict(eval_fraction=0.05),
    ))
    c.optim = ConfigDict(dict(
        name="adamw",
        learning_rate=2e-3,
        warmup_steps=min(50, a["steps"] // 4),  # short smoke runs still validate
        decay_steps=None,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        b1=0.9,
        b2=0.98,
        eps=1e-8,
        grad_clip_norm=1.0,
    ))
    c.train = ConfigDict(dict(
        num_steps=a["steps"],
        log_every=25,
        eval_every=200,
        eval_steps=8,
        seed=a["seed"],
        aux_loss_weight=0.01,
        progress_bar=True,
    ))
    c.mesh = ConfigDict(dict(shape=(-1, 1, 1, 1), rules=None))
    c.checkpoint = ConfigDict(dict(enabled=True, every_steps=200, max_to_keep=2, async_save=True))
    return c
