"""Gated Linear Attention (Yang et al. 2023): linear attention with a per-channel decay.

Recurrence, per head, state ``S_t ∈ R^{H×V}``, ``α_t = exp(g_t) ∈ R^H``:

    S_t = Diag(α_t) S_{t−1} + k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

Registered as "gla" (gate ``g = logsigmoid(x W_1 W_2 + b) / 16`` low-rank per channel as
in FLA, no conv by default, identity feature map, gated RMSNorm on the output).
"""

from __future__ import annotations

from attn.linear import _chunked, _gates, _layer


def gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
        cu_seqlens=None, impl="auto", segment_ids=None, chunk_size=64):
    """Gated linear attention, FLA's ``chunk_gla`` in attnlab layout.

    Args:
      q, k: ``[B, T, N, H]``. v: ``[B, T, N, V]``.
      g: ``[B, T, N, H]`` per-channel log-decay (<= 0).
      Other arguments as ``attn.linear.gated_delta_rule``.

    Returns:
      ``(o [B, T, N, V], final_state [B, N, H, V] float32 or None)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> q, k = jax.random.normal(jax.random.key(0), (2, 2, 19, 2, 8))
      >>> v = jax.random.normal(jax.random.key(1), (2, 19, 2, 4))
      >>> g = jax.nn.log_sigmoid(jax.random.normal(jax.random.key(2), (2, 19, 2, 8)))
      >>> o1, _ = gla(q, k, v, g, impl="naive")
      >>> o2, _ = gla(q, k, v, g, chunk_size=8)
      >>> bool(jnp.allclose(o1, o2, atol=1e-4))
      True
    """
    if getattr(g, "ndim", 4) != 4:
        raise _chunked.UserError(f"gla: g must be [B, T, N, H] (one gate per key channel), got {g.shape}")
    return _chunked.run(q, k, v, g, None, name="gla", delta=False, scale=scale,
                        initial_state=initial_state, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)


_layer.register_variant(_layer.Variant(
    name="gla", delta=False, feature=lambda q, k: (q, k),
    gate_params=_gates.channel_logsigmoid_params, gate=_gates.channel_logsigmoid,
    gate_param_count=lambda c: _gates.low_rank_count(c) + c.num_heads * c.head_dim,
    description="Gated Linear Attention: per-channel data-dependent decay (recurrent state)",
    conv_default=0,
))
