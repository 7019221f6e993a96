"""Greedy generation with TidalDecode (``attn.kv.tidal.TidalRouter``) on an unscanned model.

The router lives in ``attn/kv/tidal.py`` (the mechanism); this is the decode loop that
drives a ``models.transformer`` model with it (``attn/`` never imports ``models/``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from models.transformer import LMConfig, Transformer
  >>> from models.generate import generate_batch
  >>> cfg = LMConfig(vocab_size=32, d_model=32, num_layers=3, num_heads=2, dtype="float32")
  >>> v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  >>> out, stats = generate_tidal(cfg, v, [[1, 2, 3, 4, 5]], max_new_tokens=3, k=64,
  ...                             selection_layers=(0,), return_stats=True)
  >>> out == generate_batch(cfg, v, [[1, 2, 3, 4, 5]], max_new_tokens=3), stats["reads_fraction"]
  (True, 1.0)
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attn.core import route_attention
from attn.kv.tidal import TidalRouter, default_selection_layers
from models.analysis.capture import unscan
from models.generate import _prefill, left_pad
from models.transformer import Transformer


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("k", "selection_layers"),
                   donate_argnames=("cache",))
def _tidal_step(config, variables, tok_B, pos_B, cache, *, k, selection_layers):
    router = TidalRouter(config.num_layers, k=k, selection_layers=selection_layers)
    with route_attention(router):
        logits, cache = Transformer(config).apply(
            variables, tok_B[:, None], positions_BT=pos_B[:, None],
            segment_ids_BT=jnp.ones_like(tok_B)[:, None], cache=cache)
    if router.calls != config.num_layers:
        raise ValueError(f"TidalDecode: saw {router.calls} attention calls for {config.num_layers} layers")
    return logits[:, 0], cache


def generate_tidal(config, variables, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   k: int, selection_layers: Sequence[int] | None = None,
                   return_stats: bool = False):
    """Greedy generation with TidalDecode; each row's ``max_new_tokens`` tokens.

    Args:
      config, variables: an ``LMConfig`` and its variables (scanned models are unscanned
        with ``models.analysis.capture.unscan``; every layer must be full attention).
      prompts: token lists (left-padded into one batch, as ``models.generate``).
      max_new_tokens: tokens per row.  k: positions the sparse layers read per kv head.
      selection_layers: token-selection layers (default ``default_selection_layers``).
      return_stats: also return ``{"reads_fraction": keys read / keys a full decode
        reads, averaged over the steps, "selection_layers": ...}``.
    """
    cfg, params = unscan(config, variables)
    sel = tuple(default_selection_layers(cfg.num_layers) if selection_layers is None else
                sorted(set(int(l) for l in selection_layers)))
    TidalRouter(cfg.num_layers, k=k, selection_layers=sel)  # validate before compiling
    tokens, mask = left_pad(prompts)
    B, P = tokens.shape
    var = {"params": params}
    logits, cache, pos = _prefill(cfg, var, jnp.asarray(tokens), jnp.asarray(mask),
                                  max_len=P + max_new_tokens, cache_dtype=None)
    S = P + max_new_tokens
    dense_layers = sel[0] + len([l for l in sel if l >= sel[0]])
    sparse_layers = cfg.num_layers - dense_layers
    lens = mask.sum(axis=1).astype(np.float64)
    out, reads = [], []
    for step in range(max_new_tokens):
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out.append(np.asarray(tok))
        if step == max_new_tokens - 1:
            break
        logits, cache = _tidal_step(cfg, var, tok, pos, cache, k=int(k), selection_layers=sel)
        pos = pos + 1
        n = lens + step + 1  # keys visible to this step's query, per row
        reads.append(np.mean((dense_layers * n + sparse_layers * np.minimum(min(k, S), n))
                             / (cfg.num_layers * n)))
    rows = np.stack(out, 1).tolist()
    if not return_stats:
        return rows
    return rows, {"reads_fraction": float(np.mean(reads)) if reads else 1.0,
                  "selection_layers": sel}
