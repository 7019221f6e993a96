"""Batched, streaming generation with per-sequence lengths and EOS, plus its command line.

``models.transformer.generate`` runs the whole decode inside one ``lax.scan``: fast, but
it cannot stop early or show tokens as they come. This module drives the same model
(``Transformer`` + ``init_cache``) one jitted step at a time from the host, so that

* prompts of different lengths share one batch: they are **left-padded** to the longest
  (padding has segment id 0, so no real token ever sees it; real tokens count their
  positions from 0), which puts every row's next token in the same cache slot;
* each row stops at its first end-of-sequence id (the EOS is kept in its output, as in
  transformers); the loop ends when every row has stopped;
* ``stream`` yields each step's tokens as soon as they exist (the CLI prints text deltas);
* sampling is greedy (``temperature=0``) or temperature / top-k / top-p with a seed; the
  key of step ``s`` is ``fold_in(key(seed), s)``, so a batch and its rows alone draw alike
  only for greedy decoding (sampled rows share the step key across the batch).

The cache is donated to each step, so decoding updates it in place.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from models.transformer import LMConfig, Transformer
  >>> from models.generate import generate_batch
  >>> cfg = LMConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4, dtype="float32")
  >>> v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  >>> out = generate_batch(cfg, v, [[1, 2, 3], [4]], max_new_tokens=3)
  >>> [len(o) for o in out]
  [3, 3]

Command line (``attnlab generate`` is the same ``main``)::

  python -m models.generate --model smollm2-135m --prompt "The capital of France is" \\
      --max-new-tokens 64 [--chat] [--greedy | --temperature T --top-p P --top-k K] [--seed S] \\
      [--kv-cache dense|paged] [--kv-quant none|int8|int4|fp8] [--page-size 16] \\
      [--kv-policy snapkv --kv-budget 0.25 --kv-policy-arg window=32]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attn.cache import check_overflow, overflow_state
from models.transformer import LMConfig, Transformer, init_cache

Array = Any


# --------------------------------------------------------------------------- sampling
def sample_logits(logits_BV, key, *, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None):
    """Next token ``[B]`` int32 from ``logits_BV [B, V]``.

    ``temperature == 0`` is greedy (argmax). Otherwise, in transformers' order: divide by
    the temperature, keep the ``top_k`` largest, keep the smallest set of most likely
    tokens whose probability reaches ``top_p`` (the most likely token always stays), then
    draw from the softmax of what is left.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> l = jnp.array([[0.0, 3.0, 1.0]])
      >>> sample_logits(l, jax.random.key(0)).tolist()
      [1]
      >>> sample_logits(l, jax.random.key(0), temperature=1.0, top_p=0.5).tolist()
      [1]
    """
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    x = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_B1 = jax.lax.top_k(x, top_k)[0][:, -1:]
        x = jnp.where(x < kth_B1, -jnp.inf, x)
    if top_p is not None and top_p < 1.0:
        sorted_BV = jnp.sort(x, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Mass strictly before each sorted token; a token is kept while that is < top_p.
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        kept_B = jnp.sum(before_BV < top_p, axis=-1)  # >= 1: the first has 0 before it
        cut_B1 = jnp.take_along_axis(sorted_BV, kept_B[:, None] - 1, axis=-1)
        x = jnp.where(x < cut_B1, -jnp.inf, x)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def _check_sampling(config: LMConfig, temperature, top_k, top_p):
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"generate: temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= config.vocab_size):
        raise ValueError(f"generate: top_k must be an int in [1, vocab_size={config.vocab_size}], got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")


# --------------------------------------------------------------------------- jitted steps
@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("max_len", "cache_dtype", "kv_cache", "kv_quant", "page_size",
                                    "kv_policy", "max_keep"))
def _prefill(config, variables, tokens_BP, mask_BP, budget_B=None, *, max_len, cache_dtype,
             kv_cache="dense", kv_quant="none", page_size=16, kv_policy=None, max_keep=None):
    """Left-padded prompt → (last real logits ``[B, V]``, cache, next positions ``[B]``)."""
    from models.serving import make_cache, make_policy_cache

    B, P = tokens_BP.shape
    if kv_policy is None:
        cache = make_cache(config, B, max_len, cache_dtype, kv_cache=kv_cache, kv_quant=kv_quant,
                           page_size=page_size)
    else:
        cache = make_policy_cache(config, kv_policy, budget_B, max_keep=max_keep,
                                  max_new=max_len - P, page_size=page_size)
    seg_BP = mask_BP.astype(jnp.int32)
    pos_BP = jnp.maximum(jnp.cumsum(seg_BP, axis=1) - 1, 0)
    logits, cache = Transformer(config).apply(variables, tokens_BP, positions_BT=pos_BP,
                                              segment_ids_BT=seg_BP, cache=cache)
    return logits[:, -1], cache, pos_BP[:, -1] + 1


@functools.partial(jax.jit, static_argnums=(0,), donate_argnames=("cache",))
def _decode(config, variables, tok_B, pos_B, cache):
    """One token per row → (logits ``[B, V]``, cache)."""
    logits, cache = Transformer(config).apply(
        variables, tok_B[:, None], positions_BT=pos_B[:, None],
        segment_ids_BT=jnp.ones_like(tok_B)[:, None], cache=cache)
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def _sample(logits_BV, key, step, *, temperature, top_k, top_p):
    return sample_logits(logits_BV, jax.random.fold_in(key, step), temperature=temperature,
                         top_k=top_k, top_p=top_p)


def _check_ids(ids, vocab_size: int, what: str) -> None:
    """One-line error for ids outside ``[0, vocab_size)`` (out-of-range embedding gathers
    would silently read NaN rows)."""
    ids = np.asarray(ids)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"{what} token id {int(bad[0])} is outside the model's vocabulary "
                         f"[0, {vocab_size}) ({bad.size} such ids)")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists → ``(tokens [B, P] int32, mask [B, P] bool)``, left-padded to the longest.

    Example:
      >>> t, m = left_pad([[5, 6], [7]])
      >>> t.tolist(), m.tolist()
      ([[5, 6], [0, 7]], [[True, True], [False, True]])
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: prompts must be a non-empty list of non-empty token lists")
    P = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    mask = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = np.asarray(p, np.int32)
        mask[i, P - len(p):] = True
    return tokens, mask


def stream(config: LMConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           eos_ids: Sequence[int] = (), temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, max_len: int | None = None,
           cache_dtype=None, kv_cache: str = "dense", kv_quant: str = "none",
           page_size: int = 16, kv_policy=None,
           kv_budget: float = 1.0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(tokens [B] int32, live [B] bool)`` once per step as the tokens are produced.

    ``live[b]`` is True when ``tokens[b]`` belongs to row ``b``'s output (rows that hit an
    EOS earlier are dead; their token is meaningless). The EOS itself is yielded live.
    Stops after ``max_new_tokens`` steps or when every row has emitted an EOS.

    Args:
      config: the ``LMConfig``. params: ``{"params": ...}`` or the bare params tree.
      prompts: B token lists of any lengths >= 1 (left-padded internally).
      max_new_tokens: at most this many tokens per row.
      eos_ids: ids that end a row.
      temperature, top_k, top_p: see ``sample_logits``; seed: the PRNG seed.
      max_len: cache capacity, default longest prompt + ``max_new_tokens``.
      cache_dtype: default ``config.dtype``.
      kv_cache, kv_quant, page_size: the cache kind (``models.serving.make_cache``):
        ``"dense"`` / ``"paged"`` (pages of ``page_size`` tokens), and ``"none"`` or a
        quantized format (``"int8"``, ``"int4"``, ``"fp8"``; the newest tokens up to a
        page stay exact). Greedy decoding on a paged cache equals the dense one.
      kv_policy, kv_budget: an ``attn.kv.policy.KVPolicy`` (``make_policy(name)``) and the
        fraction of each row's prompt every kv head keeps (``attn.kv.policy.budgets``):
        the prompt is prefilled exactly, then each layer keeps what the policy selects,
        per head and per row (``attn.kv.head_cache.HeadKVCache``), and decoding attends
        over that. ``kv_budget=1`` with any policy equals the full cache.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from models.transformer import LMConfig, Transformer
      >>> cfg = LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, dtype="float32")
      >>> v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
      >>> steps = list(stream(cfg, v, [[1, 2]], max_new_tokens=2, temperature=0.8, seed=3))
      >>> len(steps), steps[0][0].shape
      (2, (1,))
    """
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    _check_sampling(config, temperature, top_k, top_p)
    tokens_BP, mask_BP = left_pad(prompts)
    _check_ids(tokens_BP, config.vocab_size, "generate: prompt")
    B, P = tokens_BP.shape
    max_len = P + max_new_tokens if max_len is None else max_len
    if max_len < P + max_new_tokens - 1:
        raise ValueError(f"generate: max_len={max_len} < longest prompt {P} + max_new_tokens "
                         f"{max_new_tokens} - 1; the KV cache would overflow")
    from models.serving import check_cache_args

    check_cache_args(kv_cache, kv_quant, page_size)  # one-line errors before anything compiles
    variables = params if "params" in params else {"params": params}
    sample = functools.partial(_sample, key=jax.random.key(seed), temperature=float(temperature),
                               top_k=top_k, top_p=None if top_p is None else float(top_p))
    policy_args = {}
    if kv_policy is not None:
        from attn.errors import UserError
        from attn.kv.policy import budgets

        if kv_cache != "dense" or kv_quant != "none":
            raise UserError(f"a KV policy builds its own per-head paged cache; it does not combine "
                            f"with kv_cache={kv_cache!r} / kv_quant={kv_quant!r}")

        budget_B = budgets(mask_BP.sum(axis=1), kv_budget)
        policy_args = dict(budget_B=jnp.asarray(budget_B), kv_policy=kv_policy,
                           max_keep=int(kv_policy.max_keep(P, int(budget_B.max()))))
    logits_BV, cache, pos_B = _prefill(
        config, variables, jnp.asarray(tokens_BP), jnp.asarray(mask_BP), max_len=max_len,
        cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype), kv_cache=kv_cache,
        kv_quant=kv_quant, page_size=page_size, **policy_args)
    eos = np.asarray(list(eos_ids), np.int32)
    live = np.ones((B,), bool)
    for step in range(max_new_tokens):
        tok_B = sample(logits_BV, step=step)
        tok = np.asarray(tok_B)
        yield tok, live.copy()
        live &= ~np.isin(tok, eos)
        if not live.any() or step == max_new_tokens - 1:
            break
        logits_BV, cache = _decode(config, variables, tok_B, pos_B, cache)
        pos_B = pos_B + 1
    check_overflow(overflow_state(cache), where="generate")


def generate_batch(config: LMConfig, params, prompts: Sequence[Sequence[int]], *,
                   max_new_tokens: int, on_token: Callable[[int, int], None] | None = None,
                   **kwargs) -> list[list[int]]:
    """Generate for B prompts at once; each row's tokens, cut after its first EOS.

    ``on_token(row, token)`` is called for every token as it is produced (streaming).
    Other keyword arguments are those of ``stream``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from models.transformer import LMConfig, Transformer
      >>> cfg = LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, dtype="float32")
      >>> v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
      >>> first = generate_batch(cfg, v, [[3, 4]], max_new_tokens=4)[0]
      >>> generate_batch(cfg, v, [[3, 4]], max_new_tokens=4, eos_ids=[first[0]]) == [first[:1]]
      True
    """
    out = [[] for _ in prompts]
    for tok, live in stream(config, params, prompts, max_new_tokens=max_new_tokens, **kwargs):
        for b in np.flatnonzero(live):
            out[b].append(int(tok[b]))
            if on_token is not None:
                on_token(int(b), int(tok[b]))
    return out


# --------------------------------------------------------------------------- text
class TextStream:
    """Incremental detokenizer: ``push(id)`` returns the new text since the last call.

    Decodes the whole generated sequence each time and returns the new suffix; a trailing
    U+FFFD (a UTF-8 character split over tokens) is held back until it completes.

    Example:
      >>> class T:  # any object with decode(ids, skip_special_tokens=...)
      ...     def decode(self, ids, skip_special_tokens=True): return "".join("ab"[i] for i in ids)
      >>> s = TextStream(T()); s.push(0) + s.push(1)
      'ab'
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer, self.skip, self.ids, self.emitted = tokenizer, skip_special_tokens, [], 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[self.emitted:], len(text)
        return delta


def add_cache_flags(p: argparse.ArgumentParser, *, kv_cache_default="dense") -> None:
    """``--kv-cache`` / ``--kv-quant`` / ``--page-size`` (shared with ``models.perplexity``).

    Free strings, checked by ``models.serving.check_cache_args`` (one-line ``UserError``
    naming the known values), so a new cache kind needs no parser change.
    """
    p.add_argument("--kv-cache", default=kv_cache_default,
                   help="KV cache layout: dense or paged (default %(default)s)")
    p.add_argument("--kv-quant", default="none",
                   help="KV cache quantization: none, int8, int4 or fp8 (default none)")
    p.add_argument("--page-size", type=int, default=16,
                   help="tokens per page (paged cache) / full-precision recent tail (quantized)")


def build_parser(prog="python -m models.generate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Stream a continuation from a pretrained model.")
    p.add_argument("--model", default="smollm2-135m",
                   help="short name (smollm2-135m), a .gguf file or a Hugging Face directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default without --temperature)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_cache_flags(p)
    p.add_argument("--kv-policy", default=None,
                   help="KV-cache policy after prefill (attn.kv: streaming, snapkv, ...); "
                        "default: keep the full cache")
    p.add_argument("--kv-budget", type=float, default=0.25,
                   help="with --kv-policy: fraction of the prompt each kv head keeps (default %(default)s)")
    p.add_argument("--kv-policy-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="a knob of the policy (repeatable), e.g. window=32")
    p.add_argument("--stats", action="store_true", help="print tokens/s to stderr at the end")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of user errors")
    return p


def main(argv=None, prog: str = "python -m models.generate") -> int:
    """Entry point of ``python -m models.generate`` / ``attnlab generate``.

    A user error (a bad flag value, a missing or unreadable model file) prints one line
    and returns 2; ``--verbose`` adds its traceback. Anything else is a bug and raises.
    """
    from train.cli import guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded(prog, lambda: _main(argv, prog), verbose="--verbose" in argv)


def _flag_error(flag: str, e: ValueError):
    """A library argument check's ValueError, reported as the command-line flag."""
    from attn.errors import UserError

    return UserError(f"{flag}: {' '.join(str(e).split())}")


def _main(argv: list[str], prog: str) -> int:
    from attn.errors import UserError

    args = build_parser(prog).parse_args(argv)
    if args.greedy and args.temperature not in (None, 0.0):
        raise UserError(f"--greedy conflicts with --temperature {args.temperature}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens}: must be >= 1")
    temperature = 0.0 if args.greedy or args.temperature is None else args.temperature
    from models.serving import check_cache_args

    check_cache_args(args.kv_cache, args.kv_quant, args.page_size, flags=True)
    policy = None
    if args.kv_policy is not None:
        from attn.kv.policy import budgets, make_policy, parse_knobs

        policy = make_policy(args.kv_policy, **parse_knobs(args.kv_policy_arg))  # UserError
        budgets([1], args.kv_budget)  # the fraction, checked before the model loads
    elif args.kv_policy_arg:
        raise UserError("--kv-policy-arg needs --kv-policy")
    from models import pretrained  # the importer (gguf / safetensors / tokenizers)

    pre = pretrained.load(args.model, dtype=jnp.dtype(args.dtype))  # PretrainedError: a UserError
    try:  # the sampling flags against the model's vocabulary, before anything compiles
        _check_sampling(pre.config, temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise _flag_error("--temperature / --top-k / --top-p", e) from e
    tok = pre.tokenizer
    text = args.prompt
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        text = tok.apply_chat_template(msgs + [{"role": "user", "content": args.prompt}],
                                       add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise UserError(f"--prompt {args.prompt!r} encodes to no tokens")
    out = TextStream(tok)
    t0, n = time.perf_counter(), 0
    for t, live in stream(pre.config, pre.params, [ids], max_new_tokens=args.max_new_tokens,
                          eos_ids=tuple(tok.eos_ids), temperature=temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          kv_cache=args.kv_cache, kv_quant=args.kv_quant,
                          page_size=args.page_size, kv_policy=policy,
                          kv_budget=args.kv_budget):
        n += 1
        sys.stdout.write(out.push(int(t[0])))
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        dt = time.perf_counter() - t0
        print(f"[{len(ids)} prompt tokens, {n} new tokens, {dt:.2f} s incl. compile]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
