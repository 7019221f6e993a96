"""Hugging Face checkpoints <-> ``models.transformer``: config.json mapping, weights, export.

Supported families (``config.json`` ``model_type``), all one decoder with GQA, SwiGLU and
RMSNorm, i.e. ``LMConfig(attn="gqa")`` with per-family attention fields:

=========  ==========================================================================
llama      ``attention_bias`` (q/k/v/o biases), Llama-3 / YaRN / linear / dynamic RoPE
mistral    ``sliding_window`` W (HF: the last W keys incl. the query) -> ``window = W - 1``
qwen2      q/k/v biases (no o bias: stored as a zero ``o_bias``), sliding layers if uniform
qwen3      qk-norm (RMSNorm over H, before RoPE), ``attention_bias``
=========  ==========================================================================

Weights map one to one (``W`` in torch's ``[out, in]`` layout)::

    model.embed_tokens.weight [V, D]           -> embedding [V, D]
    layers.i.self_attn.q_proj.weight [N*H, D]  -> units/block_0/attn/q_kernel [L, D, N, H]
    layers.i.self_attn.o_proj.weight [D, N*H]  -> .../o_kernel [L, N, H, D]
    layers.i.mlp.gate_proj.weight [F, D]       -> .../mlp/w_gate [L, D, F]   (up alike)
    layers.i.mlp.down_proj.weight [D, F]       -> .../mlp/w_down [L, F, D]
    input_layernorm / post_attention_layernorm -> attn_norm / mlp_norm scale
    model.norm.weight, lm_head.weight [V, D]   -> final_norm scale, head [D, V] (untied)

The imported model uses ``scan_layers=True`` (one compiled block for all L layers).
RoPE settings map through ``ROPE_TYPES`` (``rope_type`` -> a scaling of attn/positions.py).

Example:
  >>> from models.pretrained.hf import lm_config_from_hf
  >>> cfg, meta = lm_config_from_hf({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
  ...     "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
  ...     "num_key_value_heads": 2}, source="config.json")
  >>> dict(cfg.attn_overrides["gqa"])["use_bias"], meta["model_type"]
  (True, 'qwen2')
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from attn import positions
from models.pretrained.errors import PretrainedError
from models.transformer import LMConfig

# Keys that do not change the forward pass (bookkeeping, training-only, generation defaults).
_IGNORED = {
    "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
    "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "initializer_range", "use_cache", "attention_dropout", "pretraining_tp",
    "_name_or_path", "model_type", "output_attentions", "bos_token_id", "eos_token_id",
    "pad_token_id", "tokenizer_class", "max_position_embeddings", "_attn_implementation_autoset",
    "tie_word_embeddings", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "embd_pdrop", "resid_pdrop",
    "mlp_bias", "attention_bias",
}
_SLIDING_KEYS = {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"}


def _uniform_window(c: dict, source: str, *, always: bool) -> int | None:
    """The attnlab window of a config whose layers all slide (or None if none do).

    HF's ``sliding_window=W`` shows a query the last W keys including itself; attnlab's
    ``window`` counts the keys before it, hence ``W - 1``.
    """
    W, L = c.get("sliding_window"), c["num_hidden_layers"]
    types = c.get("layer_types")
    if types is None:
        sliding = always or bool(c.get("use_sliding_window"))
        start = 0 if always else c.get("max_window_layers", 0) or 0
        types = ["sliding_attention" if (sliding and W and i >= start) else "full_attention" for i in range(L)]
    if len(set(types)) > 1:
        raise PretrainedError(f"{source}: mixed full and sliding-window layers (layer_types) are not "
                              "supported: the model has one attention config for all layers")
    return int(W) - 1 if types and types[0] == "sliding_attention" and W else None


def _llama(c, source):
    bias = bool(c.get("attention_bias", False))
    return dict(use_bias=bias), bias, set()


def _mistral(c, source):
    return dict(window=_uniform_window(c, source, always=True)), False, _SLIDING_KEYS


def _qwen2(c, source):
    return dict(use_bias=True, window=_uniform_window(c, source, always=False)), False, _SLIDING_KEYS


def _qwen3(c, source):
    bias = bool(c.get("attention_bias", False))
    return (dict(use_bias=bias, qk_norm=True, window=_uniform_window(c, source, always=False)),
            bias, _SLIDING_KEYS)


# model_type -> fn(config, source) -> (attention fields, has o_proj bias, extra known keys)
FAMILIES: dict[str, Callable] = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3}
_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
         "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


# --------------------------------------------------------------------------- RoPE
def _rope_linear(p, c):
    return positions.LinearScaling(factor=float(p["factor"]))


def _rope_dynamic(p, c):
    return positions.DynamicNTKScaling(factor=float(p["factor"]),
                                       original_max_position=int(c.get("max_position_embeddings", 2048)))


def _orig(p, c):
    return int(p.get("original_max_position_embeddings") or c.get("max_position_embeddings"))


def _rope_yarn(p, c):
    factor = p.get("factor")
    factor = float(factor) if factor is not None else c["max_position_embeddings"] / _orig(p, c)
    return positions.YarnScaling(
        factor=factor, original_max_position=_orig(p, c), beta_fast=float(p.get("beta_fast") or 32.0),
        beta_slow=float(p.get("beta_slow") or 1.0), mscale=p.get("attention_factor"),
        mscale_num=p.get("mscale"), mscale_den=p.get("mscale_all_dim"),
        truncate=bool(p.get("truncate", True)))


def _rope_llama3(p, c):
    return positions.Llama3Scaling(factor=float(p["factor"]), original_max_position=_orig(p, c),
                                   low_freq_factor=float(p["low_freq_factor"]),
                                   high_freq_factor=float(p["high_freq_factor"]))


# HF rope_type -> fn(rope parameters, config) -> scaling (None = plain RoPE)
ROPE_TYPES: dict[str, Callable] = {"default": lambda p, c: None, "linear": _rope_linear,
                                   "dynamic": _rope_dynamic, "yarn": _rope_yarn, "llama3": _rope_llama3}


def _rope(c: dict, source: str):
    p = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise PretrainedError(f"{source}: unsupported rope_type {kind!r}; supported: {sorted(ROPE_TYPES)}")
    theta = float(p.get("rope_theta", c.get("rope_theta", 10_000.0)))
    try:
        return theta, ROPE_TYPES[kind](p, c)
    except (KeyError, TypeError, ValueError) as e:
        raise PretrainedError(f"{source}: bad {kind!r} RoPE parameters {p}: {e}") from e


# --------------------------------------------------------------------------- config
def lm_config_from_hf(c: dict, *, source: str, dtype=jnp.float32) -> tuple[LMConfig, dict]:
    """``(LMConfig, metadata)`` from a config.json dict; unknown keys raise ``PretrainedError``."""
    kind = c.get("model_type")
    if kind not in FAMILIES:
        raise PretrainedError(f"{source}: unsupported architecture model_type={kind!r}; "
                              f"supported: {sorted(FAMILIES)}")
    attn_fields, o_bias, extra_keys = FAMILIES[kind](c, source)
    unknown = sorted(set(c) - _IGNORED - extra_keys)
    if unknown:
        raise PretrainedError(f"{source}: config keys the importer does not know: {unknown}")
    if c.get("hidden_act", "silu") != "silu":
        raise PretrainedError(f"{source}: hidden_act={c['hidden_act']!r} is not supported (SwiGLU needs 'silu')")
    if c.get("mlp_bias"):
        raise PretrainedError(f"{source}: mlp_bias=true is not supported (the SwiGLU MLP has no biases)")
    try:
        N, D = int(c["num_attention_heads"]), int(c["hidden_size"])
        theta, scaling = _rope(c, source)
        cfg = LMConfig(
            vocab_size=int(c["vocab_size"]), d_model=D, num_layers=int(c["num_hidden_layers"]),
            num_heads=N, head_dim=int(c.get("head_dim") or D // N), ffn_dim=int(c["intermediate_size"]),
            attn="gqa", attn_overrides={"gqa": {"num_kv_heads": int(c.get("num_key_value_heads") or N),
                                                **attn_fields}},
            tie_embeddings=bool(c.get("tie_word_embeddings", False)), scan_layers=True,
            dtype=dtype, param_dtype=dtype, norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling)
    except KeyError as e:
        raise PretrainedError(f"{source}: missing config key {e.args[0]!r}") from e
    except ValueError as e:
        if isinstance(e, PretrainedError):
            raise
        raise PretrainedError(f"{source}: {e}") from e
    meta = dict(model_type=kind, o_bias=o_bias, max_position_embeddings=c.get("max_position_embeddings"),
                bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
                pad_token_id=c.get("pad_token_id"))
    return cfg, meta


def hf_config_from_lm(cfg: LMConfig, metadata: dict | None = None) -> dict:
    """A config.json dict for ``cfg`` (the family from ``metadata['model_type']`` or inferred)."""
    metadata = metadata or {}
    if cfg.pattern != ("gqa",) and cfg.pattern != ("mha",):
        raise PretrainedError(f"export: attn={cfg.attn!r} has no Hugging Face equivalent (needs gqa/mha); "
                              "export with format='native' (attnlab's own directory) instead")
    a = cfg.layer_configs[0]
    if a.sinks or a.softcap is not None or (a.rope is not None and a.rope.fraction != 1.0):
        raise PretrainedError("export: sinks, softcap and partial RoPE have no equivalent in the "
                              "llama/mistral/qwen2/qwen3 families")
    kind = metadata.get("model_type") or ("qwen3" if a.qk_norm else "mistral" if a.window is not None
                                          else "llama")
    if a.qk_norm and kind != "qwen3":
        kind = "qwen3"
    out = dict(architectures=[_ARCH[kind]], model_type=kind, vocab_size=cfg.vocab_size,
               hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.num_layers,
               num_attention_heads=cfg.num_heads, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim,
               hidden_act="silu", rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
               max_position_embeddings=int(metadata.get("max_position_embeddings") or 8192),
               rope_theta=cfg.rope_theta, torch_dtype="float32")
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if metadata.get(k) is not None:
            out[k] = metadata[k]
    if kind in ("llama", "qwen3"):
        out["attention_bias"] = bool(a.use_bias)
    if a.window is not None:
        out["sliding_window"] = a.window + 1
        if kind in ("qwen2", "qwen3"):
            out.update(use_sliding_window=True, max_window_layers=0,
                       layer_types=["sliding_attention"] * cfg.num_layers)
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = cfg.rope_scaling.to_hf()
    return out


# --------------------------------------------------------------------------- weights
def _layer(i):
    return f"model.layers.{i}."


def params_from_state_dict(sd: dict[str, np.ndarray], cfg: LMConfig, *, source: str,
                           o_bias: bool) -> dict:
    """The flax params (scan layout) from HF-named ``[out, in]`` arrays; consumes ``sd``."""
    a = cfg.layer_configs[0]
    D, N, K, H, L = cfg.d_model, cfg.num_heads, a.num_kv_heads, a.head_dim, cfg.num_layers
    dt = cfg.param_dtype

    def take(name, shape):
        if name not in sd:
            raise PretrainedError(f"{source}: missing tensor {name!r}")
        x = np.asarray(sd.pop(name))
        if tuple(x.shape) != tuple(shape):
            raise PretrainedError(f"{source}: tensor {name!r} has shape {tuple(x.shape)}, "
                                  f"the config implies {tuple(shape)}")
        return x

    def stack(fn):
        return jnp.asarray(np.stack([fn(_layer(i)) for i in range(L)]), dt)

    attn = {
        "q_kernel": stack(lambda p: take(p + "self_attn.q_proj.weight", (N * H, D)).T.reshape(D, N, H)),
        "k_kernel": stack(lambda p: take(p + "self_attn.k_proj.weight", (K * H, D)).T.reshape(D, K, H)),
        "v_kernel": stack(lambda p: take(p + "self_attn.v_proj.weight", (K * H, D)).T.reshape(D, K, H)),
        "o_kernel": stack(lambda p: take(p + "self_attn.o_proj.weight", (D, N * H)).T.reshape(N, H, D)),
    }
    if a.use_bias:
        for n, heads in (("q", N), ("k", K), ("v", K)):
            attn[f"{n}_bias"] = stack(lambda p: take(p + f"self_attn.{n}_proj.bias", (heads * H,))
                                      .reshape(heads, H))
        # Qwen2 has no o_proj bias: a zero one is the same function.
        attn["o_bias"] = (stack(lambda p: take(p + "self_attn.o_proj.bias", (D,))) if o_bias
                          else jnp.zeros((L, D), dt))
    if a.qk_norm:
        attn["q_norm"] = stack(lambda p: take(p + "self_attn.q_norm.weight", (H,)))
        attn["k_norm"] = stack(lambda p: take(p + "self_attn.k_norm.weight", (H,)))
    F = cfg.ffn_dim
    block = {
        "attn": attn,
        "attn_norm": {"scale": stack(lambda p: take(p + "input_layernorm.weight", (D,)))},
        "mlp_norm": {"scale": stack(lambda p: take(p + "post_attention_layernorm.weight", (D,)))},
        "mlp": {"w_gate": stack(lambda p: take(p + "mlp.gate_proj.weight", (F, D)).T),
                "w_up": stack(lambda p: take(p + "mlp.up_proj.weight", (F, D)).T),
                "w_down": stack(lambda p: take(p + "mlp.down_proj.weight", (D, F)).T)},
    }
    params = {"embedding": jnp.asarray(take("model.embed_tokens.weight", (cfg.vocab_size, D)), dt),
              "units": {"block_0": block},
              "final_norm": {"scale": jnp.asarray(take("model.norm.weight", (D,)), dt)}}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    else:
        params["head"] = jnp.asarray(take("lm_head.weight", (cfg.vocab_size, D)).T, dt)
    leftover = sorted(k for k in sd if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise PretrainedError(f"{source}: tensors the importer does not know: {leftover[:5]}"
                              + (f" (+{len(leftover) - 5} more)" if len(leftover) > 5 else ""))
    return params


def state_dict_from_params(params: dict, cfg: LMConfig, *, o_bias: bool | None = None) -> dict:
    """HF-named float32 numpy ``[out, in]`` arrays from flax params (scan or unit_* layout)."""
    a = cfg.layer_configs[0]
    D, N, K, H, L = cfg.d_model, cfg.num_heads, a.num_kv_heads, a.head_dim, cfg.num_layers
    params = _unbox(params)
    f32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32))
    if "units" in params:
        blocks = [_index(params["units"]["block_0"], i) for i in range(L)]
    else:
        blocks = [params[f"unit_{i}"]["block_0"] for i in range(L)]
    sd = {"model.embed_tokens.weight": f32(params["embedding"]),
          "model.norm.weight": f32(params["final_norm"]["scale"])}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = f32(params["head"]).T
    for i, b in enumerate(blocks):
        p, at = _layer(i), b["attn"]
        sd[p + "self_attn.q_proj.weight"] = f32(at["q_kernel"]).reshape(D, N * H).T
        sd[p + "self_attn.k_proj.weight"] = f32(at["k_kernel"]).reshape(D, K * H).T
        sd[p + "self_attn.v_proj.weight"] = f32(at["v_kernel"]).reshape(D, K * H).T
        sd[p + "self_attn.o_proj.weight"] = f32(at["o_kernel"]).reshape(N * H, D).T
        if a.use_bias:
            for n in ("q", "k", "v"):
                sd[p + f"self_attn.{n}_proj.bias"] = f32(at[f"{n}_bias"]).reshape(-1)
            ob = f32(at["o_bias"])
            if o_bias:
                sd[p + "self_attn.o_proj.bias"] = ob
            elif np.any(ob != 0):
                raise PretrainedError("export: a nonzero o_bias has no place in this family "
                                      "(qwen2 has q/k/v biases only); export as llama with attention_bias")
        if a.qk_norm:
            sd[p + "self_attn.q_norm.weight"] = f32(at["q_norm"])
            sd[p + "self_attn.k_norm.weight"] = f32(at["k_norm"])
        sd[p + "input_layernorm.weight"] = f32(b["attn_norm"]["scale"])
        sd[p + "post_attention_layernorm.weight"] = f32(b["mlp_norm"]["scale"])
        sd[p + "mlp.gate_proj.weight"] = f32(b["mlp"]["w_gate"]).T
        sd[p + "mlp.up_proj.weight"] = f32(b["mlp"]["w_up"]).T
        sd[p + "mlp.down_proj.weight"] = f32(b["mlp"]["w_down"]).T
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


# --------------------------------------------------------------------------- directories
def load_dir(path: str, *, dtype=jnp.float32, config_only: bool = False):
    """``(LMConfig, params, metadata)`` from a directory with config.json and *.safetensors
    (params None if ``config_only``)."""
    from safetensors.flax import load_file  # numpy has no bfloat16; jax arrays do

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise PretrainedError(f"{path}: no config.json (a Hugging Face directory needs config.json "
                              "and *.safetensors)")
    try:
        with open(cfg_path) as f:
            c = json.load(f)
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if c.get("quantization_config"):
        raise PretrainedError(f"{cfg_path}: quantized safetensors checkpoints are not supported "
                              f"(quantization_config={c['quantization_config'].get('quant_method')!r})")
    cfg, meta = lm_config_from_hf(c, source=cfg_path, dtype=dtype)
    if config_only:
        return cfg, None, meta
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise PretrainedError(f"{path}: no *.safetensors files (pytorch .bin checkpoints are not read)")
    sd = {}
    for fn in files:
        try:
            sd.update(_float32(load_file(fn)))
        except Exception as e:  # safetensors raises SafetensorError (not a ValueError) on bad files
            raise PretrainedError(f"{fn}: cannot read safetensors ({str(e).splitlines()[0]})") from e
    params = params_from_state_dict(sd, cfg, source=path, o_bias=meta["o_bias"])
    return cfg, params, meta


def export_dir(cfg: LMConfig, params: dict, out_dir: str, *, metadata: dict | None = None,
               tokenizer=None) -> str:
    """Write config.json + model.safetensors (+ tokenizer files) that transformers loads."""
    from safetensors.numpy import save_file

    hf = hf_config_from_lm(cfg, metadata)
    o_bias = FAMILIES[hf["model_type"]](hf, "export")[1]
    sd = state_dict_from_params(params, cfg, o_bias=o_bias)
    os.makedirs(out_dir, exist_ok=True)
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if tokenizer is not None:
        tokenizer.to_hf_dir(out_dir)
    return out_dir


def _float32(sd):
    """float32 numpy copies (bf16 / f16 checkpoints are widened once, then cast to ``dtype``)."""
    return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in sd.items()}


def _unbox(tree):
    import flax.linen as nn
    tree = nn.unbox(tree)
    return tree["params"] if "params" in tree and "embedding" not in tree else tree


def _index(tree, i):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _index(v, i) for k, v in tree.items()}
    return tree[i]
