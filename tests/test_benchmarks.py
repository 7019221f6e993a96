"""benchmarks/: exact FLOP counting, report files, the zoo and train-step CLIs on tiny settings.

Timing numbers are never asserted (DESIGN §2: speed targets live in benchmarks, not in
timed tests); only that every cell is reported and the files are written.
"""

import json
import os

import pytest

from benchmarks import kernels, report, train_step, zoo

SMALL = (
    kernels.Shape("prefill", 2, 200, 200, 3, 1, 16, 8),   # T > WINDOW and > DOC_LEN: truncation paths
    kernels.Shape("rect", 1, 40, 150, 2, 2, 16, 16),      # T != S
    kernels.Shape("decode", 2, 1, 300, 4, 2, 16, 16),     # query at position S-1
)


@pytest.mark.parametrize("shape", SMALL, ids=lambda s: s.name)
@pytest.mark.parametrize("mask_name", list(kernels.MASKS))
def test_visible_pairs_match_materialized_mask(shape, mask_name):
    mask = kernels.MASKS[mask_name](shape)
    assert kernels.visible_pairs(mask_name, shape) == kernels.visible_pairs_materialized(mask, shape)


def test_flops_count_only_visible_pairs():
    s = kernels.Shape("t", 1, 8, 8, 2, 2, 4, 6)
    assert kernels.attention_flops("full", s) == 2 * (1 * 2 * 8 * 8) * (4 + 6)
    assert kernels.attention_flops("causal", s) == 2 * (2 * 36) * (4 + 6)  # 8·9/2 pairs per head


def test_kernel_grid_reports_every_cell(tmp_path):
    impls = ["xla", "pallas_gpu", "jax.nn-xla", "jax.nn-cudnn", "tokamax"]
    paths = kernels.main(["--grid", "quick", "--impls", ",".join(impls), "--masks", "causal,documents",
                          "--passes", "fwd,decode", "--reps", "1", "--out-dir", str(tmp_path),
                          "--stem", "grid"])
    assert sorted(os.path.basename(p) for p in paths) == ["grid.json", "grid.md"]
    doc = json.load(open(tmp_path / "grid.json"))
    assert doc["env"]["device"] == report.device_name() and doc["env"]["command"]
    rows = doc["rows"]
    # every (impl, shape, mask, pass) is a row: 2 prefill shapes x fwd + 1 decode shape x decode
    assert len(rows) == len(impls) * 2 * 3
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"xla"}
    assert all(r["max_rel_err"] < 1e-4 and r["tflops"] > 0 for r in ok)
    for r in rows:
        assert r["status"] in ("ok", "unsupported", "skipped", "not installed"), r
        if r["status"] != "ok":
            assert r["reason"], r  # never silently dropped: a reason is always given
    assert all(r["status"] == "unsupported" for r in rows if r["impl"] == "jax.nn-xla" and r["mask"] == "documents")
    try:
        import tokamax  # noqa: F401
    except ImportError:
        assert all(r["status"] == "not installed" for r in rows if r["impl"] == "tokamax")
    assert "| impl |" in open(tmp_path / "grid.md").read()


def test_zoo_tiny_writes_table_and_plots(tmp_path):
    import jax
    from flax import linen as nn

    from models.transformer import LMConfig, Transformer

    # mha and mqa compile fastest (mla took twice as long); 2 steps: the minimum with a
    # step time (the second logging window).
    out = zoo.main(["--mechanisms", "mha,mqa", "--steps", "2", "--widths", "64", "--settings", "64/4",
                    "--eval-batch", "32", "--eval-steps", "1", "--out-dir", str(tmp_path), "--stem", "z"])
    names = sorted(os.path.basename(p) for p in out)
    assert names == ["z-acc-vs-kv.png", "z-acc-vs-width.png", "z.json", "z.md"]
    assert all(os.path.getsize(p) > 0 for p in out)
    rows = json.load(open(tmp_path / "z.json"))["rows"]
    assert [r["mechanism"] for r in rows] == ["mha", "mqa"]
    for r in rows:
        assert "error" not in r, r
        # 32 sequences x 4 queried values: a count over exactly those 128 answers, and an
        # untrained model is near chance (1/64 values; 4 steps measured 0.016-0.031): more
        # than 0.2 would mean the answer leaks into the inputs.
        n = 32 * 4
        assert abs(r["accuracy"] * n - round(r["accuracy"] * n)) < 1e-6 and r["accuracy"] < 0.2, r
        assert r["step_ms"] > 0 and r["attn_flops_per_token"] > 0
        # attn_params against the parameters the model really has (eval_shape: no compile).
        c = zoo.build_config(r["mechanism"], 64, 64, 4, 2)
        lm = LMConfig(**c.model.to_dict())
        tree = nn.unbox(jax.eval_shape(Transformer(lm).init, jax.random.key(0),
                                       jax.ShapeDtypeStruct((1, 8), "int32"))["params"])
        counted = sum(a.size for k, a in jax.tree_util.tree_leaves_with_path(tree)
                      if "['attn']" in jax.tree_util.keystr(k))
        assert r["attn_params"] == counted, (r["mechanism"], r["attn_params"], counted)
    # MQA caches one K/V head: a quarter of MHA's K/V bytes (4 heads), plus 8 bytes per slot.
    per_layer = [r["kv_bytes_per_token"] // zoo.NUM_LAYERS for r in rows]
    assert per_layer[0] - 8 == 4 * (per_layer[1] - 8), per_layer
    assert "| mechanism |" in open(tmp_path / "z.md").read()


def test_zoo_overrides_build_valid_configs_for_every_mechanism():
    from attn import registry
    from models.transformer import LMConfig

    for name in list(registry.names()) + ["gqa,mla", "moh,gqa"]:
        for width in (32, 64, 128, 256):
            c = zoo.build_config(name, width, 256, 16, 10)
            LMConfig(**c.model.to_dict())  # validates every layer config
            assert zoo.model_stats(c)["params"] > 0


def test_train_step_reports_tokens_and_mfu(tmp_path):
    paths = train_step.main(["--config", "configs/mqar.py", "--reps", "1", "--out-dir", str(tmp_path),
                             "--stem", "ts"])
    row = json.load(open(paths[0]))["rows"][0]
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["peak_tflops"] > 0
    assert row["train_flops_per_token"] > 6 * row["n_matmul"]  # attention context adds on top
    assert train_step.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0


def test_flash_gpu_counts_visible_pairs_and_selects_cases():
    from benchmarks import flash_gpu

    s = kernels.Shape("t", 2, 300, 300, 3, 1, 16, 16)
    for name in flash_gpu.MASKS:  # window and documents shrunk so that both bite at S = 300
        mask = flash_gpu.make_mask(name, s, window=50, doc_lengths=(20, 90))
        assert flash_gpu.visible_pairs(mask, s) == kernels.visible_pairs_materialized(mask, s), name
    names = [c.name for c in flash_gpu.all_cases()]
    assert len(names) == len(set(names)) == 33
    assert set(flash_gpu.QUICK) | {case for case, _ in flash_gpu.DESIGN_TARGETS} <= set(names)
    assert [c.name for c in flash_gpu.select_cases("s16k-h64-doc")] == [
        "mha-b1-s16k-h64-documents", "gqa-b1-s16k-h64-documents"]
    assert flash_gpu.main(["--quick", "--list"]) == []
    with pytest.raises(SystemExit, match="needs an NVIDIA GPU"):  # CPU: a clear message, no run
        flash_gpu.main(["--quick"])
