"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024): the delta rule with a scalar decay per head.

Recurrence, per head, state ``S_t ∈ R^{H×V}``, ``α_t = exp(g_t)``:

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

Registered as the mechanism "gdn" (layer: ``attn/linear/_layer.py``; gate
``g = −exp(A_log) · softplus(x W_a + dt_bias)``, ``β = sigmoid(x W_b)``, short conv + SiLU,
L2-normalised q and k, output RMSNorm gated by SiLU).
"""

from __future__ import annotations

import jax.numpy as jnp

from attn.linear import _chunked, _gates, _layer


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, impl="auto", segment_ids=None, chunk_size=64,
                     use_qk_l2norm_in_kernel=False):
    """Gated delta rule, FLA's ``chunk_gated_delta_rule`` in attnlab layout.

    Args:
      q, k: ``[B, T, N, H]`` (keys should be L2-normalised, or pass
        ``use_qk_l2norm_in_kernel=True``). v: ``[B, T, N, V]``.
      g: ``[B, T, N]`` log-decay (``α = exp(g)``, g <= 0; 0 = no decay).
      beta: ``[B, T, N]`` write strength in [0, 1].
      scale: query scale, default ``H ** -0.5``.
      initial_state: ``[B, N, H, V]`` or None (zeros).
      output_final_state: also return the state after the last token.
      cu_seqlens: ``[S + 1]`` int offsets of packed sequences (B = 1); each resets the state.
      segment_ids: ``[B, T]`` int (attnlab): a change of id resets the state, 0 = padding.
      impl: "auto" | "naive" | "chunked". chunk_size: C of the chunked form.

    Returns:
      ``(o [B, T, N, V] in q.dtype, final_state [B, N, H, V] float32 or None)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> B, T, N, H, V = 1, 37, 2, 8, 4
      >>> q, k = jax.random.normal(jax.random.key(0), (2, B, T, N, H))
      >>> v = jax.random.normal(jax.random.key(1), (B, T, N, V))
      >>> g = -jax.nn.softplus(jax.random.normal(jax.random.key(2), (B, T, N)))
      >>> beta = jax.nn.sigmoid(jax.random.normal(jax.random.key(3), (B, T, N)))
      >>> kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)
      >>> o1, s1 = gated_delta_rule(q, k, v, g, beta, impl="naive", **kw)
      >>> o2, s2 = gated_delta_rule(q, k, v, g, beta, impl="chunked", chunk_size=16, **kw)
      >>> bool(jnp.allclose(o1, o2, atol=1e-4)), s2.shape
      (True, (1, 2, 8, 4))
    """
    if use_qk_l2norm_in_kernel:
        q, k = _layer.l2_norm(q), _layer.l2_norm(k)
    if getattr(g, "ndim", 3) != 3:
        raise _chunked.UserError(f"gated_delta_rule: g must be [B, T, N] (one gate per head), got {g.shape}")
    return _chunked.run(q, k, v, g, beta, name="gated_delta_rule", delta=True, scale=scale,
                        initial_state=initial_state, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)


_layer.register_variant(_layer.Variant(
    name="gdn", delta=True, feature=lambda q, k: (_layer.l2_norm(q), _layer.l2_norm(k)),
    gate_params=_gates.head_softplus_params, gate=_gates.head_softplus,
    gate_param_count=lambda c: c.d_model * c.num_heads + 2 * c.num_heads,
    description="Gated DeltaNet: delta rule with a per-head decay (recurrent state)",
))
