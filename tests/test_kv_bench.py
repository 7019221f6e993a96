"""benchmarks/kv_policies.py: its core loop on a tiny random model (no SmolLM2, no kvpress).

Numbers are not asserted (speed lives in benchmarks); only that every (method, budget,
context) gives a row, that what the policies hold is less than the full cache, that the
loop's tokens (one prefill per context length, every policy's cache built from the stored
observations) are those of ``models.generate.generate_batch`` (a prefill per policy) and
that the files are written.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.kv.policy import budgets, make_policy
from benchmarks import kv_policies
from models.analysis.needle import CharTokenizer, make_cases
from models.generate import generate_batch
from models.transformer import LMConfig, Transformer


@pytest.fixture(scope="module")
def tiny():
    cfg = LMConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4, attn="gqa",
                   attn_overrides={"gqa": {"num_kv_heads": 2}}, dtype="float32",
                   scan_layers=True)  # SmolLM2's layout: cache leaves stacked along a layer axis
    return cfg, Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


@pytest.fixture(scope="module")
def cases():
    tok = CharTokenizer()
    corpus = tok.encode("The cat sat on the mat. A dog ran far away.\n" * 40)
    out = {}
    for L in (200,):
        cs = make_cases(tok, context_len=L, depths=(0.25, 0.75), n=2, seed=0, digits=2, corpus_ids=corpus)
        out[L] = [cs[0], cs[3]]  # needle 0 at depth .25, needle 1 at depth .75 (the benchmark's diagonal)
    return out


def test_core_loop_rows_bytes_and_files(tiny, cases, tmp_path):
    cfg, v = tiny
    policies = {"streaming": make_policy("streaming", sinks=2), "snapkv": make_policy("snapkv", window=4),
                "broken": ValueError("needs calibrated inputs")}
    windows = kv_policies.ppl_windows(np.arange(400) % 128, 2, 48)
    seen, lengths = [], []
    rows, checks = kv_policies.run_attnlab(cfg, v, cases, windows, policies=policies, budgets=[0.25],
                                           prefix=32, log=lambda s: None, on_row=seen.append,
                                           on_length=lambda done, ch: lengths.append(len(done)),
                                           check=("snapkv", 0.25))
    assert seen == rows and lengths == [4, 8]  # after the 200-token needles, then after perplexity
    assert checks == [dict(policy="snapkv", budget=0.25, context_len=200, equal=True,
                           seconds=checks[0]["seconds"], status="ok")]
    needle = [r for r in rows if r["task"] == "needle"]
    ppl = [r for r in rows if r["task"] == "ppl"]
    assert len(needle) == 1 + 3 and len(ppl) == 1 + 3
    for r in rows:
        if r["method"] == "broken":
            assert r["status"].startswith("error: ValueError"), r
            continue
        assert r["status"] == "ok", r
        if r["method"] == "full":
            assert r["held_bytes"] == r["full_bytes"] > 0
        else:  # a head keeps a fraction of its prompt: fewer live pages than the full cache
            assert 0 < r["held_bytes"] < r["full_bytes"], r
        if r["task"] == "needle":
            assert len(r["generated"]) == 2 and len(r["correct"]) == 2 and 0 <= r["accuracy"] <= 1
            assert all(len(g) == len(cases[r["context_len"]][0].answer_ids) + 1 for g in r["generated"])
        else:
            assert r["count"] == 2 * 16 and math.isfinite(r["ppl"])
    # streaming keeps exactly ceil(budget · len) tokens per (row, kv head): whole 16-slot pages
    # of K + V (8 channels each, float32) + 8 B position/segment, over 2 layers and 2 kv heads
    s = next(r for r in needle if r["method"] == "streaming")
    kept = budgets([len(c.prompt_ids) for c in cases[200]], 0.25)
    assert s["held_bytes"] == 2 * 2 * sum(-(-int(k) // 16) * 16 for k in kept) * (2 * 8 * 4 + 8)
    assert s["full_bytes"] == 2 * 2 * 2 * 200 * (2 * 8 * 4 + 8)
    full_ppl = next(r for r in ppl if r["method"] == "full")
    # the full cache through prefill + one continuation pass == one pass over the window
    one_pass = np.asarray(jax.nn.log_softmax(
        Transformer(cfg).apply(v, jnp.asarray(windows))[0][:, 31:-1], axis=-1))
    nll = -np.take_along_axis(one_pass, windows[:, 32:, None], axis=-1).sum()
    assert abs(full_ppl["nll_sum"] - nll) < 1e-3 * abs(nll), (full_ppl["nll_sum"], nll)

    kv_policies.write(str(tmp_path), "bench", {"device": "cpu", "date_utc": "d", "command": "c",
                                                "device_kind": "cpu", "cpu_count": 2, "jax": "x",
                                                "flax": "y", "python": "z", "kvpress_env": {}},
                      dict(needles=2, budgets=[0.25], kvpress_unavailable={"duo": "why"}),
                      rows, [200], [0.25], plot_path=str(tmp_path / "acc.png"))
    doc = json.load(open(tmp_path / "bench.json"))
    assert len(doc["rows"]) == len(rows)
    md = open(tmp_path / "bench.md").read()
    assert "| attnlab | snapkv |" in md and "broken" in md and (tmp_path / "acc.png").stat().st_size > 0


def test_one_prefill_tokens_equal_generate_batch(tiny, cases):
    """Every policy's tokens from the shared prefill == generate_batch's own prefill + decode,
    on left-padded prompts of two lengths; the full cache == generate_batch without a policy."""
    import types

    cfg, v = tiny
    base = cases[200][0]
    cs = [types.SimpleNamespace(prompt_ids=list(c.prompt_ids), answer_ids=[1, 2, 3], score=lambda g: False)
          for c in cases[200]] + [types.SimpleNamespace(prompt_ids=list(base.prompt_ids[40:]),
                                                        answer_ids=[1, 2, 3], score=lambda g: False)]
    prompts = [c.prompt_ids for c in cs]
    pols = {"snapkv": make_policy("snapkv", window=4), "streaming": make_policy("streaming", sinks=2),
            "h2o": make_policy("h2o")}
    rows, shared = kv_policies.needle_rows(cfg, v, 200, cs, policies=pols, budgets=[0.25, 0.5],
                                           log=lambda s: None)
    assert shared["max_new"] == 4 and all(r["status"] == "ok" for r in rows), rows
    for r in rows:
        kw = {} if r["method"] == "full" else dict(kv_policy=pols[r["method"]], kv_budget=r["budget"])
        assert r["generated"] == generate_batch(cfg, v, prompts, max_new_tokens=4, **kw), r["method"]


def test_merge_prefers_measured_rows(tmp_path):
    """``--merge``: runs' rows combined; an ok row replaces another run's error row."""
    env = {"device": "cpu", "date_utc": "d", "command": "c", "device_kind": "cpu", "cpu_count": 2,
           "jax": "x", "flax": "y", "python": "z", "kvpress_env": {}}

    def row(m, b, L, ok=True):
        r = dict(framework="attnlab", task="needle", method=m, budget=b, context_len=L, cases=2, wall_s=1.0)
        if not ok:
            return dict(r, status="error: UserError: needs scores")
        return dict(r, status="ok", correct=[True, False], accuracy=0.5, held_bytes=1, full_bytes=2,
                    decode_tok_s=1.0, prefill_s=None, build_s=0.1)

    meta = lambda L: dict(needles=2, budgets=[0.25], kvpress_unavailable={}, context_lens=[L],  # noqa: E731
                          policies=["a"], policy_knobs={}, cases={})
    kv_policies.write(str(tmp_path), "one", env, meta(200), [row("a", 0.25, 200, ok=False)], [200], [0.25],
                      partial=True)
    kv_policies.write(str(tmp_path), "two", dict(env, command="c2"), meta(400),
                      [row("a", 0.25, 200), row("a", 0.25, 400)], [400], [0.25])
    assert kv_policies.main(["--merge", str(tmp_path / "one.json"), str(tmp_path / "two.json"), "--out-dir",
                             str(tmp_path), "--stem", "m", "--plot", str(tmp_path / "m.png")]) == 0
    doc = json.load(open(tmp_path / "m.json"))
    assert [(r["context_len"], r["status"]) for r in doc["rows"]] == [(200, "ok"), (400, "ok")]
    assert doc["settings"]["context_lens"] == [200, 400] and len(doc["env"]["merged_from"]) == 2
    assert "`c2`" in open(tmp_path / "m.md").read()
