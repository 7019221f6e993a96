"""A 1.03B-parameter GQA language model laid out for a TPU pod (FSDP over 16 chips).

Run on a pod slice (every host runs the same command; ``jax.distributed`` finds the
others), with your own tokens (raw uint16 array, ``arr.astype(np.uint16).tofile(path)``):

    attnlab train --config pod:data=/data/tokens.bin,vocab=32000 --workdir runs/pod

Without ``data=`` it trains on the embedded byte corpus (vocab 256 inside the 32k
table): a smoke run of the full stack, not a meaningful experiment. Validate the layout
without any accelerator (lowers and compiles the train step on 32 forced CPU devices,
allocating nothing, and reports per-device memory):

    python -m benchmarks.compile_pod --config configs/pod.py:batch=32

Model (TinyLlama/Llama-shaped): D 2048, 20 layers, N 16 query heads of H 128, K 4 KV heads
(GQA 4:1), SwiGLU F 5632, vocab 32000, untied head, RoPE, sequence 4096.
Parameters, counted with the mechanism's own ``stats()`` (``attn.mha.param_count``)
plus the MLP, norms, embedding and head -- and equal to the leaf count of the
initialised tree (``benchmarks/compile_pod.py`` asserts it):

    per layer  = 10,485,760 (attention: D·N·H + 2·D·K·H + N·H·D)
               + 34,603,008 (SwiGLU: 3·D·F) + 4,096 (two RMSNorm scales) = 45,092,864
    total      = 20 · 45,092,864 + 2 · 32000 · 2048 (embedding, head) + 2048 (final norm)
               = 1,032,931,328

Layout: mesh ``(data=-1, fsdp=16, context=1, tensor=1)``; parameters and both Adam
moments are sharded 16 ways over ``fsdp`` (the default rules put ``embed`` there) and
replicated over ``data``; the batch is split over ``data x fsdp``. fp32 parameters and
optimizer state, bf16 compute, ``nn.scan`` over the 20 layers (one compiled body) and
remat of each block. Context parallelism is off by default (``context=1``); for long
sequences set ``context`` (and the strategy ``cp``), e.g. 1M tokens on 256 chips:
``configs/pod.py:seq=1048576,batch=16,fsdp=16,context=16,cp=ring,remat=full``
(65,536 tokens per chip; "full" keeps the saved activations at ~5 GB, and the float32
logits, 65,536 x 32,000 per chip, then dominate: docs/scaling.md section 10).

Arguments after ``:`` (comma separated key=value):
  data     text | PATH      "text" (embedded corpus) or a uint16/uint32 token file
  vocab    int              token ids of the file lie in [0, vocab) (<= 32000)
  token_dtype uint16|uint32 element type of the token file
  batch    int              global batch in sequences (256 x 4096 = 1M tokens per step);
                            must divide by data x fsdp
  seq      int              sequence length T
  layers   int              depth (scan makes every layer one compiled body, so memory is
                            affine in depth: compile_pod --layers 2,4 extrapolates)
  fsdp     int              parameter-sharding degree (mesh axis "fsdp")
  tensor   int              tensor-parallel degree (heads, MLP and vocab split)
  context  int              context-parallel degree cp (mesh axis "context"); the sequence
                            is split cp ways inside attention (train/context_parallel.py)
  cp       ring | all_gather | ulysses | hybrid   the strategy when context > 1
                            (docs/scaling.md says which wins when)
  ulysses  int              hybrid only: Ulysses degree u (cp = u·r); 0 = the default
  remat    dots | full | none   "dots" keeps matmul outputs (~170 MB per layer per
                            sequence at T 4096), "full" keeps only block inputs
  steps    int              optimizer steps
  seed     int              parameter-init and data seed
  impl     str              attention implementation ("auto": pallas_tpu on TPU,
                            pallas_gpu/cudnn on GPU, xla_chunked on CPU at this size)

Every default lives in this file.
"""

from ml_collections import ConfigDict

from attn.errors import UserError
from configs import common
from train.config_args import check_choice, parse_arg_string

ARGS = {
    "data": "text",
    "vocab": 32000,
    "token_dtype": "uint16",
    "batch": 256,
    "seq": 4096,
    "layers": 20,
    "fsdp": 16,
    "tensor": 1,
    "context": 1,
    "cp": "ring",
    "ulysses": 0,
    "remat": "dots",
    "steps": 20000,
    "impl": "auto",
    "seed": 0,
}

D_MODEL, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, FFN_DIM, VOCAB = 2048, 16, 4, 128, 5632, 32000

# The exact count at the default depth (see the docstring); compile_pod.py checks it.
PARAMS_AT_20_LAYERS = 1_032_931_328


def param_count(num_layers: int = 20, vocab_size: int = VOCAB) -> int:
    """Parameters of this model at ``num_layers`` (from ``attn.mha.param_count``).

    Example:
      >>> param_count() == PARAMS_AT_20_LAYERS
      True
    """
    from attn import mha

    attn = mha.param_count(mha.Config(d_model=D_MODEL, num_heads=NUM_HEADS,
                                      num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM))
    per_layer = attn + 3 * D_MODEL * FFN_DIM + 2 * D_MODEL
    return num_layers * per_layer + 2 * vocab_size * D_MODEL + D_MODEL


def get_config(arg: str | None = None) -> ConfigDict:
    """The pod LM; ``arg`` is ``"data=/path/tokens.bin,batch=512"`` style overrides."""
    a = parse_arg_string(arg, ARGS)
    check_choice("remat", a["remat"], ("dots", "full", "none"))
    check_choice("token_dtype", a["token_dtype"], ("uint16", "uint32"))
    check_choice("cp", a["cp"], ("ring", "all_gather", "ulysses", "hybrid"))
    if a["ulysses"] and a["cp"] != "hybrid":
        raise UserError(f"config argument ulysses={a['ulysses']} only applies to cp=hybrid")
    if not 1 <= a["vocab"] <= VOCAB:
        raise UserError(f"config argument vocab={a['vocab']} must be in [1, {VOCAB}] (the model's table)")

    c = ConfigDict()
    c.model = ConfigDict(dict(
        vocab_size=VOCAB,
        d_model=D_MODEL,
        num_layers=a["layers"],
        num_heads=NUM_HEADS,
        head_dim=HEAD_DIM,  # 128: the MXU / tensor-core friendly head width
        ffn_dim=FFN_DIM,    # 2.75·D, a multiple of 128 (Llama's 8/3·D rounded up)
        attn="gqa",
        # K 4: a 4x smaller KV cache and 4x less K/V traffic under context parallelism;
        # 16 query heads still allow Ulysses up to cp 16 (N % cp == 0).
        attn_overrides={"gqa": {"num_kv_heads": NUM_KV_HEADS}},
        # Untied: at 32k vocab the separate head is 6% of the parameters and the usual
        # choice at this scale (Llama, TinyLlama).
        tie_embeddings=False,
        remat=a["remat"],
        # One compiled layer body instead of 20: compile time and HLO size stay flat in depth.
        scan_layers=True,
        dtype="bfloat16",
        param_dtype="float32",
        rope_theta=10_000.0,
        impl=a["impl"],
    ))
    if a["data"] == "text":
        data_source, options, c.metric = "text", dict(eval_fraction=0.05), "bits_per_byte"
    else:
        data_source, c.metric = "tokens", "loss"
        options = dict(path=a["data"], vocab_size=a["vocab"], dtype=a["token_dtype"], eval_fraction=0.01)
    c.data = ConfigDict(dict(
        source=data_source,
        seq_len=a["seq"],
        batch_size=a["batch"],
        eval_batch_size=a["batch"],
        seed=a["seed"],
        options=options,
    ))
    c.optim = common.optim(steps=a["steps"], warmup_max=2000, warmup_div=10, learning_rate=3e-4, b2=0.95)
    c.train = common.train(steps=a["steps"], seed=a["seed"], log_every=10, eval_every=1000, eval_steps=20,
                           aux_loss_weight=0.0)
    # (data, fsdp, context, tensor); default rules: embed -> fsdp, heads/mlp/vocab -> tensor,
    # length -> context.
    c.mesh = common.mesh((-1, a["fsdp"], a["context"], a["tensor"]))
    # Inert while mesh context == 1. Ring by default: no head-count limit and K/V memory
    # O(T / cp); at this model's 16 query heads Ulysses stops at cp = 16 (docs/scaling.md).
    c.context_parallel = ConfigDict(dict(
        strategy=a["cp"],
        ulysses_degree=a["ulysses"] or None,
        zigzag=None,  # causal LM: zigzag load balancing on
        impl=None,    # the layers' own impl on local shards
    ))
    c.checkpoint = common.checkpoint(every_steps=1000, max_to_keep=3)
    return c
