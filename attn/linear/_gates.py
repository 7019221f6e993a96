"""Gate parameterisations shared by the variants (log-decays, all <= 0).

* ``head_softplus`` (gdn, Mamba2 / FLA GatedDeltaNet): ``g = -exp(A_log) · softplus(x W_a + dt_bias)``,
  one value per head; ``A_log ~ log U(1, 16)``, ``softplus(dt_bias) ~ logU(1e-3, 0.1)``.
* ``channel_softplus`` (kda): the same with a low-rank ``W_a = W_1 W_2`` ([D, r], [r, N, H])
  and ``dt_bias [N, H]``: one value per key channel.
* ``channel_logsigmoid`` (gla, FLA GatedLinearAttention): ``g = logsigmoid(x W_1 W_2 + b) / 16``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.axes import EMBED, HEAD_DIM, HEADS, LATENT

GLA_NORMALIZER = 16.0  # FLA's gate_logit_normalizer: slow decays at init


def _a_log_init(key, shape, dtype):
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def _dt_bias_init(key, shape, dtype):
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, jnp.log(1e-3), jnp.log(0.1)))
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus


def _p(module, cfg, name, init, shape, axes):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype)


def _fan_in(in_axis, out_axis):
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def head_softplus_params(module, cfg):
    D, N = cfg.d_model, cfg.num_heads
    return {"a_kernel": _p(module, cfg, "a_kernel", _fan_in(0, 1), (D, N), (EMBED, HEADS)),
            "A_log": _p(module, cfg, "A_log", _a_log_init, (N,), (HEADS,)),
            "dt_bias": _p(module, cfg, "dt_bias", _dt_bias_init, (N,), (HEADS,))}


def head_softplus(params, x, cfg):
    a = jnp.einsum("BTD,DN->BTN", x.astype(jnp.float32), params["a_kernel"].astype(jnp.float32))
    return -jnp.exp(params["A_log"].astype(jnp.float32)) * jax.nn.softplus(a + params["dt_bias"])


def _low_rank(module, cfg):
    D, N, H, r = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.gate_rank
    # The rank axis is named LATENT (unsharded) so that Muon sees both factors as matrices.
    return {"f1_kernel": _p(module, cfg, "f1_kernel", _fan_in(0, 1), (D, r), (EMBED, LATENT)),
            "f2_kernel": _p(module, cfg, "f2_kernel", _fan_in(0, (1, 2)), (r, N, H), (LATENT, HEADS, HEAD_DIM))}


def _low_rank_apply(params, x):
    h = jnp.einsum("BTD,DR->BTR", x.astype(jnp.float32), params["f1_kernel"].astype(jnp.float32))
    return jnp.einsum("BTR,RNH->BTNH", h, params["f2_kernel"].astype(jnp.float32))


def channel_softplus_params(module, cfg):
    N, H = cfg.num_heads, cfg.head_dim
    p = _low_rank(module, cfg)
    p["A_log"] = _p(module, cfg, "A_log", _a_log_init, (N,), (HEADS,))
    p["dt_bias"] = _p(module, cfg, "dt_bias", _dt_bias_init, (N, H), (HEADS, HEAD_DIM))
    return p


def channel_softplus(params, x, cfg):
    a = _low_rank_apply(params, x) + params["dt_bias"].astype(jnp.float32)
    return -jnp.exp(params["A_log"].astype(jnp.float32))[:, None] * jax.nn.softplus(a)


def channel_logsigmoid_params(module, cfg):
    p = _low_rank(module, cfg)
    p["f_bias"] = _p(module, cfg, "f_bias", nn.initializers.zeros, (cfg.num_heads, cfg.head_dim), (HEADS, HEAD_DIM))
    return p


def channel_logsigmoid(params, x, cfg):
    return jax.nn.log_sigmoid(_low_rank_apply(params, x) + params["f_bias"].astype(jnp.float32)) / GLA_NORMALIZER


def low_rank_count(cfg):
    return cfg.d_model * cfg.gate_rank + cfg.gate_rank * cfg.num_heads * cfg.head_dim
