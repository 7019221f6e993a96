"""Continuous batching over a paged KV cache: requests join and leave a running batch.

``Engine`` holds ``max_batch`` slots and one ``attn.paged_cache.PagedKVCache`` per layer
(pool sized with ``pages_for``, so the pool itself cannot overflow). Each step:

1. **admit** waiting requests into free slots (a request whose prompt + budget exceeds
   ``max_len``, or with token ids outside the vocab, is refused with a clear error event
   and nothing else in the batch is touched);
2. build one ``[B, T]`` token block: a prefilling slot contributes the next chunk of its
   prompt (``prefill_chunk`` tokens at most: **chunked prefill**), a decoding slot its
   last token, an idle slot padding (segment id 0, which the paged cache does not store);
   T is ``prefill_chunk`` while anyone prefills, else 1 (two compiled shapes);
3. run the model once (jitted, cache donated), take each row's logits at its last real
   token, sample (greedy or temperature / top-k / top-p per request), **stream** the
   token as an event, and **release** the pages of finished requests (EOS or budget);
4. check the caches' overflow counters on the host (``attn.cache.check_overflow``).

Rows never wait for each other: a new request prefills while the others decode, and a
finished row's slot and pages go to the next request at once. Every row's tokens have
their own positions (from 0), so a request decodes exactly as it would alone (greedy:
tested against ``models.generate.generate_batch``).

Supported mechanisms: the MHA family (mha / gqa / mqa) without a sliding window (their
cache is the full ``KVCache``, which the paged cache replaces). Others are refused by name.

With a KV-cache policy (``Engine(..., kv_policy=make_policy("snapkv"), kv_budget=0.25)``,
``attn.kv``), each admitted request is prefilled alone in one call (the policy needs the
whole prompt), its kept tokens are copied into a shared per-(row, kv head) pool, and it
decodes in the running batch like any other row.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from models.transformer import LMConfig, Transformer
  >>> cfg = LMConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4, dtype="float32")
  >>> v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  >>> eng = Engine(cfg, v, max_batch=2, max_len=16, page_size=4, prefill_chunk=4)
  >>> out = eng.run([Request([1, 2, 3], 3), Request([4], 2), Request([5, 6], 2)])
  >>> [len(out[i]) for i in range(3)]
  [3, 2, 2]
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attn.cache import KVCache, check_overflow, overflow_state
from attn.errors import UserError
from attn.paged_cache import PagedKVCache, pages_for
from models.generate import sample_logits
from models.transformer import LMConfig, Transformer, init_cache

Array = Any


@dataclasses.dataclass
class Request:
    """One generation request: prompt ids, a token budget, sampling settings."""

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Event:
    """A streamed result: ``token`` for request ``rid``; ``done`` on its last token;
    ``error`` (and no token) when the request was refused."""

    rid: int
    token: int | None = None
    done: bool = False
    error: str | None = None


@dataclasses.dataclass
class _Slot:
    rid: int
    req: Request
    fed: int = 0  # prompt tokens fed so far
    out: list = dataclasses.field(default_factory=list)
    last: int | None = None  # token to feed next in decode
    finished: bool = False

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.req.prompt)


def init_paged_cache(config: LMConfig, batch: int, max_len: int, page_size: int, dtype=None):
    """Paged caches in the layout ``Transformer`` expects (``init_cache``'s structure).

    Example:
      >>> cfg = LMConfig(vocab_size=8, d_model=16, num_layers=2, num_heads=2)
      >>> type(init_paged_cache(cfg, 2, 8, 4)[0][0]).__name__
      'PagedKVCache'
    """
    template = init_cache(config, batch=1, max_len=1, dtype=dtype)
    is_cache = lambda x: hasattr(x, "length") and not hasattr(x, "shape")

    def paged(c):
        if type(c) is not KVCache:  # subclasses (MLA's LatentCache) read their cache differently
            raise UserError(f"serving: the paged cache replaces the full KVCache; this model has "
                            f"a {type(c).__name__} layer (windowed, latent or recurrent caches "
                            "are not served yet)")
        k, v = c.k, c.v
        K, H, E = k.shape[-2], k.shape[-1], v.shape[-1]
        one = PagedKVCache.for_max_len(batch=batch, max_len=max_len, page_size=page_size,
                                       num_kv_heads=K, head_dim=H, value_dim=E, dtype=k.dtype)
        if config.scan_layers:  # stacked along a leading layer axis, like init_cache
            return jax.tree_util.tree_map(lambda a: jnp.repeat(a[None], k.shape[0], 0), one)
        return one

    return jax.tree_util.tree_map(paged, template, is_leaf=is_cache)


def _quant_cache(fmt: str):
    def build(config: LMConfig, batch: int, max_len: int, page_size: int, dtype=None):
        from attn.quant_cache import QuantKVCache
        template = init_cache(config, batch=1, max_len=1, dtype=dtype)

        def one(c):
            if type(c) is not KVCache:
                raise UserError("--kv-quant serves MHA-family layers with full caches; got "
                                f"{type(c).__name__}")
            q = QuantKVCache.create(fmt, batch=batch, max_pages=-(-max_len // page_size),
                                    page_size=page_size, num_kv_heads=c.k.shape[-2],
                                    head_dim=c.k.shape[-1], value_dim=c.v.shape[-1],
                                    dtype=c.k.dtype)
            if config.scan_layers:  # stacked along a leading layer axis, like init_cache
                return jax.tree_util.tree_map(lambda a: jnp.repeat(a[None], c.k.shape[0], 0), q)
            return q
        return jax.tree_util.tree_map(one, template, is_leaf=lambda x: isinstance(x, KVCache))
    return build


def _dense_cache(config, batch, max_len, page_size, dtype=None):
    return init_cache(config, batch, max_len, dtype)


def _paged_cache(config, batch, max_len, page_size, dtype=None):
    return init_paged_cache(config, batch, -(-max_len // page_size) * page_size, page_size, dtype)


# --kv-cache / --kv-quant of the command lines: name -> builder (no dispatch chain).
KV_CACHES = {"dense": _dense_cache, "paged": _paged_cache}
KV_QUANTS = {"none": None, "int8": _quant_cache("int8"), "int4": _quant_cache("int4"),
             "fp8": _quant_cache("fp8")}


def check_cache_args(kv_cache: str, kv_quant: str, page_size: int, *, flags: bool = False) -> None:
    """One-line ``UserError`` for an unknown cache kind / quantization or a bad page size.

    ``flags=True`` names the command-line flags (``--kv-cache`` ...) instead.

    Example:
      >>> check_cache_args("paged", "int8", 16)
      >>> check_cache_args("dense", "int2", 16, flags=True)
      Traceback (most recent call last):
      ...
      attn.errors.UserError: --kv-quant int2: unknown KV quantization; known: fp8, int4, int8, none
    """
    known = lambda table: ", ".join(sorted(table))
    if kv_cache not in KV_CACHES:
        raise UserError(f"--kv-cache {kv_cache}: unknown kv cache; known: {known(KV_CACHES)}"
                        if flags else f"unknown kv cache {kv_cache!r}; known: {known(KV_CACHES)}")
    if kv_quant not in KV_QUANTS:
        raise UserError(f"--kv-quant {kv_quant}: unknown KV quantization; known: "
                        f"{known(KV_QUANTS)}" if flags else
                        f"unknown KV quantization {kv_quant!r}; known: {known(KV_QUANTS)}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
        raise UserError(f"--page-size {page_size}: must be a positive int" if flags else
                        f"page_size must be a positive int, got {page_size!r}")


def make_cache(config: LMConfig, batch: int, max_len: int, dtype=None, *, kv_cache: str = "dense",
               kv_quant: str = "none", page_size: int = 16):
    """The per-layer caches for ``Transformer``: dense, paged, or quantized (KIVI window).

    ``max_len`` is rounded up to a whole number of pages for the paged / quantized kinds.
    A quantized cache keeps each row's newest tokens (up to ``page_size``) in full
    precision and the rest quantized (``attn.quant_cache``); it is used through the
    layers' dense cache protocol (a dequantized copy per step), so it measures accuracy
    (perplexity), not memory.

    Example:
      >>> cfg = LMConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2)
      >>> type(make_cache(cfg, 1, 10, kv_quant="int8", page_size=4)[0][0]).__name__
      'QuantKVCache'
    """
    check_cache_args(kv_cache, kv_quant, page_size)
    build = KV_QUANTS[kv_quant] or KV_CACHES[kv_cache]
    return build(config, batch, max_len, page_size, dtype)


def make_policy_cache(config: LMConfig, policy, budget_B, *, max_keep: int, max_new: int,
                      page_size: int = 16):
    """Per-layer ``attn.kv.head_cache.PolicyPrefillCache`` for ``Transformer``.

    The prefill call then runs exact attention over the prompt and each layer keeps what
    ``policy`` selects, per kv head and row (``budget_B [B]`` tokens), in a
    ``HeadKVCache``; decoding continues on it. ``policy.layer_state`` (per-layer arrays,
    e.g. retrieval-head scores) is split by layer in ``init_cache``'s layout.

    Example:
      >>> import jax.numpy as jnp
      >>> from attn.kv.policy import make_policy
      >>> cfg = LMConfig(vocab_size=8, d_model=16, num_layers=2, num_heads=2)
      >>> c = make_policy_cache(cfg, make_policy("streaming"), jnp.array([4]), max_keep=4, max_new=2)
      >>> type(c[0][0]).__name__
      'PolicyPrefillCache'
    """
    from attn.kv.head_cache import PolicyPrefillCache

    template = init_cache(config, batch=1, max_len=1)
    P, R = len(config.pattern), config.num_repeats
    for c in jax.tree_util.tree_leaves(template, is_leaf=lambda x: isinstance(x, KVCache)):
        if type(c) is not KVCache:
            raise UserError(f"KV policies replace the full KVCache; this model has a "
                            f"{type(c).__name__} layer (windowed, latent or recurrent caches "
                            "have no per-head policy yet)")
    first = jax.tree_util.tree_leaves(template, is_leaf=lambda x: isinstance(x, KVCache))[0]
    state = policy.layer_state(config.num_layers, first.k.shape[-2])
    budget_B = jnp.asarray(budget_B, jnp.int32)

    def one(layers):  # layer indices -> a cache (stacked along the layer axis when scanning)
        st = None if state is None else jax.tree_util.tree_map(lambda a: jnp.asarray(a)[layers], state)
        b = budget_B if not config.scan_layers else jnp.broadcast_to(budget_B, (len(layers),) + budget_B.shape)
        if st is not None and not config.scan_layers:
            st = jax.tree_util.tree_map(lambda a: a[0], st)
        return PolicyPrefillCache(budget_B=b, layer_state=st, policy=policy, max_new=max_new,
                                  page_size=page_size, max_keep=max_keep)

    if config.scan_layers:
        return tuple(one(np.arange(j, config.num_layers, P)) for j in range(P))
    return tuple(tuple(one(np.array([r * P + j])) for j in range(P)) for r in range(R))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnames=("cache",))
def _step(config, variables, tokens_BT, pos_BT, seg_BT, cache):
    logits, cache = Transformer(config).apply(variables, tokens_BT, positions_BT=pos_BT,
                                              segment_ids_BT=seg_BT, cache=cache)
    last = jnp.maximum(jnp.sum(seg_BT != 0, axis=1) - 1, 0)  # each row's last real token
    logits_BV = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    return logits_BV, cache, overflow_state(cache)


def _is_row_cache(x) -> bool:
    from attn.kv.head_cache import HeadKVCache
    return isinstance(x, (PagedKVCache, HeadKVCache))


def _per_layer(config, fn, *trees):
    """Apply ``fn`` to each layer's cache (vmapped over the stacked layer axis when scanning)."""
    f = jax.vmap(fn) if config.scan_layers else fn
    return jax.tree_util.tree_map(f, *trees, is_leaf=_is_row_cache)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnames=("cache",))
def _release(config, rows_B, cache):
    return _per_layer(config, lambda c: c.release(rows_B), cache)


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("policy", "max_keep", "page_size"))
def _prefill_policy(config, variables, tokens_1P, budget_1, *, policy, max_keep, page_size):
    """One request's prompt, prefilled alone through the policy: (last logits [1, V], caches)."""
    P = tokens_1P.shape[1]
    cache = make_policy_cache(config, policy, budget_1, max_keep=max_keep, max_new=1,
                              page_size=page_size)
    pos = jnp.arange(P, dtype=jnp.int32)[None]
    logits, cache = Transformer(config).apply(variables, tokens_1P, positions_BT=pos,
                                              segment_ids_BT=jnp.ones_like(pos), cache=cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("batch", "max_len"))
def _empty_policy_pool(config, one, *, batch, max_len):
    from attn.kv.head_cache import HeadKVCache
    return _per_layer(config, lambda o: HeadKVCache.empty_like(o, batch=batch, max_len=max_len), one)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnames=("cache",))
def _insert(config, cache, one, row):
    return _per_layer(config, lambda c, o: c.insert(o, row), cache, one)


class Engine:
    """Continuous-batching decoder; see the module docstring.

    Args:
      config, variables: the model (``LMConfig``, ``Transformer`` variables).
      max_batch: slots (rows) decoded together.
      max_len: prompt + generated tokens one request may hold.
      page_size: tokens per cache page (must divide ``max_len``).
      prefill_chunk: prompt tokens a slot feeds per step.
      kv_policy, kv_budget: an ``attn.kv`` policy and the fraction of each prompt every kv
        head keeps. A policy needs the whole prompt, so each request is then prefilled
        alone in one call (not in chunks); the kept tokens are copied into the shared
        per-(row, kv head) pool (``attn.kv.head_cache.HeadKVCache``) and the request
        decodes in the running batch. Each request decodes as ``models.generate`` does
        with the same policy and budget (tested).
    """

    def __init__(self, config: LMConfig, variables, *, max_batch: int, max_len: int,
                 page_size: int = 16, prefill_chunk: int = 64, kv_policy=None,
                 kv_budget: float = 1.0):
        if prefill_chunk <= 0 or max_batch <= 0:
            raise UserError(f"Engine: max_batch={max_batch} and prefill_chunk={prefill_chunk} "
                            "must be positive")
        self.config, self.variables = config, variables
        self.B, self.max_len, self.chunk = max_batch, max_len, prefill_chunk
        self.policy, self.budget, self.page_size = kv_policy, kv_budget, page_size
        if kv_policy is None:
            self.cache = init_paged_cache(config, max_batch, max_len, page_size)
        else:
            from attn.kv.policy import budgets

            budgets([1], kv_budget)  # a bad fraction fails here, not at the first request
            make_policy_cache(config, kv_policy, jnp.ones((1,), jnp.int32), max_keep=1,
                              max_new=1)  # refuses non-MHA models by name, now
            self.cache = None  # built from the first prefilled request's shapes
        self.pool_pages = pages_for(max_batch, max_len, page_size)

    def _admit_with_policy(self, i: int, s: "_Slot") -> Iterator[Event]:
        """Prefill slot i's prompt alone through the policy, copy it in, emit its first token."""
        from attn.kv.policy import budgets

        ids = np.asarray(s.req.prompt, np.int32)[None]
        b = budgets([ids.shape[1]], self.budget)
        logits, one = _prefill_policy(self.config, self.variables, jnp.asarray(ids), jnp.asarray(b),
                                      policy=self.policy, page_size=self.page_size,
                                      max_keep=int(self.policy.max_keep(ids.shape[1], int(b[0]))))
        check_overflow(overflow_state(one), where="serving (policy prefill)")
        if self.cache is None:
            self.cache = _empty_policy_pool(self.config, one, batch=self.B, max_len=self.max_len)
        self.cache = _insert(self.config, self.cache, one, jnp.int32(i))
        s.fed = len(s.req.prompt)
        yield from self._emit(s, np.asarray(logits)[0])

    def _refusal(self, req: Request) -> str | None:
        V = self.config.vocab_size
        if not len(req.prompt):
            return "empty prompt"
        if req.max_new_tokens <= 0:
            return f"max_new_tokens={req.max_new_tokens} must be positive"
        if len(req.prompt) + req.max_new_tokens > self.max_len:
            return (f"prompt of {len(req.prompt)} tokens + max_new_tokens={req.max_new_tokens} "
                    f"exceeds the cache's max_len={self.max_len}")
        bad = [t for t in req.prompt if not 0 <= int(t) < V]
        if bad:
            return f"prompt token ids {bad[:3]} outside the vocab [0, {V})"
        return None

    def stream(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Serve ``requests`` (ids = their index); yields ``Event`` s as tokens are made."""
        waiting = deque(enumerate(requests))
        slots: list[_Slot | None] = [None] * self.B
        while waiting or any(slots):
            for i in range(self.B):  # admit
                while slots[i] is None and waiting:
                    rid, req = waiting.popleft()
                    why = self._refusal(req)
                    if why:
                        yield Event(rid, error=why)
                        continue
                    slots[i] = _Slot(rid, req)
                    if self.policy is not None:
                        yield from self._admit_with_policy(i, slots[i])
                        if slots[i].finished:
                            self.cache = _release(self.config, jnp.arange(self.B) == i,
                                                  cache=self.cache)
                            slots[i] = None
            if not any(slots):
                break
            T = self.chunk if any(s and s.prefilling for s in slots) else 1
            tok = np.zeros((self.B, T), np.int32)
            pos = np.zeros((self.B, T), np.int32)
            seg = np.zeros((self.B, T), np.int32)
            for i, s in enumerate(slots):
                if s is None:
                    continue
                if s.prefilling:
                    ids = list(s.req.prompt[s.fed:s.fed + T])
                    start = s.fed
                    s.fed += len(ids)
                else:
                    ids, start = [s.last], len(s.req.prompt) + len(s.out) - 1
                n = len(ids)
                tok[i, :n], pos[i, :n], seg[i, :n] = ids, np.arange(start, start + n), 1
            logits, self.cache, state = _step(self.config, self.variables, jnp.asarray(tok),
                                              jnp.asarray(pos), jnp.asarray(seg),
                                              cache=self.cache)
            check_overflow(state, where="serving")
            logits = np.asarray(logits)
            finished = np.zeros(self.B, bool)
            for i, s in enumerate(slots):
                if s is None or s.prefilling:
                    continue
                yield from self._emit(s, logits[i])
                finished[i] = s.finished
            if finished.any():
                self.cache = _release(self.config, jnp.asarray(finished), cache=self.cache)
                for i in np.flatnonzero(finished):
                    slots[i] = None

    def _emit(self, s: "_Slot", logits_V) -> Iterator[Event]:
        """Sample slot s's next token from its logits and yield it (sets ``s.finished``)."""
        r, V = s.req, self.config.vocab_size
        key = jax.random.fold_in(jax.random.key(r.seed), len(s.out))
        t = int(sample_logits(jnp.asarray(logits_V)[None], key, temperature=r.temperature,
                              top_k=r.top_k, top_p=r.top_p)[0])
        if not 0 <= t < V:  # cannot happen with these samplers: say so if it does
            s.finished = True
            yield Event(s.rid, error=f"sampled token {t} outside the vocab [0, {V})")
            return
        s.out.append(t)
        s.last = t
        s.finished = len(s.out) >= r.max_new_tokens or (r.eos_id is not None and t == r.eos_id)
        yield Event(s.rid, token=t, done=s.finished)

    def run(self, requests: Sequence[Request]) -> dict[int, list[int] | str]:
        """All tokens per request id (or the error string of a refused request)."""
        out: dict[int, list[int] | str] = {}
        for ev in self.stream(requests):
            if ev.error is not None:
                out[ev.rid] = ev.error
            else:
                out.setdefault(ev.rid, []).append(ev.token)
        return out
