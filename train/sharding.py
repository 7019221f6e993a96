"""Mesh, logical-axis rules and the shardings of the train state and batches.

The mesh always has the four axes ``("data", "fsdp", "context", "tensor")``; the config
gives their sizes (-1 = fill with the remaining devices). Parameters carry logical axis
names (``attn/axes.py``); the config's rules map those names onto mesh axes. This module
is the one seam between the two: data parallelism today, FSDP / tensor / context
parallelism by changing ``config.mesh`` only.

Example:
  >>> import jax
  >>> from train.sharding import MeshConfig, make_mesh
  >>> mesh = make_mesh(MeshConfig(shape=(-1, 1, 1, 1)))
  >>> mesh.axis_names, mesh.devices.size == jax.device_count()
  (('data', 'fsdp', 'context', 'tensor'), True)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from attn import axes
from train.config_args import dataclass_from_dict

MESH_AXES = ("data", "fsdp", "context", "tensor")
# Mesh axes that split the batch: every process loads rows, never sequence slices.
BATCH_MESH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The ``config.mesh`` section.

    Attributes:
      shape: sizes of ("data", "fsdp", "context", "tensor"); one entry may be -1 (fill).
      rules: ((logical name, mesh axis | tuple of axes | None), ...); None = the defaults
        in ``attn.axes.DEFAULT_RULES``.
      num_devices: use only the first N devices (single-process runs: a one-device
        reference on a multi-device host, or a smaller mesh while debugging); None = all.
    """

    shape: tuple = (-1, 1, 1, 1)
    rules: tuple | None = None
    num_devices: int | None = None

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != len(MESH_AXES):
            raise ValueError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {self.shape!r}")
        if sum(s == -1 for s in shape) > 1 or any(s == 0 or s < -1 for s in shape):
            raise ValueError(f"mesh.shape={self.shape!r}: sizes must be >= 1, with at most one -1")
        object.__setattr__(self, "shape", shape)
        if self.rules is not None:
            object.__setattr__(self, "rules", normalize_rules(self.rules))

    @classmethod
    def from_dict(cls, d: Any) -> "MeshConfig":
        """Build from a dict / ConfigDict; an unknown key raises ValueError naming it."""
        return dataclass_from_dict(cls, d, "mesh")

    @property
    def logical_rules(self) -> tuple:
        return self.rules if self.rules is not None else axes.DEFAULT_RULES


def normalize_rules(rules: Sequence) -> tuple:
    """Rules as hashable tuples, checking that every target is a mesh axis.

    Example:
      >>> normalize_rules([["batch", ["data", "fsdp"]], ["embed", None]])
      (('batch', ('data', 'fsdp')), ('embed', None))
    """
    out = []
    for item in rules:
        name, target = item
        if isinstance(target, (list, tuple)):
            target = tuple(target)
            bad = [t for t in target if t not in MESH_AXES]
        else:
            bad = [] if target is None or target in MESH_AXES else [target]
        if bad:
            raise ValueError(f"mesh.rules: logical axis {name!r} maps to unknown mesh axis {bad[0]!r}; "
                             f"mesh axes are {MESH_AXES}")
        out.append((str(name), target))
    return tuple(out)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace a -1 by whatever makes the product equal ``num_devices``.

    Example:
      >>> resolve_mesh_shape((-1, 2, 1, 1), 8)
      (4, 2, 1, 1)
    """
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh.shape={tuple(shape)}: {num_devices} devices do not divide by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh.shape={tuple(shape)} needs {math.prod(shape)} devices, have {num_devices}")
    return tuple(shape)


def make_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes ``MESH_AXES`` over ``devices`` (default: all devices, all hosts)."""
    devices = list(devices) if devices is not None else jax.devices()
    if config.num_devices is not None:
        if config.num_devices > len(devices) or jax.process_count() > 1:
            raise ValueError(f"mesh.num_devices={config.num_devices}: have {len(devices)} devices "
                             f"in {jax.process_count()} process(es); a device subset is single-process only")
        devices = devices[: config.num_devices]
    shape = resolve_mesh_shape(config.shape, len(devices))
    # Auto axes: the compiler propagates shardings from the annotated params and batch.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


# Expert parallelism reuses the token axes instead of adding a fifth mesh axis: MoE
# experts carry the logical axis "expert" (models.ffn.moe.EXPERT), unmapped by default
# (replicated); a rule mapping it to some of the axes that split the tokens (data, fsdp,
# context) shards the experts there, and models/ffn/expert_parallel.py exchanges tokens
# by all-to-all over those axes (GShard's layout: each data-parallel device owns E/ep).
EXPERT_LOGICAL_AXIS = "expert"


def with_expert_rule(rules: Sequence | None, mesh_axes: Sequence[str] | str = ("data", "fsdp")) -> tuple:
    """``rules`` (None = the defaults) plus ``("expert", mesh_axes)``: expert parallelism.

    Example:
      >>> import flax.linen as nn
      >>> rules = with_expert_rule(None, ("data", "fsdp"))
      >>> rules[0], nn.logical_to_mesh_axes(("expert", "embed", "mlp"), rules)
      (('expert', ('data', 'fsdp')), P(('data', 'fsdp'), None, 'tensor'))
    """
    base = tuple(axes.DEFAULT_RULES if rules is None else rules)
    base = tuple(r for r in base if r[0] != EXPERT_LOGICAL_AXIS)
    target = mesh_axes if isinstance(mesh_axes, str) else tuple(mesh_axes)
    # First: flax gives each mesh axis to the earliest rule that claims it, so the experts
    # take (say) fsdp before EMBED's rule does, and their weights are stored split by expert.
    return normalize_rules(((EXPERT_LOGICAL_AXIS, target),) + base)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence) -> Any:
    """NamedShardings for a (possibly abstract) tree holding ``nn.Partitioned`` leaves.

    Unannotated leaves are replicated. The result has the structure of the *unboxed*
    tree (``nn.meta.unbox(boxed_tree)``).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from attn import axes
      >>> m = nn.Dense(4, kernel_init=nn.with_logical_partitioning(
      ...     nn.initializers.lecun_normal(), (axes.EMBED, axes.MLP)))
      >>> abstract = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((1, 8)))
      >>> mesh = make_mesh(MeshConfig())
      >>> logical_shardings(abstract, mesh, axes.DEFAULT_RULES)["params"]["kernel"].spec
      P('fsdp', 'tensor')
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def shardings_like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state: a leaf whose key path ends with a parameter's
    path and has its shape gets that parameter's sharding; anything else is replicated.

    Why path matching: optax states (Adam moments, Muon momenta) embed copies of the
    params tree under their own prefixes, so this works for any optimizer without
    knowing its state classes.
    """
    by_path = {}
    for (path, p), (_, s) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree_util.tree_flatten_with_path(param_shardings)[0]):
        by_path[tuple(path)] = (tuple(p.shape), s)
    depth = {len(k) for k in by_path}
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        path = tuple(path)
        for d in depth:
            hit = by_path.get(path[-d:]) if len(path) >= d else None
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh, rules: Sequence) -> NamedSharding:
    """Sharding of [B, T] batch arrays: B over the rules' ``batch`` axes, T over ``length``.

    With the default rules this is ``P(("data", "fsdp"), "context")``; context is 1 until
    context parallelism is configured.
    """
    return nn.logical_to_mesh_sharding(P(axes.BATCH, axes.LENGTH), mesh, list(rules))


def batch_shard_count(sharding: NamedSharding) -> int:
    """How many ways the batch dimension is split (the global batch must divide by it)."""
    spec = sharding.spec[0] if len(sharding.spec) else None
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(sharding.mesh.shape[n] for n in names)


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Place a global numpy batch on the mesh, each process contributing its own rows.

    Every process computes the same global batch (sources are pure in (seed, step)) and
    hands over only the rows its devices hold, through
    ``jax.make_array_from_process_local_data`` — the multi-host path, also used on one.

    Args:
      batch: {name: [B, T, ...] numpy array}, the global batch.
      sharding: from ``batch_sharding``.

    Returns:
      {name: jax.Array [B, T, ...]} sharded by ``sharding``.
    """
    out = {}
    for name, x in batch.items():
        _check_divides(name, x.shape, sharding)
        spec = P(*sharding.spec[: x.ndim])
        sh = NamedSharding(sharding.mesh, spec)
        rows = _local_rows(sh, x.shape)
        out[name] = jax.make_array_from_process_local_data(sh, x[rows], x.shape)
    return out


def _check_divides(name: str, shape: tuple[int, ...], sharding: NamedSharding) -> None:
    """One line naming the numbers when a batch array does not split evenly on the mesh.

    Refused rather than replicated: an uneven batch means the caller's batch size and the
    mesh disagree, and jax's own error is a multi-line IndivisibleError about tilings.
    """
    for dim, part in enumerate(sharding.spec[: len(shape)]):
        names = (part,) if isinstance(part, str) else tuple(part or ())
        n = math.prod(sharding.mesh.shape[a] for a in names)
        if shape[dim] % n:
            what = "batch" if dim == 0 else "sequence" if dim == 1 else f"dim {dim}"
            raise ValueError(f"put_batch: {name!r} has {what} size {shape[dim]}, which does not "
                             f"divide into the {n} shards of mesh axes {names}")


def _local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The contiguous row range this process's devices hold (all rows on one host)."""
    idx = sharding.addressable_devices_indices_map(global_shape).values()
    starts = [i[0].start or 0 for i in idx]
    stops = [global_shape[0] if i[0].stop is None else i[0].stop for i in idx]
    return slice(min(starts), max(stops))
