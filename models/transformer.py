"""Decoder-only language model: per-layer attention by registry name, SwiGLU, RMSNorm.

Layout: token embedding ``[V, D]`` → ``num_layers`` pre-norm blocks
(``x += attn(norm(x)); x += mlp(norm(x))``) → final RMSNorm → logits ``[B, T, V]``
(float32), with the head tied to the embedding or separate.

* The attention of each layer comes from ``LMConfig.attn``, a comma-separated pattern
  of registry names that repeats across depth ("gqa,gqa,mha" with 6 layers gives
  gqa gqa mha gqa gqa mha); ``attn_overrides`` sets per-mechanism config fields.
* ``scan_layers=True`` runs ``nn.scan`` over the repeats of the pattern: parameters of
  ``units`` get a leading ``[num_layers // len(pattern)]`` axis named ``LAYERS``.
  Without scan the repeats are ``unit_0``, ``unit_1``, ... with the same inner layout,
  so ``stack_unit_params`` converts one checkpoint layout into the other.
* ``remat``: "none", "full" (save nothing, recompute the block) or "dots"
  (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``: keep the projection
  and MLP matmul outputs, recompute attention and elementwise work).
* Mixed precision: parameters in ``param_dtype`` (float32), compute in ``dtype``
  (bfloat16), norms and logits in float32.
* Extra visibility: ``extra_range_BT2 [B, T, 2]`` (inclusive key positions each token
  may see on top of the causal rule, ``attn.masks.Mask.q_extra_range``) reaches every
  layer's mask; the VLM uses it for its prefix and modality-mutual masks. A mechanism
  takes it by accepting the ``extra_range_BT2`` keyword in its ``__call__`` (all the
  built-in softmax layers do); one that does not gets a clear error, never a silent drop.
* Auxiliary losses: a layer may call ``self.sow("aux_loss", name, value)`` with an
  unweighted scalar. The trainer applies the model with ``mutable=["aux_loss"]`` and
  adds ``config.train.aux_loss_weight * sum(jnp.sum(x) for x in jax.tree.leaves(aux))``
  to the loss (under scan each leaf has a leading layer axis, which the sum covers).

How a trainer calls it::

    cfg = LMConfig.from_dict(config.model)              # ValueError names unknown keys
    model = Transformer(cfg)
    params = model.init(rng, tokens_BT)["params"]        # logically boxed (nn.Partitioned);
                                                         # init may also return "aux_loss": drop it
    (logits_BTV, _), aux = model.apply({"params": params}, tokens_BT, segment_ids_BT=seg,
                                       positions_BT=pos, mutable=["aux_loss"])
    loss = xent(logits_BTV, targets) + sum(jnp.sum(x) for x in jax.tree.leaves(aux))

Parameter shardings come from ``nn.get_partition_spec(jax.eval_shape(model.init, ...))``
and ``nn.logical_to_mesh_sharding(specs, mesh, rules)``; activations are constrained at
the embedding, after every block and on the logits.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from models.transformer import LMConfig, Transformer, generate
  >>> cfg = LMConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4, attn="gqa,mha",
  ...                attn_overrides={"gqa": {"num_kv_heads": 2}}, dtype="float32")
  >>> tokens = jnp.zeros((1, 6), jnp.int32)
  >>> variables = Transformer(cfg).init(jax.random.key(0), tokens)
  >>> logits, _ = Transformer(cfg).apply(variables, tokens)
  >>> out = generate(cfg, variables, tokens, max_new_tokens=3)
  >>> logits.shape, out.shape
  ((1, 6, 32), (1, 3))
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from attn import registry
from attn.axes import BATCH, EMBED, LAYERS, LENGTH, MLP, VOCAB
from attn.cache import check_overflow, overflow_state
from attn.mha import rms_norm
from attn.positions import RopeConfig, scaling_from_any
from models import ffn

Array = Any

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _freeze(value, field: str):
    """Mappings (dicts, FrozenDicts, ml_collections ConfigDicts) as hashable FrozenDicts."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise ValueError(f"LMConfig.{field} must be a mapping, got {value!r}")
    return FrozenDict({k: _freeze(v, f"{field}.{k}") if isinstance(v, Mapping) or hasattr(v, "to_dict")
                       else v for k, v in value.items()})


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Decoder LM settings; validates itself (and every layer's config) on construction.

    Attributes:
      vocab_size: V.
      d_model: D.
      num_layers: number of blocks; a multiple of the pattern length.
      num_heads: N (query heads) passed to every mechanism.
      head_dim: H, None = D // N.
      ffn_dim: F of the SwiGLU MLP; None = 8/3·D rounded up to a multiple of 64
        (same parameter count as a 4·D GELU MLP). Resolved on construction.
      attn: comma-separated registry names, repeated across depth ("mha", "gqa,gqa,mha").
      attn_overrides: ``{mechanism name: {config field: value}}``, e.g.
        ``{"gqa": {"num_kv_heads": 2, "window": 64}}``.
      tie_embeddings: output head = embedding transpose.
      remat: "none" | "full" | "dots".
      scan_layers: ``nn.scan`` over the repeats of the pattern.
      dtype: compute dtype; param_dtype: parameter dtype.
      norm_eps: RMSNorm epsilon (blocks, final norm, qk-norm).
      rope_theta, rope_fraction, rope_scaling: RoPE for every layer that uses it
        (``rope_scaling``: a scaling of ``attn.positions`` or a dict with its ``type``); ``use_rope=False``
        disables it (a mechanism may still override ``rope``).
      impl: attention implementation handed to every layer ("auto", "xla", ...).
      ffn: comma-separated FFN registry names (``models.ffn``: "swiglu", "moe"), zipped
        with the attention pattern; one name applies to every layer ("mla,mla" with
        ffn="swiglu,moe" gives a dense first layer of each repeat).
      ffn_overrides: ``{ffn name: {config field: value}}``, e.g.
        ``{"moe": {"num_experts": 16, "top_k": 2}}``.

    Example:
      >>> LMConfig(vocab_size=256, d_model=96, num_layers=2, num_heads=4).ffn_dim
      256
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    head_dim: int | None = None
    ffn_dim: int | None = None
    attn: str = "mha"
    attn_overrides: Mapping[str, Mapping[str, Any]] = FrozenDict()
    tie_embeddings: bool = True
    remat: str = "none"
    scan_layers: bool = False
    dtype: Any = "bfloat16"
    param_dtype: Any = "float32"
    norm_eps: float = 1e-6
    use_rope: bool = True
    rope_theta: float = 10_000.0
    rope_fraction: float = 1.0
    rope_scaling: Any = None
    impl: str = "auto"
    ffn: str = "swiglu"
    ffn_overrides: Mapping[str, Mapping[str, Any]] = FrozenDict()

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        for f in ("vocab_size", "d_model", "num_layers", "num_heads"):
            v = getattr(self, f)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"LMConfig.{f} must be a positive int, got {v!r}")
        if self.ffn_dim is None:
            set_("ffn_dim", 64 * math.ceil(8 * self.d_model / 3 / 64))
        if not (isinstance(self.ffn_dim, int) and self.ffn_dim > 0):
            raise ValueError(f"LMConfig.ffn_dim must be a positive int or None, got {self.ffn_dim!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"LMConfig.remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        for f in ("dtype", "param_dtype"):
            try:
                set_(f, jnp.dtype(getattr(self, f)))
            except TypeError as e:
                raise ValueError(f"LMConfig.{f}: not a dtype: {getattr(self, f)!r}") from e
        # A scaling object of attn.positions, or a dict ({"type": "yarn"|"llama3"|..., ...}).
        set_("rope_scaling", scaling_from_any(self.rope_scaling))
        if not isinstance(self.attn, str) or not self.attn.strip():
            raise ValueError(f"LMConfig.attn must be a non-empty pattern string, got {self.attn!r}")
        pattern = self.pattern
        if self.num_layers % len(pattern):
            raise ValueError(
                f"LMConfig.num_layers={self.num_layers} is not a multiple of the attention "
                f"pattern length {len(pattern)} (attn={self.attn!r})"
            )
        known = registry.names()
        for name in pattern:
            if name not in known:
                raise ValueError(f"LMConfig.attn: unknown attention mechanism {name!r}; registered: {list(known)}")
        set_("attn_overrides", _freeze(self.attn_overrides, "attn_overrides"))
        for name in self.attn_overrides:
            if name not in pattern:
                raise ValueError(
                    f"LMConfig.attn_overrides has key {name!r}, which is not in attn={self.attn!r}"
                )
        # Build every layer config now, so bad overrides fail before anything compiles.
        set_("_layer_configs", tuple(self._make_layer_config(n) for n in pattern))
        set_("ffn_overrides", _freeze(self.ffn_overrides, "ffn_overrides"))
        set_("_ffn_configs", _ffn_configs(self))

    @classmethod
    def from_dict(cls, d) -> "LMConfig":
        """Build from a dict / ConfigDict; ``ValueError`` names unknown keys.

        Example:
          >>> LMConfig.from_dict(dict(vocab_size=8, d_model=16, num_layers=1, num_heads=2)).d_model
          16
        """
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"LMConfig: unknown config key(s) {unknown}; accepted: {sorted(fields)}")
        return cls(**d)

    @property
    def pattern(self) -> tuple[str, ...]:
        """The attention names of one repeat unit."""
        return tuple(s.strip() for s in self.attn.split(","))

    @property
    def num_repeats(self) -> int:
        return self.num_layers // len(self.pattern)

    @property
    def layer_configs(self) -> tuple:
        """Attention ``Config`` per pattern position (layer ``l`` uses ``[l % len(pattern)]``)."""
        return self._layer_configs

    def common_attention_fields(self) -> dict:
        """The model-wide fields every mechanism's ``make_config`` receives."""
        rope = (RopeConfig(theta=self.rope_theta, fraction=self.rope_fraction, scaling=self.rope_scaling)
                if self.use_rope else None)
        return dict(d_model=self.d_model, num_heads=self.num_heads, head_dim=self.head_dim,
                    dtype=self.dtype, param_dtype=self.param_dtype, impl=self.impl,
                    norm_eps=self.norm_eps, rope=rope)

    @property
    def ffn_configs(self) -> tuple:
        """``(ffn name, config)`` per pattern position (``models.ffn`` registry)."""
        return self._ffn_configs

    def _make_layer_config(self, name: str):
        overrides = dict(self.attn_overrides.get(name, {}))
        return registry.get(name).make_config(self.common_attention_fields(), overrides)


# --------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    """RMSNorm with a learned ``[D]`` scale (EMBED axis); float32 math, input dtype out."""

    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
                           (x_BTD.shape[-1],), self.param_dtype)
        return rms_norm(x_BTD, scale, self.eps)


class SwiGLU(nn.Module):
    """SwiGLU MLP: ``w_gate, w_up [D, F]`` (EMBED, MLP), ``w_down [F, D]`` (MLP, EMBED)."""

    config: LMConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.config
        D, F = cfg.d_model, cfg.ffn_dim
        init = nn.initializers.lecun_normal()
        p = {n: self.param(n, nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype)
             for n, shape, axes in (("w_gate", (D, F), (EMBED, MLP)), ("w_up", (D, F), (EMBED, MLP)),
                                    ("w_down", (F, D), (MLP, EMBED)))}
        return swiglu(p, x_BTD, dtype=cfg.dtype)


@dataclasses.dataclass(frozen=True)
class SwiGLUConfig:
    """The dense FFN's fields (``SwiGLU`` reads d_model, ffn_dim, dtype, param_dtype)."""

    d_model: int
    ffn_dim: int
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32


ffn.register(ffn.FFN(
    name="swiglu", module=SwiGLU, make_config=ffn.config_factory(SwiGLUConfig, "swiglu"),
    stats=lambda c: dict(params=3 * c.d_model * c.ffn_dim, active_params=3 * c.d_model * c.ffn_dim,
                         flops_per_token=6 * c.d_model * c.ffn_dim),
    description="dense SwiGLU MLP"))


def _ffn_configs(cfg: LMConfig) -> tuple:
    """``(name, config)`` per attention-pattern position; errors name the field."""
    names = tuple(s.strip() for s in cfg.ffn.split(",")) if isinstance(cfg.ffn, str) else ()
    P = len(cfg.pattern)
    if len(names) not in (1, P) or not all(names):
        raise ValueError(f"LMConfig.ffn={cfg.ffn!r} must name one FFN or one per attention-pattern "
                         f"position ({P}: attn={cfg.attn!r})")
    names = names * P if len(names) == 1 else names
    for key in cfg.ffn_overrides:
        if key not in names:
            raise ValueError(f"LMConfig.ffn_overrides has key {key!r}, which is not in ffn={cfg.ffn!r}")
    common = dict(d_model=cfg.d_model, ffn_dim=cfg.ffn_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    return tuple((n, ffn.get(n).make_config(common, dict(cfg.ffn_overrides.get(n, {})))) for n in names)


class Block(nn.Module):
    """Pre-norm block: ``x += attn(norm(x)); x += mlp(norm(x))``; attention by pattern index."""

    config: LMConfig
    index: int  # position in the attention pattern

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache, extra_range_BT2=None):
        cfg = self.config
        mech = registry.get(cfg.pattern[self.index])
        h = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="attn_norm")(x_BTD)
        extra = {}
        if extra_range_BT2 is not None:
            if not accepts_extra_range(mech):
                raise NotImplementedError(
                    f"attention mechanism {mech.name!r} does not take extra_range_BT2 (extra "
                    "visible key ranges, e.g. the VLM's prefix / mutual masks): its __call__ "
                    "has no such keyword; use one that does: "
                    + ", ".join(n for n in registry.names() if accepts_extra_range(registry.get(n))))
            extra = {"extra_range_BT2": extra_range_BT2}
        a, cache = mech.module(cfg.layer_configs[self.index], name="attn")(
            h, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, cache=cache, **extra)
        x_BTD = x_BTD + a.astype(x_BTD.dtype)
        h = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="mlp_norm")(x_BTD)
        ffn_name, ffn_config = cfg.ffn_configs[self.index]
        x_BTD = x_BTD + ffn.get(ffn_name).module(ffn_config, name="mlp")(h).astype(x_BTD.dtype)
        return nn.with_logical_constraint(x_BTD, (BATCH, LENGTH, EMBED)), cache


class Unit(nn.Module):
    """One repeat of the attention pattern; the body of ``nn.scan`` when scanning."""

    config: LMConfig

    @nn.compact
    def __call__(self, x_BTD, caches, positions_BT, segment_ids_BT, extra_range_BT2=None):
        cfg = self.config
        block = Block
        if cfg.remat != "none":
            # Inside scan the CSE hazard remat guards against is already prevented.
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        new = []
        for j in range(len(cfg.pattern)):
            x_BTD, c = block(cfg, j, name=f"block_{j}")(
                x_BTD, positions_BT, segment_ids_BT, None if caches is None else caches[j],
                extra_range_BT2)
            new.append(c)
        return x_BTD, (None if caches is None else tuple(new))


class Transformer(nn.Module):
    """Decoder LM: ``__call__(tokens_BT, *, positions_BT=None, segment_ids_BT=None,
    cache=None, embeddings_BTD=None, extra_range_BT2=None) -> (logits_BTV float32, cache)``.

    Args (of ``__call__``):
      tokens_BT: ``[B, T]`` int token ids (may be None when ``embeddings_BTD`` is given).
      positions_BT: ``[B, T]`` int; default ``arange(T)``, or ``cache length + arange(T)``
        with a cache. Packed documents should pass per-document positions.
      segment_ids_BT: ``[B, T]`` int document ids, 0 = padding.
      cache: None, or the pytree from ``init_cache`` (returned updated).
      embeddings_BTD: ``[B, T, D]`` inputs used instead of the token embedding
        (vision tokens, or gradients with respect to the inputs).
      extra_range_BT2: ``[B, T, 2]`` int: per token an inclusive range ``(lo, hi)`` of key
        positions it may also see, whatever causality says (``Mask.q_extra_range``;
        ``hi < lo`` adds nothing). Handed to every layer. With a cache it applies to the
        T tokens of this call (a prefill), against everything cached.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = LMConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, scan_layers=True)
      >>> m = Transformer(cfg)
      >>> v = m.init(jax.random.key(0), jnp.zeros((2, 4), jnp.int32))
      >>> m.apply(v, jnp.zeros((2, 4), jnp.int32))[0].dtype
      dtype('float32')
    """

    config: LMConfig

    @nn.compact
    def __call__(self, tokens_BT=None, *, positions_BT=None, segment_ids_BT=None, cache=None,
                 embeddings_BTD=None, extra_range_BT2=None):
        cfg = self.config
        V, D = cfg.vocab_size, cfg.d_model
        embed_VD = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(D ** -0.5), (VOCAB, EMBED)),
            (V, D), cfg.param_dtype)
        x = _embed_inputs(cfg, embed_VD, tokens_BT, embeddings_BTD)
        B, T, _ = x.shape
        for name, a in (("positions_BT", positions_BT), ("segment_ids_BT", segment_ids_BT)):
            if a is not None and tuple(getattr(a, "shape", ())) != (B, T):
                raise ValueError(
                    f"Transformer: {name} must have shape [B, T]={(B, T)}, got {getattr(a, 'shape', a)}")
        if extra_range_BT2 is not None and tuple(getattr(extra_range_BT2, "shape", ())) != (B, T, 2):
            raise ValueError(f"Transformer: extra_range_BT2 must have shape [B, T, 2]={(B, T, 2)}, "
                             f"got {getattr(extra_range_BT2, 'shape', extra_range_BT2)}")
        if positions_BT is None and cache is not None:
            start = cache_length(cfg, cache)
            positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))
        if cfg.scan_layers:
            units = nn.scan(
                Unit, variable_axes={"params": 0, "aux_loss": 0, "intermediates": 0,
                                     "moe_state": 0, "moe_stats": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_repeats,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )(cfg, name="units")
            x, cache = units(x, cache, positions_BT, segment_ids_BT, extra_range_BT2)
        else:
            new = []
            for r in range(cfg.num_repeats):
                x, c = Unit(cfg, name=f"unit_{r}")(
                    x, None if cache is None else cache[r], positions_BT, segment_ids_BT,
                    extra_range_BT2)
                new.append(c)
            cache = None if cache is None else tuple(new)
        x = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = jnp.einsum("BTD,VD->BTV", x, embed_VD.astype(cfg.dtype),
                                preferred_element_type=jnp.float32)
        else:
            head_DV = self.param(
                "head", nn.with_logical_partitioning(nn.initializers.lecun_normal(), (EMBED, VOCAB)),
                (D, V), cfg.param_dtype)
            logits = jnp.einsum("BTD,DV->BTV", x, head_DV.astype(cfg.dtype),
                                preferred_element_type=jnp.float32)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), (BATCH, LENGTH, VOCAB))
        return logits, cache


# --------------------------------------------------------------------------- cache helpers
def init_cache(config: LMConfig, batch: int, max_len: int, dtype=None):
    """Empty caches for every layer, in the layout ``Transformer`` expects.

    * ``scan_layers=False``: ``cache[r][j]`` is the cache of layer ``r·P + j``
      (P = pattern length).
    * ``scan_layers=True``: ``cache[j]`` holds pattern position ``j`` of every repeat,
      each array stacked along a leading ``[num_layers // P]`` layer axis.

    Args:
      config: the ``LMConfig``.
      batch: B.
      max_len: tokens a full cache holds (prompt + generated).
      dtype: cache dtype, default ``config.dtype``.

    Example:
      >>> cfg = LMConfig(vocab_size=8, d_model=16, num_layers=2, num_heads=2, scan_layers=True)
      >>> init_cache(cfg, batch=1, max_len=4)[0].k.shape
      (2, 1, 4, 2, 8)
    """
    dtype = config.dtype if dtype is None else jnp.dtype(dtype)
    unit = tuple(registry.get(n).init_cache(c, batch, max_len, dtype)
                 for n, c in zip(config.pattern, config.layer_configs))
    R = config.num_repeats
    if config.scan_layers:
        return jax.tree_util.tree_map(lambda a: jnp.repeat(a[None], R, axis=0), unit)
    return tuple(unit for _ in range(R))


def cache_length(config: LMConfig, cache) -> Array:
    """Tokens appended so far (every cache exposes ``.length``; all layers agree)."""
    first = cache[0] if config.scan_layers else cache[0][0]
    length = first.length
    return length[0] if length.ndim else length


def stack_unit_params(params, config: LMConfig):
    """Convert the non-scan parameter layout (``unit_0..``) to the scan layout (``units``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = LMConfig(vocab_size=8, d_model=16, num_layers=2, num_heads=2)
      >>> p = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
      >>> sorted(stack_unit_params(p["params"], cfg))
      ['embedding', 'final_norm', 'units']
    """
    params = dict(params)
    units = [params.pop(f"unit_{r}") for r in range(config.num_repeats)]
    params["units"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *units)
    return params


# --------------------------------------------------------------------------- generation
def generate(config: LMConfig, params, prompt_BT, *, max_new_tokens: int, rng=None,
             temperature: float = 0.0, top_k: int | None = None, prompt_mask_BT=None,
             max_len: int | None = None, cache_dtype=None, return_logits: bool = False):
    """Prefill the KV cache with the prompt, then decode token by token (jitted, ``lax.scan``).

    Args:
      config: the ``LMConfig``.
      params: the variables from ``Transformer.init`` (``{"params": ...}``) or the
        bare params tree.
      prompt_BT: ``[B, P]`` int prompt, left-padded when rows differ in length.
      max_new_tokens: tokens to generate (>= 1).
      rng: a PRNG key, needed when ``temperature > 0``.
      temperature: 0 = greedy; otherwise sample from ``softmax(logits / temperature)``.
      top_k: sample only among the k most likely tokens.
      prompt_mask_BT: ``[B, P]`` bool, False on left padding (padding is invisible).
      max_len: full-cache capacity; default ``P + max_new_tokens``.
      cache_dtype: default ``config.dtype``.
      return_logits: also return the float32 logits ``[B, max_new_tokens, V]`` that
        produced each new token.

    Returns:
      ``tokens [B, max_new_tokens]`` int32, or ``(tokens, logits)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, dtype="float32")
      >>> v = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
      >>> generate(cfg, v, jnp.ones((1, 3), jnp.int32), max_new_tokens=2, temperature=1.0,
      ...          rng=jax.random.key(1)).shape
      (1, 2)
    """
    if getattr(prompt_BT, "ndim", None) != 2:
        raise ValueError(
            f"generate: prompt must be [B, P] token ids, got shape {getattr(prompt_BT, 'shape', None)}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    B, P = prompt_BT.shape
    # The last generated token is never fed back, so the cache holds P + n - 1 tokens.
    max_len = P + max_new_tokens if max_len is None else max_len
    if max_len < P + max_new_tokens - 1:
        raise ValueError(
            f"generate: max_len={max_len} is smaller than prompt length {P} + "
            f"max_new_tokens {max_new_tokens} - 1; the KV cache would overflow"
        )
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
    greedy = temperature == 0.0
    if not greedy and rng is None:
        raise ValueError("generate: temperature > 0 needs rng=jax.random.key(...)")
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
        raise ValueError(f"generate: top_k must be in [1, vocab_size={config.vocab_size}], got {top_k!r}")
    if prompt_mask_BT is not None and tuple(prompt_mask_BT.shape) != (B, P):
        raise ValueError(f"generate: prompt_mask_BT must have shape {(B, P)}, got {tuple(prompt_mask_BT.shape)}")
    variables = params if "params" in params else {"params": params}
    rng = jax.random.key(0) if rng is None else rng
    mask = jnp.ones((B, P), bool) if prompt_mask_BT is None else prompt_mask_BT
    tokens, logits, overflow = _generate_jit(
        config, variables, prompt_BT, mask, rng, jnp.float32(max(temperature, 1e-6)),
        max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k, max_len=max_len,
        cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype))
    # The budget check above is static; this one reads what the caches really saw (a
    # mechanism's cache may hold fewer slots than max_len), since jit could only drop.
    check_overflow(overflow, where="generate")
    return (tokens, logits) if return_logits else tokens


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("max_new_tokens", "greedy", "top_k", "max_len", "cache_dtype"))
def _generate_jit(config, variables, prompt_BT, mask_BT, rng, temperature, *, max_new_tokens,
                  greedy, top_k, max_len, cache_dtype):
    """Prefill + ``lax.scan`` decode; ``(tokens [B, n], logits [B, n, V], overflow_state)``."""
    model = Transformer(config)
    B, P = prompt_BT.shape
    cache = init_cache(config, B, max_len, cache_dtype)
    seg_BT = mask_BT.astype(jnp.int32)
    # Left padding: real tokens count positions from 0; padding (segment 0) is invisible.
    pos_BT = jnp.maximum(jnp.cumsum(seg_BT, axis=1) - 1, 0)
    logits, cache = model.apply(variables, prompt_BT, positions_BT=pos_BT, segment_ids_BT=seg_BT,
                                cache=cache)
    keys = jax.random.split(rng, max_new_tokens)
    first_V = logits[:, -1]
    tok_B = sample_token(first_V, keys[0], temperature, greedy=greedy, top_k=top_k)
    ones_B1 = jnp.ones((B, 1), jnp.int32)

    def step(carry, key):
        tok_B, cache, pos_B = carry
        logits, cache = model.apply(variables, tok_B[:, None], positions_BT=pos_B[:, None],
                                    segment_ids_BT=ones_B1, cache=cache)
        nxt_B = sample_token(logits[:, 0], key, temperature, greedy=greedy, top_k=top_k)
        return (nxt_B, cache, pos_B + 1), (nxt_B, logits[:, 0])

    (_, cache, _), (toks_nB, logits_nBV) = jax.lax.scan(step, (tok_B, cache, pos_BT[:, -1] + 1),
                                                        keys[1:])
    tokens = jnp.concatenate([tok_B[:, None], toks_nB.T], axis=1)
    logits = jnp.concatenate([first_V[:, None], jnp.swapaxes(logits_nBV, 0, 1)], axis=1)
    return tokens.astype(jnp.int32), logits, overflow_state(cache)


# --------------------------------------------------------------------------- pure functions
def accepts_extra_range(mechanism) -> bool:
    """Whether a registered mechanism's layer takes the ``extra_range_BT2`` keyword.

    Example:
      >>> from attn import registry
      >>> accepts_extra_range(registry.get("mla"))
      True
    """
    return "extra_range_BT2" in inspect.signature(mechanism.module.__call__).parameters


def sample_token(logits_BV, key, temperature, *, greedy: bool, top_k: int | None = None):
    """Next token ``[B]`` int32: argmax when ``greedy``, else top-k / temperature sampling.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> sample_token(jnp.array([[0.0, 2.0, 1.0]]), jax.random.key(0), 1.0, greedy=True).tolist()
      [1]
    """
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def swiglu(params, x_BTD, *, dtype=jnp.bfloat16):
    """``(silu(x W_gate) * (x W_up)) W_down`` with ``w_gate, w_up [D, F]``, ``w_down [F, D]``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = dict(w_gate=jnp.ones((4, 8)), w_up=jnp.ones((4, 8)), w_down=jnp.ones((8, 4)))
      >>> swiglu(p, jnp.zeros((1, 2, 4)), dtype=jnp.float32).shape
      (1, 2, 4)
    """
    x = x_BTD.astype(dtype)
    gate_BTF = jnp.einsum("BTD,DF->BTF", x, params["w_gate"].astype(dtype))
    up_BTF = jnp.einsum("BTD,DF->BTF", x, params["w_up"].astype(dtype))
    return jnp.einsum("BTF,FD->BTD", nn.silu(gate_BTF) * up_BTF, params["w_down"].astype(dtype))


def _embed_inputs(cfg: LMConfig, embed_VD, tokens_BT, embeddings_BTD):
    """Token lookup (or the given embeddings), validated and cast to the compute dtype."""
    if embeddings_BTD is not None:
        if getattr(embeddings_BTD, "ndim", None) != 3 or embeddings_BTD.shape[-1] != cfg.d_model:
            raise ValueError(
                f"Transformer: embeddings_BTD must be [B, T, D={cfg.d_model}], got "
                f"{getattr(embeddings_BTD, 'shape', None)}")
        return embeddings_BTD.astype(cfg.dtype)
    if getattr(tokens_BT, "ndim", None) != 2:
        raise ValueError(
            f"Transformer: tokens must be [B, T] int ids, got shape {getattr(tokens_BT, 'shape', tokens_BT)}")
    if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
        raise ValueError(f"Transformer: tokens must be integers, got dtype {tokens_BT.dtype}")
    return jnp.take(embed_VD, tokens_BT, axis=0).astype(cfg.dtype)
