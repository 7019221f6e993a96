"""Float64 numpy oracle of the linear-attention recurrences, written from the math.

One loop over t, vectorised over batch and heads; independent of ``attn/linear``:

    gla / lightning:  S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ
    gdn / kda:        S_t = (I - b_t k_t k_tᵀ) Diag(exp(g_t)) S_{t-1} + b_t k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

``g`` is ``[B,T,N]`` (scalar per head) or ``[B,T,N,H]``; ``starts [B,T]`` bool marks tokens
whose state starts from zero (a new document). Returns ``(o [B,T,N,V], S_T [B,N,H,V])``.
"""

import numpy as np


def recurrence(q, k, v, g, beta=None, *, delta, scale=None, initial_state=None, starts=None):
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    B, T, N, H = q.shape
    V = v.shape[-1]
    scale = H ** -0.5 if scale is None else scale
    if g.ndim == 3:
        g = np.repeat(g[..., None], H, axis=-1)
    S = np.zeros((B, N, H, V)) if initial_state is None else np.array(initial_state, np.float64)
    o = np.zeros((B, T, N, V))
    eye = np.eye(H)
    for t in range(T):
        if starts is not None:
            S = np.where(np.asarray(starts)[:, t, None, None, None], 0.0, S)
        decay = np.exp(g[:, t])[..., :, None] * eye  # Diag(alpha_t), [B,N,H,H]
        kt, vt = k[:, t], v[:, t]
        if delta:
            b = np.asarray(beta, np.float64)[:, t][..., None, None]
            erase = eye - b * kt[..., :, None] * kt[..., None, :]
            S = erase @ decay @ S + b * kt[..., :, None] * vt[..., None, :]
        else:
            S = decay @ S + kt[..., :, None] * vt[..., None, :]
        o[:, t] = scale * np.einsum("bnhv,bnh->bnv", S, q[:, t])
    return o, S
