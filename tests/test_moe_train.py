"""The MoE under ``train_and_evaluate``: the balance bias is carried, logged, checkpointed.

configs/moe.py shrunk to seconds: the bias (collection "moe_state") must move, the load
statistics must reach tensorboard as moe/* scalars, a killed run must resume
bit-identically (bias included, checked by the checkpoint digest), and expert
parallelism over the 8 forced CPU devices (conftest.py) must train as one device.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import train_and_evaluate, trainer
from train.config_args import load_config
from train.data import TextSource
from train.metrics import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_EVERY = 8, 4


def tiny_moe(arg="", experts=4):
    """configs/moe.py (MHA; dense layer 0, MoE layer 1 with 4 experts, top-2, bias balancing)."""
    c = load_config(os.path.join(ROOT, "configs/moe.py") + f":attn=mha,experts={experts},steps={STEPS}{arg}")
    c.model.update(dict(d_model=32, num_heads=2))
    c.data.update(dict(seq_len=16, batch_size=8, eval_batch_size=8))
    c.optim.update(dict(warmup_steps=1, learning_rate=1e-2))
    c.train.update(dict(log_every=2, eval_every=0, eval_steps=1, progress_bar=False))
    c.checkpoint.update(dict(every_steps=SAVE_EVERY, max_to_keep=2))
    # Large enough that 8 steps move the bias visibly (DeepSeek-V3 uses 1e-3 over long runs).
    c.model.ffn_overrides["moe"]["bias_update_rate"] = 0.05
    return c


def saved_state(workdir, step):
    with ocp.StandardCheckpointer() as ck:
        return ck.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def biases(state):
    return [np.asarray(b) for b in jax.tree.leaves(state["moe_state"])]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("moe_reference"))
    return workdir, train_and_evaluate(tiny_moe(), workdir)


def test_bias_moves_and_stats_are_logged(reference_run):
    workdir, result = reference_run
    state = saved_state(workdir, STEPS)
    (bias,) = biases(state)  # one MoE layer (layer 0 is dense)
    assert bias.shape == (4,) and np.abs(bias).max() > 0, bias
    # sign updates of ±rate (or 0) per step: the bias is a multiple of the rate.
    np.testing.assert_allclose(bias / 0.05, np.round(bias / 0.05), atol=1e-4)
    scalars = read_scalars(os.path.join(workdir, "tb"))
    for name in ("max_load", "dropped_fraction", "balance_loss", "z_loss", "bias_spread"):
        steps = [s for s, _ in scalars[f"moe/{name}"]]
        assert steps == list(range(2, STEPS + 1, 2)), (name, steps)
    assert any(k.startswith("moe/max_load/") for k in scalars)  # per layer
    # bias_spread is the spread of the bias the step routed with: 0 at step 1, > 0 later.
    assert scalars["moe/bias_spread"][-1][1] > 0
    assert scalars["moe/max_load"][-1][1] >= 1.0
    assert result["moe/max_load"] == scalars["moe/max_load"][-1][1]
    assert result["metric"] == "eval/bits_per_byte"


def test_bias_is_in_the_checkpoint_digest(reference_run):
    """The integrity record covers moe_state: a changed bias fails its checksum."""
    import json

    import jax.numpy as jnp

    from train.checkpoint import state_integrity

    workdir, _ = reference_run
    with open(os.path.join(workdir, "checkpoints", str(STEPS), "integrity", "metadata")) as f:
        record = json.load(f)["state"]
    moe_state = jax.tree.map(jnp.asarray, saved_state(workdir, STEPS)["moe_state"])
    _, digest = state_integrity({"moe_state": moe_state})
    assert digest and all(record[k] == v for k, v in digest.items()), (digest, record)
    tampered = jax.tree.map(lambda b: b.at[0].add(1e-3), moe_state)
    _, bad = state_integrity({"moe_state": tampered})
    assert all(record[k] != v for k, v in bad.items())


def test_kill_and_resume_is_bit_identical(reference_run, tmp_path, monkeypatch):
    ref_dir, ref_result = reference_run
    workdir = str(tmp_path)
    original = TextSource.batch

    def crash_at_6(self, split, step, batch_size):
        if split == "train" and step == 6:
            raise KeyboardInterrupt("simulated kill")
        return original(self, split, step, batch_size)

    monkeypatch.setattr(TextSource, "batch", crash_at_6)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(tiny_moe(), workdir)
    assert np.abs(biases(saved_state(workdir, SAVE_EVERY))[0]).max() > 0  # saved with a moved bias
    monkeypatch.setattr(TextSource, "batch", original)
    result = train_and_evaluate(tiny_moe(), workdir)
    got, want = saved_state(workdir, STEPS), saved_state(ref_dir, STEPS)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert result["train/loss"] == ref_result["train/loss"]
    assert result["eval/loss"] == ref_result["eval/loss"]


def test_state_layout_with_and_without_moe():
    """Only a model with MoE layers gets the "moe_state" key (replicated); others keep
    {step, params, opt_state}, so their existing checkpoints still load."""
    plain = trainer._build_compiled(trainer.parse_config(load_config(os.path.join(ROOT, "configs/mqar.py"))))
    assert set(plain.abstract_state) == {"step", "params", "opt_state"}
    c = trainer._build_compiled(trainer.parse_config(tiny_moe()))
    assert set(c.abstract_state) == {"step", "params", "opt_state", "moe_state"}
    for s in jax.tree.leaves(c.state_shardings["moe_state"]):
        assert s.is_fully_replicated


def test_expert_parallel_training_equals_one_device(tmp_path):
    """ep=1: experts split over the 8 data devices, tokens exchanged by all-to-all."""
    runs = {}
    for name, arg, mesh in (("ep8", ",ep=1", {}), ("one", "", {"num_devices": 1})):
        c = tiny_moe(arg, experts=8)  # one expert per device
        c.mesh.update(mesh)
        c.checkpoint.enabled = False
        c.train.num_steps = 4
        c.optim.decay_steps = STEPS  # same schedule as a 4-step slice of the reference
        runs[name] = train_and_evaluate(c, str(tmp_path / name))
    ep8, one = runs["ep8"], runs["one"]
    for key in ("train/loss", "eval/loss", "moe/max_load", "moe/bias_spread"):
        np.testing.assert_allclose(ep8[key], one[key], rtol=1e-4, err_msg=key)
