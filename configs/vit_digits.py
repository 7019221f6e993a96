"""A small ViT on scikit-learn's 8×8 digits (embedded; nothing downloaded).

Run (a few minutes on 2 CPU cores; reports eval accuracy on the 359 held-out digits):

    python -m train --config configs/vit_digits.py --workdir runs/vit_digits

Arguments after ``:`` (comma separated key=value):
  attn    a registry name with causal=False (mha, gqa, mqa, mla, moh)
  patch   1 | 2 | 4 | 8                 patch size; 1 = pixel tokens (64 tokens)
  pool    cls | gap | map               pooling
  pos     learned | sincos | none       position embedding
  steps   int                           training steps
  seed    int                           init and data seed
  remat   none | full | dots

Every default lives in this file.
"""

from ml_collections import ConfigDict

from train.config_args import check_choice, parse_arg_string

ARGS = {
    "attn": "mha",
    # Measured on 2 shared CPU cores, 1500 steps: patch 4 (4 tokens) 97.5% test accuracy in
    # ~75 s; patch 2 (16 tokens) 93.9%: on 1.4k training images smaller patches overfit.
    "patch": 4,
    "pool": "gap",
    "pos": "learned",
    "steps": 1500,
    "seed": 0,
    "remat": "none",
}


def get_config(arg: str | None = None) -> ConfigDict:
    """The digits experiment; ``arg`` is ``"patch=1,pool=map"`` style overrides."""
    a = parse_arg_string(arg, ARGS)
    check_choice("patch", a["patch"], (1, 2, 4, 8))
    check_choice("pool", a["pool"], ("cls", "gap", "map"))
    check_choice("pos", a["pos"], ("learned", "sincos", "none"))
    check_choice("remat", a["remat"], ("none", "full", "dots"))

    c = ConfigDict()
    c.task = "classify"
    c.model = ConfigDict(dict(
        image_size=(8, 8),
        channels=1,
        patch_size=a["patch"],
        width=64,
        depth=4,
        num_heads=4,
        mlp_dim=128,
        num_classes=10,
        pool=a["pool"],
        pos_emb=a["pos"],
        pos_resize="bilinear",
        attn=a["attn"],
        remat=a["remat"],
        dtype="float32",  # float32 is faster than bfloat16 on CPU
        param_dtype="float32",
    ))
    c.data = ConfigDict(dict(
        source="digits",
        seq_len=1,  # unused by images; kept so tokens/s in logs reads as examples/s
        batch_size=64,
        # 359 test digits: 3 batches of 128 cover them exactly once (padding has weight 0).
        eval_batch_size=128,
        seed=a["seed"],
        options=dict(test_fraction=0.2, split_seed=0, train_shift=1),
    ))
    c.optim = ConfigDict(dict(
        name="adamw",
        learning_rate=2e-3,
        warmup_steps=min(100, a["steps"] // 4),
        decay_steps=None,
        min_lr_ratio=0.05,
        weight_decay=0.05,
        b1=0.9,
        b2=0.99,
        eps=1e-8,
        grad_clip_norm=1.0,
    ))
    c.train = ConfigDict(dict(
        num_steps=a["steps"],
        log_every=50,
        eval_every=500,
        eval_steps=3,
        seed=a["seed"],
        aux_loss_weight=0.01,
        progress_bar=True,
    ))
    c.mesh = ConfigDict(dict(shape=(-1, 1, 1, 1), rules=None))
    c.checkpoint = ConfigDict(dict(enabled=True, every_steps=500, max_to_keep=2, async_save=True))
    return c
