"""attnlab's own checkpoint directory: any ``models.transformer`` LM, converted or tuned.

A Hugging Face directory can only hold what a transformers architecture describes (Llama,
Qwen, Mistral). A model after TransMLA, MoH conversion or a head-level method has layers
no such architecture has, so it is written in attnlab's own layout instead:

  attnlab_config.json   {"format": "attnlab-native", "version": 1,
                         "lm_config": <LMConfig as JSON>, "metadata": {...}}
  model.safetensors     the parameter tree, keys joined with "/" ("units/block_0/attn/q_nope_kernel")
  tokenizer.json, tokenizer_config.json   when the model has a tokenizer

``models.pretrained.load`` reads such a directory like any other checkpoint (so
``model.init_from``, ``attnlab generate --model`` and ``attnlab perplexity --model``
take it), and ``models.pretrained.export(..., format="native")`` writes one.

Example:
  >>> import tempfile, jax, jax.numpy as jnp
  >>> from models.transformer import LMConfig, Transformer
  >>> from models.pretrained import native
  >>> cfg = LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, attn="mla", dtype="float32",
  ...                attn_overrides={"mla": {"kv_lora_rank": 8, "qk_rope_head_dim": 4}})
  >>> import flax.linen as nn
  >>> p = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"]
  >>> d = native.save(cfg, p, tempfile.mkdtemp())
  >>> cfg2, p2, meta = native.load(d)
  >>> a, b = p2["unit_0"]["block_0"]["attn"], p["unit_0"]["block_0"]["attn"]
  >>> cfg2 == cfg, bool(jnp.all(a["kv_down_kernel"] == b["kv_down_kernel"]))
  (True, True)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from models.pretrained.errors import PretrainedError
from models.transformer import LMConfig

CONFIG_FILE = "attnlab_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT, VERSION = "attnlab-native", 1


def is_native_dir(path: str) -> bool:
    """True for a directory written by ``save`` (it has ``attnlab_config.json``)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def config_to_json(cfg: LMConfig) -> dict:
    """``LMConfig`` as plain JSON values that ``LMConfig.from_dict`` reads back.

    Example:
      >>> from models.transformer import LMConfig
      >>> d = config_to_json(LMConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2))
      >>> d["dtype"], LMConfig.from_dict(d).dtype
      ('bfloat16', dtype(bfloat16))
    """
    return {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _jsonable(x: Any) -> Any:
    from attn.positions import SCALINGS

    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    scaling_types = {cls: name for name, cls in SCALINGS.items()}
    if type(x) in scaling_types:  # RoPE scalings are read back from {"type": name, **fields}
        return {"type": scaling_types[type(x)], **{k: _jsonable(v) for k, v in dataclasses.asdict(x).items()}}
    if dataclasses.is_dataclass(x):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    try:  # dtypes (jnp.float32, np.dtype("bfloat16"), ...)
        return jnp.dtype(x).name
    except TypeError:
        raise PretrainedError(f"native export: config value {x!r} ({type(x).__name__}) "
                              "has no JSON form") from None


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"a/b/c": array}`` of a nested parameter mapping."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if hasattr(v, "items"):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """The inverse of ``flatten``."""
    tree: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def save(cfg: LMConfig, params, out_dir: str, *, metadata: dict | None = None, tokenizer=None) -> str:
    """Write ``params`` (bare or ``{"params": ...}``, boxed or not) and ``cfg``; returns ``out_dir``."""
    import flax.linen as nn
    from safetensors.numpy import save_file

    tree = nn.unbox(params)
    tree = tree["params"] if "params" in tree else tree
    # float32 on disk: numpy has no bfloat16, and a tuned model is usually kept in f32.
    flat = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flatten(tree).items()}
    os.makedirs(out_dir, exist_ok=True)
    save_file(flat, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": FORMAT})
    doc = {"format": FORMAT, "version": VERSION, "lm_config": config_to_json(cfg),
           "metadata": {k: v for k, v in (metadata or {}).items() if _is_plain(v)}}
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(doc, f, indent=2)
    if tokenizer is not None:
        tokenizer.to_hf_dir(out_dir)
    return out_dir


def _is_plain(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def read_config(path: str, *, dtype=None) -> tuple[LMConfig, dict]:
    """``(LMConfig, metadata)`` of a native directory, without reading the weights."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(cfg_path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise PretrainedError(f"{cfg_path}: format {doc.get('format')!r} version {doc.get('version')!r} "
                              f"is not {FORMAT!r} version {VERSION}")
    c = dict(doc["lm_config"])
    if dtype is not None:
        c["dtype"] = jnp.dtype(dtype).name
    try:
        cfg = LMConfig.from_dict(c)
    except (ValueError, TypeError) as e:
        raise PretrainedError(f"{cfg_path}: lm_config is not a valid LMConfig ({e})") from e
    return cfg, dict(doc.get("metadata", {}))


def load(path: str, *, dtype=jnp.float32, config_only: bool = False):
    """``(LMConfig, params or None, metadata)``; params in ``cfg.param_dtype``, shapes checked."""
    import jax
    from safetensors.numpy import load_file

    from models.transformer import Transformer

    cfg, meta = read_config(path, dtype=dtype)
    if config_only:
        return cfg, None, meta
    fn = os.path.join(path, WEIGHTS_FILE)
    try:
        flat = load_file(fn)
    except Exception as e:  # SafetensorError is not a ValueError
        raise PretrainedError(f"{fn}: cannot read safetensors ({str(e).splitlines()[0]})") from e
    want = flatten(jax.eval_shape(lambda: Transformer(cfg).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"])
    want = {k: getattr(v, "value", v) for k, v in want.items()}
    missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
    if missing or extra:
        raise PretrainedError(f"{fn}: parameters do not match the config: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for k, w in want.items():
        if tuple(flat[k].shape) != tuple(w.shape):
            raise PretrainedError(f"{fn}: {k} has shape {tuple(flat[k].shape)}, the config needs {tuple(w.shape)}")
    params = unflatten({k: jnp.asarray(v, cfg.param_dtype) for k, v in flat.items()})
    return cfg, params, meta
