"""benchmarks/kv_policies.py: its core loop on a tiny random model (no SmolLM2, no kvpress).

Numbers are not asserted (speed lives in benchmarks); only that every (method, budget,
context) gives a row, that what the policies hold is less than the full cache, that the
loop's tokens are those of ``models.generate.generate_batch`` and that the files are written.
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
    rows = kv_policies.run_attnlab(cfg, v, cases, windows, policies=policies, budgets=[0.25],
                                   prefix=32, log=lambda s: None)
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


def test_loop_tokens_equal_generate_batch(tiny, cases):
    cfg, v = tiny
    prompts = [list(c.prompt_ids) for c in cases[200]] + [list(cases[200][0].prompt_ids[40:])]  # 2 lengths
    for pol in (make_policy("snapkv", window=4),):
        kw = dict(kv_policy=pol, kv_budget=0.25)
        r = kv_policies.attnlab_needle(cfg, v, prompts, policy=pol, budget=0.25, max_new=4)
        assert r["generated"] == generate_batch(cfg, v, prompts, max_new_tokens=4, **kw)
