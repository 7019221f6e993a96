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

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

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
    wrapped = "params" in params
    tree = nn.unbox(params["params"] if wrapped else params)
    cfg = lm_config
    todo = [j for j, n in enumerate(cfg.pattern) if _convertible(n)]
    if not todo:
        raise ValueError(f"convert_lm: no GQA/MHA/MQA layer in attn={cfg.attn!r}")
    inputs = None if calib_tokens_BT is None else _capture_attn_inputs(cfg, tree, calib_tokens_BT)
    units = ["units"] if cfg.scan_layers else [f"unit_{u}" for u in range(cfg.num_repeats)]
    tree = _to_dicts(tree)
    new_cfgs = set()
    for j in todo:
        layer_cfg = cfg.layer_configs[j]
        for unit in units:
            block = tree[unit][f"block_{j}"]
            x = None if inputs is None else inputs[unit][f"block_{j}"]["attn_norm"]["__call__"][0]

            def one(p, xs):
                out, m = convert_gqa_to_mla(p, layer_cfg, kv_lora_rank=kv_lora_rank,
                                            rope_heads=rope_heads, calib_x_BTD=xs, balance_kv=balance_kv,
                                            freq_fold=freq_fold)
                new_cfgs.add(m)
                return out

            if cfg.scan_layers:  # leading layer axis: convert each repeat, restack
                outs = [one(jax.tree_util.tree_map(lambda a: a[i], block["attn"]),
                            None if x is None else x[i]) for i in range(cfg.num_repeats)]
                block["attn"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
            else:
                block["attn"] = one(block["attn"], x)
    if len(new_cfgs) != 1:
        raise NotImplementedError(
            "convert_lm: converted layers differ in shape (num_kv_heads / head_dim / window...), "
            "but one LM pattern name carries one config; convert such stacks layer by layer")
    (m,) = new_cfgs
    if "mla" in cfg.pattern:
        raise NotImplementedError("convert_lm: the pattern already has 'mla' layers with their own config")
    common = set(cfg.common_attention_fields()) - {"rope", "head_dim"}
    mla_over = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in common}
    overrides = {k: dict(v) for k, v in cfg.attn_overrides.items() if not _convertible(k)}
    overrides["mla"] = mla_over
    pattern = ",".join("mla" if _convertible(n) else n for n in cfg.pattern)
    new_cfg = dataclasses.replace(cfg, attn=pattern, attn_overrides=overrides)
    assert all(new_cfg.layer_configs[j] == m for j in todo), (new_cfg.layer_configs, m)
    return ({"params": tree} if wrapped else tree), new_cfg


def _to_dicts(tree):
    """Nested mappings (FrozenDict included) as plain dicts, so subtrees can be replaced."""
    if hasattr(tree, "items"):
        return {k: _to_dicts(v) for k, v in tree.items()}
    return tree
