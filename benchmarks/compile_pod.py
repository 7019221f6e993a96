"""Compile-only validation of ``configs/pod.py``: lower and compile the sharded train
step on forced CPU devices, without allocating a single parameter, and report memory.

    python -m benchmarks.compile_pod --config configs/pod.py:batch=32
    python -m benchmarks.compile_pod --config configs/pod.py:batch=32 --layers 2,4 --devices 32
    python -m benchmarks.compile_pod --config configs/pod.py:batch=32 --mesh=-1,8,1,4
    python -m benchmarks.compile_pod --config configs/pod.py:batch=8,seq=16384,fsdp=8,context=4,cp=ring,impl=xla_chunked
    python -m benchmarks.compile_pod --layers 2,4 --set model.scan_layers=false   # XLA-counted FLOPs

What happens, with the trainer's own machinery (nothing is re-implemented here):
  1. ``--devices`` CPU devices are forced (``XLA_FLAGS=--xla_force_host_platform_device_count``,
     set before jax is imported -- it cannot change afterwards);
  2. ``train.trainer.parse_config`` validates the config and ``_build_compiled`` builds the
     mesh, the logical shardings and the jitted, donated train step;
  3. the step is lowered against ``abstract_state`` (``ShapeDtypeStruct`` leaves carrying
     their ``NamedSharding``) and an abstract batch sharded like ``put_batch`` would
     place it, then compiled: XLA's SPMD partitioner runs for real, no array exists;
  4. ``compiled.memory_analysis()`` gives the per-device argument / output / alias / temp
     bytes of the partitioned program, and ``cost_analysis()`` its FLOPs.

Memory is per device (one SPMD partition). The analytic estimate it is compared with:
  * state  = P·4 B (fp32 params) · (1 + 2 Adam moments) / (fsdp·tensor) (the default
    rules shard every parameter's ``embed`` axis over fsdp and heads / mlp / vocab over
    tensor; the state is replicated over data and context);
  * grads  = P·4 B / (fsdp·tensor) (reduce-scattered to the parameter sharding; temp);
  * saved activations per layer = tokens_per_device · (D + saved matmul outputs) · 2 B
    (remat "dots": q, k, v, attention output, gate, up, down projections in bf16;
    "full": only the D-wide block input), times the number of layers;
  * logits = tokens_per_device · V · 4 B (float32) and the same again for their gradient.
Temp on CPU is an upper bound on TPU's: XLA:CPU runs bf16 matmuls as float32 dots plus
converts, and the compiled program keeps float32 copies of the saved matmul outputs next
to the bf16 ones (visible in ``compiled.as_text()`` as ``f32[20,1,4096,5632]`` beside
``bf16[20,1,4096,5632]``); TPU's buffer assignment and fusion differ.

Attention implementation: on CPU ``impl="auto"`` picks dense ``xla`` whenever a call's
float32 logits fit in 1 GiB (``attn.core.AUTO_DENSE_LOGITS_BYTES``), which context-parallel
blocks often do; the dense logits then dominate temp. Pass ``impl=xla_chunked`` (a
flash-like O(T) working set, what TPU's ``pallas_tpu`` also has) to compare strategies.

FLOPs: ``cost_analysis()`` counts a while loop's body once, so with ``scan_layers`` its
figure covers one layer of the scan whatever the depth. ``--set model.scan_layers=false
--layers 2,4`` compiles unrolled layers, whose FLOPs XLA does count; the fit over depth
then gives XLA's own per-layer count, to compare with the 6·P·tokens model.

``--layers 2,4`` compiles the same config at several depths. With ``scan_layers`` every
layer is the same compiled body, so memory is affine in depth; the report fits the line
and extrapolates to the config's own depth, labelled as extrapolated, next to the rows
that were compiled for real (when the full depth is compiled as well, the fit is
the check that per-layer memory is constant).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/pod.py:batch=32",
                   help="config file[:args], as for python -m train (default: %(default)s)")
    p.add_argument("--devices", type=int, default=32, help="forced CPU devices (default 32)")
    p.add_argument("--mesh", default=None,
                   help="override mesh.shape: data,fsdp,context,tensor, e.g. -1,16,1,2")
    p.add_argument("--layers", default=None,
                   help="comma-separated depths to compile (default: the config's own); "
                        "two or more fit memory = a + b·layers and extrapolate to the config's depth")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value after get_config (repeatable), e.g. "
                        "model.scan_layers=false or data.seq_len=8192")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--note", default="", help="free text recorded in the report (why this variant)")
    p.add_argument("--tag", default="", help="suffix of the result file stem, e.g. noscan")
    p.add_argument("--stem", default=None, help="result file stem (default pod-compile-cpu-<date>[-tag])")
    return p.parse_args(argv)


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    # Must precede the first jax import anywhere in the process.
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={ARGS.devices}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.train_step import REPO, load_config  # noqa: E402
from train import sharding as shd  # noqa: E402
from train import trainer  # noqa: E402

GiB = float(1 << 30)

def _saved_per_token_layer(lm, tensor: int) -> float:
    """Activation elements saved per token per layer for the backward, per device.

    The block input (D) is saved under every remat policy. remat="dots" (and "none",
    counting only matmul outputs) adds q (N·H), k and v (K·H each), SwiGLU gate and up
    (F each) -- split over ``tensor`` -- and the attention output projection and down
    projection (D each, whole after their tensor all-reduce).
    """
    cfg = lm.layer_configs[0]
    split = cfg.num_heads * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim + 2 * lm.ffn_dim
    dots = split / tensor + 2 * lm.d_model
    return lm.d_model + (0 if lm.remat == "full" else dots)


def analytic(exp, n_params: int, mesh_shape: dict) -> dict:
    """Per-device bytes expected from first principles (see the module docstring)."""
    lm = exp.model
    fsdp, tensor = mesh_shape["fsdp"], mesh_shape["tensor"]
    shards = fsdp * tensor  # every matrix has an embed axis (fsdp); most also a tensor axis
    batch_shards = mesh_shape["data"] * fsdp
    tokens = exp.data.batch_size // batch_shards * exp.data.seq_len // mesh_shape["context"]
    moments = 2 if exp.optim.name == "adamw" else 1
    state = n_params * 4 * (1 + moments) / shards
    grads = n_params * 4 / shards
    act = tokens * _saved_per_token_layer(lm, tensor) * 2 * lm.num_layers
    logits = 2 * tokens * lm.vocab_size * 4 / tensor
    return {"state_gib": state / GiB, "grads_gib": grads / GiB, "saved_activations_gib": act / GiB,
            "logits_and_grad_gib": logits / GiB,
            "total_gib": (state + grads + act + logits) / GiB, "tokens_per_device": tokens}


def compile_one(config, mesh_override: tuple | None, expected_params: int | None = None) -> dict:
    """Lower + compile the trainer's train step for ``config``; one result row.

    ``expected_params``: when given, the parameter count of the initialised (abstract)
    tree must equal it -- the check behind the count in ``configs/pod.py``'s docstring.
    """
    if mesh_override is not None:
        config.mesh.shape = mesh_override
    exp = trainer.parse_config(config)
    t0 = time.perf_counter()
    c = trainer._build_compiled(exp)  # the trainer's own mesh, shardings and jitted step
    B, T = exp.data.batch_size, exp.data.seq_len
    trainer._check_batch_divisible("batch_size", B, c.batch_sharding)
    # Shaped like put_batch's output for the lm task: [B, T] arrays, B over data x fsdp.
    batch = {
        "inputs": jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=c.batch_sharding),
        "targets": jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=c.batch_sharding),
        "weights": jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=c.batch_sharding),
    }
    with jax.set_mesh(c.mesh), nn.logical_axis_rules(c.rules):
        lowered = c.train_step.lower(c.abstract_state, batch)
    t_lower = time.perf_counter() - t0
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t1

    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(c.abstract_state["params"])))
    if expected_params is not None and n_params != expected_params:
        raise AssertionError(f"initialised tree has {n_params} parameters, the config's "
                             f"param_count() says {expected_params}")
    mesh_shape = dict(c.mesh.shape)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # Per-device shard bytes of the state as the shardings say (an independent check
    # of memory_analysis's argument size).
    state_bytes = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                      for x, s in zip(jax.tree.leaves(c.abstract_state),
                                      jax.tree.leaves(c.state_shardings)))
    an = analytic(exp, n_params, mesh_shape)
    lm = exp.model
    # 6·P per token for the matmuls (the embedding gather excluded) plus causal attention,
    # 3 x (2 · 2·N·H·mean context) per layer; per device = global / devices.
    matmul_params = n_params - lm.vocab_size * lm.d_model
    attn = 3 * 4 * lm.num_heads * (lm.head_dim or lm.d_model // lm.num_heads) * (T + 1) / 2 * lm.num_layers
    flops_model = (6 * matmul_params + attn) * B * T / c.mesh.devices.size
    return dict(
        layers=lm.num_layers,
        mesh="x".join(f"{k}={v}" for k, v in mesh_shape.items()),
        devices=int(c.mesh.devices.size),
        batch=B, seq_len=T, remat=lm.remat, scan=lm.scan_layers, params=n_params,
        tokens_per_device=an["tokens_per_device"],
        argument_gib=mem.argument_size_in_bytes / GiB,
        output_gib=mem.output_size_in_bytes / GiB,
        alias_gib=mem.alias_size_in_bytes / GiB,
        temp_gib=mem.temp_size_in_bytes / GiB,
        # Donated state: outputs reuse the argument buffers, so live = args + out - alias + temp.
        total_gib=(mem.argument_size_in_bytes + mem.output_size_in_bytes
                   - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / GiB,
        state_shard_gib=state_bytes / GiB,
        analytic_state_gib=an["state_gib"],
        analytic_temp_gib=an["grads_gib"] + an["saved_activations_gib"] + an["logits_and_grad_gib"],
        analytic_total_gib=an["total_gib"],
        xla_tflops_per_device=float(cost.get("flops", float("nan"))) / 1e12,
        model_tflops_per_device=flops_model / 1e12,
        lower_s=t_lower, compile_s=t_compile,
    )


def _fit(rows: list[dict], depth: int) -> dict | None:
    """Least-squares line through (layers, value) per column over the rows compiled at
    depths other than ``depth``, evaluated at ``depth``; None with fewer than 2 depths.

    When ``depth`` itself was compiled too, the fitted row sits next to the real one:
    the check that per-layer memory really is constant under scan.
    """
    rows = [r for r in rows if r["layers"] != depth]
    xs = np.array([r["layers"] for r in rows], float)
    if len(set(xs)) < 2:
        return None
    out = {"layers": depth, "mesh": rows[0]["mesh"], "devices": rows[0]["devices"],
           "batch": rows[0]["batch"], "seq_len": rows[0]["seq_len"], "remat": rows[0]["remat"],
           "scan": rows[0]["scan"], "note": f"EXTRAPOLATED (linear fit over compiled depths {sorted(set(int(x) for x in xs))})"}
    for col in ("params", "argument_gib", "output_gib", "alias_gib", "temp_gib", "total_gib",
                "state_shard_gib", "xla_tflops_per_device"):
        slope, icpt = np.polyfit(xs, np.array([r[col] for r in rows], float), 1)
        out[col] = float(icpt + slope * depth)
        out[col + "_per_layer"] = float(slope)
    out["params"] = int(round(out["params"]))
    return out


def _expected_params(spec: str, depth: int) -> int | None:
    """The config file's own ``param_count(depth)`` if it defines one (configs/pod.py does)."""
    import importlib.util

    path = spec.partition(":")[0]
    path = path if os.path.isabs(path) else os.path.join(REPO, path)
    mspec = importlib.util.spec_from_file_location("attnlab_compile_config", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    fn = getattr(mod, "param_count", None)
    return None if fn is None else int(fn(depth))


def apply_overrides(config, items: list[str]):
    """Apply ``section.key=value`` strings to a ConfigDict (values parsed as Python literals).

    Example:
      >>> from ml_collections import ConfigDict
      >>> c = ConfigDict({"model": {"scan_layers": True, "remat": "dots"}})
      >>> c = apply_overrides(c, ["model.scan_layers=false", "model.remat=full"])
      >>> c.model.scan_layers, c.model.remat
      (False, 'full')
    """
    import ast

    for item in items:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        low = text.strip().lower()
        if low in ("true", "false", "none"):
            value = {"true": True, "false": False, "none": None}[low]
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare string such as full or gqa
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        if leaf not in node:
            raise ValueError(f"--set {item!r}: config has no key {key!r}")
        node[leaf] = value
    return config


def main() -> int:
    a = ARGS
    mesh_override = tuple(int(s) for s in a.mesh.split(",")) if a.mesh else None
    base = apply_overrides(load_config(a.config), a.set)
    depths = [int(s) for s in a.layers.split(",")] if a.layers else [base.model.num_layers]
    rows = []
    for depth in depths:
        config = apply_overrides(load_config(a.config), a.set)
        config.model.num_layers = depth
        print(f"compiling {a.config} at {depth} layers on {jax.device_count()} CPU devices ...",
              flush=True)
        row = compile_one(config, mesh_override, _expected_params(a.config, depth))
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        rows.append(row)
    extra = _fit(rows, base.model.num_layers)
    if extra is not None:
        # The analytic side at the full depth, for the same comparison as the real rows.
        full = apply_overrides(load_config(a.config), a.set)
        if mesh_override is not None:
            full.mesh.shape = mesh_override
        exp = trainer.parse_config(full)
        mesh_shape = dict(zip(shd.MESH_AXES, shd.resolve_mesh_shape(exp.mesh.shape, jax.device_count())))
        an = analytic(exp, extra["params"], mesh_shape)
        extra.update(analytic_state_gib=an["state_gib"],
                     analytic_temp_gib=an["grads_gib"] + an["saved_activations_gib"] + an["logits_and_grad_gib"],
                     analytic_total_gib=an["total_gib"], tokens_per_device=an["tokens_per_device"])
        rows.append(extra)
        print("extrapolated:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in extra.items()})

    meta = {
        "title": f"Compile-only check of {a.config} on {jax.device_count()} forced CPU devices",
        "what": "trainer.parse_config -> trainer._build_compiled -> train_step.lower(abstract_state, "
                "abstract_batch).compile(); memory_analysis() per device, cost_analysis() flops",
        "memory": "per device (one SPMD partition); total = argument + output - alias + temp",
        "analytic": "state P·4·(1+moments)/fsdp; temp = grads P·4/fsdp + saved activations "
                    "(remat policy) + float32 logits and their gradient",
        "model_tflops": "(6·(P − V·D) + 12·N·H·(T+1)/2·layers)·B·T / devices",
        "caveat": "XLA:CPU buffer assignment; it keeps float32 copies of saved bf16 matmul outputs, "
                  "so TPU temp is expected lower. cost_analysis counts a scanned (while) body once: "
                  "xla_tflops of scan=True rows are not whole-step FLOPs",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if a.note:
        meta["note"] = a.note
    out = a.out or report.DEFAULT_DIR
    stem = a.stem or f"pod-compile-cpu-{report.today()}" + (f"-{a.tag}" if a.tag else "")
    paths = report.write(out, stem, meta, rows)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
