"""Context parallelism: attention over a sequence split along the mesh axis ``context``.

The layers never see the mesh. Under ``activate(config, mesh)`` every self-attention
call (``attn.core.attention(..., self_attention=True)``, which the layers pass when k/v
are their own tokens; shapes cannot tell, cross-attention may have T == S) is routed here, re-expressed on local shards
with ``jax.shard_map`` and computed by the layer's own implementation (xla,
xla_chunked, cudnn, Pallas) on local shapes. Four strategies, ``cp`` = context degree:

* ``all_gather``  all-gather K/V (and their positions / segments) along the sequence;
                  local queries attend to every key. Backward reduce-scatters dK/dV.
* ``ring``        K/V blocks travel around the ring with ``ppermute``; each block's
                  ``(o, lse)`` is merged in float32. The next block's send is issued
                  before the current block's compute (double buffering), so the
                  scheduler can overlap them. Only implementations that return float32
                  block outputs (``Impl.float32_out``) run in the ring, so nothing is
                  rounded before the merge. Backward is a custom VJP that circulates
                  K/V again with their dK/dV accumulators: memory stays O(T / cp).
* ``ulysses``     an all-to-all swaps the split from sequence to heads, every device
                  attends over the whole sequence for N / cp heads, and a second
                  all-to-all swaps back. K kv heads that do not divide by cp are
                  repeated to lcm(K, cp) first (logged once, with the cost).
* ``hybrid``      ``cp = u · r``: Ulysses inside groups of ``u`` neighbouring devices,
                  ring over the ``r`` groups.

**Zigzag.** With causal masks a contiguous split gives the last device all the work.
``zigzag_permutation`` reorders the sequence once at the input: split into ``2·c``
chunks (``c`` = ring size, or ``cp`` for the other strategies), device ``i`` holds chunks
``i`` and ``2c−1−i``. Positions travel with the tokens, and masks are defined on
positions, so every mask stays exact; the ring additionally skips the half of each
off-diagonal block that causality hides. Document masks work unchanged: segment ids
travel with their tokens.

Example (8 CPU devices, as in the tests):
  >>> import jax, jax.numpy as jnp
  >>> from attn.masks import Mask
  >>> from train.context_parallel import context_parallel_attention
  >>> from train.sharding import MeshConfig, make_mesh
  >>> mesh = make_mesh(MeshConfig(shape=(1, 1, -1, 1)))
  >>> q = jax.random.normal(jax.random.key(0), (1, 64, 4, 8))
  >>> o = context_parallel_attention(q, q, q, mask=Mask(causal=True), strategy="ring",
  ...                                mesh=mesh)
  >>> o.shape
  (1, 64, 4, 8)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from attn import core
from attn.masks import Mask
from train.config_args import dataclass_from_dict

Array = Any
log = logging.getLogger(__name__)
CONTEXT_AXIS = "context"
BATCH_AXES = ("data", "fsdp")   # mesh axes that may split B
HEAD_AXIS = "tensor"            # mesh axis that may split N and K


_LOGGED: set[str] = set()


def _say_once(msg: str) -> None:
    """Log ``msg`` once per process: a replication is a cost worth one line, not one per layer."""
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.warning("%s", msg)


# --------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class ContextParallelConfig:
    """The ``config.context_parallel`` section (used when ``mesh.shape`` context > 1).

    Attributes:
      strategy: "all_gather" | "ring" | "ulysses" | "hybrid".
      ulysses_degree: ``u`` of hybrid (divides cp; the local head count must divide by
        it); None = the largest proper divisor of cp.
      zigzag: reorder the sequence for causal load balance; None = whenever the task
        allows it (causal LM whose mechanisms mix tokens only through attention).
      impl: attention implementation on local shards; None = each layer's own ``impl``.

    Example:
      >>> ContextParallelConfig.from_dict({"strategy": "ulysses"}).strategy
      'ulysses'
    """

    strategy: str = "ring"
    ulysses_degree: int | None = None
    zigzag: bool | None = None
    impl: str | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"context_parallel.strategy={self.strategy!r}; known: {sorted(STRATEGIES)}")
        if self.ulysses_degree is not None and self.strategy != "hybrid":
            raise ValueError("context_parallel.ulysses_degree only applies to strategy='hybrid'")

    @classmethod
    def from_dict(cls, d: Any) -> "ContextParallelConfig":
        return dataclass_from_dict(cls, d, "context_parallel")


# --------------------------------------------------------------------------- zigzag
def zigzag_permutation(seq_len: int, chunks: int) -> np.ndarray:
    """Index order putting chunks ``i`` and ``chunks−1−i`` side by side.

    Split contiguously into ``chunks / 2`` shards afterwards, shard ``i`` holds the
    ``i``-th earliest and the ``i``-th latest chunk: equal causal work per shard.

    Example:
      >>> zigzag_permutation(8, 4).tolist()
      [0, 1, 6, 7, 2, 3, 4, 5]
    """
    if chunks % 2 or seq_len % chunks:
        raise ValueError(f"zigzag needs T={seq_len} to divide into {chunks} chunks "
                         f"(T % (2·cp) == 0); pad the sequence or change data.seq_len")
    c = seq_len // chunks
    order = [i for g in range(chunks // 2) for i in (g, chunks - 1 - g)]
    return np.concatenate([np.arange(i * c, (i + 1) * c) for i in order])


def permute_batch(batch: dict[str, np.ndarray], perm: np.ndarray) -> dict[str, np.ndarray]:
    """Reorder every ``[B, T, ...]`` array of an LM batch along T, adding ``positions``.

    Positions (``arange(T)`` unless the batch has them) are permuted with the tokens so
    RoPE and the masks see the original order. Per-token losses are order-free.
    """
    B, T = batch["inputs"].shape[:2]
    out = dict(batch)
    out.setdefault("positions", np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)))
    return {n: (x[:, perm] if x.ndim >= 2 and x.shape[1] == T else x) for n, x in out.items()}


# --------------------------------------------------------------------------- local math
@dataclasses.dataclass(frozen=True)
class _Local:
    """Static part of one local attention call (hashable: a custom_vjp nondiff arg)."""

    causal: bool
    window: tuple | None
    scale: float
    softcap: float | None
    impl: str


def _float32_out_impls() -> list[str]:
    """Registered attention impls that can return float32 block outputs (for messages)."""
    return sorted(n for n in core.registered_impls() if core.get_impl(n).float32_out)


def _inner(spec: _Local, q, k, v, qpos, kpos, qseg, kseg, sinks, *, float32_out=False):
    """One local attention call through the registry; ``(o, lse)``.

    ``float32_out``: the ring merges partial results, so ``o`` must come back in float32
    (``Impl.float32_out``); an implementation that would round a low-precision block
    output to the input dtype first is refused with the reason.
    """
    mask = Mask(causal=spec.causal, window=spec.window, q_positions=qpos, kv_positions=kpos,
                q_segment_ids=qseg, kv_segment_ids=kseg)
    call = core.make_call(q, k, v, mask=mask, scale=spec.scale, softcap=spec.softcap,
                          sinks=sinks, return_lse=True)
    impl = core.select_impl(call, spec.impl)
    narrow = jnp.dtype(q.dtype).itemsize < 4  # float32 / float64 outputs lose nothing
    if float32_out and narrow and not impl.float32_out:
        raise NotImplementedError(
            f"context-parallel ring: impl {impl.name!r} cannot return float32 block outputs "
            f"(Impl.float32_out=False), so every block would be rounded to {q.dtype} before the "
            f"merge; use an impl that declares float32_out ({', '.join(_float32_out_impls())}), "
            "or strategy all_gather/ulysses")
    extra = {"out_dtype": jnp.float32} if float32_out and impl.float32_out else {}
    return impl.fn(q, k, v, mask=mask, scale=spec.scale, softcap=spec.softcap, sinks=sinks,
                   bias=None, return_lse=True, **extra)


def _tw(w):
    """``[B, N, T]`` row weights as ``[B, T, N, 1]`` to scale ``o``."""
    return jnp.transpose(w, (0, 2, 1))[..., None]


def _merge(o_a, lse_a, o_b, lse_b):
    """Merge two partial softmaxes over disjoint keys (float32; -inf rows give 0)."""
    lse = jnp.logaddexp(lse_a, lse_b)
    ref = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return o_a * _tw(jnp.exp(lse_a - ref)) + o_b * _tw(jnp.exp(lse_b - ref)), lse


def _fold_sinks(o, lse, sinks):
    """Add the sink term once, after all blocks: ``lse' = logaddexp(lse, sink)``."""
    lse2 = jnp.logaddexp(lse, sinks.astype(jnp.float32)[None, :, None])
    return (o.astype(jnp.float32) * _tw(jnp.exp(lse - lse2))).astype(o.dtype), lse2


# --------------------------------------------------------------------------- ring
@dataclasses.dataclass(frozen=True)
class _Ring:
    """A ring of ``size`` members along ``axis``; member index = axis_index // stride."""

    spec: _Local
    axis: str
    size: int
    stride: int
    zigzag: bool

    def me(self):
        return lax.axis_index(self.axis) // self.stride

    def shift(self, tree):
        """Send every leaf one step along the ring (to the next member)."""
        n = self.size * self.stride
        perm = [(i, ((i // self.stride + 1) % self.size) * self.stride + i % self.stride)
                for i in range(n)]
        return jax.tree.map(lambda x: lax.ppermute(x, self.axis, perm), tree)


def _empty(q, v):
    B, T, N, _ = q.shape
    return (jnp.zeros((B, T, N, v.shape[-1]), jnp.float32),
            jnp.full((B, N, T), -jnp.inf, jnp.float32))


def _f32(out):
    return out[0].astype(jnp.float32), out[1]


def _ring_block(ring: _Ring, q, qpos, qseg, k, v, kpos, kseg, src, me):
    """Local queries against the K/V block of ring member ``src``: ``(o f32, lse)``.

    Causal skips what the layout guarantees is hidden: contiguous — later blocks
    entirely; zigzag — earlier blocks' second half of keys, later blocks' first half
    of queries. Positions still mask everything exactly inside each call.
    """
    spec = ring.spec
    inner = functools.partial(_inner, spec, float32_out=True)
    full = lambda: _f32(inner(q, k, v, qpos, kpos, qseg, kseg, None))  # noqa: E731
    if not spec.causal:
        return full()
    if not ring.zigzag:
        return lax.cond(src > me, lambda: _empty(q, v), full)
    h = q.shape[1] // 2
    cut = lambda x, s: None if x is None else x[:, s]  # noqa: E731

    def early_keys():  # src < me: only src's first chunk precedes my queries
        b = slice(0, h)
        return _f32(inner(q, cut(k, b), cut(v, b), qpos, cut(kpos, b), qseg, cut(kseg, b), None))

    def late_queries():  # src > me: only my second chunk follows src's keys
        s = slice(h, None)
        o2, l2 = _f32(inner(cut(q, s), k, v, cut(qpos, s), kpos, cut(qseg, s), kseg, None))
        o0, l0 = _empty(q[:, :h], v)
        return jnp.concatenate([o0, o2], 1), jnp.concatenate([l0, l2], 2)

    idx = jnp.where(src == me, 0, jnp.where(src < me, 1, 2))
    return lax.switch(idx, (full, early_keys, late_queries))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(ring: _Ring, q, k, v, qpos, kpos, qseg, kseg):
    return _ring_fwd(ring, q, k, v, qpos, kpos, qseg, kseg)[0]


def _ring_fwd(ring, q, k, v, qpos, kpos, qseg, kseg):
    me = ring.me()
    o, lse = _empty(q, v)
    blk = (k, v, kpos, kseg)
    for j in range(ring.size):
        nxt = ring.shift(blk) if j + 1 < ring.size else None  # issued before the compute
        o_j, lse_j = _ring_block(ring, q, qpos, qseg, *blk, (me - j) % ring.size, me)
        o, lse = _merge(o, lse, o_j, lse_j)
        blk = nxt
    return (o.astype(q.dtype), lse), (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _ring_bwd(ring, res, cts):
    """Recompute each block and split the cotangent by its softmax share.

    With ``o = Σ_j w_j o_j``, ``w_j = exp(lse_j − lse)``: the block sees
    ``do_j = w_j·do`` and ``dlse_j = w_j·(⟨do, o_j − o⟩ + dlse)``. dK/dV accumulators ride
    with their block and reach home after one more shift.

    K and V travel packed as one ``[.., H + E]`` buffer (and the ints as one
    ``[B, t, 2]``). Shipped as in the forward, the shifts would be identical to the
    forward's, XLA would merge them, and every block the forward received would stay
    alive until here: O(T) memory instead of O(T / cp).
    """
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    do, dlse = cts
    do = do.astype(jnp.float32)
    me = ring.me()
    ref = jnp.where(jnp.isfinite(lse), lse, 0.0)
    dq = jnp.zeros(q.shape, jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    H = k.shape[-1]
    blk = (jnp.concatenate([k, v], -1),
           kpos[..., None] if kseg is None else jnp.stack([kpos, kseg], -1))
    for j in range(ring.size):
        nxt = ring.shift(blk) if j + 1 < ring.size else None
        kb, vb = blk[0][..., :H], blk[0][..., H:]
        kpb, ksb = blk[1][..., 0], None if kseg is None else blk[1][..., 1]
        src = (me - j) % ring.size
        (o_j, lse_j), vjp = jax.vjp(
            lambda q_, k_, v_: _ring_block(ring, q_, qpos, qseg, k_, v_, kpb, ksb, src, me), q, kb, vb)
        w = jnp.exp(lse_j - ref)
        dot = jnp.transpose(jnp.sum(do * (o_j - o), -1), (0, 2, 1))
        dq_j, dk_j, dv_j = vjp((_tw(w) * do, w * (dot + dlse)))
        dq = dq + dq_j
        dk, dv = ring.shift((dk + dk_j, dv + dv_j))
        blk = nxt
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


# --------------------------------------------------------------------------- strategies
def _gather_seq(x, axis, groups):
    return None if x is None else lax.all_gather(x, axis, axis=1, tiled=True, axis_index_groups=groups)


def _all_gather_local(spec, q, k, v, qpos, kpos, qseg, kseg, sinks, *, axis, cp, u, zigzag):
    del cp, u, zigzag  # one gather serves every layout
    g = functools.partial(_gather_seq, axis=axis, groups=None)
    return _inner(spec, q, g(k), g(v), qpos, g(kpos), qseg, g(kseg), sinks)


def _seq_heads_local(spec, q, k, v, qpos, kpos, qseg, kseg, sinks, *, axis, cp, u, zigzag):
    """Ulysses over groups of ``u`` devices, then a ring over the ``cp / u`` groups."""
    r = cp // u
    groups = None if u in (1, cp) else [list(range(g * u, (g + 1) * u)) for g in range(r)]
    if u > 1:
        n = q.shape[2]
        kv = k.shape[2]
        if kv % u:  # each device must own whole kv heads: replicate them (GQA, K < u)
            rep = math.lcm(kv, u) // kv
            _say_once(f"context parallelism ({'ulysses' if r == 1 else 'hybrid'}): K={kv} local kv "
                      f"heads do not divide by the Ulysses degree u={u}; K/V are repeated {rep}x to "
                      f"{kv * rep} heads before the all-to-all ({rep}x the K/V all-to-all traffic "
                      "and K/V memory of attention)")
            k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        to_heads = lambda x: lax.all_to_all(x, axis, 2, 1, tiled=True, axis_index_groups=groups)  # noqa: E731
        q, k, v = to_heads(q), to_heads(k), to_heads(v)
        gather = functools.partial(_gather_seq, axis=axis, groups=groups)
        qpos, kpos, qseg, kseg = gather(qpos), gather(kpos), gather(qseg), gather(kseg)
        if sinks is not None:
            sinks = lax.dynamic_slice_in_dim(sinks, (lax.axis_index(axis) % u) * (n // u), n // u)
    if r == 1:
        o, lse = _inner(spec, q, k, v, qpos, kpos, qseg, kseg, sinks)
    else:
        o, lse = _ring(_Ring(spec, axis, r, u, zigzag), q, k, v, qpos, kpos, qseg, kseg)
        if sinks is not None:
            o, lse = _fold_sinks(o, lse, sinks)
    if u > 1:
        o = lax.all_to_all(o, axis, 1, 2, tiled=True, axis_index_groups=groups)
        lse = lax.all_to_all(lse, axis, 2, 1, tiled=True, axis_index_groups=groups)
    return o, lse


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A context-parallel strategy: its local body and its Ulysses degree."""

    name: str
    local: Callable
    ulysses_degree: Callable[[int, int | None], int]  # (cp, configured u) -> u

    def zigzag_chunks(self, cp: int, ulysses_degree: int | None = None) -> int:
        """Chunks of the zigzag layout: 2 per ring member (2·cp without a ring)."""
        u = self.ulysses_degree(cp, ulysses_degree)
        return 2 * (cp // u if self.name in ("ring", "hybrid") else cp)


def _hybrid_degree(cp: int, configured: int | None) -> int:
    """``u`` of hybrid: as configured, else cp's largest proper divisor (cp=8 → 4 × 2).

    It depends on cp alone so the trainer's zigzag order (2 chunks per ring member)
    is the same for every layer, whatever its head count.
    """
    if configured is not None:
        return configured
    proper = [u for u in range(cp - 1, 1, -1) if cp % u == 0]
    if not proper:
        raise ValueError(f"hybrid needs a context degree with a proper divisor (cp={cp} is prime "
                         f"or < 4); use ring or ulysses, or set context_parallel.ulysses_degree")
    return proper[0]


STRATEGIES: dict[str, Strategy] = {
    "all_gather": Strategy("all_gather", _all_gather_local, lambda cp, c: 1),
    "ring": Strategy("ring", _seq_heads_local, lambda cp, c: 1),
    "ulysses": Strategy("ulysses", _seq_heads_local, lambda cp, c: cp),
    "hybrid": Strategy("hybrid", _seq_heads_local, _hybrid_degree),
}


# --------------------------------------------------------------------------- entry point
def mesh_axis_size(mesh, name: str) -> int:
    """Size of mesh axis ``name`` (1 when the mesh has no such axis)."""
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1)


def context_parallel_attention(q, k, v, *, mask: Mask | None = None, scale=None, softcap=None,
                               sinks=None, return_lse=False, impl="auto", strategy="ring",
                               mesh=None, zigzag=False, ulysses_degree=None, axis=CONTEXT_AXIS):
    """Self-attention on arrays whose sequence dimension is split over ``axis``.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, T, K, H]``; v: ``[B, T, K, E]`` (global arrays).
      mask: causal / window / segments / positions (no block_mask or dense: those are
        on array indices, which sharding reorders).
      impl: implementation run on the local shards.
      strategy: a name in ``STRATEGIES``.
      mesh: the mesh (default: the one set by ``jax.set_mesh``).
      zigzag: the sequence is in ``zigzag_permutation`` order (the caller reordered it);
        lets the ring skip the hidden halves of causal blocks.
      ulysses_degree: ``u`` for hybrid.

    Returns:
      ``o [B, T, N, E]``, or ``(o, lse [B, N, T])`` with ``return_lse``; equal to
      ``attn.core.attention`` on one device.
    """
    mask = Mask() if mask is None else mask
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mask.block_mask is not None or mask.dense is not None:
        raise NotImplementedError("context parallelism: block_mask / dense masks are defined on "
                                  "array indices, which the sequence split reorders; use context=1")
    if mask.q_extra_range is not None:
        raise NotImplementedError("context parallelism does not carry Mask.q_extra_range (the VLM "
                                  "prefix/mutual masks) yet; use mesh context=1 for this model")
    B, T, N, H = q.shape
    K, S = k.shape[2], k.shape[1]
    if S != T:
        raise ValueError(f"context parallelism shards self-attention: q has T={T}, k has S={S}")
    cp, tp = mesh_axis_size(mesh, axis), mesh_axis_size(mesh, HEAD_AXIS)
    strat = STRATEGIES.get(strategy)
    if strat is None:
        raise ValueError(f"unknown context-parallel strategy {strategy!r}; known: {sorted(STRATEGIES)}")
    head_axis = HEAD_AXIS if tp > 1 and N % tp == 0 and K % tp == 0 else None
    if tp > 1 and head_axis is None:
        # Still correct (each tensor device computes every head); tp x the attention work.
        _say_once(f"context parallelism: N={N} query / K={K} kv heads do not both divide the "
                  f"tensor axis ({tp}); attention is replicated over it: each of its {tp} "
                  f"devices computes all heads ({tp}x the attention FLOPs and memory of a head split)")
    n_local = N // (tp if head_axis else 1)
    u = strat.ulysses_degree(cp, ulysses_degree)
    if cp % u:
        raise ValueError(f"{strategy}: ulysses degree u={u} does not divide the context degree cp={cp}")
    if n_local % u:
        raise ValueError(f"{strategy}: the local head count N={n_local} does not divide by the Ulysses "
                         f"degree {u} (N % cp != 0); heads are what the all-to-all splits")
    chunks = strat.zigzag_chunks(cp, ulysses_degree) if zigzag else cp
    if T % chunks:
        raise ValueError(f"{strategy}: T={T} does not divide into {chunks} sequence chunks "
                         f"({'2·ring size for zigzag' if zigzag else 'cp'})")
    batch_axes = tuple(a for a in BATCH_AXES if mesh_axis_size(mesh, a) > 1)
    shards = math.prod(mesh_axis_size(mesh, a) for a in batch_axes)
    if B % shards:
        # Refused, not replicated: the trainer's batches always divide, so this is a caller
        # whose batch was meant to be split; replicating would repeat every row's work.
        sizes = " x ".join(str(mesh_axis_size(mesh, a)) for a in BATCH_AXES)
        raise ValueError(f"context parallelism: batch B={B} does not divide into the {shards} "
                         f"batch shards of the mesh (data x fsdp = {sizes})")
    b = batch_axes or None
    qpos, kpos = mask.positions(B, T, S)
    qpos = jnp.broadcast_to(qpos, (B, T)).astype(jnp.int32)
    kpos = jnp.broadcast_to(kpos, (B, S)).astype(jnp.int32)
    spec = _Local(mask.causal, mask.window, float(H ** -0.5 if scale is None else scale), softcap, impl)
    body = functools.partial(strat.local, spec, axis=axis, cp=cp, u=u, zigzag=zigzag)
    x4, s2 = P(b, axis, head_axis, None), P(b, axis)
    args = (q, k, v, qpos, kpos, mask.q_segment_ids, mask.kv_segment_ids, sinks)
    specs = (x4, x4, x4, s2, s2, s2 if mask.has_segments else None, s2 if mask.has_segments else None,
             P(head_axis) if sinks is not None else None)
    fn = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(x4, P(b, head_axis, axis)),
                       check_vma=False)
    o, lse = fn(*args)
    return (o, lse) if return_lse else o


# --------------------------------------------------------------------------- activation
@contextlib.contextmanager
def activate(config: ContextParallelConfig, mesh, *, zigzag: bool):
    """Route every self-attention call in this block through ``config.strategy``.

    Use inside the traced function (the trainer wraps its forward). Only calls that
    declare ``self_attention=True`` are split; False (cross-attention, decode against a
    cache) runs as usual, and an undeclared call (None) runs unsplit with one warning.

    Example:
      >>> import jax
      >>> from attn.core import attention
      >>> from train.sharding import MeshConfig, make_mesh
      >>> mesh = make_mesh(MeshConfig(shape=(1, 1, -1, 1)))
      >>> x = jax.random.normal(jax.random.key(0), (2, 32, 4, 8))
      >>> with activate(ContextParallelConfig("all_gather"), mesh, zigzag=False):
      ...     o = attention(x, x, x, self_attention=True)
      >>> o.shape
      (2, 32, 4, 8)
    """
    def route(call, q, k, v, *, mask, scale, softcap, sinks, bias, return_lse, impl,
              self_attention=None):
        if not self_attention or mesh_axis_size(mesh, CONTEXT_AXIS) == 1:
            if self_attention is None and mesh_axis_size(mesh, CONTEXT_AXIS) > 1:
                _say_once("context parallelism: an attention() call without self_attention= "
                          f"(q {call.q_shape}, k {call.k_shape}) runs unsplit; pass "
                          "self_attention=True from a self-attention layer to split it")
            return None
        if bias is not None:
            raise NotImplementedError("context parallelism does not shard an additive bias; "
                                      "use mesh context=1 for this model")
        return context_parallel_attention(
            q, k, v, mask=mask, scale=scale, softcap=softcap, sinks=sinks, return_lse=True,
            impl=config.impl or impl, strategy=config.strategy, mesh=mesh, zigzag=zigzag,
            ulysses_degree=config.ulysses_degree)

    with core.route_attention(route):
        yield
