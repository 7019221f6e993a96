"""X-EcoMLA on a pretrained checkpoint: SVD-initialised MLA layers, healed by distillation.

Li et al. 2025, "X-EcoMLA: Upcycling Pre-Trained Attention into MLA for Efficient and
Extreme KV Compression" (arXiv 2503.11132), as its released code initialises a layer
(``AMD-Hybrid-Models/X-EcoMLA``, ``re_init_q`` / ``re_init_kv``). In the ``[in, out]``
kernels of this codebase, with ``H`` the original head dim, ``Hn + Hr`` the new query/key
head dim and every head's value kept whole (``E = H``):

* **Query.** ``W_q [D, N·H] = P Σ Qᵀ`` (SVD): ``q_down = P_r Σ_r [D, Lq]``; the up-projection
  ``Q_rᵀ [Lq, N, H]`` gives each head's first ``Hn`` dims to ``q_nope`` and its last ``Hr``
  to ``q_rope``. Without ``--q-lora-rank`` the query stays full rank (the same slices of
  ``W_q``).
* **Keys and values, jointly.** Each kv head is repeated over its G query heads, so
  ``W_kv = [W_k^rep, W_v^rep] [D, 2·N·H] = A Σ Bᵀ``: ``kv_down = A_L Σ_L [D, L]`` (the
  cached latent), and ``B_Lᵀ`` splits into ``k_up`` (each head's first ``Hn`` key dims)
  and ``v_up`` (all H value dims).
* **Decoupled RoPE key**: the mean over kv heads of their last ``Hr`` key dims.
* No RMSNorm on the latents (the released default), the output projection unchanged.

This is an initialisation, not an equivalence: the first ``Hn`` dims lose their
rotation and the RoPE block is re-paired over ``Hr`` dims (which TransMLA's RoRoPE
avoids), so the model is poor right after conversion and X-EcoMLA recovers it by
distillation from the original (``attnlab train --config
finetune:init=DIR,teacher=smollm2-135m,kd=1.0``; the paper trains on the KL alone). The
released SmolLM-135M setting is ``Hn = Hr = 32``, ``Lq = 400``, ``L = 16``.

Command line::

  python -m models.conversion.xecomla --model smollm2-135m --kv-lora-rank 128,64,16 \\
      [--rope-dim 32] [--q-lora-rank 400] [--eval-tokens N] [--results FILE.json] [--out DIR]

Example:
  >>> import jax, jax.numpy as jnp
  >>> from models.transformer import LMConfig, Transformer
  >>> from models.conversion.xecomla import convert_lm
  >>> cfg = LMConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, attn="gqa",
  ...                attn_overrides={"gqa": {"num_kv_heads": 1}}, dtype="float32")
  >>> v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  >>> v2, cfg2 = convert_lm(v, cfg, kv_lora_rank=4, rope_dim=4, q_lora_rank=8)
  >>> m = cfg2.layer_configs[0]
  >>> cfg2.attn, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.q_norm
  ('mla', 4, 4, 4, False)
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

from attn import mha, mla
from attn.positions import RopeConfig


def _svd(w, rank: int, what: str):
    """``(left·Σ [I, r], right [r, O])`` of the rank-``rank`` truncated SVD of ``w [I, O]``."""
    if rank > min(w.shape):
        raise ValueError(f"X-EcoMLA: {what}={rank} exceeds the rank {min(w.shape)} of the "
                         f"{w.shape[0]}x{w.shape[1]} weights it factors")
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return u[:, :rank] * s[:rank], vt[:rank]


def convert_layer(p, cfg: mha.Config, *, kv_lora_rank: int, rope_dim: int, q_lora_rank: int | None = None):
    """One GQA/MHA/MQA layer as an SVD-initialised MLA layer: ``(params, mla.Config)``.

    ``p``: ``q_kernel [D, N, H]``, ``k_kernel, v_kernel [D, K, H]``, ``o_kernel [N, H, D]``.
    ``rope_dim`` = Hr (even, < H); Hn = H - Hr. ``ValueError`` / ``NotImplementedError``
    name what is wrong or unsupported.
    """
    if not isinstance(cfg, mha.Config):
        raise ValueError(f"X-EcoMLA: expected an attn.mha.Config layer, got {type(cfg).__name__}")
    for flag in ("qk_norm", "use_bias", "sinks"):
        if getattr(cfg, flag):
            raise NotImplementedError(f"X-EcoMLA: {flag}=True is not supported (attn.mla has none)")
    if cfg.rope is None:
        raise NotImplementedError("X-EcoMLA: a layer without RoPE is not supported (attn.mla always "
                                  "has a decoupled RoPE key)")
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if not (isinstance(rope_dim, int) and 2 <= rope_dim < H and rope_dim % 2 == 0):
        raise ValueError(f"X-EcoMLA: rope_dim must be an even int in [2, head_dim={H}), got {rope_dim!r}")
    Hr, Hn, G = rope_dim, H - rope_dim, N // K
    f64 = lambda name: np.asarray(p[name], np.float64)
    wq, wk, wv = f64("q_kernel"), f64("k_kernel"), f64("v_kernel")
    out = {"o_kernel": f64("o_kernel")}
    if q_lora_rank is None:
        q_up = wq
    else:
        out["q_down_kernel"], q_up = _svd(wq.reshape(D, N * H), q_lora_rank, "q_lora_rank")
        q_up = q_up.reshape(q_lora_rank, N, H)
    out["q_nope_kernel"], out["q_rope_kernel"] = q_up[..., :Hn], q_up[..., H - Hr:]
    rep = lambda w: np.repeat(w, G, axis=1).reshape(D, N * H)        # kv head k -> heads kG..kG+G-1
    out["kv_down_kernel"], up = _svd(np.concatenate([rep(wk), rep(wv)], axis=1), kv_lora_rank,
                                     "kv_lora_rank")
    up = up.reshape(kv_lora_rank, 2, N, H)
    out["k_up_kernel"], out["v_up_kernel"] = up[:, 0, :, :Hn], up[:, 1]
    out["k_rope_kernel"] = wk[:, :, H - Hr:].mean(axis=1)
    m = mla.Config(
        d_model=D, num_heads=N, kv_lora_rank=kv_lora_rank, q_lora_rank=q_lora_rank,
        qk_nope_head_dim=Hn, qk_rope_head_dim=Hr, v_head_dim=H, kv_norm=False, q_norm=False,
        rope=RopeConfig(theta=cfg.rope.theta, fraction=1.0, scaling=cfg.rope.scaling),
        causal=cfg.causal, window=cfg.window, softcap=cfg.softcap, impl=cfg.impl,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, norm_eps=cfg.norm_eps)
    return {k: jnp.asarray(v, cfg.param_dtype) for k, v in out.items()}, m


def convert_lm(params, lm_config, *, kv_lora_rank: int, rope_dim: int, q_lora_rank: int | None = None):
    """Every GQA/MHA/MQA layer of an LM through ``convert_layer``: ``(params, LMConfig)``."""
    from models.conversion.common import replace_attention

    return replace_attention(params, lm_config, lambda p, c, _: convert_layer(
        p, c, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, q_lora_rank=q_lora_rank), "mla")


def build_parser(prog: str = "python -m models.conversion.xecomla") -> argparse.ArgumentParser:
    from models.conversion.common import add_run_flags

    p = argparse.ArgumentParser(prog=prog, description="X-EcoMLA SVD initialisation of MLA from a pretrained model.")
    p.add_argument("--kv-lora-rank", required=True, help="latent size(s) L, comma separated")
    p.add_argument("--rope-dim", type=int, default=None, help="Hr (default: half the head dim)")
    p.add_argument("--q-lora-rank", type=int, default=None, help="Lq (default: full-rank query)")
    add_run_flags(p)
    return p


def main(argv=None, prog: str = "python -m models.conversion.xecomla") -> int:
    """Entry point; user errors print one line and return 2."""
    from models.conversion.common import run_command

    return run_command(argv, prog, _main)


def _main(argv: list[str], prog: str) -> int:
    from attn.errors import UserError
    from models import pretrained
    from models.conversion.common import (eval_perplexity, kv_bytes_per_token, original_row,
                                          save_converted, split_tokens, write_results)
    from models.conversion.transmla import _ints

    args = build_parser(prog).parse_args(argv)
    ranks = _ints("--kv-lora-rank", args.kv_lora_rank)
    if args.out and len(ranks) != 1:
        raise UserError("--out saves one conversion: give one --kv-lora-rank")
    pre = pretrained.load(args.model)
    H = pre.config.layer_configs[0].head_dim
    rope_dim = H // 2 if args.rope_dim is None else args.rope_dim
    _, eval_ids = split_tokens(args.model)
    base, score = original_row(pre, eval_ids, args, kv_lora_rank=None)
    rows = [base]
    for L in ranks:
        t0 = time.time()
        try:
            params, cfg = convert_lm(pre.params, pre.config, kv_lora_rank=L, rope_dim=rope_dim,
                                     q_lora_rank=args.q_lora_rank)
        except (ValueError, NotImplementedError) as e:
            raise UserError(str(e)) from e
        row = {"kv_lora_rank": L, "rope_dim": rope_dim, "q_lora_rank": args.q_lora_rank,
               "kv_bytes_per_token": kv_bytes_per_token(cfg), "convert_s": round(time.time() - t0, 1),
               **eval_perplexity(cfg, params, eval_ids, **score)}
        row["kv_ratio"] = row["kv_bytes_per_token"] / base["kv_bytes_per_token"]
        rows.append(row)
        print(f"L {L} Hr {rope_dim} Lq {args.q_lora_rank} kv_bytes/token {row['kv_bytes_per_token']} "
              f"({row['kv_ratio']:.3f} of original) ppl {row['ppl']:.3f}", flush=True)
        if args.out:
            save_converted(pre, cfg, params, args.out, source=args.model, method="xecomla",
                           settings={k: row[k] for k in ("kv_lora_rank", "rope_dim", "q_lora_rank")})
    write_results(args.results, args.model, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
