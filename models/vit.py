"""Vision Transformer: patches down to pixel tokens, any registered attention per layer.

Layout: image ``x_BHWC`` (B batch, H×W pixels, C channels; in this file H and W are
image rows / columns, not head dims) → patches of ``p×p`` pixels, ``P = (H/p)·(W/p)``
tokens ``[B, P, D]`` (``patch_size=1`` gives one token per pixel, as in "Scaling Laws in
Patchification") → position embedding → ``depth`` pre-norm blocks
(``x += attn(LN(x)); x += mlp(LN(x))``, GELU MLP) → final LayerNorm → pooling → head.

* Attention per layer by registry name: ``attn`` is a comma-separated pattern repeated
  across depth (as in ``models.transformer``). Every layer config is built with
  ``causal=False`` and ``rope=None`` through the mechanism's ``make_config``; mechanisms
  whose ``Config`` has no ``causal`` field (cca, ccgqa: their convolutions are causal)
  are refused with ``NotImplementedError`` before anything compiles.
* Position embeddings (``pos_emb``): "learned" (a ``[gh, gw, D]`` grid) or "sincos"
  (fixed 2-D sin-cos), both defined on the config's grid and *resampled* with
  ``jax.image.resize`` (``pos_resize``: "bilinear" | "bicubic" | ...) when an image of
  another size comes in; "none". 2-D RoPE is not offered: the layer interface takes
  one scalar position per token (``positions_BT``), see the report / docs.
* Pooling (``pool``): "cls" (a learned token), "gap" (mean over patches), "map"
  (multihead attention pooling with a learned probe, as in big_vision), or "none"
  (return the patch features ``[B, P, D]``: the VLM's vision encoder).
* ``remat``: "none" | "full" | "dots" (the policies of ``models.transformer``).
* Variants ``VARIANTS`` (ViT paper / "How to train your ViT"): Ti, S, B, L.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from models.vit import ViT, ViTConfig
  >>> cfg = ViTConfig(image_size=8, channels=1, patch_size=2, width=32, depth=2,
  ...                 num_heads=4, num_classes=10, dtype="float32")
  >>> x = jnp.zeros((2, 8, 8, 1))
  >>> variables = ViT(cfg).init(jax.random.key(0), x)
  >>> ViT(cfg).apply(variables, x).shape
  (2, 10)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from attn import registry
from attn.core import attention
from models.transformer import REMAT_POLICIES, _freeze

Array = Any

# (width D, depth, heads N, mlp F) from Dosovitskiy et al. 2020 and Steiner et al. 2021.
VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}


def _pair(field: str, v) -> tuple[int, int]:
    """An int or a 2-sequence as ``(rows, cols)``; errors name the field."""
    t = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if len(t) != 2 or not all(isinstance(a, (int, np.integer)) and a > 0 for a in t):
        raise ValueError(f"ViTConfig.{field} must be a positive int or (rows, cols), got {v!r}")
    return (int(t[0]), int(t[1]))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """ViT settings; validates itself and every layer's attention config.

    Attributes:
      image_size: ``(H, W)`` or an int; the grid the position embedding is defined on.
      channels: C of the input images.
      patch_size: p (int or ``(ph, pw)``); 1 = pixel tokens. H and W must divide by it.
      width, depth, num_heads, mlp_dim: D, layers, N, F. ``variant`` fills them.
      variant: "Ti" | "S" | "B" | "L" or None; explicit fields given as non-None win.
      head_dim: H per head (None = D // N).
      num_classes: classifier outputs; 0 = no head (return pooled features).
      pool: "cls" | "gap" | "map" | "none".
      pos_emb: "learned" | "sincos" | "none".
      pos_resize: ``jax.image.resize`` method for other resolutions ("bilinear", "bicubic").
      attn: registry-name pattern ("mha", "mha,gqa"); attn_overrides: per-name fields.
      remat: "none" | "full" | "dots".
      impl: attention implementation for every layer.
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> ViTConfig(image_size=32, channels=3, patch_size=4, variant="Ti").width
      192
    """

    image_size: Any = 32
    channels: int = 3
    patch_size: Any = 4
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    variant: str | None = None
    head_dim: int | None = None
    num_classes: int = 0
    pool: str = "gap"
    pos_emb: str = "learned"
    pos_resize: str = "bilinear"
    attn: str = "mha"
    attn_overrides: Mapping[str, Mapping[str, Any]] = FrozenDict()
    remat: str = "none"
    impl: str = "auto"
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    norm_eps: float = 1e-6

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.variant is not None:
            if self.variant not in VARIANTS:
                raise ValueError(f"ViTConfig.variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
            for k, v in VARIANTS[self.variant].items():
                if getattr(self, k) is None:
                    set_(k, v)
        for f in ("width", "depth", "num_heads"):
            v = getattr(self, f)
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"ViTConfig.{f} must be a positive int (or set variant), got {v!r}")
        if self.mlp_dim is None:
            set_("mlp_dim", 4 * self.width)
        set_("image_size", _pair("image_size", self.image_size))
        set_("patch_size", _pair("patch_size", self.patch_size))
        (h, w), (ph, pw) = self.image_size, self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"ViTConfig.image_size={self.image_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        if not (isinstance(self.channels, int) and self.channels > 0):
            raise ValueError(f"ViTConfig.channels must be a positive int, got {self.channels!r}")
        for f, table in (("pool", POOLS), ("pos_emb", POS_EMBS), ("remat", REMAT_POLICIES)):
            if getattr(self, f) not in table:
                raise ValueError(f"ViTConfig.{f} must be one of {sorted(table)}, got {getattr(self, f)!r}")
        if self.num_classes < 0:
            raise ValueError(f"ViTConfig.num_classes must be >= 0, got {self.num_classes!r}")
        for f in ("dtype", "param_dtype"):
            set_(f, jnp.dtype(getattr(self, f)))
        set_("attn_overrides", _freeze(self.attn_overrides, "attn_overrides"))
        pattern = self.pattern
        if self.depth % len(pattern):
            raise ValueError(f"ViTConfig.depth={self.depth} is not a multiple of the attention "
                             f"pattern length {len(pattern)} (attn={self.attn!r})")
        for name in self.attn_overrides:
            if name not in pattern:
                raise ValueError(f"ViTConfig.attn_overrides has key {name!r}, not in attn={self.attn!r}")
        set_("_layer_configs", tuple(bidirectional_layer_config(n, self.common_attention_fields(),
                                                                self.attn_overrides.get(n, {}))
                                     for n in pattern))

    @classmethod
    def from_dict(cls, d) -> "ViTConfig":
        """Build from a dict / ConfigDict; ``ValueError`` names unknown keys."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"ViTConfig: unknown config key(s) {unknown}")
        return cls(**d)

    @property
    def pattern(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.attn.split(","))

    @property
    def grid(self) -> tuple[int, int]:
        """``(gh, gw)`` patches along rows / columns at ``image_size``."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def layer_configs(self) -> tuple:
        return self._layer_configs

    def common_attention_fields(self) -> dict:
        return dict(d_model=self.width, num_heads=self.num_heads, head_dim=self.head_dim,
                    dtype=self.dtype, param_dtype=self.param_dtype, impl=self.impl,
                    norm_eps=self.norm_eps, rope=None)


def bidirectional_layer_config(name: str, common: Mapping[str, Any], overrides: Mapping[str, Any]):
    """The mechanism's layer config with ``causal=False``; refuses causal-only mechanisms.

    Example:
      >>> bidirectional_layer_config("mha", dict(d_model=16, num_heads=2), {}).causal
      False
    """
    mech = registry.get(name)
    fields = {f.name for f in dataclasses.fields(mech.config_cls)}
    if "causal" not in fields:
        raise NotImplementedError(
            f"attention mechanism {name!r} has no causal=False option (its Config has no "
            f"'causal' field), so it cannot serve a bidirectional encoder; use one of "
            f"{[n for n in registry.names() if 'causal' in {f.name for f in dataclasses.fields(registry.get(n).config_cls)}]}")
    return mech.make_config(dict(common), {**dict(overrides), "causal": False})


# --------------------------------------------------------------------------- modules
class MLP(nn.Module):
    """GELU MLP ``D -> F -> D`` (the ViT block MLP)."""

    mlp_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        D = x_BTD.shape[-1]
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x_BTD)
        return nn.Dense(D, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(nn.gelu(h))


class EncoderBlock(nn.Module):
    """Pre-norm block; the attention is the registered mechanism at pattern ``index``."""

    config: ViTConfig
    index: int

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.config
        mech = registry.get(cfg.pattern[self.index])
        h = nn.LayerNorm(cfg.norm_eps, param_dtype=cfg.param_dtype, name="attn_norm")(x_BTD)
        a, _ = mech.module(cfg.layer_configs[self.index], name="attn")(h)
        x_BTD = x_BTD + a.astype(x_BTD.dtype)
        h = nn.LayerNorm(cfg.norm_eps, param_dtype=cfg.param_dtype, name="mlp_norm")(x_BTD)
        return x_BTD + MLP(cfg.mlp_dim, cfg.dtype, cfg.param_dtype, name="mlp")(h).astype(x_BTD.dtype)


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then an MLP."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.config
        D, N = cfg.width, cfg.num_heads
        H = cfg.head_dim or D // N
        init = nn.initializers.lecun_normal()
        p = dict(
            probe_D=self.param("probe", nn.initializers.normal(0.02), (D,), cfg.param_dtype),
            q_DNH=self.param("q_kernel", init, (D, N, H), cfg.param_dtype),
            k_DNH=self.param("k_kernel", init, (D, N, H), cfg.param_dtype),
            v_DNH=self.param("v_kernel", init, (D, N, H), cfg.param_dtype),
            o_NHD=self.param("o_kernel", init, (N, H, D), cfg.param_dtype),
        )
        y_BD = map_pool(p, x_BTD, impl=cfg.impl)
        h = nn.LayerNorm(cfg.norm_eps, param_dtype=cfg.param_dtype, name="norm")(y_BD)
        return y_BD + MLP(cfg.mlp_dim, cfg.dtype, cfg.param_dtype, name="mlp")(h)


class ViT(nn.Module):
    """``__call__(images_BHWC) -> logits [B, num_classes]`` (float32), pooled ``[B, D]``
    when ``num_classes=0``, or patch features ``[B, P, D]`` when ``pool="none"``.

    Images of another size than ``config.image_size`` are accepted when they divide by
    the patch size: the position embedding is resampled to the new grid.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = ViTConfig(image_size=4, channels=3, patch_size=1, width=16, depth=1,
      ...                 num_heads=2, pool="none")
      >>> m = ViT(cfg); v = m.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
      >>> m.apply(v, jnp.zeros((1, 8, 8, 3))).shape   # 2x the resolution: 64 pixel tokens
      (1, 64, 16)
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images_BHWC):
        cfg = self.config
        check_images(cfg, images_BHWC)
        ph, pw = cfg.patch_size
        patches_BPX, (gh, gw) = patchify(images_BHWC.astype(cfg.dtype), ph, pw)
        x = nn.Dense(cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="patch_embed")(patches_BPX)
        x = x + POS_EMBS[cfg.pos_emb](self, cfg, (gh, gw)).astype(cfg.dtype)[None]
        if cfg.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros, (cfg.width,), cfg.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.width)), x], 1)
        block = EncoderBlock
        if cfg.remat != "none":
            block = nn.remat(EncoderBlock, policy=REMAT_POLICIES[cfg.remat])
        for i in range(cfg.depth):
            x = block(cfg, i % len(cfg.pattern), name=f"block_{i}")(x)
        x = nn.LayerNorm(cfg.norm_eps, param_dtype=cfg.param_dtype, name="final_norm")(x)
        pooled = POOLS[cfg.pool](self, cfg, x)
        if cfg.pool == "none" or cfg.num_classes == 0:
            return pooled
        head = nn.Dense(cfg.num_classes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        kernel_init=nn.initializers.zeros, name="head")
        return head(pooled).astype(jnp.float32)


# Tables instead of if/elif: each entry is ``fn(module, config, ...)``.
def _learned_pos(module, cfg, grid):
    pos = module.param("pos_embedding", nn.initializers.normal(0.02), (*cfg.grid, cfg.width),
                       cfg.param_dtype)
    return resample_pos_emb(pos, grid, cfg.pos_resize).reshape(-1, cfg.width)


def _sincos_pos(module, cfg, grid):
    # Defined on the config's grid and resampled like the learned one, so that a model
    # sees the same embedding family at every resolution.
    pos = sincos_2d(cfg.grid, cfg.width)
    return resample_pos_emb(pos, grid, cfg.pos_resize).reshape(-1, cfg.width)


POS_EMBS: dict[str, Callable] = {
    "learned": _learned_pos,
    "sincos": _sincos_pos,
    "none": lambda module, cfg, grid: jnp.zeros((grid[0] * grid[1], cfg.width)),
}

POOLS: dict[str, Callable] = {
    "cls": lambda module, cfg, x: x[:, 0],
    "gap": lambda module, cfg, x: jnp.mean(x, axis=1),
    "map": lambda module, cfg, x: MAPHead(cfg, name="map")(x),
    "none": lambda module, cfg, x: x,
}


# --------------------------------------------------------------------------- pure functions
def check_images(cfg: ViTConfig, images_BHWC) -> None:
    """Raise ``ValueError`` naming the problem: rank, channel count, patch divisibility."""
    shape = tuple(getattr(images_BHWC, "shape", ()))
    if len(shape) != 4:
        raise ValueError(f"ViT: images must be [B, H, W, C], got shape {shape}")
    if shape[3] != cfg.channels:
        raise ValueError(f"ViT: images have {shape[3]} channels, but ViTConfig.channels={cfg.channels}")
    ph, pw = cfg.patch_size
    if shape[1] % ph or shape[2] % pw:
        raise ValueError(f"ViT: image size {shape[1:3]} is not divisible by patch_size={cfg.patch_size}")


def patchify(images_BHWC, ph: int, pw: int):
    """Non-overlapping patches in raster order: ``([B, P, ph·pw·C], (gh, gw))``.

    Example:
      >>> import jax.numpy as jnp
      >>> p, grid = patchify(jnp.arange(16.).reshape(1, 4, 4, 1), 2, 2)
      >>> p.shape, grid, p[0, 1].tolist()
      ((1, 4, 4), (2, 2), [2.0, 3.0, 6.0, 7.0])
    """
    B, H, W, C = images_BHWC.shape
    gh, gw = H // ph, W // pw
    x = images_BHWC.reshape(B, gh, ph, gw, pw, C)
    x = jnp.einsum("BhpwqC->BhwpqC", x)  # rows of patches first, pixels inside last
    return x.reshape(B, gh * gw, ph * pw * C), (gh, gw)


def resample_pos_emb(pos_hwD, grid: tuple[int, int], method: str = "bilinear"):
    """Resize a ``[gh, gw, D]`` position grid to ``grid`` (identity when equal).

    Example:
      >>> import jax.numpy as jnp
      >>> resample_pos_emb(jnp.ones((2, 2, 4)), (4, 3)).shape
      (4, 3, 4)
    """
    if tuple(pos_hwD.shape[:2]) == tuple(grid):
        return pos_hwD
    return jax.image.resize(pos_hwD, (*grid, pos_hwD.shape[-1]), method=method)


def sincos_2d(grid: tuple[int, int], width: int, temperature: float = 10_000.0):
    """Fixed 2-D sin-cos embedding ``[gh, gw, D]`` (MoCo v3 / big_vision); D % 4 == 0.

    Example:
      >>> sincos_2d((2, 3), 8).shape
      (2, 3, 8)
    """
    if width % 4:
        raise ValueError(f"sincos position embedding needs width % 4 == 0, got width={width}")
    y, x = np.mgrid[: grid[0], : grid[1]]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
    y, x = y[..., None] * omega, x[..., None] * omega
    return jnp.asarray(np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], -1), jnp.float32)


def map_pool(p: Mapping[str, Array], x_BTD, *, impl: str = "auto"):
    """Attention pooling with one learned probe query: ``[B, T, D] -> [B, D]``.

    ``p``: ``probe_D [D]``, ``q_DNH``, ``k_DNH``, ``v_DNH [D, N, H]``, ``o_NHD [N, H, D]``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = dict(probe_D=jnp.ones(4), q_DNH=jnp.ones((4, 2, 2)), k_DNH=jnp.ones((4, 2, 2)),
      ...          v_DNH=jnp.ones((4, 2, 2)), o_NHD=jnp.ones((2, 2, 4)))
      >>> map_pool(p, jnp.ones((3, 5, 4))).shape
      (3, 4)
    """
    dt = x_BTD.dtype
    B = x_BTD.shape[0]
    q = jnp.einsum("D,DNH->NH", p["probe_D"].astype(dt), p["q_DNH"].astype(dt))
    q_BTNH = jnp.broadcast_to(q, (B, 1, *q.shape))
    k = jnp.einsum("BTD,DNH->BTNH", x_BTD, p["k_DNH"].astype(dt))
    v = jnp.einsum("BTD,DNH->BTNH", x_BTD, p["v_DNH"].astype(dt))
    o_BTNH = attention(q_BTNH, k, v, impl=impl, self_attention=False)  # a probe attends to x
    return jnp.einsum("BNH,NHD->BD", o_BTNH[:, 0], p["o_NHD"].astype(dt))
