"""``train_and_evaluate(config, workdir)``: the sharded training loop.

What one call does, in order:
  1. validate every config section into its dataclass (before anything compiles);
  2. build the data source (file errors surface here), the mesh and the optimizer;
     (the workdir and checkpoint folder are proven writable before anything compiles);
  3. create the train state already sharded (``jit(init, out_shardings=...)``): step,
     params, opt_state and, for models that have it, the non-gradient model state
     (``STATE_COLLECTIONS``: the MoE balance bias, replicated, updated by each train
     step, read by eval, checkpointed and digested with the rest); or start from the
     parameters of ``model.init_from`` (a pretrained or converted checkpoint; the model
     section is then its config); ``config.peft`` adapters (``train/peft.py``) are attached
     here; or restore the newest checkpoint in ``workdir/checkpoints`` that passes its
     checksum (``train/checkpoint.py``; damaged steps are moved aside, named in one line);
  4. loop: batch = source(seed, step) -> jitted, donated train step (with
     ``train.distill_from``, the frozen teacher's logits enter the loss,
     ``train/distill.py``; with ``optim.trainable`` / peft, frozen parameters get no
     gradient); metrics are pulled
     to the host every ``log_every`` steps (and before every save), checked for
     non-finite values, written to tensorboard (MoE load statistics as ``moe/*``) and
     the progress bar; a save refuses a
     state with NaN/inf in it, so the newest checkpoint is always one to continue from;
     SIGINT / SIGTERM finish the current step, save it and raise ``TrainingInterrupted``;
  5. evaluate every ``eval_every`` steps and at the end; return the final metrics.

Example:
  >>> from train.trainer import train_and_evaluate                    # doctest: +SKIP
  >>> import importlib.util                                            # doctest: +SKIP
  >>> spec = importlib.util.spec_from_file_location("c", "configs/mqar.py")  # doctest: +SKIP
  >>> mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)  # doctest: +SKIP
  >>> train_and_evaluate(mod.get_config("steps=50"), "/tmp/mqar")["eval/accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from attn.errors import UserError
from train import context_parallel as cpl
from train import sharding as shd
from train import tasks
from train.checkpoint import (CheckpointConfig, Checkpointer, NonFiniteStateError,
                              all_processes_agree, check_writable)
from train.config_args import check_impl_names, dataclass_from_dict
from train.data import DataConfig, DataSource, make_source
from train import peft
from train.distill import build_teacher, kl_sums
from train.distributed import DistributedConfig
from train.metrics import ScalarWriter, moe_scalars, summarize_eval, weighted_sums
from train.optim import OptimConfig, make_optimizer
from train.optim import param_path as optim_param_path
from train.peft import PeftConfig

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN/inf loss, gradient norm or state; the bad state was not saved.

    Attributes: step (1-based update number), metrics (that step's values),
    last_checkpoint (step of the last good checkpoint, or None).
    """

    def __init__(self, message: str, *, step: int, metrics: dict, last_checkpoint: int | None):
        super().__init__(message)
        self.step, self.metrics, self.last_checkpoint = step, metrics, last_checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped training after a step; that step was saved (if enabled).

    A ``KeyboardInterrupt`` so that code which handles Ctrl-C keeps doing so.
    Attributes: step (updates applied), checkpoint (step saved, or None), signum.
    """

    def __init__(self, message: str, *, step: int, checkpoint: int | None, signum: int):
        super().__init__(message)
        self.step, self.checkpoint, self.signum = step, checkpoint, signum

    def __str__(self) -> str:
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The ``config.train`` section.

    Attributes:
      num_steps: optimizer updates in total (a resumed run continues to this).
      log_every: pull metrics to the host, check them, write tensorboard every N steps.
      eval_every: evaluate every N steps (0 = only at the end).
      eval_steps: eval batches per evaluation (the same batches every time).
      seed: parameter-initialisation seed (the data seed is ``data.seed``).
      aux_loss_weight: weight on the sum of everything layers sow into "aux_loss"
        (for example MoH load balancing); 0.01 is the usual load-balance weight.
      progress_bar: show a tqdm bar (process 0 only).
      distill_from: None, or a checkpoint (``models.pretrained`` name or path) whose
        next-token distributions the model learns as well (``train/distill.py``).
      distill_weight: the KL term's share of the loss (the rest is cross-entropy).
      distill_temperature: τ of both softmaxes in the KL term.
    """

    num_steps: int = 1000
    log_every: int = 50
    eval_every: int = 0
    eval_steps: int = 10
    seed: int = 0
    aux_loss_weight: float = 0.01
    progress_bar: bool = True
    distill_from: str | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 1.0

    def __post_init__(self):
        for name in ("num_steps", "log_every", "eval_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.eval_every < 0:
            raise UserError(f"train.eval_every must be >= 0, got {self.eval_every!r}")
        if self.distill_from == "":
            object.__setattr__(self, "distill_from", None)  # "" from a command line = off
        if not 0.0 <= self.distill_weight <= 1.0:
            raise UserError(f"train.distill_weight must be in [0, 1], got {self.distill_weight!r}")
        if not self.distill_temperature > 0:
            raise UserError(f"train.distill_temperature must be > 0, got {self.distill_temperature!r}")

    @classmethod
    def from_dict(cls, d: Any) -> "TrainConfig":
        return dataclass_from_dict(cls, d, "train")


# ----------------------------------------------------------------- model boundary
# Non-gradient model state carried in the train state next to "params", when the model
# creates it at init: the MoE balance bias (models/ffn/moe.py), updated by every train
# forward (the collection is mutable there), read but not changed by eval, checkpointed
# with the rest. A model without it has no such key in its state.
STATE_COLLECTIONS = ("moe_state",)
# Sown per step and logged: "aux_loss" enters the loss, "moe_stats" become moe/* scalars.
_SOWN = ("aux_loss", "moe_stats")


# The only code that knows the model's interface: the task named by ``config.task``
# (train/tasks.py) builds the model, feeds it a batch and says what the loss sees.
def _forward(task: tasks.Task, model: nn.Module, variables: dict, batch: dict, *, train: bool):
    """(logits [B, T, V] float32, targets [B, T], weights [B, T], summed aux loss, collections).

    ``variables``: "params" and any ``STATE_COLLECTIONS`` the model has. ``train``: those
    state collections are mutable (their new values come back in ``collections``).
    """
    args, kwargs = task.model_inputs(batch)
    mutable = list(_SOWN) + (list(STATE_COLLECTIONS) if train else [])
    out, new_vars = model.apply(variables, *args, **kwargs, mutable=mutable)
    logits, targets, weights = task.outputs(out, batch)
    aux_leaves = jax.tree.leaves(new_vars.get("aux_loss", {}))
    aux = sum((jnp.sum(x.astype(jnp.float32)) for x in aux_leaves), jnp.zeros((), jnp.float32))
    return logits, targets, weights, aux, new_vars


def model_variables(state: dict) -> dict:
    """The variables ``model.apply`` takes, out of a train state: params and model state."""
    return {k: state[k] for k in ("params", *STATE_COLLECTIONS) if k in state}


# ----------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class Experiment:
    """All validated sections of one run."""

    model: Any
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    mesh: shd.MeshConfig
    checkpoint: CheckpointConfig
    task: str = "lm"
    # The headline eval metric ("accuracy", "loss", "bits_per_byte", ...): the command
    # line prints it last as FINAL EVAL <METRIC>. None = bits per token unit for byte
    # data, else accuracy (resolved against the data source in ``validate``).
    metric: str | None = None
    # Read by train/__main__.py before JAX starts (jax.distributed.initialize); kept here
    # so the section is validated with the rest and recorded in config.json.
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    context_parallel: cpl.ContextParallelConfig = dataclasses.field(
        default_factory=cpl.ContextParallelConfig)
    # model.init_from: the checkpoint (a models.pretrained name or path) whose parameters
    # a fresh run starts from; the model section is then that checkpoint's config.
    init_from: str | None = None
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)


def _plain(x: Any) -> Any:
    """ConfigDict / FrozenConfigDict -> nested plain dicts."""
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


# Top-level keys that are values, not sections.
_TOP_LEVEL_VALUES = ("task", "metric")
# Written into the workdir: the config as given; train/restore.py rebuilds a run from it.
RUN_CONFIG = "run_config.json"


def parse_config(config: Any) -> Experiment:
    """Validate a config (ConfigDict or dict) into an ``Experiment``; errors name the key.

    Raises ``attn.errors.UserError`` for every bad key or value (``validate`` also checks
    what needs the data source and the devices).

    Example:
      >>> parse_config({"model": {}, "bogus": {}})
      Traceback (most recent call last):
      ...
      attn.errors.UserError: unknown config section 'bogus'; known sections: ['checkpoint', 'context_parallel', 'data', 'distributed', 'mesh', 'model', 'optim', 'peft', 'train'] (and values ['metric', 'task'])
    """
    try:
        return _parse_config(config)
    except UserError:
        raise
    except (ValueError, TypeError) as e:
        # The sections' own checks (dataclass __post_init__ in train/, models/) raise
        # ValueError or, for a missing required key, TypeError: all caused by the config.
        raise UserError(_one_line(e)) from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _parse_config(config: Any) -> Experiment:
    config = _plain(config)
    task = tasks.get(config.get("task", "lm"))  # ValueError names config.task
    sections: dict[str, Callable[[Any], Any]] = {
        "model": task.config_from_dict,
        "data": DataConfig.from_dict,
        "optim": OptimConfig.from_dict,
        "train": TrainConfig.from_dict,
        "mesh": shd.MeshConfig.from_dict,
        "checkpoint": CheckpointConfig.from_dict,
        "distributed": DistributedConfig.from_dict,
        "context_parallel": cpl.ContextParallelConfig.from_dict,
        "peft": PeftConfig.from_dict,
    }
    unknown = sorted(set(config) - set(sections) - set(_TOP_LEVEL_VALUES))
    if unknown:
        raise UserError(f"unknown config section {unknown[0]!r}; known sections: {sorted(sections)} "
                        f"(and values {sorted(_TOP_LEVEL_VALUES)})")
    if "model" not in config:
        raise UserError("config has no 'model' section")
    metric = config.get("metric")
    if metric is not None and not (isinstance(metric, str) and metric):
        raise UserError(f"config metric={metric!r}: expected an eval metric name such as 'accuracy'")
    model_dict = dict(_plain(config["model"]))
    init_from = model_dict.pop("init_from", None) or None
    if init_from is not None:
        if task.pretrained_config is None:
            raise UserError(f"model.init_from: config.task={task.name!r} cannot start from a checkpoint")
        # The checkpoint's own config, with the run-time fields the section changes.
        sections["model"] = lambda d: task.pretrained_config(str(init_from), d)
    parsed = {}
    for name, build in sections.items():
        try:
            parsed[name] = build(model_dict if name == "model" else _plain(config.get(name, {})))
        except TypeError as e:  # a required key missing (e.g. model.vocab_size)
            raise UserError(f"config section {name}: {_one_line(e)}") from e
    exp = Experiment(task=task.name, metric=metric, init_from=init_from, **parsed)
    # Attention impl names are checked with the config, so that a typo fails in one
    # line before anything compiles rather than at trace time inside the first step.
    for section in ("model", "context_parallel"):
        check_impl_names(getattr(exp, section), section)
    return exp


def validate(config: Any) -> tuple[Experiment, DataSource]:
    """Everything about a config that can be checked before compiling; ``UserError`` if not.

    Parses every section (``parse_config``), opens the data source (file errors, token
    ids out of range), checks the sections against each other and the mesh against the
    devices (a mesh larger than the machine, a batch that does not split over it) and
    resolves the headline ``metric``. The checks of the other modules raise
    ``ValueError`` / ``FileNotFoundError``; here, at the config boundary, those are the
    user's errors and become ``UserError`` (the original stays as ``__cause__``).

    Returns:
      (the validated experiment with ``metric`` resolved, the opened data source).
    """
    exp = parse_config(config)
    try:
        source = make_source(exp.data)
        _check_compatible(exp, source)
        mesh = shd.make_mesh(exp.mesh)
        batch_sharding = shd.batch_sharding(mesh, exp.mesh.logical_rules)
        _context_parallel(exp, tasks.get(exp.task), mesh)  # its checks only (zigzag, seq_len)
        _check_batch_divisible("batch_size", exp.data.batch_size, batch_sharding)
        _check_batch_divisible("eval_batch_size", exp.data.eval_batch_size or exp.data.batch_size,
                               batch_sharding)
    except UserError:
        raise
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise UserError(_one_line(e)) from e
    available = ["loss", "accuracy"] + ([f"bits_per_{source.token_unit}"] if source.token_unit else [])
    # Default headline: bits per token unit for byte-level data, else accuracy.
    metric = exp.metric or (available[-1] if source.token_unit else "accuracy")
    if metric not in available:
        raise UserError(f"config metric={metric!r} is not reported for data.source="
                        f"{exp.data.source!r}; available: {available}")
    return dataclasses.replace(exp, metric=metric), source


def _check_compatible(exp: Experiment, source: DataSource) -> None:
    """Cross-section checks that no single dataclass can make (the task knows them)."""
    tasks.get(exp.task).check_compatible(exp.model, source)


# ----------------------------------------------------------------- compiled functions
@dataclasses.dataclass
class _Compiled:
    mesh: Any
    rules: tuple
    state_shardings: Any
    param_shardings: Any
    batch_sharding: NamedSharding
    abstract_state: Any
    init: Callable
    # (rng, params) -> a fresh state around given parameters (model.init_from).
    init_with_params: Callable
    # (state, batch[, teacher params]) -> (state, metrics)
    train_step: Callable
    eval_step: Callable
    # Host-side batch preparation: the zigzag reorder under context parallelism.
    prepare: Callable[[dict], dict] = lambda batch: batch
    teacher: Any = None  # train.distill.Teacher when train.distill_from is set
    # The model's own parameters (no peft adapters): what model.init_from must match.
    model_abstract_params: Any = None
    model_param_shardings: Any = None
    trainable: Any = None  # Python-bool tree like the state's params


def _compile_key(exp: Experiment) -> str:
    # repr() of frozen dataclasses: stable and covers every field that enters a trace.
    return repr((exp.task, exp.model, exp.optim, exp.train.num_steps, exp.train.aux_loss_weight,
                 exp.train.distill_from, exp.train.distill_weight, exp.train.distill_temperature, exp.peft,
                 exp.mesh, exp.context_parallel, exp.data.seq_len, exp.data.batch_size, exp.data.eval_batch_size,
                 tuple(jax.devices())))


_COMPILED: dict[str, "_Compiled"] = {}
_COMPILED_MAX = 4


def _compiled_for(exp: Experiment) -> _Compiled:
    """The sharded init / train / eval functions for ``exp``, cached per configuration.

    Why cache: several runs in one process (tests, notebooks, sweeps over seeds) reuse
    the same compiled executables instead of re-tracing identical programs. (The
    configs hold dicts, so they are keyed by repr rather than hashed.)
    """
    key = _compile_key(exp)
    if key not in _COMPILED:
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = _build_compiled(exp)
    return _COMPILED[key]


def _build_compiled(exp: Experiment) -> _Compiled:
    """Mesh, shardings and the jitted init / train / eval functions."""
    mesh = shd.make_mesh(exp.mesh)
    rules = exp.mesh.logical_rules
    task = tasks.get(exp.task)
    model = task.build_model(exp.model)
    B = exp.data.batch_size
    batch_sharding = shd.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, P())

    def init_variables(rng):
        args, kwargs = task.model_inputs(task.example_batch(exp.model, exp.data, B))
        v = model.init(rng, *args, **kwargs)
        return {k: v[k] for k in ("params", *STATE_COLLECTIONS) if jax.tree.leaves(v.get(k, {}))}

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed_vars = jax.eval_shape(init_variables, jax.random.key(0))
    boxed = boxed_vars["params"]
    carried = tuple(k for k in STATE_COLLECTIONS if k in boxed_vars)  # () without MoE
    param_axes = nn.get_partition_spec(boxed)
    # config.peft: targeted kernels become {"base", adapter factors} nodes in the state,
    # merged back into plain kernels before every apply (train/peft.py).
    attach = (lambda p, rng: p) if exp.peft.method is None else (
        lambda p, rng: peft.attach(p, exp.peft, rng, param_axes))
    merge = functools.partial(peft.merge, cfg=exp.peft)
    try:
        state_params = jax.eval_shape(attach, nn.meta.unbox(boxed), jax.random.key(0))
        # optim.trainable / peft: frozen parameters are cut out of the gradient
        # (stop_gradient), so XLA never computes their weight gradients; the optimizer
        # leaves them as they are (no state, no decay).
        trainable = peft.trainable_mask(state_params, exp.peft, exp.optim.trainable)
    except ValueError as e:
        raise UserError(_one_line(e)) from e
    frozen_any = not all(jax.tree.leaves(trainable))
    freeze = (lambda p: p) if not frozen_any else (
        lambda p: jax.tree.map(lambda x, t: x if t else jax.lax.stop_gradient(x), p, trainable))
    # Logical names per parameter: the optimizer may use them (Muon's fan-in axes).
    tx, schedule = make_optimizer(exp.optim, exp.train.num_steps, param_axes,
                                  trainable=(lambda p: trainable) if frozen_any else None)

    def init_state(rng, params=None):
        v = nn.meta.unbox(init_variables(rng))
        params = attach(v["params"] if params is None else params, jax.random.fold_in(rng, 1))
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        state.update({k: v[k] for k in carried})
        return state

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract_state = jax.eval_shape(init_state, jax.random.key(0))
    model_param_shardings = shd.logical_shardings(boxed, mesh, rules)
    param_shardings = (model_param_shardings if exp.peft.method is None else
                       peft.shardings(model_param_shardings, state_params, replicated))
    state_shardings = {
        "step": replicated,
        "params": param_shardings,
        "opt_state": shd.shardings_like_params(abstract_state["opt_state"], abstract_state["params"],
                                               param_shardings, mesh),
        # Small per-layer vectors (the MoE bias [E]): replicated, as routing reads them whole.
        **{k: jax.tree.map(lambda _: replicated, abstract_state[k]) for k in carried},
    }
    variable_shardings = model_variables(state_shardings)
    aux_weight = exp.train.aux_loss_weight
    routed, prepare = _context_parallel(exp, task, mesh)
    teacher = build_teacher(exp, task, mesh, rules)
    kd_weight = exp.train.distill_weight if teacher is not None else 0.0

    def train_step(state, batch, teacher_params=None):
        model_state = {k: state[k] for k in carried}
        if teacher is not None:
            with routed():
                teacher_BTV = teacher.logits(teacher_params, batch)

        def loss_fn(params):
            with routed():
                logits_BTV, targets_BT, weights_BT, aux, new_vars = _forward(
                    task, model, {"params": merge(freeze(params)), **model_state}, batch, train=True)
            sums = weighted_sums(logits_BTV, targets_BT, weights_BT)
            ce = sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0)
            reg = aux_weight * aux + peft.penalty(params, exp.peft)  # peft: LoFiT's L1
            if teacher is None:
                return ce + reg, (ce, aux, sums, new_vars)
            kl = kl_sums(logits_BTV, teacher_BTV, weights_BT, exp.train.distill_temperature)["kl_sum"]
            sums = {**sums, "kl": kl / jnp.maximum(sums["weight_sum"], 1.0)}
            loss = kd_weight * sums["kl"] + (1 - kd_weight) * ce + reg
            return loss, (ce, aux, sums, new_vars)

        (loss, (ce, aux, sums, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": loss,
            "ce": ce,
            "aux_loss": aux,
            "accuracy": sums["correct_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
            **({"kl": sums["kl"]} if teacher is not None else {}),
            **moe_scalars(new_vars.get("moe_stats", {})),
        }
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        # The state after this step's forward: the bias moved by this batch's loads.
        new_state.update({k: new_vars[k] for k in carried})
        return new_state, metrics

    def eval_step(variables, batch):
        variables = {**variables, "params": merge(variables["params"])}
        with routed():
            logits_BTV, targets_BT, weights_BT, _, _ = _forward(task, model, variables, batch, train=False)
        return weighted_sums(logits_BTV, targets_BT, weights_BT)

    return _Compiled(
        mesh=mesh,
        rules=rules,
        state_shardings=state_shardings,
        param_shardings=param_shardings,
        batch_sharding=batch_sharding,
        abstract_state=jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings),
        init=jax.jit(init_state, out_shardings=state_shardings),
        init_with_params=jax.jit(init_state, in_shardings=(None, model_param_shardings),
                                 out_shardings=state_shardings, donate_argnums=1),
        # Batches arrive already placed by put_batch, whose spec follows each array's
        # rank (labels [B], images [B, H, W, C]); None keeps those placements.
        # With a teacher its parameters are a third argument (placed once, never donated).
        train_step=jax.jit(train_step, in_shardings=(state_shardings, None) + (
                               () if teacher is None else (teacher.shardings,)),
                           out_shardings=(state_shardings, replicated), donate_argnums=0),
        eval_step=jax.jit(eval_step, in_shardings=(variable_shardings, None),
                          out_shardings=replicated),
        prepare=prepare,
        teacher=teacher,
        model_abstract_params=jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
            nn.meta.unbox(boxed), model_param_shardings),
        model_param_shardings=model_param_shardings,
        trainable=trainable,
    )


def _context_parallel(exp: Experiment, task: tasks.Task, mesh):
    """(context manager routing attention, host batch reorder) for this run.

    With mesh context == 1 both are no-ops. Otherwise attention goes through
    ``exp.context_parallel.strategy``; zigzag (causal load balance) is on when the
    config asks for it or, by default, whenever the task allows it.
    """
    cp_cfg = exp.context_parallel
    cp = cpl.mesh_axis_size(mesh, cpl.CONTEXT_AXIS)
    if cp == 1:
        return contextlib.nullcontext, lambda batch: batch
    refusal = task.zigzag_refusal(exp.model)
    if cp_cfg.zigzag and refusal:
        raise UserError(f"context_parallel.zigzag=True is not possible for this model: {refusal}")
    zigzag = refusal is None and cp_cfg.zigzag is not False
    if zigzag:
        chunks = cpl.STRATEGIES[cp_cfg.strategy].zigzag_chunks(cp, cp_cfg.ulysses_degree)
        perm = cpl.zigzag_permutation(exp.data.seq_len, chunks)
        prepare = functools.partial(cpl.permute_batch, perm=perm)
    else:
        if exp.data.seq_len % cp:
            raise UserError(f"data.seq_len={exp.data.seq_len} must divide by the context degree "
                             f"mesh.shape[2]={cp}")
        prepare = lambda batch: batch  # noqa: E731
    return (lambda: cpl.activate(cp_cfg, mesh, zigzag=zigzag)), prepare


# ----------------------------------------------------------------- the loop
def _check_batch_divisible(name: str, size: int, sharding: NamedSharding) -> None:
    n = shd.batch_shard_count(sharding)
    if size % n:
        raise UserError(f"data.{name}={size} must be divisible by the {n} batch shards of the mesh "
                         f"(mesh.shape data x fsdp)")


def _evaluate(c: _Compiled, state: dict, source: DataSource, exp: Experiment) -> dict[str, float]:
    """Mean loss / accuracy over the fixed eval batches 0..eval_steps-1 (state unchanged)."""
    B = exp.data.eval_batch_size or exp.data.batch_size
    totals = {"loss_sum": 0.0, "correct_sum": 0.0, "weight_sum": 0.0}
    variables = model_variables(state)
    for i in range(exp.train.eval_steps):
        sums = c.eval_step(variables, shd.put_batch(c.prepare(source.batch("eval", i, B)), c.batch_sharding))
        for k, v in jax.device_get(sums).items():
            totals[k] += float(v)  # float64 on the host: no drift over many batches
    return summarize_eval(totals, source.token_unit)


def _progress(exp: Experiment, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=exp.train.num_steps, initial=start, desc="train", dynamic_ncols=True,
                disable=not exp.train.progress_bar or jax.process_index() != 0)


def _say(bar, msg: str) -> None:
    """Print above the progress bar (or log when there is none)."""
    if jax.process_index() != 0:
        return
    if bar is not None and not bar.disable:
        bar.write(msg)
    else:
        log.info(msg)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Train the configured model, evaluating and checkpointing into ``workdir``.

    Args:
      config: an ml_collections ConfigDict (or dict) with sections model, data, optim,
        train, mesh, checkpoint (see ``configs/mqar.py``).
      workdir: checkpoints go to ``workdir/checkpoints``, tensorboard events to
        ``workdir/tb``; an existing checkpoint there is resumed.

    Returns:
      Final metrics: step, train/loss, eval/loss, eval/accuracy (and eval/bits_per_byte
      for byte-level data), tokens_per_s, wall_time_s, and ``metric``: the key of the
      headline one (``"eval/accuracy"``, ``"eval/bits_per_byte"``, ...).

    Raises:
      attn.errors.UserError: a config key or value, the data or the mesh is invalid
        (before anything compiles; a ValueError, so ``except ValueError`` still works).
      NonFiniteLossError: the loss, gradient norm or saved state became NaN/inf.
      train.checkpoint.CheckpointError: the workdir cannot be written, a save failed, or
        checkpoints exist but none is loadable (one line each).
      TrainingInterrupted: SIGINT / SIGTERM; the current step was saved first.
    """
    t_start = time.time()
    exp, source = validate(config)
    # Before compiling: a folder that cannot be written must not cost a run up to its
    # first save (CheckpointError, one line).
    ckpt_dir = os.path.join(workdir, "checkpoints")
    check_writable(workdir, "workdir")
    if exp.checkpoint.enabled:
        check_writable(ckpt_dir, "checkpoint directory")
    c = _compiled_for(exp)

    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(exp), f, indent=2, default=str)
        # The config as given (overrides included), from which restore_trained rebuilds
        # the run; config.json above is the validated, resolved record.
        with open(os.path.join(workdir, RUN_CONFIG), "w") as f:
            json.dump(_plain(config), f, indent=2, default=str)
    ckpt = Checkpointer(ckpt_dir, exp.checkpoint)
    writer = ScalarWriter(os.path.join(workdir, "tb"))
    bar = None
    try:
        with jax.set_mesh(c.mesh), nn.logical_axis_rules(c.rules):
            state, start = _init_or_restore(c, ckpt, exp)
            bar = _progress(exp, start)
            if exp.init_from is not None or exp.optim.trainable is not None or exp.peft.method:
                _say(bar, _parameter_summary(state["params"], c.trainable, exp))
            with _StopOnSignal() as stop:
                state, last = _train_loop(c, exp, source, state, start, ckpt, writer, bar, stop)
            # Per-layer moe/<name>/<layer> scalars go to tensorboard only.
            result = {"step": exp.train.num_steps, **{k: v for k, v in last.items() if k.count("/") == 1}}
            result.update(_evaluate(c, state, source, exp))
        writer.write(exp.train.num_steps, {k: v for k, v in result.items() if k.startswith("eval/")})
        result["wall_time_s"] = time.time() - t_start
        result["metric"] = f"eval/{exp.metric}"  # the headline; the command line prints it last
        summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.items()) if k.startswith("eval/"))
        _say(bar, f"final eval at step {exp.train.num_steps}: {summary}")
        return result
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()  # waits for an in-flight async save: the last good one stays complete
        writer.close()


def _init_or_restore(c: _Compiled, ckpt: Checkpointer, exp: Experiment):
    """A freshly initialised sharded state, or the newest good checkpoint's; and its step."""
    restored = ckpt.restore_latest(c.abstract_state)
    if restored is None and exp.init_from is not None:
        params = _pretrained_params(c, exp)
        return c.init_with_params(jax.random.key(exp.train.seed), params), 0
    if restored is None:
        state = c.init(jax.random.key(exp.train.seed))
        return state, 0
    state, data_state, _ = restored
    if (data_state.get("seed"), data_state.get("source")) != (exp.data.seed, exp.data.source):
        log.warning("resuming with data seed/source %s, checkpoint has %s: batches will differ "
                    "from the original run", (exp.data.seed, exp.data.source),
                    (data_state.get("seed"), data_state.get("source")))
    step = int(data_state["step"])
    log.info("resumed from %s at step %d", ckpt.directory, step)
    return state, step


def _parameter_summary(params, mask, exp: Experiment) -> str:
    """One line: where the parameters come from and how many are trained."""
    sizes = [int(x.size) for x in jax.tree.leaves(params)]
    n = sum(s for s, t in zip(sizes, jax.tree.leaves(mask)) if t)
    start = f"from {exp.init_from}" if exp.init_from else "from scratch"
    how = [f"optim.trainable={exp.optim.trainable!r}"] if exp.optim.trainable else []
    how += [f"peft {exp.peft.method} on {exp.peft.targets!r}"] if exp.peft.method else []
    return f"parameters {start}: training {n:,} of {sum(sizes):,}" + (f" ({'; '.join(how)})" if how else "")


def _pretrained_params(c: _Compiled, exp: Experiment):
    """``model.init_from``'s parameters, checked against the model's and placed as the state's."""
    params = tasks.get(exp.task).pretrained_params(exp.init_from, exp.model)
    return checked_params(params, c.model_abstract_params, c.model_param_shardings,
                          f"model.init_from={exp.init_from!r}")


def checked_params(params, want, shardings, what: str):
    """``params`` cast to ``want``'s dtypes and placed by ``shardings``; ``UserError`` naming
    the first parameter that is missing, extra or of another shape."""
    got_paths = {optim_param_path(p): a for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, w in jax.tree_util.tree_flatten_with_path(want)[0]:
        key = optim_param_path(path)
        if key not in got_paths:
            raise UserError(f"{what} has no parameter {key}")
        if tuple(got_paths[key].shape) != tuple(w.shape):
            raise UserError(f"{what}: {key} has shape {tuple(got_paths[key].shape)}, "
                            f"the model needs {tuple(w.shape)}")
    if len(got_paths) != len(jax.tree.leaves(want)):
        raise UserError(f"{what} has parameters the model does not")
    params = jax.tree.map(lambda a, w: jnp.asarray(a, w.dtype), params, want)
    return jax.device_put(params, shardings)


class _StopOnSignal:
    """SIGINT / SIGTERM ask the loop to stop after the current step.

    Between steps the state is consistent, so that is where a save can happen; the
    handler only records the signal. It then puts the previous handlers back, so a
    second Ctrl-C interrupts at once (the last complete checkpoint stays). Signal
    handlers exist only in the main thread; elsewhere this is a no-op.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    def requested(self, sync_point: bool) -> bool:
        """Stop now? Checked after every step; with several processes only at sync points,
        where all of them agree (one process saving alone would hang the others)."""
        if jax.process_count() == 1:
            return self.signum is not None
        return sync_point and not all_processes_agree(self.signum is None)


def _train_loop(c, exp, source, state, start, ckpt, writer, bar, stop: _StopOnSignal):
    """Steps ``start..num_steps``; returns (state, last logged train metrics)."""
    tcfg, B, T = exp.train, exp.data.batch_size, exp.data.seq_len
    # Loaded here, once, and never saved: the run's checkpoints hold only the student.
    teacher_args = () if c.teacher is None else (c.teacher.load(tasks.get(exp.task)),)
    pending: list[tuple[int, dict]] = []  # device metrics not yet pulled to the host
    last: dict[str, float] = {}
    t_last, steps_since = time.time(), 0

    for step in range(start, tcfg.num_steps):
        batch = shd.put_batch(c.prepare(source.batch("train", step, B)), c.batch_sharding)
        state, metrics = c.train_step(state, batch, *teacher_args)
        done = step + 1  # updates applied so far
        pending.append((done, metrics))
        steps_since += 1
        bar.update(1)
        is_last = done == tcfg.num_steps
        save_now = exp.checkpoint.enabled and (done % exp.checkpoint.every_steps == 0 or is_last)
        eval_now = tcfg.eval_every and done % tcfg.eval_every == 0 and not is_last
        sync_point = done % tcfg.log_every == 0 or is_last or save_now or eval_now
        interrupted = stop.requested(sync_point)
        if not (sync_point or interrupted):
            continue
        # Pulling metrics syncs with the device, so it happens only every log_every
        # steps -- and always before a save, so a non-finite loss is never written.
        host = jax.device_get(pending)
        pending.clear()
        for s, m in host:
            m = {k: float(v) for k, v in m.items()}
            if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                _stop_non_finite(s, m, ckpt, bar)
        tokens_per_s = steps_since * B * T / max(time.time() - t_last, 1e-9)
        # Namespaced metrics (moe/max_load, ...) keep their name; the rest are train/*.
        last = {(k if "/" in k else f"train/{k}"): v for k, v in m.items()}
        last["train/tokens_per_s"] = tokens_per_s
        writer.write(done, last)
        bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        if eval_now and not interrupted:
            ev = _evaluate(c, state, source, exp)
            writer.write(done, ev)
            _say(bar, f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()))
        if save_now or (interrupted and exp.checkpoint.enabled):
            try:
                # The update of this very step can still have written inf into the
                # parameters (loss and grad norm are computed before it): save checks.
                ckpt.save(done, state, {"step": done, "seed": exp.data.seed, "source": exp.data.source})
            except NonFiniteStateError as e:
                _stop_non_finite(done, m, ckpt, bar, state_leaves=e.leaves)
        writer.flush()
        if interrupted:
            _stop_interrupted(done, stop.signum, ckpt, exp, bar)
        t_last, steps_since = time.time(), 0  # eval and save time do not count as training
    return state, last


def _stop_interrupted(step: int, signum: int | None, ckpt: Checkpointer, exp: Experiment, bar) -> None:
    """Wait for the save of ``step`` and raise TrainingInterrupted (one line)."""
    ckpt.wait()
    name = signal.Signals(signum).name if signum else "a signal"
    if exp.checkpoint.enabled:
        where = f"saved checkpoint step {step} in {ckpt.directory}; run the same command again to resume"
    else:
        where = f"not saved (checkpoint.enabled=False); last checkpoint: {ckpt.latest_step()}"
    msg = f"interrupted by {name} after step {step}: {where}"
    raise TrainingInterrupted(msg, step=step, checkpoint=step if exp.checkpoint.enabled else None,
                              signum=signum or signal.SIGINT)


def _stop_non_finite(step: int, m: dict, ckpt: Checkpointer, bar, state_leaves=None) -> None:
    """Log, let any in-flight save finish, and raise NonFiniteLossError."""
    ckpt.wait()
    good = ckpt.latest_step()
    where = f"step {good} in {ckpt.directory}" if good is not None else "none (no checkpoint was saved yet)"
    if state_leaves:
        what = (f"non-finite state after the update of step {step} in {len(state_leaves)} arrays "
                f"(first: {state_leaves[0]}) although loss={m['loss']:.4g} and "
                f"grad_norm={m['grad_norm']:.4g} were finite, lr={m['lr']:.3g}")
    else:
        what = (f"non-finite loss at step {step}: loss={m['loss']}, grad_norm={m['grad_norm']}, "
                f"lr={m['lr']:.3g}")
    msg = (f"{what}. Training stopped; the non-finite state was not saved. "
           f"Last good checkpoint: {where}. Try a lower optim.learning_rate, a tighter "
           f"optim.grad_clip_norm, or model.dtype='float32'.")
    log.error(msg)
    _say(bar, msg)
    raise NonFiniteLossError(msg, step=step, metrics=m, last_checkpoint=good)
