"""Kimi Delta Attention (Kimi Linear, 2025): the delta rule with a per-channel decay.

Recurrence, per head, state ``S_t ∈ R^{H×V}``, ``α_t = exp(g_t) ∈ R^H``:

    S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t−1} + β_t k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

Registered as "kda" (gate ``g = −exp(A_log) · softplus(x W_1 W_2 + dt_bias)`` low-rank per
channel, ``β = sigmoid(x W_b)``, short conv + SiLU, L2-normalised q and k, gated RMSNorm).
"""

from __future__ import annotations

from attn.linear import _chunked, _gates, _layer


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
        cu_seqlens=None, impl="auto", segment_ids=None, chunk_size=64, use_qk_l2norm_in_kernel=False):
    """Kimi delta attention, FLA's ``chunk_kda`` in attnlab layout.

    Args:
      q, k: ``[B, T, N, H]``. v: ``[B, T, N, V]``.
      g: ``[B, T, N, H]`` per-channel log-decay (<= 0). beta: ``[B, T, N]``.
      Other arguments as ``attn.linear.gated_delta_rule``.

    Returns:
      ``(o [B, T, N, V], final_state [B, N, H, V] float32 or None)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> q, k = jax.random.normal(jax.random.key(0), (2, 1, 20, 2, 8))
      >>> v = jax.random.normal(jax.random.key(1), (1, 20, 2, 4))
      >>> g = -jax.nn.softplus(jax.random.normal(jax.random.key(2), (1, 20, 2, 8)))
      >>> beta = jnp.full((1, 20, 2), 0.5)
      >>> o1, _ = kda(q, k, v, g, beta, impl="naive", use_qk_l2norm_in_kernel=True)
      >>> o2, _ = kda(q, k, v, g, beta, chunk_size=8, use_qk_l2norm_in_kernel=True)
      >>> bool(jnp.allclose(o1, o2, atol=1e-4))
      True
    """
    if use_qk_l2norm_in_kernel:
        q, k = _layer.l2_norm(q), _layer.l2_norm(k)
    if getattr(g, "ndim", 4) != 4:
        raise _chunked.UserError(f"kda: g must be [B, T, N, H] (one gate per key channel), got {g.shape}")
    return _chunked.run(q, k, v, g, beta, name="kda", delta=True, scale=scale,
                        initial_state=initial_state, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)


_layer.register_variant(_layer.Variant(
    name="kda", delta=True, feature=lambda q, k: (_layer.l2_norm(q), _layer.l2_norm(k)),
    gate_params=_gates.channel_softplus_params, gate=_gates.channel_softplus,
    gate_param_count=lambda c: _gates.low_rank_count(c) + c.num_heads + c.num_heads * c.head_dim,
    description="Kimi Delta Attention: delta rule with a per-channel decay (recurrent state)",
))
