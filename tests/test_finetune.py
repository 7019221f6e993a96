"""Fine-tuning from a checkpoint: model.init_from, optim.trainable, export and reload.

Small models saved in attnlab's native format stand in for pretrained ones (the path is
the same: ``models.pretrained.load``); one test runs the real SmolLM2 through
``configs/finetune.py``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.errors import UserError
from models import pretrained
from models.pretrained import native
from models.transformer import LMConfig, Transformer
from train.optim import trainable_mask
from train.restore import restore_trained
from train.trainer import train_and_evaluate

TINY = dict(vocab_size=256, d_model=32, num_layers=2, num_heads=4, attn="gqa",
            attn_overrides={"gqa": {"num_kv_heads": 2}}, dtype="float32", scan_layers=True)


def _tiny_checkpoint(path, seed=3, **over):
    cfg = LMConfig(**{**TINY, **over})
    params = nn.unbox(Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))["params"]
    native.save(cfg, params, str(path))
    return cfg, params


def _config(init_from, *, steps=2, lr=1e-3, trainable=None, **model):
    return {
        "model": {"init_from": init_from, **model},
        "data": {"source": "text", "seq_len": 16, "batch_size": 8, "eval_batch_size": 8},
        "optim": {"learning_rate": lr, "warmup_steps": 0, "weight_decay": 0.1, "trainable": trainable},
        "train": {"num_steps": steps, "log_every": 1, "eval_steps": 1, "progress_bar": False},
        "checkpoint": {"every_steps": steps, "async_save": False},
    }


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_init_from_starts_at_the_checkpoint(tmp_path):
    # One step at a vanishing rate: the trained parameters are the checkpoint's.
    cfg, params = _tiny_checkpoint(tmp_path / "ckpt")
    train_and_evaluate(_config(str(tmp_path / "ckpt"), steps=1, lr=1e-12), str(tmp_path / "run"))
    got_cfg, variables, step = restore_trained(str(tmp_path / "run"))
    assert step == 1 and got_cfg == cfg
    want, got = _flat(params), _flat(variables["params"])
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-9, err_msg=k)


def test_trainable_freezes_everything_else(tmp_path):
    # Frozen parameters (with weight decay 0.1 set) stay bit-identical; matching ones move.
    _, params = _tiny_checkpoint(tmp_path / "ckpt")
    train_and_evaluate(_config(str(tmp_path / "ckpt"), trainable=r"attn/(k|v)_"), str(tmp_path / "run"))
    _, variables, _ = restore_trained(str(tmp_path / "run"))
    want, got = _flat(params), _flat(variables["params"])
    moved = {k for k in want if not np.array_equal(want[k], got[k])}
    assert moved == {k for k in want if "/attn/k_" in f"/{k}" or "/attn/v_" in f"/{k}"}, moved


def test_trainable_mask_and_errors(tmp_path):
    tree = {"units": {"block_0": {"attn": {"q_kernel": 0, "k_kernel": 0}, "mlp": {"w": 0}}}}
    m = trainable_mask(tree, "attn/k")
    assert m == {"units": {"block_0": {"attn": {"q_kernel": False, "k_kernel": True}, "mlp": {"w": False}}}}
    with pytest.raises(ValueError, match="matches no parameter"):
        trainable_mask(tree, "nothing_here")
    _tiny_checkpoint(tmp_path / "ckpt")
    with pytest.raises(UserError, match="not a regular expression"):
        train_and_evaluate(_config(str(tmp_path / "ckpt"), trainable="(", steps=1), str(tmp_path / "r"))


def test_init_from_config_checks(tmp_path):
    _tiny_checkpoint(tmp_path / "ckpt")
    ck = str(tmp_path / "ckpt")
    with pytest.raises(UserError, match="differs from the checkpoint"):
        train_and_evaluate(_config(ck, d_model=64), str(tmp_path / "a"))
    with pytest.raises(UserError, match="not a known name"):
        train_and_evaluate(_config(str(tmp_path / "missing")), str(tmp_path / "b"))
    with pytest.raises(UserError, match="matches no parameter"):
        train_and_evaluate(_config(ck, trainable="nothing_here"), str(tmp_path / "c"))


def test_export_run_round_trips(tmp_path):
    # A run exports (auto: hf for a GQA LM) and loads back with the same logits;
    # an MLA model exports native.
    from models.export import export_run, main

    _tiny_checkpoint(tmp_path / "ckpt")
    train_and_evaluate(_config(str(tmp_path / "ckpt"), steps=1), str(tmp_path / "run"))
    cfg, variables, _ = restore_trained(str(tmp_path / "run"))
    fmt, n = export_run(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert fmt == "hf" and n == sum(x.size for x in jax.tree.leaves(variables["params"]))
    back = pretrained.load(str(tmp_path / "hf"))
    t = jnp.asarray([[5, 9, 200, 17, 3]])
    want = Transformer(cfg).apply(variables, t)[0]
    got = Transformer(back.config).apply({"params": back.params}, t)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)

    mla = dict(attn="mla", attn_overrides={"mla": {"kv_lora_rank": 8, "qk_rope_head_dim": 4}})
    _tiny_checkpoint(tmp_path / "mla", **mla)
    assert main(["--model", str(tmp_path / "mla"), "--out", str(tmp_path / "mla_out")]) == 0
    assert native.is_native_dir(str(tmp_path / "mla_out"))
    with pytest.raises(UserError, match="format='native'"):
        pretrained.export(pretrained.load(str(tmp_path / "mla")), str(tmp_path / "x"), format="hf")


def test_native_rejects_mismatched_weights(tmp_path):
    from safetensors.numpy import save_file

    _tiny_checkpoint(tmp_path / "ckpt")
    flat = {k: np.zeros((1,), np.float32) for k in ("embedding",)}
    save_file(flat, str(tmp_path / "ckpt" / native.WEIGHTS_FILE))
    with pytest.raises(UserError, match="do not match the config"):
        pretrained.load(str(tmp_path / "ckpt"))


def test_tokenized_text_is_the_perplexity_corpus():
    from models.perplexity import corpus_text
    from train.data import DataConfig, make_source, tokenized_text

    ids = tokenized_text("smollm2-135m")
    tok = pretrained.load("smollm2-135m", config_only=True).tokenizer
    assert ids[:200].tolist() == tok.encode(corpus_text(), add_special_tokens=False)[:200]
    src = make_source(DataConfig(source="tokenized_text", seq_len=32, batch_size=3,
                                 options={"tokenizer": "smollm2-135m"}))
    b = src.batch("eval", 0, 3)
    assert b["inputs"].shape == (3, 32) and (b["inputs"][:, 1:] == b["targets"][:, :-1]).all()
    with pytest.raises(ValueError, match="must name the model"):
        make_source(DataConfig(source="tokenized_text", seq_len=8, batch_size=1, options={}))


def test_finetune_config_on_smollm2():
    # The README's fine-tuning config on the real model, without a training step (the
    # loop is the tiny tests'): it validates, its parameters load into the model's own
    # layout, and they are SmolLM2's (an untrained model's NLL would be ln(49152) = 10.8).
    from train import trainer
    from train.cli import build_train_config

    config = build_train_config("finetune:steps=1,seq_len=16,batch=8,trainable=final_norm", [])
    exp, source = trainer.validate(config)
    c = trainer._compiled_for(exp)
    assert sum(jax.tree.leaves(c.trainable)) == 1            # final_norm's scale only
    params = trainer._pretrained_params(c, exp)
    b = source.batch("eval", 0, 1)
    logits = Transformer(exp.model).apply({"params": params}, jnp.asarray(b["inputs"]))[0]
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(b["targets"])[..., None], -1))
    assert float(nll) < 5.0, float(nll)


def test_kl_sums_match_a_float64_oracle():
    from train.distill import kl_sums

    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 7)) * 2, rng.normal(size=(2, 3, 7)) * 2
    w = np.array([[1.0, 0.0, 0.5], [2.0, 1.0, 0.0]])
    tau = 1.7

    def logsm(z):
        z = z / tau
        return z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)

    want = np.sum(w * np.sum(np.exp(logsm(t)) * (logsm(t) - logsm(s)), -1) * tau ** 2)
    got = float(kl_sums(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(w), tau)["kl_sum"])
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_distillation_loss_mixes_kl_and_ce(tmp_path):
    # A student equal to its teacher has KL 0; another teacher gives loss = w·KL + (1-w)·CE.
    _tiny_checkpoint(tmp_path / "student", seed=3)
    _tiny_checkpoint(tmp_path / "teacher", seed=4)
    st = str(tmp_path / "student")
    cfg = _config(st, steps=1, lr=1e-12)
    cfg["train"].update(distill_from=st, distill_weight=1.0)
    out = train_and_evaluate(cfg, str(tmp_path / "same"))
    assert abs(out["train/kl"]) < 1e-5 and abs(out["train/loss"]) < 1e-5, out
    cfg["train"].update(distill_from=str(tmp_path / "teacher"), distill_weight=0.3)
    out = train_and_evaluate(cfg, str(tmp_path / "other"))
    assert out["train/kl"] > 1e-3
    np.testing.assert_allclose(out["train/loss"], 0.3 * out["train/kl"] + 0.7 * out["train/ce"], rtol=1e-5)
    # The run's checkpoint holds the student only.
    _, variables, _ = restore_trained(str(tmp_path / "other"))
    assert set(variables) == {"params"}


# --------------------------------------------------------------------------- peft
def test_peft_merge_matches_a_float64_oracle():
    from train.peft import PeftConfig, merge

    rng = np.random.default_rng(1)
    L, D, N, H, r = 2, 6, 3, 4, 2
    w = rng.normal(size=(L, D, N, H))
    node = {"base": w, "lora_a": rng.normal(size=(L, D, r)), "lora_b": rng.normal(size=(L, r, N * H)),
            "seq_a": rng.normal(size=(L, N * H, r)), "seq_b": rng.normal(size=(L, r, N * H))}
    cfg = PeftConfig(method="hydra", rank=r, alpha=3.0)
    got = np.asarray(merge({"k": {kk: jnp.asarray(v, jnp.float32) for kk, v in node.items()}}, cfg)["k"])
    for layer in range(L):
        W = w[layer].reshape(D, N * H)
        delta = node["lora_a"][layer] @ node["lora_b"][layer] + W @ node["seq_a"][layer] @ node["seq_b"][layer]
        want = (W + 1.5 * delta).reshape(D, N, H)
        np.testing.assert_allclose(got[layer], want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("method", ["hydra"])  # hydra's factors include lora's (merge oracle above)
def test_peft_trains_only_adapters_and_restores_merged(tmp_path, method):
    from train import peft

    cfg, params = _tiny_checkpoint(tmp_path / "ckpt")
    config = _config(str(tmp_path / "ckpt"), steps=2, lr=1e-2)
    config["peft"] = {"method": method, "rank": 2, "targets": r"attn/(q|v)_kernel$"}
    train_and_evaluate(config, str(tmp_path / "run"))
    # The trained state has this method's factors (a compiled run of another method,
    # cached in the same process, must not be reused).
    from train.trainer import _compiled_for, parse_config

    state_keys = set(_flat(_compiled_for(parse_config(config)).abstract_state["params"]))
    assert any(k.endswith("seq_a") for k in state_keys) == (method == "hydra")
    got_cfg, variables, _ = restore_trained(str(tmp_path / "run"))
    want, got = _flat(params), _flat(variables["params"])
    assert got_cfg == cfg and want.keys() == got.keys()          # merged: the plain layout
    moved = {k for k in want if not np.array_equal(want[k], got[k])}
    assert moved == {k for k in want if k.endswith(("attn/q_kernel", "attn/v_kernel"))}, moved
    # The state holds the factors: rank 2 on q [D, N·H] and v [D, K·H] of 2 layers.
    attached = peft.attach(params, peft.PeftConfig(method=method, rank=2, targets=r"attn/(q|v)_kernel$"),
                           jax.random.key(0), nn.get_partition_spec(Transformer(cfg).init(
                               jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]))
    n_adapter, _ = peft.count(attached)
    D, N, K, H, L = 32, 4, 2, 8, 2
    per = lambda O: (D * 2 + 2 * O) + ((O * 2 + 2 * O) if method == "hydra" else 0)
    assert n_adapter == L * (per(N * H) + per(K * H))


def test_peft_config_errors(tmp_path):
    _tiny_checkpoint(tmp_path / "ckpt")
    for peft_cfg, match in (({"method": "lora", "targets": "nothing_here"}, "matches no parameter"),
                            ({"method": "lora", "targets": "attn_norm"}, "not a matrix"),
                            ({"method": "dora"}, "peft.method='dora'"),
                            ({"method": "lora", "rank": 0}, "peft.rank must be a positive int")):
        config = _config(str(tmp_path / "ckpt"), steps=1)
        config["peft"] = peft_cfg
        with pytest.raises(UserError, match=match):
            train_and_evaluate(config, str(tmp_path / "r"))


def test_lofit_folds_match_a_float64_oracle():
    """Head scales and offsets on head outputs z [B,T,N,H], against y = Σ_i z_i W_O[i] in numpy."""
    from train.peft import PeftConfig, merge

    rng = np.random.default_rng(4)
    L, N, H, D = 2, 3, 4, 5
    z = rng.normal(size=(L, 6, N, H))
    w, A, v = rng.normal(size=(L, N, H, D)), rng.normal(size=(L, N, H)), rng.normal(size=(L, N, H))
    b0 = rng.normal(size=(L, D))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    scaled = merge({"units": {"block_0": {"attn": {"o_kernel": {"base": f32(w), "head_scale": f32(A)}}}}},
                   PeftConfig(method="lofit_scale"))["units"]["block_0"]["attn"]["o_kernel"]
    mask = np.zeros((L, N, H))
    mask[0, 2], mask[1, 0] = 1, 1                            # heads 0.2 and 1.0
    tree = {"units": {"block_0": {"attn": {"o_bias": f32(b0), "o_kernel": {
        "base": f32(w), "head_bias": f32(v), "head_mask": f32(mask)}}}}}
    out = merge(tree, PeftConfig(method="lofit", heads="0.2,1.0"))["units"]["block_0"]["attn"]
    for l in range(L):
        want_scale = np.einsum("tnh,nhd->td", (1 + A[l]) * z[l], w[l])
        np.testing.assert_allclose(np.einsum("tnh,nhd->td", z[l], np.asarray(scaled[l], np.float64)),
                                   want_scale, rtol=1e-5, atol=1e-5)
        want_bias = np.einsum("tnh,nhd->td", z[l] + mask[l] * v[l], w[l]) + b0[l]
        got = np.einsum("tnh,nhd->td", z[l], np.asarray(out["o_kernel"][l], np.float64)) + np.asarray(out["o_bias"][l])
        np.testing.assert_allclose(got, want_bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not have"):
        merge({"attn": {"o_kernel": tree["units"]["block_0"]["attn"]["o_kernel"]}}, PeftConfig(method="lofit", heads="0.2"))


def test_lofit_two_steps_select_heads_then_tune_only_their_offsets(tmp_path, capsys):
    from train import lofit, peft

    cfg, params = _tiny_checkpoint(tmp_path / "ckpt")
    step1 = _config(str(tmp_path / "ckpt"), steps=2, lr=1e-2)
    step1["peft"] = {"method": "lofit_scale", "l1": 1e-3}
    train_and_evaluate(step1, str(tmp_path / "s1"))
    _, state, _ = restore_trained(str(tmp_path / "s1"), merged=False)
    scores = lofit.head_scores(state["params"])
    assert sorted(scores) == [(l, h) for l in range(2) for h in range(4)] and max(scores.values()) > 0
    assert lofit.main(["--workdir", str(tmp_path / "s1"), "--heads", "3", "--out", str(tmp_path / "h.json")]) == 0
    heads = capsys.readouterr().out.strip()
    assert len(heads.split(",")) == 3 and lofit.parse_heads("@" + str(tmp_path / "h.json")) == lofit.parse_heads(heads)
    step2 = _config(str(tmp_path / "ckpt"), steps=2, lr=1e-2, attention_bias=True)
    step2["peft"] = {"method": "lofit", "heads": "@" + str(tmp_path / "h.json")}
    train_and_evaluate(step2, str(tmp_path / "s2"))
    got_cfg, variables, _ = restore_trained(str(tmp_path / "s2"))
    assert got_cfg.layer_configs[0].use_bias and not cfg.layer_configs[0].use_bias
    want, got = _flat(params), _flat(variables["params"])
    moved = {k for k in got if k not in want or not np.array_equal(want[k], got[k])}
    # Only the output bias holds the offsets; the q/k/v biases stay zero.
    assert {k for k in moved if not k.endswith("_bias") or np.any(got[k])} == {"units/block_0/attn/o_bias"}
    _, state2, _ = restore_trained(str(tmp_path / "s2"), merged=False)
    assert peft.count(state2["params"])[0] == 3 * 8             # K heads x H
    axes = nn.get_partition_spec(Transformer(got_cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    for bad, match in (("0.9", "heads 0..3"), ("x", "not 'layer.head'")):
        with pytest.raises(ValueError, match=match):
            peft.attach(variables["params"], peft.PeftConfig(method="lofit", heads=bad), jax.random.key(0), axes)
