"""DeepSeek-V3-style small byte-level LM: MLA attention + MoE FFN, on the embedded pydoc text.

Run (a few minutes on 2 CPU cores; reports eval bits per byte):

    python -m train --config configs/moe.py:steps=600 --workdir runs/moe

Expert parallelism over the data-parallel devices (experts split over mesh axis
``data``; tokens exchanged by all-to-all inside ``jax.shard_map``):

    python -m train --config configs/moe.py:ep=1 --workdir runs/moe_ep

Arguments after ``:`` (comma separated key=value):
  attn      mla | mha | ... (registry name)   attention of every layer
  ffn       moe | swiglu                      FFN of the MoE layers (swiglu: the dense baseline)
  dense_first 0 | 1                           DeepSeek-V3's dense first layer (ffn pattern swiglu,moe)
  experts   int                               routed experts E
  top_k     int                               experts per token
  shared    int                               shared experts
  gate      softmax | sigmoid                 router gate (DeepSeek-V3: sigmoid)
  balance   bias | aux | none                 aux-loss-free bias (DeepSeek-V3) or Switch aux loss
  dispatch  ragged | capacity                 dropless grouped matmul or capacity-factor buffers
  optim     adamw | muon                      optimizer
  ep        0 | 1                             expert parallelism over the mesh's data axis
  size      S | M                             model size
  steps     int                               training steps
  seed      int                               init and data seed
  dtype     float32 | bfloat16                compute dtype (float32 is faster on CPU)

The expert width defaults to ``ffn_dim // (top_k + shared)``, so the active FFN
parameters per token match the dense SwiGLU (``ffn=swiglu``) of the same size.
Balancing defaults to DeepSeek-V3's auxiliary-loss-free bias (``balance=bias``): the
trainer carries the ``"moe_state"`` collection (``models/ffn/moe.py``) in its state and
checkpoints, and logs the load statistics as tensorboard scalars ``moe/max_load``,
``moe/bias_spread``, ... (``train/trainer.py``). Every default lives in this file.
"""

from ml_collections import ConfigDict

from attn import registry
from configs import common
from train.config_args import check_at_least, check_choice, parse_arg_string
from train.sharding import with_expert_rule

ARGS = {
    "attn": "mla",
    "ffn": "moe",
    "dense_first": 1,
    "experts": 8,
    "top_k": 2,
    "shared": 1,
    "gate": "sigmoid",
    "balance": "bias",
    "dispatch": "ragged",
    "optim": "adamw",
    "ep": 0,
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

# balance -> MoE overrides. DeepSeek-V3: bias rate 1e-3; Switch: aux weight 1e-2.
BALANCE = {
    "bias": dict(bias_update_rate=1e-3, aux_loss_coef=0.0),
    "aux": dict(bias_update_rate=0.0, aux_loss_coef=1e-2),
    "none": dict(bias_update_rate=0.0, aux_loss_coef=0.0),
}


def get_config(arg: str | None = None) -> ConfigDict:
    """The MLA + MoE text experiment; ``arg`` is ``"experts=16,top_k=4"`` style overrides."""
    a = parse_arg_string(arg, ARGS)
    check_choice("size", a["size"], tuple(SIZES))
    check_choice("ffn", a["ffn"], ("moe", "swiglu"))
    check_choice("gate", a["gate"], ("softmax", "sigmoid"))
    check_choice("balance", a["balance"], tuple(BALANCE))
    check_choice("dispatch", a["dispatch"], ("ragged", "capacity"))
    check_choice("optim", a["optim"], ("adamw", "muon"))
    check_choice("dtype", a["dtype"], ("float32", "bfloat16"))
    check_choice("ep", a["ep"], (0, 1))
    check_choice("dense_first", a["dense_first"], (0, 1))
    check_at_least("experts", a["experts"], 1)
    check_at_least("top_k", a["top_k"], 1)
    check_at_least("shared", a["shared"], 0)
    d_model, num_layers, num_heads, seq_len, batch_size = SIZES[a["size"]]
    attn = a["attn"]

    moe = dict(num_experts=a["experts"], top_k=a["top_k"], num_shared_experts=a["shared"], gate=a["gate"],
               dispatch=a["dispatch"], capacity_factor=1.25, z_loss_coef=1e-3, **BALANCE[a["balance"]])
    ffn = a["ffn"]
    if a["dense_first"] and ffn == "moe":
        # Pattern of length 2 over the attention pattern attn,attn: layer 0 dense, layer 1 MoE.
        attn, ffn = f"{attn},{attn}", "swiglu,moe"
    c = ConfigDict()
    c.metric = "bits_per_byte"  # the headline eval metric, printed last as FINAL EVAL BITS_PER_BYTE
    c.model = ConfigDict(dict(
        vocab_size=256,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        attn=attn,
        attn_overrides=registry.small_overrides([a["attn"]], d_model),
        ffn=ffn,
        ffn_overrides={"moe": moe} if "moe" in ffn else {},
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
    c.optim = common.optim(steps=a["steps"], warmup_max=50, name=a["optim"], learning_rate=2e-3,
                           muon_learning_rate=0.02)
    # The MoE sows its losses already weighted (aux_loss_coef, z_loss_coef): weight 1 here.
    c.train = common.train(steps=a["steps"], seed=a["seed"], log_every=25, eval_every=200, eval_steps=8,
                           aux_loss_weight=1.0)
    # ep=1: experts split over the data-parallel devices (GShard layout; train/sharding.py).
    c.mesh = common.mesh(rules=with_expert_rule(None, "data") if a["ep"] else None)
    c.checkpoint = common.checkpoint(every_steps=200)
    return c
