"""Byte-level LM at an 8192-token context, the sequence split 4 ways (context parallelism).

Run on forced CPU devices (XLA_FLAGS must be set before JAX starts, hence on the
command line; without it the mesh reports "mesh.num_devices=4: have 1 devices"):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        attnlab train --config long_context --workdir runs/long
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        attnlab train --config long_context:strategy=ulysses --workdir runs/long-ulysses

On a machine with 4 or more accelerators drop XLA_FLAGS. Mesh ``(data 1, fsdp 1,
context 4, tensor 1)`` on the first ``context`` devices: every attention layer runs
through ``train/context_parallel.py`` with the chosen strategy, in the zigzag order
(causal load balance), and every other layer works on its own 2048 tokens. The model is
small (D 64, 2 layers, 4 heads of 16) so that attention, quadratic in T, is the work.
Measured on 2 CPU cores shared with other jobs: 360-660 tokens/s (12-23 s a step;
three times that under heavy load), so the default 200 steps take about an hour there:
``steps=20`` shows the loss falling (5.5 → 3.5, eval 3.1 nats/byte), ``seq=2048`` cuts
the attention work 16x. Every strategy gives the same losses; docs/scaling.md says
which one wins where.

Arguments after ``:`` (comma separated key=value):
  strategy  ring | all_gather | ulysses | hybrid   context-parallel strategy (ulysses
                                                   needs heads % context == 0)
  context   int             context-parallel degree cp (mesh axis "context")
  seq       int             sequence length T; divides by 2·cp (zigzag)
  steps     int             training steps
  attn      a registry name attention of every layer (mha, gqa, mqa, ...)
  impl      str             attention on the local shards ("auto": each layer's own)
  seed      int             init and data seed

The corpus is configs/text.py's (Python's ``pydoc_data.topics``, about 466k bytes;
the last 5% held out); its optimizer and loop settings too, overridden here only where
the long sequence needs it.
"""

from ml_collections import ConfigDict

from attn.errors import UserError
from configs import common, text
from train.config_args import check_choice, parse_arg_string
from train.context_parallel import STRATEGIES

ARGS = {
    "strategy": "ring",
    "context": 4,
    "seq": 8192,
    "steps": 200,
    "attn": "mha",
    "impl": "auto",
    "seed": 0,
}


def get_config(arg: str | None = None) -> ConfigDict:
    """The long-context experiment; ``arg`` is ``"strategy=ulysses,steps=20"`` style overrides.

    configs/text.py's run (corpus, optimizer, train loop) at a long sequence, a small
    model and a (1, 1, context, 1) mesh.
    """
    a = parse_arg_string(arg, ARGS)
    check_choice("strategy", a["strategy"], tuple(sorted(STRATEGIES)))
    cp = a["context"]
    if a["seq"] % (2 * cp):
        raise UserError(f"config argument seq={a['seq']} must divide by 2·context={2 * cp} (zigzag)")

    c = text.get_config(f"attn={a['attn']},steps={a['steps']},seed={a['seed']}")
    # 4 heads: ulysses (N % cp) and hybrid (u = 2 at cp 4) both divide them.
    c.model.update(dict(d_model=64, num_layers=2, num_heads=4))
    # One sequence per step: data x fsdp = 1, so the batch is not split; the sequence
    # is, over the context axis.
    c.data.update(dict(seq_len=a["seq"], batch_size=1, eval_batch_size=1))
    # Eval only at the end: each 8192-token eval batch costs about a step.
    c.train.update(dict(log_every=10, eval_every=0, eval_steps=2))
    # num_devices: the mesh takes the first cp devices, so a host with more still runs it.
    c.mesh = common.mesh((1, 1, cp, 1), num_devices=cp)
    c.context_parallel = ConfigDict(dict(
        strategy=a["strategy"],
        ulysses_degree=None,  # hybrid: cp's largest proper divisor (2 x 2 at cp 4)
        zigzag=None,          # on: the LM mixes tokens only through attention
        impl=None if a["impl"] == "auto" else a["impl"],
    ))
    c.checkpoint.update(dict(every_steps=100))
    return c
