"""Perplexity of a pretrained model on the embedded English text (Python's pydoc topics).

The text is ``train.data.pydoc_corpus_bytes()`` (the corpus the ``text`` config trains
on, shipped with CPython), decoded as UTF-8 and tokenized with the model's tokenizer
(no BOS). It is cut into **non-overlapping windows** of ``--window`` tokens; every
window is scored from a fresh context, so token ``i`` of a window is predicted from the
``i`` tokens before it in that window and the first token of each window is context
only. A run over ``N`` tokens thus scores ``N - ceil(N / window)`` predictions. (Sliding
windows would give each prediction more context and a lower perplexity for the same
model; non-overlapping ones cost one forward pass per token.)

With ``--kv-cache`` / ``--kv-quant`` each window is instead fed through the model in
chunks of ``--chunk`` tokens (default 64) into a KV cache of that kind
(``models.serving.make_cache``), so every token attends to the cached (paged, or
quantized: int8 / int4 / fp8 with the newest ``--page-size`` tokens exact) keys and
values of the tokens before it — the accuracy a decoding model would get from that
cache. A dense or paged cache gives the one-pass result up to float rounding.

``--split eval`` scores only the held-out tail (the last 5% of the tokens) that
``configs/finetune.py`` never trains on, so models tuned or healed on the text compare
fairly with the original.

The last line printed is ``tokens <n> mean_nll <nats> perplexity <exp(mean_nll)>``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from models.transformer import LMConfig, Transformer
  >>> from models.perplexity import score_windows
  >>> cfg = LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, dtype="float32")
  >>> v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  >>> n, nll = score_windows(cfg, v, list(range(10)), window=4)
  >>> n
  7

Command line (``attnlab perplexity`` is the same ``main``)::

  python -m models.perplexity --model smollm2-135m [--split all|eval] [--max-tokens N] [--window 512] [--batch 4] \\
      [--kv-cache dense|paged] [--kv-quant none|int8|int4|fp8] [--page-size 16] [--chunk 64]
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.transformer import LMConfig, Transformer


@functools.partial(jax.jit, static_argnums=(0,))
def _window_nll(config, variables, tokens_BT, mask_BT):
    """Summed next-token NLL (float32) and count over the real (mask) positions."""
    logits, _ = Transformer(config).apply(variables, tokens_BT, segment_ids_BT=mask_BT.astype(jnp.int32))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    valid = mask_BT[:, 1:] & mask_BT[:, :-1]
    return jnp.sum(jnp.where(valid, nll_BT, 0.0)), jnp.sum(valid)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnames=("cache",))
def _chunk_nll(config, variables, tokens_BT, pos_BT, seg_BT, target_BT, valid_BT, cache):
    """One chunk through the cache: (summed NLL of its valid targets, count, cache, overflow)."""
    from attn.cache import overflow_state

    logits, cache = Transformer(config).apply(variables, tokens_BT, positions_BT=pos_BT,
                                              segment_ids_BT=seg_BT, cache=cache)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp, target_BT[..., None], axis=-1)[..., 0]
    return (jnp.sum(jnp.where(valid_BT, nll_BT, 0.0)), jnp.sum(valid_BT), cache,
            overflow_state(cache))


@functools.cache
def _jit_make_cache(make_cache):
    return jax.jit(make_cache, static_argnums=(0, 1, 2),
                   static_argnames=("kv_cache", "kv_quant", "page_size"))


def _cached_window_nll(config, variables, toks, mask, *, chunk, kv_cache, kv_quant, page_size):
    """``_window_nll`` through a KV cache, ``chunk`` tokens per call (see the module doc)."""
    from attn.cache import check_overflow
    from models.serving import make_cache

    B, W = toks.shape
    Wp = -(-W // chunk) * chunk  # one compiled chunk shape: pad the window to whole chunks
    t = np.zeros((B, Wp + 1), np.int32)
    m = np.zeros((B, Wp + 1), bool)
    t[:, :W], m[:, :W] = toks, mask
    target, valid = t[:, 1:], m[:, 1:] & m[:, :-1]
    t, m = t[:, :Wp], m[:, :Wp]
    # Built under jit: fresh output buffers (an eager build may share one zeros buffer
    # between leaves, which the donated step then refuses).
    cache = _jit_make_cache(make_cache)(config, B, Wp, kv_cache=kv_cache, kv_quant=kv_quant,
                                        page_size=page_size)
    total = count = 0
    pos = np.broadcast_to(np.arange(Wp, dtype=np.int32), (B, Wp))
    for a in range(0, Wp, chunk):
        sl = slice(a, a + chunk)
        if not m[:, sl].any():
            break
        s, n, cache, state = _chunk_nll(config, variables, jnp.asarray(t[:, sl]), jnp.asarray(pos[:, sl]),
                                        jnp.asarray(m[:, sl].astype(np.int32)),
                                        jnp.asarray(target[:, sl]), jnp.asarray(valid[:, sl]),
                                        cache=cache)
        check_overflow(state, where="perplexity")
        total, count = total + s, count + n
    return total, count


def score_windows(config: LMConfig, params, ids: Sequence[int], *, window: int = 512, batch: int = 4,
                  progress: bool = False, kv_cache: str | None = None, kv_quant: str = "none",
                  page_size: int = 16, chunk: int = 64) -> tuple[int, float]:
    """``(predictions scored, summed NLL in nats)`` over non-overlapping windows of ``ids``.

    Windows are right-padded (segment 0) to ``window`` so one compiled shape serves all.
    ``kv_cache=None`` with ``kv_quant="none"`` scores each window in one forward pass;
    otherwise through a cache of that kind, ``chunk`` tokens at a time (module docstring;
    ``kv_cache=None`` then means dense).
    """
    if not (isinstance(window, int) and window >= 2):
        raise ValueError(f"perplexity: window must be an int >= 2, got {window!r}")
    cached = kv_cache is not None or kv_quant != "none"
    if cached:
        from models.serving import check_cache_args

        kv_cache = "dense" if kv_cache is None else kv_cache
        check_cache_args(kv_cache, kv_quant, page_size)
        if not (isinstance(chunk, int) and chunk >= 1):
            raise ValueError(f"perplexity: chunk must be a positive int, got {chunk!r}")
    if len(ids) < 2:
        raise ValueError(f"perplexity: need at least 2 tokens, got {len(ids)}")
    from models.generate import _check_ids

    _check_ids(ids, config.vocab_size, "perplexity:")
    variables = params if "params" in params else {"params": params}
    chunks = [ids[i:i + window] for i in range(0, len(ids), window)]
    chunks = [c for c in chunks if len(c) >= 2]
    total, count = 0.0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(c) for c in chunks), unit="tok", file=sys.stderr, desc="scoring")
    for i in range(0, len(chunks), batch):
        group = chunks[i:i + batch]
        toks = np.zeros((batch, window), np.int32)
        mask = np.zeros((batch, window), bool)
        for b, c in enumerate(group):
            toks[b, :len(c)], mask[b, :len(c)] = c, True
        if cached:
            s, n = _cached_window_nll(config, variables, toks, mask, chunk=chunk,
                                      kv_cache=kv_cache, kv_quant=kv_quant, page_size=page_size)
        else:
            s, n = _window_nll(config, variables, jnp.asarray(toks), jnp.asarray(mask))
        total, count = total + float(s), count + int(n)
        if bar is not None:
            bar.update(sum(len(c) for c in group))
    if bar is not None:
        bar.close()
    return count, total


def corpus_text() -> str:
    """The pydoc corpus as text (the bytes ``train.data`` trains on)."""
    from train.data import pydoc_corpus_bytes

    return pydoc_corpus_bytes().tobytes().decode("utf-8", errors="replace")


def main(argv=None, prog: str = "python -m models.perplexity") -> int:
    """Entry point of ``python -m models.perplexity`` / ``attnlab perplexity``.

    A user error (a bad flag value, a missing or unreadable model file) prints one line
    and returns 2; ``--verbose`` adds its traceback. Anything else is a bug and raises.
    """
    from train.cli import guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded(prog, lambda: _main(argv, prog), verbose="--verbose" in argv)


def build_parser(prog: str = "python -m models.perplexity") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Perplexity on the embedded pydoc English text.")
    p.add_argument("--model", default="smollm2-135m",
                   help="short name (smollm2-135m), a .gguf file or a Hugging Face directory")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--split", default="all", choices=["all", "eval"],
                   help="all of the text, or only the held-out last 5%% that configs/finetune.py "
                        "never trains on (models.conversion.common.split_tokens)")
    p.add_argument("--window", type=int, default=512, help="non-overlapping window length")
    p.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    from models.generate import add_cache_flags

    add_cache_flags(p, kv_cache_default=None)
    p.add_argument("--chunk", type=int, default=64,
                   help="tokens per forward pass with --kv-cache / --kv-quant (default 64)")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of user errors")
    return p


def _main(argv: list[str], prog: str) -> int:
    from attn.errors import UserError

    args = build_parser(prog).parse_args(argv)
    for flag, value, low in (("--max-tokens", args.max_tokens, 2), ("--window", args.window, 2),
                             ("--batch", args.batch, 1), ("--chunk", args.chunk, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag}={value}: must be >= {low}")
    from models.serving import check_cache_args

    check_cache_args(args.kv_cache or "dense", args.kv_quant, args.page_size, flags=True)
    from models import pretrained

    pre = pretrained.load(args.model, dtype=jnp.dtype(args.dtype))  # PretrainedError: a UserError
    if args.split == "eval":
        from models.conversion.common import split_tokens

        ids = split_tokens(args.model)[1].tolist()
    else:
        ids = pre.tokenizer.encode(corpus_text(), add_special_tokens=False)
    ids = ids[:args.max_tokens] if args.max_tokens else ids
    n, total = score_windows(pre.config, pre.params, ids, window=args.window, batch=args.batch,
                             progress=True, kv_cache=args.kv_cache, kv_quant=args.kv_quant,
                             page_size=args.page_size, chunk=args.chunk)
    nll = total / n
    how = ("" if args.kv_cache is None and args.kv_quant == "none" else
           f", {args.kv_cache or 'dense'} cache, kv-quant {args.kv_quant}, page {args.page_size},"
           f" chunks of {args.chunk}")
    what = "pydoc text" if args.split == "all" else "held-out pydoc text (eval split)"
    print(f"model {args.model}, {len(ids)} tokens of {what}, windows of {args.window}{how}")
    print(f"tokens {n} mean_nll {nll:.4f} perplexity {math.exp(nll):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
