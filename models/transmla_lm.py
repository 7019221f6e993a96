"""TransMLA for a whole ``models.transformer`` LM: every GQA/MHA/MQA layer into MLA.

The per-layer conversion and its maths live in ``attn/transmla.py``
(``convert_gqa_to_mla``); this file walks an LM's parameter tree (scanned or not),
optionally captures each attention layer's inputs for the calibrated PCAs, and rewrites
the ``LMConfig`` pattern. It sits in ``models/`` because it needs the LM, and ``attn/``
never imports ``models/``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from models.transformer import LMConfig, Transformer
  >>> from models.transmla_lm import convert_lm
  >>> cfg = LMConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, attn="gqa,mha",
  ...                attn_overrides={"gqa": {"num_kv_heads": 2}}, dtype="float32")
  >>> v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  >>> v2, cfg2 = convert_lm(v, cfg, kv_lora_rank=16, rope_heads=2)
  >>> cfg2.attn
  'mla,mla'
"""

from __future__ import annotations

import flax.linen as nn

from attn import mha, registry
from attn.transmla import convert_gqa_to_mla
from models.transformer import Transformer


def _convertible(name: str) -> bool:
    return registry.get(name).module is mha.MHA


def _capture_attn_inputs(lm_config, params, tokens_BT):
    """The input of every attention layer (the ``attn_norm`` output), per unit / block."""
    _, state = Transformer(lm_config).apply(
        {"params": params}, tokens_BT, mutable=["intermediates"],
        capture_intermediates=lambda mdl, _: mdl.name == "attn_norm")
    return state["intermediates"]


def convert_lm(params, lm_config, *, kv_lora_rank: int, rope_heads: int = 1, calib_tokens_BT=None,
               balance_kv: bool = True, freq_fold: int = 1):
    """Convert every GQA/MHA/MQA layer of a ``models.transformer`` LM into MLA.

    Args:
      params: the LM's params tree (``{"params": ...}`` or bare, boxed or not; scanned or not).
      lm_config: its ``LMConfig``.
      kv_lora_rank, rope_heads, balance_kv, freq_fold: as ``convert_gqa_to_mla``.
      calib_tokens_BT: optional ``[B, T]`` tokens whose per-layer attention inputs drive the PCAs.

    Returns:
      ``(new_params, new_lm_config)``: the pattern names of converted layers become "mla",
      with ``attn_overrides["mla"]`` holding the converted layer config.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from models.transformer import LMConfig, Transformer
      >>> from models.transmla_lm import convert_lm
      >>> cfg = LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, attn="mqa",
      ...                dtype="float32")
      >>> v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
      >>> v2, cfg2 = convert_lm(v, cfg, kv_lora_rank=8)
      >>> t = jnp.ones((1, 3), jnp.int32)
      >>> cfg2.attn, bool(jnp.allclose(Transformer(cfg).apply(v, t)[0], Transformer(cfg2).apply(v2, t)[0],
      ...                              atol=1e-4))
      ('mla', True)
    """
    from models.conversion.common import replace_attention

    tree = nn.unbox(params["params"] if "params" in params else params)
    if not any(_convertible(n) for n in lm_config.pattern):
        raise ValueError(f"convert_lm: no GQA/MHA/MQA layer in attn={lm_config.attn!r}")
    inputs = None if calib_tokens_BT is None else _capture_attn_inputs(lm_config, tree, calib_tokens_BT)

    def one(p, layer_cfg, xs):
        return convert_gqa_to_mla(p, layer_cfg, kv_lora_rank=kv_lora_rank, rope_heads=rope_heads,
                                  calib_x_BTD=xs, balance_kv=balance_kv, freq_fold=freq_fold)

    return replace_attention(params, lm_config, one, "mla", inputs=inputs)
