"""Lightning attention (TransNormerLLM / MiniMax): linear attention with a fixed per-head decay.

Recurrence, per head n with a constant ``λ_n = exp(−s_n)`` (simple GLA):

    S_t = λ_n S_{t−1} + k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

The slopes follow FLA's ``lightning_attn``: ALiBi slopes ``s_n = 2^{−8(n+1)/N}`` scaled by
``1 − layer_idx / (num_layers − 1) + 1e-5`` (deeper layers decay less). Registered as
"lightning" (SiLU feature map on q and k, no conv, gated RMSNorm on the output; the layer
uses ``layer_idx = 0``, ``num_layers = 1``, i.e. the plain ALiBi slopes).
"""

from __future__ import annotations

import jax.numpy as jnp
import jax

from attn.linear import _chunked, _layer


def lightning_slopes(num_heads: int, layer_idx: int = 0, num_layers: int = 1):
    """Per-head decay rates ``s_n > 0`` (``λ_n = exp(−s_n)``), float32 ``[N]``.

    Example:
      >>> [round(float(s), 4) for s in lightning_slopes(4)]
      [0.25, 0.0625, 0.0156, 0.0039]
    """
    base = 2.0 ** (-8.0 * (jnp.arange(num_heads, dtype=jnp.float32) + 1) / num_heads)
    depth = 1.0 - layer_idx / (num_layers - 1) + 1e-5 if num_layers > 1 else 1.0
    return base * depth


def lightning(q, k, v, *, layer_idx=0, num_layers=1, slopes=None, scale=None, initial_state=None,
              output_final_state=False, cu_seqlens=None, impl="auto", segment_ids=None, chunk_size=64):
    """Lightning attention (fixed per-head decay), FLA's ``chunk_lightning_attn`` in attnlab layout.

    Args:
      q, k: ``[B, T, N, H]``. v: ``[B, T, N, V]``.
      layer_idx, num_layers: pick the slopes as in FLA (``lightning_slopes``).
      slopes: ``[N]`` decay rates overriding them.
      Other arguments as ``attn.linear.gated_delta_rule``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> q, k = jax.random.normal(jax.random.key(0), (2, 1, 10, 4, 8))
      >>> v = jnp.ones((1, 10, 4, 2))
      >>> o1, _ = lightning(q, k, v, impl="naive"); o2, _ = lightning(q, k, v, impl="chunked", chunk_size=4)
      >>> bool(jnp.allclose(o1, o2, atol=1e-4))
      True
    """
    B, T, N, _ = q.shape
    s = lightning_slopes(N, layer_idx, num_layers) if slopes is None else jnp.asarray(slopes, jnp.float32)
    g = jnp.broadcast_to(-s, (B, T, N))
    return _chunked.run(q, k, v, g, None, name="lightning", delta=False, scale=scale,
                        initial_state=initial_state, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)


def _fixed_gate(params, x, cfg):
    B, T, _ = x.shape
    return jnp.broadcast_to(-lightning_slopes(cfg.num_heads), (B, T, cfg.num_heads))


_layer.register_variant(_layer.Variant(
    name="lightning", delta=False, feature=lambda q, k: (jax.nn.silu(q), jax.nn.silu(k)),
    gate_params=lambda module, cfg: {}, gate=_fixed_gate, gate_param_count=lambda c: 0,
    description="Lightning attention: linear attention with a fixed per-head decay",
    conv_default=0,
))
