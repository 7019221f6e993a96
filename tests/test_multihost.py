"""Multi-host training on one machine: two CPU processes, gloo collectives, a shared workdir.

Each process owns 2 of the mesh's 4 devices (the data axis spans both processes), so
every step all-reduces gradients across the processes. Leg 1 is ``python -m train`` in
both processes: 3 steps, a checkpoint per step. Leg 2 starts both processes again with
5 steps: they must resume from step 3, and the step-5 state must equal, bit for bit, an
uninterrupted run to step 5 -- which the same leg-2 processes run next, in a fresh
workdir, reusing the compiled steps (one launch fewer, about a third of the test's time).

The learning rate is constant (no warmup, ``min_lr_ratio=1``) so that a run of 3 steps
and a run of 5 follow the same schedule: stopping at 3 and extending to 5 is then the
same training as going to 5 at once.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/mqar.py")
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2
TIMEOUT_S = 240  # per leg; a hung collective is killed and reported, not waited out

OVERRIDES = {
    "model.vocab_size": 64, "model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2,
    "model.head_dim": 16,
    "data.seq_len": 32, "data.batch_size": 8, "data.eval_batch_size": 8,
    "data.options.vocab_size": 64, "data.options.num_kv_pairs": 4,
    "optim.warmup_steps": 0, "optim.min_lr_ratio": 1.0,
    "train.log_every": 1, "train.eval_steps": 1, "train.progress_bar": True,
    "checkpoint.every_steps": 1, "checkpoint.max_to_keep": 10,
}

# Leg 2's program: what ``python -m train`` does (initialize first, then train), for
# several workdirs in turn. argv: config spec, overrides (JSON), workdirs (JSON).
_DRIVER = """
import json, logging, sys
from train import distributed
distributed.initialize()
import jax
from ml_collections import ConfigDict
from train import train_and_evaluate
from train.config_args import load_config
logging.basicConfig(level=logging.WARNING)
logging.getLogger("train").setLevel(logging.INFO)
spec, overrides, workdirs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
for workdir in workdirs:
    config = load_config(spec)
    config.update_from_flattened_dict(overrides)
    metrics = train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        print("METRICS " + json.dumps({"workdir": workdir, **metrics}), flush=True)
"""


def _gloo_available() -> bool:
    from jax._src.lib import _jax

    return hasattr(_jax, "make_gloo_tcp_collectives")


pytestmark = pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(process_id: int, port: int) -> dict:
    # Drop anything that could steer jax.distributed elsewhere (a SLURM allocation the
    # tests run inside, the caller's JAX_* settings), then describe this 2-process job.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "XLA_"))}
    env.update({
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        "JAX_PLATFORMS": "cpu",
        distributed.ENV_COORDINATOR_ADDRESS: f"localhost:{port}",
        distributed.ENV_NUM_PROCESSES: str(NUM_PROCESSES),
        distributed.ENV_PROCESS_ID: str(process_id),
    })
    return env


def _run_job(cmd: list[str]) -> list[tuple[str, str]]:
    """Run ``cmd`` as every process of one job; all must exit 0. [(stdout, stderr)]."""
    port = _free_port()
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(i, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
             for i in range(NUM_PROCESSES)]
    outs, hung = [], False
    for p in procs:
        try:
            outs.append(p.communicate(timeout=TIMEOUT_S))
        except subprocess.TimeoutExpired:
            hung = True
            for q in procs:  # one stuck process leaves its peers waiting in a collective
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            outs.append(p.communicate())
    if hung or any(p.returncode != 0 for p in procs):
        report = "\n".join(f"--- process {i} exit {p.returncode}\n{err[-4000:]}"
                           for i, (p, (_, err)) in enumerate(zip(procs, outs)))
        pytest.fail(f"a training process failed or hung (limit {TIMEOUT_S} s):\n{report}")
    return outs


def _train_cli(workdir: str, steps: int) -> list[tuple[str, str]]:
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    return _run_job([sys.executable, "-m", "train", "--config", f"{CONFIG}:steps={steps}", *flags,
                     "--workdir", workdir])


def _train_driver(steps: int, workdirs: list[str]) -> list[tuple[str, str]]:
    return _run_job([sys.executable, "-c", _DRIVER, f"{CONFIG}:steps={steps}", json.dumps(OVERRIDES),
                     json.dumps(workdirs)])


def _cli_metrics(stdout: str) -> dict[str, str]:
    lines = stdout.split("final metrics:\n", 1)[1].splitlines()
    return dict(line.strip().split(": ", 1) for line in lines if line.startswith("  "))


def _driver_metrics(stdout: str) -> dict[str, dict]:
    rows = [json.loads(line[len("METRICS "):]) for line in stdout.splitlines() if line.startswith("METRICS ")]
    return {row.pop("workdir"): row for row in rows}


def _steps_saved(workdir: str) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _saved_state(workdir: str, step: int):
    """Checkpoint ``step``'s state on one device of this (single) process.

    The checkpoint records the 2-process mesh, so orbax needs a target here.
    """
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ck:
        meta = ck.metadata(path).item_metadata
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
        return ck.restore(path, target)


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    resumed, reference = str(tmp_path / "resumed"), str(tmp_path / "reference")

    first = _train_cli(resumed, 3)
    # Both processes joined, and wrote one checkpoint per step together.
    assert "distributed: process 0 of 2" in first[0][1] and "distributed: process 1 of 2" in first[1][1]
    assert _steps_saved(resumed) == [1, 2, 3]
    # Only process 0 reports: metrics on stdout, the progress bar, tensorboard events.
    assert "final metrics:" in first[0][0] and "final metrics:" not in first[1][0]
    assert "train: " in first[0][1] and "train: " not in first[1][1]
    assert len(os.listdir(os.path.join(resumed, "tb"))) == 1
    assert _cli_metrics(first[0][0])["step"] == "3"

    second = _train_driver(5, [resumed, reference])
    for _, err in second:  # both processes restored step 3 (and only there), neither started over
        assert err.count("resumed from") == 1 and f"resumed from {resumed}" in err, err[-2000:]
        assert "at step 3" in err
    assert _steps_saved(resumed) == [1, 2, 3, 4, 5]
    metrics = _driver_metrics(second[0][0])
    assert _driver_metrics(second[1][0]) == {}
    got, want = metrics[resumed], metrics[reference]
    assert got["step"] == want["step"] == 5
    for key in ("train/loss", "eval/loss", "eval/accuracy"):
        assert got[key] == want[key], key
    a, b = _saved_state(resumed, 5), _saved_state(reference, 5)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert int(a["step"]) == 5
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- the config
def test_config_section_and_environment(monkeypatch):
    # As if on a plain machine, even where the tests themselves run in a SLURM job or on a TPU VM.
    for name in [n for n in os.environ if n.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                       "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "SLURM_"))]:
        monkeypatch.delenv(name)
    from jax._src import cloud_tpu_init

    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)
    with pytest.raises(ValueError, match=r"distributed\.coordinator"):
        distributed.DistributedConfig.from_dict({"coordinator": "h:1"})
    with pytest.raises(ValueError, match=r"process_id=2 must be below distributed.num_processes=2"):
        distributed.DistributedConfig(num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="has no port"):
        distributed.DistributedConfig(coordinator_address="localhost")
    # The config wins over the environment, which fills only what the config leaves unset.
    env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
           "JAX_LOCAL_DEVICE_IDS": "0,1"}
    got = distributed.with_environment(distributed.DistributedConfig(process_id=1), env)
    assert (got.coordinator_address, got.num_processes, got.process_id, got.local_device_ids) == \
        ("h:9", 4, 1, (0, 1))
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        distributed.with_environment(distributed.DistributedConfig(), {"JAX_NUM_PROCESSES": "two"})
    # A single-task SLURM step is one process: no auto-initialisation there.
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert distributed.detect_cluster(slurm) is None
    assert distributed.detect_cluster({**slurm, "SLURM_NTASKS": "8"}) == "slurm"
    # Partial setups off a cluster fail before JAX is touched, naming what is missing.
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    with pytest.raises(ValueError, match=r"distributed\.coordinator_address \(or JAX_COORDINATOR_ADDRESS\)"):
        distributed.initialize()
    monkeypatch.delenv(distributed.ENV_NUM_PROCESSES)
    assert distributed.initialize() is False  # single process: a no-op, and again
    assert distributed.initialize(distributed.DistributedConfig()) is False
    from train import trainer
    from train.config_args import load_config

    c = load_config(os.path.join(ROOT, "configs/mqar.py"))
    c.distributed = {"num_processes": 2}
    assert trainer.parse_config(c).distributed.num_processes == 2
    c.distributed = {"procs": 2}
    with pytest.raises(ValueError, match=r"distributed\.procs"):
        trainer.parse_config(c)
