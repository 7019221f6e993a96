"""TransMLA: convert a trained GQA layer (``attn.mha``) into an MLA layer (``attn.mla``).

TransMLA (Meng et al., arXiv 2502.07864) shows that any GQA layer is an MLA layer with a
particular choice of weights (the K/V of all kv heads form the latent, and the
up-projections replicate each kv head for its query group), and gives a recipe to move
the RoPE into MLA's decoupled key and compress the rest (the paper's method section):

1. **RoRoPE**. RoPE rotates the pair ``(i, i + R/2)`` of every kv head by the same
   angle, so any mixing *across kv heads* that is the same for both components of a pair
   commutes with RoPE. For each frequency i we take the PCA over heads of the key pairs
   (a K×K "complex" covariance, both pair components pooled) and rotate the kv heads by
   its eigenvectors ``U_i``. The logits are unchanged (``U_i`` is orthogonal) and the
   positional energy is concentrated in the first rotated heads. The first ``r`` rotated
   heads become MLA's decoupled RoPE key (``Hr = r·R``, applied per block,
   ``mla.Config.rope_heads = r``); the remaining ``K - r`` rotated heads **lose their
   rotation** and join the NoPE (latent) part.
   **FreqFold** (``freq_fold = f > 1``): neighbouring RoPE frequencies turn at nearly the
   same speed, so f of them are pooled into one PCA over ``K·f`` (head, frequency)
   channels; the top ``r·f`` channels keep RoPE, each rotating at one frequency of its
   group. Mixing frequencies does not commute with RoPE, so this is an approximation
   even with ``r = K``; it keeps more key energy in the RoPE part than ``f = 1`` for
   the same ``Hr`` (the PCA over the larger space), which is what pays at
   ``rope_heads=1``.
2. **BKV-PCA** (balanced key-value PCA). The NoPE key content (rotated heads
   ``r..K-1`` and the non-rotated dims of partial RoPE) and the values are concatenated,
   the key part is scaled so both parts have the same mean energy (otherwise the PCA
   would serve only the larger one), and the concatenation is projected on its top ``L``
   principal directions: ``c_kv = x W_dkv`` with ``W_dkv = W_z P``; ``W_uk``, ``W_uv``
   are ``P^T`` followed by the (unscaled) maps from that concatenation to each head's
   key / value.

Exactness. RoRoPE is exact only when every rotated head keeps its RoPE: with
``rope_heads = K`` (``Hr = K·R``) and ``L >= Z`` (the width of the concatenation:
``K·H`` for full RoPE, plus ``K·(H-R)`` for partial RoPE) the MLA layer reproduces the
GQA layer up to float rounding. An exact conversion into the paper's *single* shared
RoPE head (``rope_heads=1``) is impossible in general: that key has ``R`` dims, but the
K kv heads rotate ``K·R`` independent dims with position, so unless those are linearly
dependent (K = 1, MQA) dropping the rotation of heads ``1..K-1`` changes the logits.
``rope_heads=1`` is the paper's approximation; its error is measured in
``tests/test_transmla.py``. TransMLA then fine-tunes to recover it; we do not.

Other choices, all for exactness:

* ``kv_norm=False``: MLA's RMSNorm on ``c_kv`` is not linear, a GQA key/value is.
* The GQA scale ``1/sqrt(H)`` differs from MLA's ``1/sqrt(Hn + Hr)``; the ratio is
  folded into the query kernels.
* ``Hn = H`` (``q_nope`` is the whole unrotated query); ``E = H``; ``q_lora_rank=None``.
* Statistics: with ``calib_x_BTD`` (the inputs of the attention layer) the PCAs use the
  input covariance ``X^T X``, as the paper's calibration; without it, the identity
  (a data-free, weights-only PCA). Either way the exact settings stay exact.

A whole ``models.transformer`` LM is converted by ``models.transmla_lm.convert_lm``
(kept out of ``attn/``, which never imports ``models/``).

Not supported (``NotImplementedError``): qk_norm (a nonlinear key), projection biases,
attention sinks and layers without RoPE.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from attn import mha, mla
  >>> from attn.transmla import convert_gqa_to_mla
  >>> g = mha.Config(d_model=32, num_heads=4, num_kv_heads=2, dtype="float32")
  >>> x = jax.random.normal(jax.random.key(1), (1, 6, 32))
  >>> gp = nn.unbox(mha.MHA(g).init(jax.random.key(0), x))["params"]
  >>> mp, m = convert_gqa_to_mla(gp, g, kv_lora_rank=16, rope_heads=2)   # exact: L >= K·H
  >>> y_gqa, _ = mha.mha_forward(gp, x, config=g)
  >>> y_mla, _ = mla.mla_forward(mp, x, config=m)
  >>> bool(jnp.allclose(y_gqa, y_mla, atol=1e-5)), m.qk_rope_head_dim, m.kv_lora_rank
  (True, 16, 16)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from attn import mha, mla
from attn.positions import RopeConfig

Array = Any


# --------------------------------------------------------------------------- one layer
def convert_gqa_to_mla(gqa_params, gqa_config: mha.Config, *, kv_lora_rank: int,
                       rope_heads: int = 1, calib_x_BTD=None, balance_kv: bool = True,
                       freq_fold: int = 1):
    """Convert one ``attn.mha`` layer's parameters into ``attn.mla`` parameters.

    Args:
      gqa_params: the layer's parameter dict (``q_kernel [D,N,H]``, ``k_kernel [D,K,H]``,
        ``v_kernel [D,K,H]``, ``o_kernel [N,H,D]``), boxed or not, or ``{"params": ...}``.
      gqa_config: its ``mha.Config``.
      kv_lora_rank: L of the MLA latent.
      rope_heads: r in ``[1, K]``: rotated kv heads kept in the RoPE key (``Hr = r·R``).
        1 is the paper (approximate for K > 1); K keeps RoPE exactly.
      calib_x_BTD: optional ``[..., D]`` inputs of this attention layer for the PCAs.
      balance_kv: scale the key part to the value part's energy before the joint PCA.
      freq_fold: f, FreqFold: one PCA per group of f adjacent frequencies (1 = plain
        RoRoPE; must divide R/2). Exact only at f = 1 (see the module docstring).

    Returns:
      ``(mla_params, mla.Config)``; parameters in ``gqa_config.param_dtype``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from attn import mha
      >>> g = mha.Config(d_model=16, num_heads=2, num_kv_heads=1)
      >>> gp = nn.unbox(mha.MHA(g).init(jax.random.key(0), jnp.ones((1, 2, 16))))
      >>> p, c = convert_gqa_to_mla(gp, g, kv_lora_rank=8)
      >>> p["kv_down_kernel"].shape, p["k_rope_kernel"].shape, c.rope_heads
      ((16, 8), (16, 8), 1)
    """
    cfg = gqa_config
    _check_convertible(cfg, kv_lora_rank, rope_heads, freq_fold)
    p = nn.unbox(gqa_params)
    p = p.get("params", p)
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    R, r, L = cfg.rope.rotary_dims(H), rope_heads, kv_lora_rank
    f64 = lambda a: np.asarray(a, np.float64)
    Wq, Wk, Wv, Wo = (f64(p[n]) for n in ("q_kernel", "k_kernel", "v_kernel", "o_kernel"))
    sigma_DD = input_covariance(calib_x_BTD, D)
    group_N = np.arange(N) // (N // K)

    # RoRoPE (+ FreqFold): per group of f frequencies, rotate the (kv head, frequency)
    # channels by their PCA; the first r·f channels keep RoPE, the rest join the latent.
    k_rope, q_rope, Wz_rot, Bk_rot = _rorope(Wk, Wq, sigma_DD, R, r, freq_fold, group_N)

    # NoPE content z = [rotated channels past the RoPE ones (unrotated from here on),
    # pass-through dims of partial RoPE, values].
    Wz_k = np.concatenate([Wz_rot, Wk[:, :, R:].reshape(D, -1)], axis=1)
    Wz_v = Wv.reshape(D, K * H)
    Zk = Wz_k.shape[1]
    Bk_ZNH = np.zeros((Zk, N, H))   # z_k -> each head's nope key
    Bk_ZNH[:Wz_rot.shape[1], :, :R] = Bk_rot
    for n in range(N):
        e = np.arange(H - R)
        Bk_ZNH[Wz_rot.shape[1] + group_N[n] * (H - R) + e, n, R + e] = 1.0
    Bv_ZNH = np.zeros((K * H, N, H))
    for n in range(N):
        Bv_ZNH[group_N[n] * H + np.arange(H), n, np.arange(H)] = 1.0

    # BKV-PCA: balance key vs value energy, then one PCA of the concatenation.
    alpha = 1.0
    if balance_kv and Zk:
        ek, ev = np.trace(Wz_k.T @ sigma_DD @ Wz_k), np.trace(Wz_v.T @ sigma_DD @ Wz_v)
        alpha = float(np.sqrt(ev / ek)) if ek > 0 and ev > 0 else 1.0
    Wz = np.concatenate([alpha * Wz_k, Wz_v], axis=1)
    Bk_full = np.concatenate([Bk_ZNH / alpha, np.zeros((K * H, N, H))], axis=0)
    Bv_full = np.concatenate([np.zeros((Zk, N, H)), Bv_ZNH], axis=0)
    P_ZL = top_principal_directions(Wz.T @ sigma_DD @ Wz, L)

    # MLA's scale is 1/sqrt(Hn + Hr) with Hn = H: fold the ratio to GQA's 1/sqrt(H) into q.
    s = float(np.sqrt((H + r * R) / H))
    out = dict(
        q_nope_kernel=Wq * s, q_rope_kernel=q_rope * s,
        kv_down_kernel=Wz @ P_ZL, k_rope_kernel=k_rope,
        k_up_kernel=np.einsum("ZL,ZNH->LNH", P_ZL, Bk_full),
        v_up_kernel=np.einsum("ZL,ZNE->LNE", P_ZL, Bv_full),
        o_kernel=Wo,
    )
    m = mla.Config(
        d_model=D, num_heads=N, kv_lora_rank=L, q_lora_rank=None, qk_nope_head_dim=H,
        qk_rope_head_dim=r * R, v_head_dim=H, rope_heads=r, kv_norm=False,
        rope=RopeConfig(theta=cfg.rope.theta, fraction=1.0, scaling=cfg.rope.scaling),
        causal=cfg.causal, window=cfg.window, softcap=cfg.softcap, impl=cfg.impl,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, norm_eps=cfg.norm_eps)
    return {k: jnp.asarray(v, cfg.param_dtype) for k, v in out.items()}, m


def _check_convertible(cfg, kv_lora_rank, rope_heads, freq_fold=1) -> None:
    """ValueError for bad arguments, NotImplementedError (with the reason) for unsupported layers."""
    if not isinstance(cfg, mha.Config):
        raise ValueError("convert_gqa_to_mla: gqa_config must be an attn.mha.Config, "
                         f"got {type(cfg).__name__}")
    if not (isinstance(kv_lora_rank, int) and kv_lora_rank > 0):
        raise ValueError(f"convert_gqa_to_mla: kv_lora_rank must be a positive int, got {kv_lora_rank!r}")
    if not (isinstance(rope_heads, int) and 1 <= rope_heads <= cfg.num_kv_heads):
        raise ValueError(f"convert_gqa_to_mla: rope_heads must be an int in [1, K={cfg.num_kv_heads}], "
                         f"got {rope_heads!r}")
    for flag, why in (("qk_norm", "the RMSNormed key is not linear in x, a latent up-projection is"),
                      ("use_bias", "MLA has no projection biases"),
                      ("sinks", "attn.mla has no attention sinks")):
        if getattr(cfg, flag):
            raise NotImplementedError(f"convert_gqa_to_mla: {flag}=True is not supported: {why}")
    if cfg.rope is None:
        raise NotImplementedError("convert_gqa_to_mla: a layer without RoPE is not supported "
                                  "(attn.mla always has a decoupled RoPE key)")
    half = cfg.rope.rotary_dims(cfg.head_dim) // 2
    if not (isinstance(freq_fold, int) and freq_fold >= 1 and half % freq_fold == 0):
        raise ValueError(f"convert_gqa_to_mla: freq_fold must be a positive int dividing the "
                         f"{half} RoPE frequencies, got {freq_fold!r}")


def input_covariance(x, D: int) -> np.ndarray:
    """``X^T X / n`` float64 ``[D, D]`` of ``x [..., D]``, or the identity when x is None."""
    if x is None:
        return np.eye(D)
    X = np.asarray(x, np.float64).reshape(-1, D)
    return X.T @ X / max(len(X), 1)


def rorope_rotation(k_kernel_DKH, sigma_DD, R: int, freq_fold: int = 1) -> np.ndarray:
    """Per-group channel rotations ``U [R/(2f), K·f, K·f]`` (columns: principal directions first).

    Group ``g`` holds frequencies ``g·f .. g·f + f - 1``; its channels are the pairs of
    every (kv head a, frequency j), indexed ``a·f + (j - g·f)``, and
    ``M_g[(a,j), (b,l)] = Σ_c E[k_a[j + c·R/2] k_b[l + c·R/2]]`` over the pair component
    c ∈ {0, 1} (RoRoPE's joint "complex" PCA: RoPE keeps this 2-D inner product).
    ``f = 1`` is plain RoRoPE (``[R/2, K, K]``); ``f > 1`` is FreqFold.

    Example:
      >>> import numpy as np
      >>> U = rorope_rotation(np.random.default_rng(0).normal(size=(8, 3, 4)), np.eye(8), 4)
      >>> U.shape, bool(np.allclose(U[0].T @ U[0], np.eye(3)))
      ((2, 3, 3), True)
      >>> rorope_rotation(np.random.default_rng(0).normal(size=(8, 3, 4)), np.eye(8), 4, 2).shape
      (1, 6, 6)
    """
    k = np.asarray(k_kernel_DKH, np.float64)
    half, f = R // 2, freq_fold
    out = []
    for g in range(half // f):
        M = 0.0
        for c in (0, 1):
            X = k[:, :, g * f + c * half: g * f + c * half + f].reshape(k.shape[0], -1)  # [D, K·f]
            M = M + X.T @ sigma_DD @ X
        w, U = np.linalg.eigh(M)
        out.append(U[:, np.argsort(-w)])
    return np.stack(out)


def _rorope(Wk, Wq, sigma_DD, R: int, r: int, f: int, group_N):
    """RoRoPE / FreqFold on the rotary dims: ``(k_rope [D, r·R], q_rope [D, N, r·R],
    Wz_rot [D, (K-r)·R], Bk_rot [(K-r)·R, N, R])``.

    In group g, channel ``m < r·f`` goes to RoPE block ``m // f``, frequency slot
    ``g·f + m % f`` (so with f > 1 a channel mixing neighbouring frequencies rotates at
    one of them: FreqFold's approximation); channels ``m >= r·f`` become latent features
    ``z``, and ``Bk_rot`` maps them back onto each query head's rotary key dims.
    """
    D, K, _ = Wk.shape
    N = Wq.shape[1]
    half = R // 2
    U_G = rorope_rotation(Wk, sigma_DD, R, f)                  # [G, K·f, K·f]
    k_rope, q_rope = np.zeros((D, r * R)), np.zeros((D, N, r * R))
    z_cols, Bk_rows = [], []
    for g, U in enumerate(U_G):
        for c in (0, 1):
            cols = g * f + c * half + np.arange(f)                # this group's dims, component c
            Y = Wk[:, :, cols].reshape(D, K * f) @ U              # [D, K·f] rotated channels
            for m in range(r * f):
                k_rope[:, (m // f) * R + cols[m % f]] = Y[:, m]
            for n in range(N):
                a = group_N[n]
                Yq = Wq[:, n, cols] @ U[a * f:(a + 1) * f]          # query head n sees its kv head
                for m in range(r * f):
                    q_rope[:, n, (m // f) * R + cols[m % f]] = Yq[:, m]
            z_cols.append(Y[:, r * f:])
            for m in range(r * f, K * f):
                row = np.zeros((N, R))
                for n in range(N):
                    a = group_N[n]
                    row[n, cols] = U[a * f:(a + 1) * f, m]
                Bk_rows.append(row)
    Wz_rot = np.concatenate(z_cols, axis=1) if z_cols else np.zeros((D, 0))
    Bk_rot = np.stack(Bk_rows) if Bk_rows else np.zeros((0, N, R))
    return k_rope, q_rope, Wz_rot, Bk_rot


def top_principal_directions(cov_ZZ, L: int) -> np.ndarray:
    """``P [Z, L]``: eigenvectors of ``cov`` by decreasing eigenvalue; zero columns past Z.

    Example:
      >>> top_principal_directions(np.diag([1.0, 3.0]), 3).tolist()
      [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    """
    Z = cov_ZZ.shape[0]
    w, V = np.linalg.eigh(np.asarray(cov_ZZ, np.float64))
    V = V[:, np.argsort(-w)][:, :L]
    return np.concatenate([V, np.zeros((Z, max(L - Z, 0)))], axis=1)


def __getattr__(name: str):
    # The whole-LM conversion needs models.transformer; attn/ never imports models/,
    # so it lives in models/transmla_lm.py. Say where instead of a bare AttributeError.
    if name == "convert_lm":
        raise AttributeError("attn.transmla.convert_lm moved to models.transmla_lm.convert_lm "
                             "(attn/ does not import models/)")
    raise AttributeError(f"module 'attn.transmla' has no attribute {name!r}")
