"""What every conversion reports: held-out perplexity and KV-cache bytes per token.

**Held-out perplexity.** The tokens are ``train.data.tokenized_text`` (the pydoc text
through the model's tokenizer, as ``configs/finetune.py`` trains on); the last
5% of them (``train.data.tokenized_text_splits``) is the eval split the fine-tuning run holds out, so a model
healed on the train split is measured on text it has not seen. It is scored in
non-overlapping windows (``models.perplexity.score_windows``). Calibration tokens for
the conversions' PCAs come from the start of the train split.

**KV bytes per token**: the bytes a dense decode cache (``models.serving.make_cache``)
holds per token, over all layers, in the cache dtype (bf16 by default: 2 bytes).

Example:
  >>> from models.transformer import LMConfig
  >>> from models.conversion.common import kv_bytes_per_token
  >>> cfg = LMConfig(vocab_size=8, d_model=32, num_layers=2, num_heads=4, attn="gqa",
  ...                attn_overrides={"gqa": {"num_kv_heads": 2}})
  >>> kv_bytes_per_token(cfg)        # 2 layers x (k + v) x 2 kv heads x 8 dims x 2 bytes
  128
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

def split_tokens(tokenizer: str, text: str = "pydoc") -> tuple[np.ndarray, np.ndarray]:
    """``(train ids, eval ids)``: the split ``configs/finetune.py``'s data source makes."""
    from train.data import tokenized_text_splits

    return tokenized_text_splits(tokenizer, text)


def eval_perplexity(cfg, params, eval_ids, *, window: int = 256, batch: int = 4,
                    max_tokens: int | None = None) -> dict:
    """``{"tokens", "nll", "ppl"}`` of ``eval_ids`` in non-overlapping windows."""
    from models.perplexity import score_windows

    ids = [int(t) for t in (eval_ids[:max_tokens] if max_tokens else eval_ids)]
    n, total = score_windows(cfg, params, ids, window=window, batch=batch)
    return {"tokens": n, "nll": total / n, "ppl": math.exp(total / n)}


def kv_bytes_per_token(cfg, *, dtype=jnp.bfloat16, probe_len: int = 64) -> int:
    """Bytes per token of a dense decode cache for ``cfg``, summed over layers.

    Counts every floating-point cache leaf with a ``probe_len`` axis (keys, values,
    latents, RoPE keys), from the cache's abstract shapes, so it is the layout the model
    really caches; the int32 position / segment bookkeeping, the same for every
    mechanism, is left out.
    """
    from models.serving import make_cache

    shapes = jax.eval_shape(lambda: make_cache(cfg, 1, probe_len, dtype))
    total = 0
    for leaf in jax.tree.leaves(shapes):
        if probe_len in leaf.shape and jnp.issubdtype(leaf.dtype, jnp.floating):
            total += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
    return total // probe_len
