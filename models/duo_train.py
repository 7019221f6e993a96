"""DuoAttention gate training (Xiao et al., 2024): learn which kv heads need the full cache.

Every (layer, kv head) gets a gate α ∈ [0, 1] (initialised to 1). The model is frozen;
each layer's attention output becomes ``α · full + (1 − α) · streaming`` (sinks + a recent
window; ``attn.kv.duo.DuoMixRouter``, at the op contract, on an unscanned copy of the
model: layer = call order). The loss, as in the paper's code, is the mean squared
distance of the final hidden states (``final_norm``'s output) to the full model's at the
positions that predict the answer of a synthetic passkey-retrieval sample, plus
``λ · mean |α|``; Adam on α, clipped to [0, 1] after each step. The samples are built
from the embedded pydoc text (``models.perplexity.corpus_text``): a haystack with a
passkey sentence at a random depth, then the question and the answer.

The gates JSON (``{"gates": [[α]] [L][K], ...}``) is what ``make_policy("duo", gates=PATH)``
reads.

Command line (CPU-feasible: short samples, few steps)::

  python -m models.duo_train --model smollm2-135m --steps 20 --seq-len 512 --out gates.json

Example:
  >>> import jax, jax.numpy as jnp
  >>> from models.transformer import LMConfig, Transformer
  >>> cfg = LMConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, attn="gqa",
  ...                attn_overrides={"gqa": {"num_kv_heads": 2}}, dtype="float32")
  >>> v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  >>> enc = lambda s: [b for b in s.encode()]
  >>> text = "lorem ipsum dolor sit amet " * 40
  >>> gates, losses = train_gates(cfg, v, enc, text, steps=2, seq_len=160, sinks=2, recent=8,
  ...                             progress=False)
  >>> gates.shape, len(losses)
  ((2, 2), 2)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attn.errors import UserError
from models.transformer import LMConfig, Transformer


# --------------------------------------------------------------------------- data
def passkey_sample(encode: Callable[[str], list], text: str, *, seq_len: int,
                   rng: np.random.Generator):
    """One sample: ``(tokens [seq_len] int32, loss_mask [seq_len] bool)``.

    A slice of ``text`` as the haystack, ``" The pass key is KEY. Remember it. KEY is the
    pass key."`` at a random depth, then ``" What is the pass key? The pass key is"`` and
    the answer ``" KEY"``; ``loss_mask`` marks the positions whose outputs predict the
    answer tokens.
    """
    key = str(rng.integers(10000, 100000))
    needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
    question = encode(" What is the pass key? The pass key is")
    answer = encode(f" {key}")
    room = seq_len - len(needle) - len(question) - len(answer)
    if room < 8:
        raise UserError(f"--seq-len {seq_len} is too short for a passkey sample (needs > "
                        f"{seq_len - room + 8} tokens)")
    chars = min(len(text) - 1, room * 8)
    start = int(rng.integers(0, max(1, len(text) - chars)))
    hay = encode(text[start:start + chars])[:room]
    if len(hay) < room:
        hay = (hay * (room // max(len(hay), 1) + 1))[:room]
    depth = int(rng.integers(0, room + 1))
    toks = hay[:depth] + needle + hay[depth:] + question + answer
    mask = np.zeros(seq_len, bool)
    a0 = seq_len - len(answer)
    mask[a0 - 1:seq_len - 1] = True
    return np.asarray(toks, np.int32), mask


def passkey_batch(encode, text, *, batch: int, seq_len: int, rng):
    """``(tokens [B, T], loss_mask [B, T])`` of ``passkey_sample``s."""
    pairs = [passkey_sample(encode, text, seq_len=seq_len, rng=rng) for _ in range(batch)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# --------------------------------------------------------------------------- model
def _final_hidden(cfg, params, tokens_BT, router=None):
    from attn.core import route_attention

    with route_attention(router):
        _, state = Transformer(cfg).apply(
            {"params": params}, tokens_BT, mutable=["intermediates"],
            capture_intermediates=lambda mdl, name: mdl.name == "final_norm")
    return state["intermediates"]["final_norm"]["__call__"][0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0,))
def full_hidden(cfg, params, tokens_BT):
    """Final hidden states ``[B, T, D]`` of the unchanged model."""
    return _final_hidden(cfg, params, tokens_BT)


def duo_loss(gates_LK, cfg, params, tokens_BT, mask_BT, ref_BTD, *, sinks, recent, lam):
    """``(loss, distill)``: masked mean over positions of the mean squared hidden-state
    difference, plus ``lam · mean |α|``."""
    from attn.kv.duo import DuoMixRouter

    router = DuoMixRouter(gates_LK, sinks=sinks, recent=recent)
    h = _final_hidden(cfg, params, tokens_BT, router)
    if router.calls != cfg.num_layers:
        raise UserError(f"duo training: saw {router.calls} attention calls for {cfg.num_layers} layers")
    w = mask_BT.astype(jnp.float32)
    distill = jnp.sum(jnp.mean((h - ref_BTD) ** 2, axis=-1) * w) / jnp.maximum(jnp.sum(w), 1.0)
    return distill + lam * jnp.mean(jnp.abs(gates_LK)), distill


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("sinks", "recent", "lam"))
def _step(cfg, opt, gates, opt_state, params, tokens, mask, ref, *, sinks, recent, lam):
    import optax

    (loss, distill), g = jax.value_and_grad(duo_loss, has_aux=True)(
        gates, cfg, params, tokens, mask, ref, sinks=sinks, recent=recent, lam=lam)
    upd, opt_state = opt.update(g, opt_state, gates)
    gates = jnp.clip(optax.apply_updates(gates, upd), 0.0, 1.0)
    return gates, opt_state, loss, distill


def kv_heads(cfg: LMConfig) -> int:
    """Kv heads per layer of a full-attention model (``init_cache``'s KVCache shape)."""
    from models.transformer import init_cache

    leaves = [l for l in jax.tree_util.tree_leaves(init_cache(cfg, batch=1, max_len=1))
              if getattr(l, "ndim", 0) >= 3]
    return int(leaves[0].shape[-2])


def train_gates(config: LMConfig, variables, encode, text: str, *, steps: int, seq_len: int = 512,
                batch: int = 1, sinks: int = 16, recent: int = 64, lam: float = 0.05,
                lr: float = 0.02, seed: int = 0, init: float = 1.0, progress: bool = True,
                batches=None):
    """Train the gates; returns ``(gates [L, K] numpy, losses [steps])``.

    ``encode`` maps text to token ids; ``init`` is every gate's start value (the paper's
    1.0: the full model, zero distillation loss, so the L1 term alone moves the gates
    until the distillation term pushes back); ``batches`` (optional) is a list of fixed
    ``(tokens, mask)`` batches cycled through instead of fresh samples.
    """
    import optax
    from tqdm import tqdm

    from models.analysis.capture import unscan

    cfg, params = unscan(config, variables)
    K = kv_heads(cfg)
    gates = jnp.full((cfg.num_layers, K), float(init), jnp.float32)
    opt = optax.adam(lr)
    opt_state = opt.init(gates)
    rng = np.random.default_rng(seed)
    losses = []
    bar = tqdm(range(steps), disable=not progress, desc="duo gates")
    for i in bar:
        if batches is not None:
            tok, mask = batches[i % len(batches)]
        else:
            tok, mask = passkey_batch(encode, text, batch=batch, seq_len=seq_len, rng=rng)
        tok, mask = jnp.asarray(tok), jnp.asarray(mask)
        ref = full_hidden(cfg, params, tok)
        gates, opt_state, loss, distill = _step(cfg, opt, gates, opt_state, params, tok, mask, ref,
                                                sinks=sinks, recent=recent, lam=float(lam))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{float(loss):.4f}", distill=f"{float(distill):.4f}",
                        mean_gate=f"{float(jnp.mean(gates)):.3f}")
    return np.asarray(gates), losses


# --------------------------------------------------------------------------- CLI
def build_parser(prog="python -m models.duo_train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train DuoAttention gates on passkey samples.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", required=True, help="gates JSON (make_policy('duo', gates=PATH))")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sinks", type=int, default=16)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--lam", type=float, default=0.05, help="L1 weight on the gates")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    return p


def _main(argv, prog) -> int:
    import time

    from models import pretrained
    from models.perplexity import corpus_text

    a = build_parser(prog).parse_args(argv)
    if a.steps < 1:
        raise UserError(f"--steps {a.steps}: must be >= 1")
    pre = pretrained.load(a.model)
    if pre.tokenizer is None:
        raise UserError(f"{a.model}: has no tokenizer")
    t0 = time.time()
    gates, losses = train_gates(pre.config, pre.params, pre.tokenizer.encode, corpus_text(),
                                steps=a.steps, seq_len=a.seq_len, batch=a.batch, sinks=a.sinks,
                                recent=a.recent, lam=a.lam, lr=a.lr, seed=a.seed)
    out = {"gates": gates.round(6).tolist(), "model": a.model, "steps": a.steps,
           "seq_len": a.seq_len, "batch": a.batch, "sinks": a.sinks, "recent": a.recent,
           "lam": a.lam, "lr": a.lr, "seed": a.seed, "losses": [round(l, 6) for l in losses],
           "seconds": round(time.time() - t0, 1)}
    with open(a.out, "w") as f:
        json.dump(out, f)
    print(f"wrote {a.out}: {gates.shape[0]}×{gates.shape[1]} gates, loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f}, mean gate {gates.mean():.3f}")
    return 0


def main(argv=None, prog: str = "python -m models.duo_train") -> int:
    from train.cli import guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded(prog, lambda: _main(argv, prog), verbose="--verbose" in argv)


if __name__ == "__main__":
    sys.exit(main())
