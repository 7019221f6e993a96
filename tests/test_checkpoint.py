"""Nothing bad is saved or loaded as good: checksums, fallback, writability, signals.

The corruption cases use ``Checkpointer`` on a small state (no training); the trainer
cases use the tiniest MQAR run; the process cases (a failing save, SIGINT) run
``python -m train``'s ``main`` in a subprocess with a timeout, since the point there is
the exit code, the one line and that nothing hangs.
"""

import logging
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import NonFiniteLossError, train_and_evaluate, trainer
from train.checkpoint import (CheckpointConfig, CheckpointError, Checkpointer,
                              NonFiniteStateError, state_integrity)
from train.config_args import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(step):
    # Random values: zstd cannot shrink them, so a flipped byte changes a value instead
    # of breaking decompression -- the case only a checksum catches.
    k = jax.random.key(step)
    return {"step": jnp.int32(step), "params": {"w": jax.random.normal(k, (8, 16)) + step},
            "opt": {"mu": jax.random.normal(jax.random.fold_in(k, 1), (3000,))}}


def _saved(directory, steps=(1, 2, 3)):
    ck = Checkpointer(directory, CheckpointConfig(max_to_keep=None))
    for s in steps:
        ck.save(s, _state(s), {"step": s})
    ck.close()


def _files(path):
    return [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]


def _flip_biggest(step_dir):
    f = max(_files(step_dir), key=os.path.getsize)  # the opt/mu values
    b = bytearray(open(f, "rb").read())
    b[len(b) // 2] ^= 0xFF
    open(f, "wb").write(bytes(b))


def _truncate_all_data(step_dir):
    for f in _files(step_dir):
        if f"{os.sep}d{os.sep}" in f:
            open(f, "r+b").truncate(os.path.getsize(f) // 2)


CORRUPTIONS = {
    "flipped bytes": (_flip_biggest, "checksum mismatch in 1 arrays \\(first: \\['opt'\\]\\['mu'\\]\\)"),
    "truncated": (_truncate_all_data, "unreadable"),
    "half deleted": (lambda d: shutil.rmtree(os.path.join(d, "state", "ocdbt.process_0")), "unreadable"),
    "record deleted": (lambda d: os.remove(os.path.join(d, "integrity", "metadata")), "unreadable"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_bad_latest_step_falls_back_to_newest_good(tmp_path, caplog, name):
    corrupt, why = CORRUPTIONS[name]
    d = str(tmp_path)
    _saved(d)
    corrupt(os.path.join(d, "3"))
    ck = Checkpointer(d, CheckpointConfig(max_to_keep=None))
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        state, data, step = ck.restore_latest(_state(0))
    assert step == 2 and data == {"step": 2}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = [r.getMessage() for r in caplog.records if r.name == "train.checkpoint"]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"checkpoint {os.path.join(d, '3')} is unusable")
    assert "resuming from step 2" in lines[0] and "\n" not in lines[0]
    assert re.search(why, lines[0]), lines[0]
    # Moved aside: the bytes stay, and the resumed run can save step 3 again.
    assert sorted(os.listdir(d)) == ["1", "2", "3.bad"]
    ck.save(3, _state(3), {"step": 3})
    ck.close()
    assert Checkpointer(d, CheckpointConfig()).restore_latest(_state(0))[2] == 3


def test_no_good_step_stops_with_one_line_and_moves_nothing(tmp_path):
    d = str(tmp_path)
    _saved(d, steps=(1, 2))
    for s in ("1", "2"):
        _flip_biggest(os.path.join(d, s))
    with pytest.raises(CheckpointError, match=r"no loadable checkpoint in .*\(2: checksum mismatch.*1: ") as e:
        Checkpointer(d, CheckpointConfig()).restore_latest(_state(0))
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(d)) == ["1", "2"]


def test_other_model_is_named_not_called_corrupt(tmp_path):
    d = str(tmp_path)
    _saved(d, steps=(1,))
    other = {**_state(0), "params": {"w": jnp.zeros((8, 8))}}
    with pytest.raises(CheckpointError, match=r"different state .*\['params'\]\['w'\]"):
        Checkpointer(d, CheckpointConfig()).restore_latest(other)
    assert os.listdir(d) == ["1"]


def test_digest_sees_every_bit_and_no_sharding(tmp_path):
    x = jax.random.normal(jax.random.key(0), (8, 6))
    base = state_integrity({"x": x})[1]["['x']"]
    assert state_integrity({"x": x.at[3, 2].set(jnp.nextafter(x[3, 2], 9.0))})[1]["['x']"] != base
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    assert state_integrity({"x": swapped})[1]["['x']"] != base
    mesh = jax.make_mesh((8,), ("d",))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    assert state_integrity({"x": sharded})[1]["['x']"] == base
    ck = Checkpointer(str(tmp_path), CheckpointConfig())
    with pytest.raises(NonFiniteStateError, match=r"not finite in 1 arrays \(first: \['b'\]\)"):
        ck.save(1, {"a": x, "b": x.at[1, 1].set(jnp.inf)}, {"step": 1})
    ck.close()
    assert ck.all_steps() == []


# --------------------------------------------------------------------------- the trainer
OVERRIDES = {
    "model.vocab_size": 64, "model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2,
    "data.seq_len": 32, "data.batch_size": 8, "data.eval_batch_size": 8,
    "data.options.vocab_size": 64, "data.options.num_kv_pairs": 4, "optim.warmup_steps": 0,
    "train.log_every": 3, "train.eval_every": 0, "train.eval_steps": 1,
    "train.progress_bar": False, "checkpoint.every_steps": 3,
}


def tiny(steps, **extra):
    c = load_config(os.path.join(ROOT, f"configs/mqar.py:steps={steps}"))
    c.update_from_flattened_dict({**OVERRIDES, **extra})
    return c


def test_unwritable_checkpoint_folder_fails_before_compiling(tmp_path):
    open(tmp_path / "checkpoints", "w").close()  # a file where the folder should be (root-proof)
    before = dict(trainer._COMPILED)
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*checkpoints is not writable"):
        train_and_evaluate(tiny(6), str(tmp_path))
    assert trainer._COMPILED == before


def test_update_that_writes_inf_on_a_save_step_is_not_saved(tmp_path, monkeypatch):
    """Loss and grad norm of step 6 are finite (computed before its update); the update is not."""
    make = trainer.make_optimizer

    def poisoned(*args, **kwargs):
        tx, schedule = make(*args, **kwargs)

        def update(g, s, p=None):
            u, inner = tx.update(g, s[0], p)
            n = s[1] + 1
            return jax.tree.map(lambda x: jnp.where(n == 6, jnp.inf, x), u), (inner, n)

        return optax.GradientTransformation(lambda p: (tx.init(p), jnp.zeros((), jnp.int32)), update), schedule

    monkeypatch.setattr(trainer, "make_optimizer", poisoned)
    monkeypatch.setattr(trainer, "_COMPILED", {})
    with pytest.raises(NonFiniteLossError, match=r"non-finite state after the update of step 6 .*"
                                                 r"Last good checkpoint: step 3") as e:
        train_and_evaluate(tiny(9), str(tmp_path))
    assert e.value.last_checkpoint == 3
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


# --------------------------------------------------------------------------- processes
_DRIVER = """
import os, shutil, sys, time
from train.data import MQARSource
mode, workdir = sys.argv[1], sys.argv[2]
original = MQARSource.batch
def batch(self, split, step, batch_size):
    if split == "train" and mode == "sigint":
        time.sleep(0.02)  # the run must still be going when the signal comes
        if step == 2:
            print("STEP", step, flush=True)
    if split == "train" and mode == "disk_gone" and step == 2:
        ckpt = os.path.join(workdir, "checkpoints")  # checked writable at start, gone now
        shutil.rmtree(ckpt)
        open(ckpt, "w").close()
    return original(self, split, step, batch_size)
MQARSource.batch = batch
from train.__main__ import main
sys.exit(main(sys.argv[3:]))
"""


def _launch(mode, workdir, steps):
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    return subprocess.Popen(
        [sys.executable, "-c", _DRIVER, mode, workdir, "--config",
         f"configs/mqar.py:steps={steps}", *flags, "--workdir", workdir],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_failed_save_says_one_line_and_exits_without_hanging(tmp_path):
    p = _launch("disk_gone", str(tmp_path), 6)
    try:
        out, err = p.communicate(timeout=240)
    finally:
        p.kill()
    assert p.returncode == 4, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("CHECKPOINT ERROR: checkpoint save at step 3 in ") and "failed" in last
    assert len(err.strip().splitlines()) < 10, err


def test_sigint_saves_the_current_step_and_resume_continues(tmp_path, caplog):
    workdir = str(tmp_path)
    p = _launch("sigint", workdir, 100000)
    try:
        line = p.stdout.readline()
        assert line.startswith("STEP"), (line, p.stderr.read()[-3000:] if p.poll() is not None else "")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=240)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGINT, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("STOPPED: interrupted by SIGINT after step ") and "Traceback" not in err, err
    step = int(last.split("after step ")[1].split(":")[0])
    assert step >= 2
    assert str(step) in os.listdir(os.path.join(workdir, "checkpoints"))
    with caplog.at_level(logging.INFO, logger="train"):
        result = train_and_evaluate(tiny(100000, **{"train.num_steps": step + 1}), workdir)
    assert result["step"] == step + 1
    assert any(f"at step {step}" in r.getMessage() for r in caplog.records), caplog.text
