"""``cudnn``: delegate to ``jax.nn.dot_product_attention(implementation="cudnn")``.

It is registered only where that is correct. ``jax.nn`` can express causal masks,
sliding windows together with causality, GQA and an additive bias; it cannot express
positions, segment ids (beyond lengths), softcap, sinks, E != H, or return the lse, so
those calls are refused with the reason. A non-causal sliding window is refused too:
cuDNN's sliding window has a known wrong-result bug when ``is_causal=False``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import core


def _supports(call: core.AttentionCall) -> str | None:
    m = call.mask
    if call.platform != "gpu":
        return f"needs an NVIDIA GPU (platform is {call.platform})"
    if call.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention takes bf16/fp16, got {call.dtype}"
    if call.head_dim != call.value_dim:
        return f"jax.nn needs E == H (got H={call.head_dim}, E={call.value_dim})"
    if call.head_dim % 8 or call.head_dim > 256:
        return f"head dim {call.head_dim} must be a multiple of 8 and <= 256"
    if call.return_lse:
        return "jax.nn.dot_product_attention does not return the lse"
    if call.softcap is not None:
        return "softcap is not supported by jax.nn.dot_product_attention"
    if call.has_sinks:
        return "attention sinks are not supported by jax.nn.dot_product_attention"
    if m.q_positions is not None or m.kv_positions is not None:
        return "explicit positions are not expressible in jax.nn.dot_product_attention"
    if m.has_segments:
        return "segment ids are not expressible in jax.nn.dot_product_attention"
    if m.block_mask is not None or m.dense is not None:
        return "block-sparse and dense masks are not supported by the cuDNN path"
    if m.q_extra_range is not None:
        return "Mask.q_extra_range is not expressible in jax.nn.dot_product_attention"
    if m.window is not None and not m.causal:
        return "cuDNN's sliding window is wrong when is_causal=False; refused"
    if m.causal and call.q_len > call.kv_len:
        return "causal with T > S leaves rows fully masked, which cuDNN does not zero"
    return None


def _impl(q, k, v, *, mask, scale, softcap, sinks, bias, return_lse):
    window = None
    if mask.window is not None:
        left, _ = mask.window
        window = (-1 if left is None else left, 0)
    o = jax.nn.dot_product_attention(
        q, k, v, bias=bias, scale=scale, is_causal=mask.causal,
        local_window_size=window, implementation="cudnn",
    )
    return o, None


core.register_impl("cudnn", _impl, _supports)
