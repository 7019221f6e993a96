"""Per-head capture and intervention at the op contract (``attn.core.route_attention``).

``HeadIntercept`` is a router: every ``attention()`` call inside ``route_attention`` is
offered to it. For the layers it was asked about it runs the call itself (through
``select_impl(call, impl).fn``, never ``attention``, so it cannot recurse) and

* records the attention probabilities ``probs_BNTS [B, N, T_sel, S]`` (float32) of
  selected query rows, recomputed from q, k, the call's ``Mask``, scale, softcap, sinks
  and bias (``head_probs``);
* records the per-head outputs ``o_BTNE [B, T, N, E]`` (before the output projection);
* replaces the outputs of chosen heads: zero ablation, mean ablation (a per-head mean
  output ``[L, N, E]``), or patching from another run's recorded ``o``. The output
  projection is linear in the heads (``'BTNE,NED->BTD'``), so changing
  ``o[:, :, n, :]`` is exactly removing or replacing head ``n``'s contribution.

Layer identity comes from call order: in a model that is not scanned, layer ``l``'s
attention is the ``l``-th call (a scanned model traces one body for all layers, so it is
refused; ``unscan`` converts it). Records are tracers during tracing and are returned by
the traced function (``intercepted_apply``), so everything works under ``jax.jit``
(``capture`` is the jitted form).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> from models.transformer import LMConfig, Transformer
  >>> from models.analysis.capture import InterceptSpec, capture
  >>> cfg = LMConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, dtype="float32")
  >>> params = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32)))["params"]
  >>> spec = InterceptSpec(probs_layers=(1,), rows=2, out_layers=(0,), ablate=((0, 1),))
  >>> logits, rec = capture(cfg, params, jnp.ones((1, 5), jnp.int32), spec=spec)
  >>> rec["probs"][1].shape, rec["o"][0].shape
  ((1, 2, 2, 5), (1, 5, 2, 8))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.core import route_attention, select_impl
from attn.errors import UserError
from attn.masks import Mask
from models.transformer import LMConfig, Transformer

Array = Any
ABLATE_MODES = ("zero", "mean")


# --------------------------------------------------------------------------- pure math
def row_indices(q_len: int, rows) -> np.ndarray:
    """Static query-row indices ``[T_sel]``: ``rows=None`` all, an int the last ``rows``,
    or a sequence of indices (negative counts from the end).

    Example:
      >>> row_indices(5, 2).tolist(), row_indices(5, None).tolist(), row_indices(5, [0, -1]).tolist()
      ([3, 4], [0, 1, 2, 3, 4], [0, 4])
    """
    if rows is None:
        return np.arange(q_len)
    if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool):
        if not 1 <= rows <= q_len:
            raise UserError(f"rows={rows}: must be in [1, T={q_len}]")
        return np.arange(q_len - rows, q_len)
    idx = np.asarray(list(rows), np.int64)
    if idx.ndim != 1 or idx.size == 0 or np.any(idx >= q_len) or np.any(idx < -q_len):
        raise UserError(f"rows={list(rows)!r}: need a non-empty list of indices in [-{q_len}, {q_len})")
    return idx % q_len


def head_probs(q_BTNH, k_BSKH, *, mask: Mask | None = None, scale: float | None = None,
               softcap: float | None = None, sinks_N=None, bias=None, rows=None):
    """Attention probabilities ``[B, N, T_sel, S]`` in float32 for the selected query rows.

    The same math as ``attn.core`` (``logits = softcap(scale q·k) + bias``, hidden keys
    ``-inf``, sinks join the normaliser but have no column), so a row sums to 1, or less
    with sinks; a fully masked row (padding) is all 0, never NaN.

    Args:
      q_BTNH: ``[B, T, N, H]`` queries. k_BSKH: ``[B, S, K, H]`` keys, ``N % K == 0``.
      mask: the call's ``attn.masks.Mask`` (None: all visible).
      scale: default ``H ** -0.5``. softcap: ``c tanh(x / c)`` or None.
      sinks_N: ``[N]`` sink logits or None. bias: broadcastable to ``[B, N, T, S]``.
      rows: which query rows (``row_indices``): None all, int the last ``rows``.

    Example:
      >>> import jax.numpy as jnp
      >>> from attn.masks import Mask
      >>> p = head_probs(jnp.ones((1, 3, 2, 4)), jnp.ones((1, 3, 1, 4)), mask=Mask(causal=True))
      >>> p.shape, p[0, 0].tolist()
      ((1, 2, 3, 3), [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.3333333432674408, 0.3333333432674408, 0.3333333432674408]])
    """
    mask = Mask() if mask is None else mask
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    idx = row_indices(T, rows)
    scale = H ** -0.5 if scale is None else scale
    q = q_BTNH[:, idx].astype(jnp.float32).reshape(B, len(idx), K, N // K, H)
    # Head n = k·G + g, the grouping attn.core uses; HIGHEST keeps float32 on TF32 GPUs.
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k_BSKH.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST).reshape(B, N, len(idx), S) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if bias is not None:
        b4 = jnp.asarray(bias, jnp.float32)
        b4 = b4.reshape((1,) * (4 - b4.ndim) + b4.shape)
        s = s + (b4[:, :, idx] if b4.shape[2] == T else b4)
    qp, kp = mask.positions(B, T, S)
    qseg = None if mask.q_segment_ids is None else mask.q_segment_ids[:, idx]
    vis = mask.tile(qp[:, idx], kp, qseg, mask.kv_segment_ids, jnp.asarray(idx), jnp.arange(S))
    if vis is not None:
        s = jnp.where(vis, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    if sinks_N is not None:
        sink = jnp.asarray(sinks_N, jnp.float32)[None, :, None]
        m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # empty row: any finite shift; its sum is 0
    e = jnp.exp(s - m[..., None])
    l = jnp.sum(e, axis=-1)
    if sinks_N is not None:
        l = l + jnp.exp(sink - m)
    return jnp.where(l[..., None] > 0, e / jnp.where(l > 0, l, 1.0)[..., None], 0.0)


# --------------------------------------------------------------------------- the spec
def _pairs(name, pairs) -> tuple[tuple[int, int], ...]:
    out = []
    for p in pairs:
        if len(tuple(p)) != 2:
            raise UserError(f"InterceptSpec.{name}: entries must be (layer, head) pairs, got {p!r}")
        out.append((int(p[0]), int(p[1])))
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class InterceptSpec:
    """What to record and change (static: hashable, so it can be a ``jit`` static arg).

    Attributes:
      probs_layers: layers whose attention probabilities are recorded.
      rows: query rows of those probabilities (``row_indices``): None all, int the last n.
      out_layers: layers whose per-head outputs ``o [B, T, N, E]`` are recorded (as the
        heads computed them, before this spec's own ablation or patch at that layer).
      ablate: ``(layer, head)`` pairs whose outputs are replaced by 0 (``"zero"``) or by
        ``mean_o[layer, head]`` (``"mean"``).
      ablate_mode: ``"zero"`` or ``"mean"``.
      patch: ``(layer, head)`` pairs whose outputs are taken from ``patch_o[layer]``.
      patch_rows: patch only the last ``patch_rows`` query rows (None: all rows).

    Example:
      >>> InterceptSpec(ablate=[(2, 1), (0, 3), (2, 1)]).ablate
      ((0, 3), (2, 1))
    """

    probs_layers: tuple[int, ...] = ()
    rows: Any = None
    out_layers: tuple[int, ...] = ()
    ablate: tuple[tuple[int, int], ...] = ()
    ablate_mode: str = "zero"
    patch: tuple[tuple[int, int], ...] = ()
    patch_rows: int | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("probs_layers", tuple(sorted({int(l) for l in self.probs_layers})))
        set_("out_layers", tuple(sorted({int(l) for l in self.out_layers})))
        set_("ablate", _pairs("ablate", self.ablate))
        set_("patch", _pairs("patch", self.patch))
        if self.rows is not None and not isinstance(self.rows, (int, np.integer)):
            set_("rows", tuple(int(r) for r in self.rows))
        if self.ablate_mode not in ABLATE_MODES:
            raise UserError(f"InterceptSpec.ablate_mode={self.ablate_mode!r}: must be one of {ABLATE_MODES}")
        if self.patch_rows is not None and not (isinstance(self.patch_rows, int) and self.patch_rows >= 1):
            raise UserError(f"InterceptSpec.patch_rows={self.patch_rows!r}: must be a positive int or None")
        both = set(self.ablate) & set(self.patch)
        if both:
            raise UserError(f"InterceptSpec: heads {sorted(both)} are both ablated and patched")

    def validate(self, num_layers: int, num_heads: int) -> None:
        """One-line ``UserError`` naming an unknown layer or head."""
        for name in ("probs_layers", "out_layers"):
            for l in getattr(self, name):
                if not 0 <= l < num_layers:
                    raise UserError(f"InterceptSpec.{name}: layer {l} is not in [0, {num_layers})")
        for name in ("ablate", "patch"):
            for l, n in getattr(self, name):
                if not 0 <= l < num_layers:
                    raise UserError(f"InterceptSpec.{name}: layer {l} (of {l}:{n}) is not in [0, {num_layers})")
                if not 0 <= n < num_heads:
                    raise UserError(f"InterceptSpec.{name}: head {n} (of {l}:{n}) is not in [0, {num_heads})")

    @property
    def layers(self) -> frozenset[int]:
        """Every layer the spec touches (the router declines the others)."""
        return frozenset(self.probs_layers) | frozenset(self.out_layers) | frozenset(
            l for l, _ in self.ablate + self.patch)


def parse_heads(items: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """``["3:1", "14:5"]`` → ``((3, 1), (14, 5))``; one-line ``UserError`` otherwise.

    Example:
      >>> parse_heads(["3:1", "14:5"])
      ((3, 1), (14, 5))
    """
    out = []
    for s in items:
        try:
            l, n = s.split(":")
            out.append((int(l), int(n)))
        except ValueError:
            raise UserError(f"head {s!r}: expected LAYER:HEAD, e.g. 14:5") from None
    return tuple(out)


# --------------------------------------------------------------------------- the router
class HeadIntercept:
    """The router (see the module docstring); one instance per trace.

    ``HeadIntercept(spec, num_layers=L, num_heads=N, mean_o=[L, N, E] | None,
    patch_o={layer: [B, T, N, E]} | None)``; after the forward, ``records()`` gives
    ``{"probs": {layer: [B, N, T_sel, S]}, "o": {layer: [B, T, N, E]}}`` and ``calls``
    the number of attention calls seen.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from attn.core import attention, route_attention
      >>> x = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
      >>> hi = HeadIntercept(InterceptSpec(probs_layers=(0,), ablate=((0, 1),)), num_layers=1, num_heads=2)
      >>> with route_attention(hi):
      ...     o = attention(x, x, x)
      >>> hi.records()["probs"][0].shape, float(jnp.abs(o[:, :, 1]).max())
      ((1, 2, 4, 4), 0.0)
    """

    def __init__(self, spec: InterceptSpec, *, num_layers: int, num_heads: int,
                 mean_o=None, patch_o: Mapping[int, Array] | None = None):
        spec.validate(num_layers, num_heads)
        if spec.ablate and spec.ablate_mode == "mean" and mean_o is None:
            raise UserError("InterceptSpec.ablate_mode='mean' needs mean_o [L, N, E] (mean_head_outputs)")
        missing = sorted({l for l, _ in spec.patch} - set(patch_o or {}))
        if missing:
            raise UserError(f"InterceptSpec.patch: patch_o has no recorded outputs for layers {missing}")
        self.spec, self.num_layers, self.num_heads = spec, num_layers, num_heads
        self.mean_o, self.patch_o = mean_o, dict(patch_o or {})
        self.calls = 0
        self.probs: dict[int, Array] = {}
        self.outputs: dict[int, Array] = {}

    def records(self) -> dict:
        return {"probs": dict(self.probs), "o": dict(self.outputs)}

    def __call__(self, call, q, k, v, *, mask, scale, softcap, sinks, bias, return_lse, impl,
                 self_attention=None):
        layer = self.calls
        self.calls += 1
        if layer >= self.num_layers:
            raise ValueError(f"HeadIntercept: attention call {layer + 1} but the model has "
                             f"{self.num_layers} layers (more than one call per layer?)")
        spec = self.spec
        if layer not in spec.layers:
            return None  # decline: the call runs as usual
        o, lse = select_impl(call, impl).fn(q, k, v, mask=mask, scale=scale, softcap=softcap,
                                            sinks=sinks, bias=bias, return_lse=return_lse)
        if layer in spec.probs_layers:
            self.probs[layer] = head_probs(q, k, mask=mask, scale=scale, softcap=softcap,
                                           sinks_N=sinks, bias=bias, rows=spec.rows)
        if layer in spec.out_layers:
            self.outputs[layer] = o
        abl = [n for l, n in spec.ablate if l == layer]
        if abl:
            heads = np.asarray(abl)
            if spec.ablate_mode == "zero":
                o = o.at[:, :, heads].set(0)
            else:
                o = o.at[:, :, heads].set(jnp.asarray(self.mean_o)[layer, heads].astype(o.dtype))
        pat = [n for l, n in spec.patch if l == layer]
        if pat:
            src = jnp.asarray(self.patch_o[layer])
            if src.shape != o.shape:
                raise UserError(f"patch_o[{layer}] has shape {tuple(src.shape)}, the run's o is "
                                f"{tuple(o.shape)} (patch runs must have equal token shapes)")
            heads = np.asarray(pat)
            t0 = 0 if spec.patch_rows is None else max(o.shape[1] - spec.patch_rows, 0)
            o = o.at[:, t0:, heads].set(src[:, t0:, heads].astype(o.dtype))
        return o, lse


# --------------------------------------------------------------------------- model level
def check_unscanned(config: LMConfig) -> None:
    """One-line ``UserError`` for a scanned (or rematerialised) model.

    Example:
      >>> from models.transformer import LMConfig
      >>> check_unscanned(LMConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=1))
    """
    if config.scan_layers:
        raise UserError("head capture needs an unscanned model (scan_layers=True traces one body "
                        "for all layers); convert it with models.analysis.capture.unscan(config, params)")
    if config.remat != "none":
        # jax.checkpoint would re-trace the layer, and the recorded tracers would escape it.
        raise UserError(f"head capture needs remat='none', got remat={config.remat!r} (unscan() sets it)")


def unscan(config: LMConfig, params):
    """Scan layout → unscanned: ``(config with scan_layers=False, remat='none', params)``.

    ``params["units"]`` (leading ``[num_layers // P]`` axis) becomes ``unit_0, unit_1, ...``;
    the inverse of ``models.transformer.stack_unit_params``. Logits are bit-identical.
    An unscanned model is returned as it is (with remat switched off).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from models.transformer import LMConfig, Transformer
      >>> cfg = LMConfig(vocab_size=8, d_model=16, num_layers=2, num_heads=2, scan_layers=True)
      >>> p = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"]
      >>> cfg2, p2 = unscan(cfg, p)
      >>> cfg2.scan_layers, sorted(p2)
      (False, ['embedding', 'final_norm', 'unit_0', 'unit_1'])
    """
    params = nn.unbox(params)
    params = dict(params["params"] if "params" in params else params)
    new_cfg = dataclasses.replace(config, scan_layers=False, remat="none")
    if not config.scan_layers:
        return new_cfg, params
    units = params.pop("units")
    for r in range(config.num_repeats):
        params[f"unit_{r}"] = jax.tree_util.tree_map(lambda a, r=r: a[r], units)
    return new_cfg, params


def padded_inputs(prompts: Sequence[Sequence[int]], length: int | None = None):
    """Left-pad token lists (as ``models.generate``): ``(tokens, positions, segment_ids)``
    int32 ``[B, T]``; padding is segment 0 and real tokens count positions from 0.

    Example:
      >>> t, p, s = padded_inputs([[5, 6, 7], [8]])
      >>> t.tolist(), p.tolist(), s.tolist()
      ([[5, 6, 7], [0, 0, 8]], [[0, 1, 2], [0, 0, 0]], [[1, 1, 1], [0, 0, 1]])
    """
    T = max(len(p) for p in prompts) if length is None else length
    if any(len(p) == 0 or len(p) > T for p in prompts):
        raise UserError(f"padded_inputs: every prompt needs 1..{T} tokens")
    tok = np.zeros((len(prompts), T), np.int32)
    seg = np.zeros((len(prompts), T), np.int32)
    for b, p in enumerate(prompts):
        tok[b, T - len(p):] = np.asarray(p, np.int32)
        seg[b, T - len(p):] = 1
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return tok, pos, seg


def intercepted_apply(config: LMConfig, params, tokens_BT, *, positions_BT=None,
                      segment_ids_BT=None, spec: InterceptSpec = InterceptSpec(), mean_o=None,
                      patch_o=None):
    """One forward pass with a ``HeadIntercept``: ``(logits [B, T, V] float32, records)``.

    Not jitted, so it composes inside other jitted functions; ``capture`` is its jitted
    form. Args as ``Transformer.__call__`` (no cache) plus the ``HeadIntercept`` ones;
    ``params`` is the bare tree or ``{"params": ...}``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from models.transformer import LMConfig, Transformer
      >>> cfg = LMConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=2, dtype="float32")
      >>> v = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32)))
      >>> logits, rec = intercepted_apply(cfg, v, jnp.ones((1, 3), jnp.int32))
      >>> bool(jnp.allclose(logits, Transformer(cfg).apply(v, jnp.ones((1, 3), jnp.int32))[0]))
      True
    """
    check_unscanned(config)
    params = params["params"] if "params" in params else params
    router = HeadIntercept(spec, num_layers=config.num_layers, num_heads=config.num_heads,
                           mean_o=mean_o, patch_o=patch_o)
    with route_attention(router):
        logits, _ = Transformer(config).apply({"params": params}, tokens_BT, positions_BT=positions_BT,
                                              segment_ids_BT=segment_ids_BT)
    if router.calls != config.num_layers:
        raise UserError(f"head capture: saw {router.calls} attention calls for {config.num_layers} "
                        f"layers (attn={config.attn!r}: every layer must call attention() once)")
    return logits, router.records()


capture = jax.jit(intercepted_apply, static_argnums=(0,), static_argnames=("spec",))
capture.__doc__ = "``jax.jit(intercepted_apply)`` with ``config`` and ``spec`` static."


@functools.partial(jax.jit, static_argnums=(0,))
def _sum_outputs(config, params, tokens_BT, segment_ids_BT):
    spec = InterceptSpec(out_layers=tuple(range(config.num_layers)))
    pos = jnp.maximum(jnp.cumsum(segment_ids_BT, axis=1) - 1, 0)
    _, rec = intercepted_apply(config, params, tokens_BT, positions_BT=pos,
                               segment_ids_BT=segment_ids_BT, spec=spec)
    w = (segment_ids_BT > 0).astype(jnp.float32)[:, :, None, None]
    o_L = jnp.stack([jnp.sum(rec["o"][l].astype(jnp.float32) * w, axis=(0, 1))
                     for l in range(config.num_layers)])
    return o_L, jnp.sum(w)


def mean_head_outputs(config: LMConfig, params, token_lists: Sequence[Sequence[int]], *,
                      batch: int = 2):
    """Mean per-head output over every real token of ``token_lists``: ``[L, N, E]`` float32
    (the value mean ablation writes in place of a head).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from models.transformer import LMConfig, Transformer
      >>> cfg = LMConfig(vocab_size=8, d_model=8, num_layers=2, num_heads=2, dtype="float32")
      >>> v = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32)))
      >>> mean_head_outputs(cfg, v, [[1, 2, 3], [4, 5]]).shape
      (2, 2, 4)
    """
    check_unscanned(config)
    total, count = 0.0, 0.0
    for i in range(0, len(token_lists), batch):
        tok, _, seg = padded_inputs(token_lists[i:i + batch])
        s, c = _sum_outputs(config, params, jnp.asarray(tok), jnp.asarray(seg))
        total, count = total + s, count + c
    return total / count
