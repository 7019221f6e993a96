"""GGUF (llama.cpp) checkpoints -> ``models.transformer``, with the ``gguf`` library.

The file is read with ``gguf.GGUFReader`` (memory-mapped); every tensor is dequantized with
the library's own ``gguf.quants.dequantize`` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16, F32
and the K-quants it knows) to float32, renamed to the Hugging Face names and handed to
``models.pretrained.hf`` (one weight mapping for both formats).

llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` of the "llama"
architecture per head so that ggml's interleaved RoPE (pairs ``(2i, 2i+1)``) gives the same
scores; attnlab rotates halves (pairs ``(i, i + H/2)``), so the import undoes it with
``attn.positions.interleaved_to_half``. Qwen2/Qwen3 files use ggml's NeoX (rotate-half)
RoPE and are not permuted.

Example:
  >>> from models.pretrained.gguf_import import GGUF_ARCHS
  >>> sorted(GGUF_ARCHS)
  ['llama', 'qwen2', 'qwen3']
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from attn.positions import interleaved_to_half
from models.pretrained import hf
from models.pretrained.errors import PretrainedError

# GGUF architecture -> (HF model_type, Q/K rows permuted for interleaved RoPE)
GGUF_ARCHS = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}

_BLOCK = {  # GGUF per-layer tensor name -> HF name (after "model.layers.i.")
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
# Types the library dequantizes; anything else is refused by name.
_SUPPORTED_QUANTS = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                     "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def read_fields(reader) -> dict:
    """Metadata as plain Python values (strings, numbers, lists)."""
    out = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        out[k] = f.contents()
    return out


def open_reader(path: str):
    import gguf

    if not os.path.exists(path):
        raise PretrainedError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # truncated files fail inside numpy memmap / struct reads
        raise PretrainedError(f"{path}: not a readable GGUF file (truncated or corrupt: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def hf_config_from_gguf(fields: dict, path: str) -> dict:
    """The config.json-style dict of a GGUF's metadata."""
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise PretrainedError(f"{path}: unsupported architecture general.architecture={arch!r}; "
                              f"supported: {sorted(GGUF_ARCHS)}")
    g = lambda key, default=None: fields.get(f"{arch}.{key}", default)
    try:
        N, D = int(g("attention.head_count")), int(g("embedding_length"))
        c = dict(model_type=GGUF_ARCHS[arch][0], hidden_size=D, num_attention_heads=N,
                 num_hidden_layers=int(g("block_count")), intermediate_size=int(g("feed_forward_length")),
                 num_key_value_heads=int(g("attention.head_count_kv", N)),
                 head_dim=int(g("attention.key_length", D // N)),
                 rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
                 rope_theta=float(g("rope.freq_base", 10_000.0)),
                 max_position_embeddings=int(g("context_length", 2048)),
                 vocab_size=int(g("vocab_size", len(fields.get("tokenizer.ggml.tokens", ())))))
    except TypeError as e:
        raise PretrainedError(f"{path}: GGUF metadata lacks a required {arch}.* key ({e})") from e
    if int(g("rope.dimension_count", c["head_dim"])) != c["head_dim"]:
        raise PretrainedError(f"{path}: partial RoPE ({arch}.rope.dimension_count) is not supported")
    scaling = g("rope.scaling.type")
    if scaling not in (None, "none"):
        c["rope_scaling"] = {"rope_type": scaling, "factor": float(g("rope.scaling.factor")),
                             "original_max_position_embeddings": g("rope.scaling.original_context_length")}
    return c


def load_gguf(path: str, *, dtype=jnp.float32, config_only: bool = False):
    """``(LMConfig, params, metadata, tokenizer)`` from a GGUF file (params None if ``config_only``)."""
    import gguf

    from models.pretrained.tokenizer import Tokenizer

    reader = open_reader(path)
    fields = read_fields(reader)
    c = hf_config_from_gguf(fields, path)
    names = {t.name for t in reader.tensors}
    if f"{fields['general.architecture']}.vocab_size" not in fields:
        # Most files omit it; the embedding's rows are the vocab, not the tokenizer's list
        # (which load() then checks against it).
        embd = [t for t in reader.tensors if t.name == "token_embd.weight"]
        if embd:
            c["vocab_size"] = int(embd[0].shape[-1])  # ggml order: (D, V)
    c["tie_word_embeddings"] = "output.weight" not in names
    if c["model_type"] == "qwen3" or c["model_type"] == "llama":
        c["attention_bias"] = "blk.0.attn_q.bias" in names
    cfg, meta = hf.lm_config_from_hf(c, source=path, dtype=dtype)
    tokenizer = Tokenizer.from_gguf_fields(fields, path)
    meta.update({k: v for k, v in fields.items() if k.startswith("general.")
                 and isinstance(v, (str, int, float))})
    meta.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_ids[0] if tokenizer.eos_ids else None,
                pad_token_id=tokenizer.pad_id,
                quantization=sorted({t.tensor_type.name for t in reader.tensors}))
    if config_only:
        return cfg, None, meta, tokenizer
    permute = GGUF_ARCHS[fields["general.architecture"]][1]
    a = cfg.layer_configs[0]
    sd = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if qtype not in _SUPPORTED_QUANTS:
            raise PretrainedError(f"{path}: tensor {t.name!r} has unsupported quantization type {qtype}")
        hf_name = _TOP.get(t.name)
        if hf_name is None:
            parts = t.name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _BLOCK:
                raise PretrainedError(f"{path}: tensor {t.name!r} is not one the importer knows")
            hf_name = f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}"
        # numpy order of the GGUF dims is torch's [out, in].
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = interleaved_to_half(w, cfg.num_heads, a.head_dim)
        elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = interleaved_to_half(w, a.num_kv_heads, a.head_dim)
        sd[hf_name] = w
    params = hf.params_from_state_dict(sd, cfg, source=path, o_bias=meta["o_bias"])
    return cfg, params, meta, tokenizer
