"""Byte-level LM on Python's own ``pydoc_data.topics`` (about 466k bytes; nothing downloaded),
or an LM on a token file of your own.

Run (about two minutes on 2 CPU cores; reports eval bits per byte, printed last as
FINAL EVAL BITS_PER_BYTE):

    attnlab train --config text:size=S --workdir runs/text

Your own tokens (a raw uint16 / uint32 array, ``arr.astype(np.uint16).tofile(path)``;
the last 5% is held out; reports the eval loss in nats per token, FINAL EVAL LOSS):

    attnlab train --config text:data=/path/tokens.bin,vocab=32000 --workdir runs/mytext

Arguments after ``:`` (comma separated key=value):
  attn    a registry name (mha, gqa, mqa, ...)   attention of every layer
  size    S | M                                  model size (S is the CPU default)
  steps   int                                    training steps
  seed    int                                    init and data seed
  dtype   float32 | bfloat16                     compute dtype (float32 is faster on CPU)
  data    text | PATH                            the embedded corpus or a token file
  vocab   int                                    data=PATH: ids lie in [0, vocab); the
                                                 model's vocabulary (text: always 256)
  token_dtype uint16 | uint32                    data=PATH: element type of the file

The last 5% of the corpus is held out; eval uses the same random windows every time.
Every default lives in this file.
"""

from ml_collections import ConfigDict

from attn.errors import UserError
from configs import common
from train.config_args import check_at_least, check_choice, parse_arg_string

ARGS = {
    "attn": "mha",
    "size": "S",
    "steps": 600,
    "seed": 0,
    "dtype": "float32",
    "data": "text",
    "vocab": 256,
    "token_dtype": "uint16",
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
    check_choice("token_dtype", a["token_dtype"], ("uint16", "uint32"))
    check_at_least("vocab", a["vocab"], 2)
    if a["data"] == "text" and a["vocab"] != ARGS["vocab"]:
        raise UserError(f"config argument vocab={a['vocab']} only applies with data=PATH (a token "
                        f"file); the embedded text is bytes (vocab 256)")
    d_model, num_layers, num_heads, seq_len, batch_size = SIZES[a["size"]]
    if a["data"] == "text":
        vocab, source, metric, options = 256, "text", "bits_per_byte", dict(eval_fraction=0.05)
    else:  # a token file: its ids are range-checked against vocab when it opens
        vocab, source, metric = a["vocab"], "tokens", "loss"
        options = dict(path=a["data"], vocab_size=a["vocab"], dtype=a["token_dtype"], eval_fraction=0.05)

    c = ConfigDict()
    c.metric = metric  # the headline eval metric, printed last as FINAL EVAL <METRIC>
    c.model = ConfigDict(dict(
        vocab_size=vocab,
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
        impl="auto",  # attention implementation (attn.core); --config.model.impl=xla_chunked etc.
    ))
    c.data = ConfigDict(dict(
        source=source,
        seq_len=seq_len,
        batch_size=batch_size,
        eval_batch_size=64,
        seed=a["seed"],
        options=options,
    ))
    c.optim = common.optim(steps=a["steps"], warmup_max=50, learning_rate=2e-3)
    c.train = common.train(steps=a["steps"], seed=a["seed"], log_every=25, eval_every=200, eval_steps=8)
    c.mesh = common.mesh()
    c.checkpoint = common.checkpoint(every_steps=200)
    return c
