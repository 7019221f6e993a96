"""Molmo-style vision-language model: ViT encoder → 2×2 connector → decoder LM.

Data flow (I images per example, each ``[H, W, C]``; letters: M = tokens per image)::

    images [B, I, H, W, C] --ViT(pool="none")--> [B·I, P, Dv]       P = gh·gw patches
      --pool_2x2--> [B·I, M, 4·Dv]  M = (gh/2)·(gw/2)  (each 2×2 block of neighbouring
                                     patches concatenated, as Molmo's 2×2 pooling)
      --MLP--> [B, I·M, D]                                      D = the LM's width
    tokens [B, T] with I·M placeholders (``image_token_id``)
      --embedding, then image features scattered into the placeholders in order-->
    x [B, T, D] --Transformer(embeddings_BTD=x, positions_BT=arange(T),
                             extra_range_BT2=the mask option's ranges)--> logits

Attention masks (``mask``). Positions are always ``arange(T)`` (so RoPE gives every
token, image tokens included, its own angle); each option is the layers' causal rule
plus, per token, an extra inclusive range of key positions it may also see
(``extra_range_BT2 [B, T, 2]`` → ``attn.masks.Mask.q_extra_range``), never a dense
matrix. Text tokens never get an extra range, so text is causal in every option.

* "causal": nothing extra.
* "prefix" (image-bidirectional): an image token also sees every token of its own
  image (range = the image's first..last placeholder).
* "mutual" (modality-mutual attention, MMA, from AKI, "Seeing is Understanding",
  arXiv 2503.02597): image tokens also see the *text question that follows them*; the
  mask is otherwise causal, image tokens among themselves included (the paper relaxes
  image→text only). The question ends at the first ``question_end_id`` token after
  the image, inclusive (AKI's code ends it at the assistant marker): text after it,
  i.e. the answer, stays hidden from image tokens, or the answer would leak backwards
  through them (the leak the paper reports when MMA is applied to captions in
  pre-training). A row with no ``question_end_id`` after an image stays causal for
  that image: caption rows train causally, as AKI pre-trains. Several images: each
  image sees the run of text that follows it (skipping images placed right after
  it), up to the next image or the end of the question, whichever comes first, so
  no image ever sees another image's tokens early. Across layers the mask composes:
  a question token sees later question tokens through the image tokens (the paper's
  caveat), so put the loss after the question end, as SFT does (``train/shapes.py``
  puts it at the "?" only, and its captions have no "?").

Generation (``generate``) prefills the KV cache once with the prompt and its image
tokens, then decodes text tokens one at a time through the LM's cache machinery. The
extra ranges only ever point inside the prompt (an image and its question), and the
prefill handles the whole prompt in one call, so the cached image keys/values are
those of the full forward; decoded tokens are text, hence causal. For "mutual" the
question (with its ``question_end_id``) must be complete in the prompt.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from models.vlm import VLM, VLMConfig
  >>> cfg = VLMConfig(vision=dict(image_size=8, channels=3, patch_size=2, width=16, depth=1,
  ...                             num_heads=2),
  ...                 lm=dict(vocab_size=16, d_model=16, num_layers=1, num_heads=2, dtype="float32"),
  ...                 image_token_id=3)
  >>> cfg.tokens_per_image
  4
  >>> tokens = jnp.array([[1, 3, 3, 3, 3, 5, 6]])
  >>> images = jnp.zeros((1, 1, 8, 8, 3))
  >>> variables = VLM(cfg).init(jax.random.key(0), tokens, images)
  >>> logits, _ = VLM(cfg).apply(variables, tokens, images)
  >>> logits.shape
  (1, 7, 16)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.cache import check_overflow, overflow_state
from models.transformer import LMConfig, Transformer, init_cache, sample_token
from models.vit import ViT, ViTConfig

Array = Any


# --------------------------------------------------------------------------- masks
_NONE = jnp.iinfo(jnp.int32).max  # "no such token" in the next-index scans below


def _empty_range(B, T):
    """``[B, T, 2]`` of ``(0, -1)``: nothing extra (hi < lo)."""
    return jnp.broadcast_to(jnp.array([0, -1], jnp.int32), (B, T, 2))


def _next_index(flag_BT):
    """For each t, the first index >= t where ``flag_BT`` holds (``_NONE`` if none)."""
    T = flag_BT.shape[1]
    idx = jnp.where(flag_BT, jnp.arange(T, dtype=jnp.int32), _NONE)
    return jax.lax.cummin(idx, axis=1, reverse=True)


def _at(a_BT, i_BT):
    """``a[b, i[b, t]]``, with ``_NONE`` for indices past the end."""
    T = a_BT.shape[1]
    got = jnp.take_along_axis(a_BT, jnp.clip(i_BT, 0, T - 1), axis=1)
    return jnp.where(i_BT < T, got, _NONE)


def _image_bounds(is_image_BT, tokens_per_image: int):
    """``(first, last)`` placeholder index of each image token's own image ``[B, T]``."""
    B, T = is_image_BT.shape
    rank_BT = jnp.cumsum(is_image_BT, axis=1) - 1  # index among the row's image tokens
    starts = is_image_BT & (rank_BT % tokens_per_image == 0)
    ends = is_image_BT & (rank_BT % tokens_per_image == tokens_per_image - 1)
    idx = jnp.arange(T, dtype=jnp.int32)
    first = jax.lax.cummax(jnp.where(starts, idx, -1), axis=1)
    return first, _next_index(ends)


def causal_range(tokens_BT, is_image_BT, config: "VLMConfig"):
    """"causal": no token sees anything extra (None)."""
    return None


def prefix_range(tokens_BT, is_image_BT, config: "VLMConfig"):
    """"prefix": an image token also sees its whole image.

    Example:
      >>> cfg = VLMConfig(vision=dict(image_size=4, channels=1, patch_size=1, width=8, depth=1,
      ...                 num_heads=2), lm=dict(vocab_size=8, d_model=8, num_layers=1, num_heads=2),
      ...                 image_token_id=2)
      >>> tok = jnp.array([[1] + [2] * 4 + [5]])
      >>> prefix_range(tok, tok == 2, cfg)[0].tolist()
      [[0, -1], [1, 4], [1, 4], [1, 4], [1, 4], [0, -1]]
    """
    B, T = tokens_BT.shape
    first, last = _image_bounds(is_image_BT, config.tokens_per_image)
    r = jnp.stack([first, last], axis=-1).astype(jnp.int32)
    return jnp.where(is_image_BT[..., None], r, _empty_range(B, T))


def mutual_range(tokens_BT, is_image_BT, config: "VLMConfig"):
    """"mutual" (AKI's MMA): an image token also sees the question text after its image.

    The range starts at the first text token after the image and ends at the first of:
    the ``question_end_id`` token (inclusive), the token before the next image. No
    question end after the image: nothing extra.

    Example:
      >>> cfg = VLMConfig(vision=dict(image_size=4, channels=1, patch_size=1, width=8, depth=1,
      ...                 num_heads=2), lm=dict(vocab_size=8, d_model=8, num_layers=1, num_heads=2),
      ...                 image_token_id=2, mask="mutual", question_end_id=3)
      >>> tok = jnp.array([[1] + [2] * 4 + [5, 6, 3, 7]])  # BOS, image, "5 6 ?", answer 7
      >>> mutual_range(tok, tok == 2, cfg)[0, :2].tolist()  # image tokens see 5 6 ?, not 7
      [[0, -1], [5, 7]]
    """
    B, T = tokens_BT.shape
    _, last = _image_bounds(is_image_BT, config.tokens_per_image)
    next_text = _next_index(~is_image_BT)
    next_image = _next_index(is_image_BT)
    next_qend = _next_index((tokens_BT == config.question_end_id) & ~is_image_BT)
    lo = _at(next_text, jnp.minimum(last, T - 1) + 1)  # first text token after the own image
    qend = _at(next_qend, lo)           # the question's last token
    stop = _at(next_image, lo)          # the next image, if it comes first
    hi = jnp.minimum(qend, jnp.where(stop == _NONE, _NONE, stop - 1))
    ok = is_image_BT & (lo != _NONE) & (qend != _NONE)
    r = jnp.stack([lo, hi], axis=-1).astype(jnp.int32)
    return jnp.where(ok[..., None], r, _empty_range(B, T))


# Mask name -> extra visible key range per token (a table, no if/elif chain).
MASK_RULES: dict[str, Callable] = {
    "causal": causal_range,
    "prefix": prefix_range,
    "mutual": mutual_range,
}


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """VLM settings; validates itself, the ViT and the LM.

    Attributes:
      vision: ``ViTConfig`` or a dict of its fields (pool/num_classes are forced to
        "none"/0: the encoder returns patch features). Its grid must be even.
      lm: ``LMConfig`` or a dict of its fields.
      image_token_id: the placeholder token id (one per image token, in the text).
      connector_dim: hidden width F of the connector MLP (None = 4·D of the LM).
      mask: "causal" | "prefix" | "mutual" (see the module docstring).
      question_end_id: the token that ends a question (inclusive), required by
        ``mask="mutual"``: image tokens see the text after them up to it, never the
        answer after it (e.g. the id of "?" in ``train/shapes.py``).

    Example:
      >>> VLMConfig(vision=dict(image_size=4, channels=1, patch_size=1, width=8, depth=1,
      ...           num_heads=2), lm=dict(vocab_size=8, d_model=8, num_layers=1, num_heads=2),
      ...           image_token_id=2).tokens_per_image
      4
    """

    vision: Any
    lm: Any
    image_token_id: int = 2
    connector_dim: int | None = None
    mask: str = "causal"
    question_end_id: int | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        vision = self.vision
        if not isinstance(vision, ViTConfig):
            vision = ViTConfig.from_dict(dict(vision.to_dict() if hasattr(vision, "to_dict") else vision))
        set_("vision", dataclasses.replace(vision, pool="none", num_classes=0))
        if not isinstance(self.lm, LMConfig):
            set_("lm", LMConfig.from_dict(self.lm))
        gh, gw = self.vision.grid
        if gh % 2 or gw % 2:
            raise ValueError(f"VLMConfig.vision: the patch grid {(gh, gw)} must be even for 2x2 "
                             f"pooling (image_size={self.vision.image_size}, patch_size="
                             f"{self.vision.patch_size})")
        if not 0 <= self.image_token_id < self.lm.vocab_size:
            raise ValueError(f"VLMConfig.image_token_id={self.image_token_id} is outside the "
                             f"vocab [0, {self.lm.vocab_size})")
        if self.connector_dim is None:
            set_("connector_dim", 4 * self.lm.d_model)
        if self.mask not in MASK_RULES:
            raise ValueError(f"VLMConfig.mask must be one of {sorted(MASK_RULES)}, got {self.mask!r}")
        if self.mask == "mutual" and self.question_end_id is None:
            raise ValueError("VLMConfig.mask='mutual' needs question_end_id (the token that ends the "
                             "question): image tokens see the text after them up to it, and must "
                             "not see the answer")
        if self.question_end_id is not None and not (
                0 <= self.question_end_id < self.lm.vocab_size and self.question_end_id != self.image_token_id):
            raise ValueError(f"VLMConfig.question_end_id={self.question_end_id} must be a text token id "
                             f"in [0, {self.lm.vocab_size}) other than image_token_id")

    @classmethod
    def from_dict(cls, d) -> "VLMConfig":
        """Build from a dict / ConfigDict; ``ValueError`` names unknown keys."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"VLMConfig: unknown config key(s) {unknown}")
        return cls(**d)

    @property
    def tokens_per_image(self) -> int:
        """M: connector outputs (= placeholder tokens) per image."""
        gh, gw = self.vision.grid
        return (gh // 2) * (gw // 2)


# --------------------------------------------------------------------------- modules
class Connector(nn.Module):
    """2×2 patch pooling (concatenate neighbours) then a GELU MLP to the LM width."""

    config: VLMConfig

    @nn.compact
    def __call__(self, feats_BPD, grid):
        cfg = self.config
        x = pool_2x2(feats_BPD, grid)
        x = nn.Dense(cfg.connector_dim, param_dtype=cfg.lm.param_dtype, dtype=cfg.lm.dtype, name="fc1")(x)
        return nn.Dense(cfg.lm.d_model, param_dtype=cfg.lm.param_dtype, dtype=cfg.lm.dtype,
                        name="fc2")(nn.gelu(x))


class VLM(nn.Module):
    """``__call__(tokens_BT, images_BIHWC, *, cache=None) -> (logits_BTV float32, cache)``.

    Args (of ``__call__``):
      tokens_BT: ``[B, T]`` int ids with ``I·M`` placeholders per row.
      images_BIHWC: ``[B, I, H, W, C]`` float images (I may be 0).
      cache: an LM cache from ``models.transformer.init_cache(config.lm, ...)``.

    Parameters: ``vision`` (the ViT), ``connector``, ``lm`` (the Transformer, whose
    token embedding also embeds the text around the images).
    """

    config: VLMConfig

    def setup(self):
        self.vision = ViT(self.config.vision)
        self.connector = Connector(self.config)
        self.lm = Transformer(self.config.lm)

    def __call__(self, tokens_BT, images_BIHWC, *, cache=None):
        x_BTD, positions_BT, extra_BT2 = self.embed_inputs(tokens_BT, images_BIHWC)
        return self.lm(None, embeddings_BTD=x_BTD, positions_BT=positions_BT, cache=cache,
                       extra_range_BT2=extra_BT2)

    def embed_inputs(self, tokens_BT, images_BIHWC):
        """``(x [B, T, D], positions [B, T], extra_range [B, T, 2] | None)``: text embedded,
        image features scattered in, and the mask option's extra visible key ranges."""
        cfg = self.config
        if getattr(images_BIHWC, "ndim", None) != 5:
            raise ValueError(f"VLM: images must be [B, I, H, W, C], got shape "
                             f"{getattr(images_BIHWC, 'shape', None)}")
        B, I = images_BIHWC.shape[:2]
        feats_BSD, M = self.encode_images(images_BIHWC.reshape(B * I, *images_BIHWC.shape[2:]))
        check_placeholders(tokens_BT, I, M, cfg.image_token_id)
        if self.is_initializing():
            self.lm(tokens_BT)  # creates the LM's parameters, among them the embedding
        embed_VD = nn.meta.unbox(self.lm.variables["params"]["embedding"])
        text_BTD = jnp.take(embed_VD, tokens_BT, axis=0).astype(cfg.lm.dtype)
        is_image_BT = tokens_BT == cfg.image_token_id
        x = scatter_image_tokens(text_BTD, feats_BSD.reshape(B, I * M, -1).astype(cfg.lm.dtype),
                                 is_image_BT)
        B, T = tokens_BT.shape
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return x, positions_BT, MASK_RULES[cfg.mask](tokens_BT, is_image_BT, cfg)

    def encode_images(self, images_NHWC):
        """``([N, M, D], M)``: ViT patch features → 2×2 pooling → connector MLP."""
        feats = self.vision(images_NHWC)
        ph, pw = self.config.vision.patch_size
        grid = (images_NHWC.shape[1] // ph, images_NHWC.shape[2] // pw)
        out = self.connector(feats, grid)
        return out, out.shape[1]


# --------------------------------------------------------------------------- generation
def generate(config: VLMConfig, variables, tokens_BT, images_BIHWC, *, max_new_tokens: int,
             return_logits: bool = False):
    """Greedy decoding: prefill the cache once with the prompt and its images, then decode.

    Args:
      config: the ``VLMConfig``.
      variables: ``VLM(config).init(...)`` output (``{"params": ...}``).
      tokens_BT: ``[B, T]`` prompt with placeholders; images_BIHWC: ``[B, I, H, W, C]``.
      max_new_tokens: tokens to generate (>= 1).
      return_logits: also return the float32 logits ``[B, n, V]`` behind each token.

    Returns:
      ``tokens [B, max_new_tokens]`` int32, or ``(tokens, logits)``.

    Example:
      >>> import jax, jax.numpy as jnp                                  # doctest: +SKIP
      >>> out = generate(cfg, variables, tokens, images, max_new_tokens=3)  # doctest: +SKIP
    """
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    I = images_BIHWC.shape[1] if getattr(images_BIHWC, "ndim", 0) == 5 else 0
    check_placeholders(tokens_BT, I, config.tokens_per_image, config.image_token_id)
    tokens, logits, overflow = _generate_jit(config, variables, tokens_BT, images_BIHWC,
                                             max_new_tokens=max_new_tokens)
    check_overflow(overflow, where="vlm generate")  # jit could only drop tokens; say it here
    return (tokens, logits) if return_logits else tokens


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens",))
def _generate_jit(config, variables, tokens_BT, images_BIHWC, *, max_new_tokens):
    """Prefill (image tokens enter the cache once) + ``lax.scan`` over text tokens (causal)."""
    B, T = tokens_BT.shape
    x_BTD, pos_BT, extra_BT2 = VLM(config).apply(variables, tokens_BT, images_BIHWC,
                                                 method=VLM.embed_inputs)
    lm = Transformer(config.lm)
    lm_vars = {"params": variables["params"]["lm"]}
    cache = init_cache(config.lm, B, T + max_new_tokens)
    ones_BT = jnp.ones((B, T), jnp.int32)
    # The prefill is the whole prompt in one call: image tokens see their extra ranges
    # (own image / question) here, and the cache keeps the resulting keys and values.
    logits, cache = lm.apply(lm_vars, None, embeddings_BTD=x_BTD, positions_BT=pos_BT,
                             segment_ids_BT=ones_BT, cache=cache, extra_range_BT2=extra_BT2)
    first_V = logits[:, -1]
    tok_B = sample_token(first_V, None, 1.0, greedy=True)

    def step(carry, _):
        tok_B, cache, p_B = carry
        logits, cache = lm.apply(lm_vars, tok_B[:, None], positions_BT=p_B[:, None],
                                 segment_ids_BT=ones_BT[:, :1], cache=cache)
        nxt_B = sample_token(logits[:, 0], None, 1.0, greedy=True)
        return (nxt_B, cache, p_B + 1), (nxt_B, logits[:, 0])

    (_, cache, _), (toks_nB, logits_nBV) = jax.lax.scan(
        step, (tok_B, cache, pos_BT[:, -1] + 1), None, length=max_new_tokens - 1)
    tokens = jnp.concatenate([tok_B[:, None], toks_nB.T], axis=1)
    logits = jnp.concatenate([first_V[:, None], jnp.swapaxes(logits_nBV, 0, 1)], axis=1)
    return tokens.astype(jnp.int32), logits, overflow_state(cache)


# --------------------------------------------------------------------------- pure functions
def check_placeholders(tokens_BT, num_images: int, tokens_per_image: int, image_token_id: int):
    """Raise ``ValueError`` when a row's placeholders do not match its images.

    Skipped under ``jit`` (tokens are traced values); data sources build rows that match.

    Example:
      >>> check_placeholders(np.array([[1, 2, 2]]), 2, 2, image_token_id=2)
      Traceback (most recent call last):
      ...
      ValueError: VLM: more images than placeholders: row 0 has 2 placeholder tokens (image_token_id=2), but 2 images x 2 tokens per image need 4
    """
    if isinstance(tokens_BT, jax.core.Tracer):
        return
    counts_B = np.sum(np.asarray(tokens_BT) == image_token_id, axis=1)
    need = num_images * tokens_per_image
    for b, n in enumerate(counts_B.tolist()):
        if n == need:
            continue
        if n == 0:
            raise ValueError(f"VLM: missing placeholder: row {b} has no image_token_id="
                             f"{image_token_id} tokens, but {num_images} image(s) x "
                             f"{tokens_per_image} tokens per image need {need}")
        if n < need:
            raise ValueError(f"VLM: more images than placeholders: row {b} has {n} placeholder "
                             f"tokens (image_token_id={image_token_id}), but {num_images} images "
                             f"x {tokens_per_image} tokens per image need {need}")
        raise ValueError(f"VLM: row {b} has {n} placeholder tokens (image_token_id="
                         f"{image_token_id}) but only {num_images} image(s) x "
                         f"{tokens_per_image} tokens per image = {need} to fill them")


def pool_2x2(feats_BPD, grid: tuple[int, int]):
    """Concatenate each 2×2 block of neighbouring patches: ``[B, gh·gw, D] -> [B, M, 4·D]``.

    Example:
      >>> pool_2x2(jnp.arange(16.).reshape(1, 16, 1), (4, 4))[0, 0].tolist()
      [0.0, 1.0, 4.0, 5.0]
    """
    B, P, D = feats_BPD.shape
    gh, gw = grid
    x = feats_BPD.reshape(B, gh // 2, 2, gw // 2, 2, D)
    x = jnp.einsum("BhiwjD->BhwijD", x)  # block rows, block cols, then the 2x2 inside
    return x.reshape(B, (gh // 2) * (gw // 2), 4 * D)


def scatter_image_tokens(text_BTD, image_BSD, is_image_BT):
    """Put image token k (in order) at the k-th placeholder of each row.

    Example:
      >>> x = scatter_image_tokens(jnp.zeros((1, 4, 1)), jnp.array([[[7.], [8.]]]),
      ...                          jnp.array([[False, True, True, False]]))
      >>> x[0, :, 0].tolist()
      [0.0, 7.0, 8.0, 0.0]
    """
    S = image_BSD.shape[1]
    if S == 0:
        return text_BTD
    idx_BT = jnp.clip(jnp.cumsum(is_image_BT, axis=1) - 1, 0, S - 1)
    gathered_BTD = jnp.take_along_axis(image_BSD, idx_BT[..., None], axis=1)
    return jnp.where(is_image_BT[..., None], gathered_BTD.astype(text_BTD.dtype), text_BTD)


def reference_mask(kind: str, tokens_BT, *, image_token_id: int, tokens_per_image: int,
                   question_end_id: int | None = None):
    """Dense visibility ``[B, T, T]`` (query, key) of each mask option, built directly
    with loops from the definitions in the module docstring (numpy; for tests).

    "causal": key <= query. "prefix": also every token of the query's own image.
    "mutual": causal, plus for an image query the text run after its image (images
    right after it skipped) up to the next image or the ``question_end_id`` token
    (inclusive), provided a question end follows.

    Example:
      >>> reference_mask("mutual", np.array([[2, 2, 5, 3, 7]]), image_token_id=2,
      ...                tokens_per_image=2, question_end_id=3)[0].astype(int).tolist()
      [[1, 0, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    """
    if kind not in ("causal", "prefix", "mutual"):
        raise ValueError(f"reference_mask: kind must be 'causal', 'prefix' or 'mutual', got {kind!r}")
    tokens = np.asarray(tokens_BT)
    B, T = tokens.shape
    vis = np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T)).copy()
    for b in range(B):
        is_img = tokens[b] == image_token_id
        members = np.flatnonzero(is_img).reshape(-1, tokens_per_image)  # one row per image
        for img in members:
            last = img.max()
            if kind == "prefix":
                vis[b, img[:, None], img[None, :]] = True
            if kind != "mutual":
                continue
            lo = last + 1
            while lo < T and is_img[lo]:
                lo += 1
            text_after = [s for s in range(lo, T) if not is_img[s]]
            if not any(tokens[b, s] == question_end_id for s in text_after):
                continue
            for s in range(lo, T):
                if is_img[s]:
                    break
                vis[b, img, s] = True
                if tokens[b, s] == question_end_id:
                    break
    return vis
