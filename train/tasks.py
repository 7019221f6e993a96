"""Tasks: what a model is, how a batch goes through it, and what the loss sees.

The trainer is one loop for every kind of model. ``config.task`` (default "lm") names a
``Task`` in this registry; the trainer asks it for:

* ``config_from_dict(config.model)``: the validated model config dataclass;
* ``build_model(model_config)``: the linen module;
* ``example_batch(model_config, data_config, B)``: zeros shaped like a batch, for
  ``model.init`` (the trainer never needs to know an image from a token);
* ``model_inputs(batch)``: ``(args, kwargs)`` for ``model.apply`` / ``model.init``;
* ``outputs(model_out, batch)``: ``(logits [B, T, V], targets [B, T], weights [B, T])``,
  which the trainer turns into weighted cross-entropy and accuracy
  (``train.metrics.weighted_sums``), so loss, metrics, eval and logging are shared;
* ``check_compatible(model_config, source)``: cross-section checks.
* ``zigzag_refusal(model_config)``: None when the batch's ``[B, T]`` arrays may be
  reordered along T for context parallelism's causal load balancing (positions are
  carried along), else the reason why not.
* ``pretrained_config(name_or_path, model_dict)`` / ``pretrained_params(name_or_path,
  model_config)``: for ``model.init_from`` (None: the task cannot start from a
  checkpoint). The first reads only the checkpoint's config and applies the run-time
  fields ``model_dict`` may change; the second loads the parameters.

Built-in tasks:

  lm        next-token CE on ``weights`` (``models.transformer.Transformer``).
  classify  CE + accuracy on ``labels`` (``models.vit.ViT``); logits ``[B, C]`` are
            seen as ``[B, 1, C]`` so one loss serves all tasks.
  vlm       answer-token CE + accuracy (``models.vlm.VLM``): ``weights`` mark the
            position that predicts the answer.

A new task is one ``register_task(Task(...))`` call; nothing in the trainer changes.

Example:
  >>> from train import tasks
  >>> sorted(tasks.names())
  ['classify', 'lm', 'vlm']
  >>> tasks.get("lm").name
  'lm'
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Task:
    """One kind of training problem (see the module docstring for each field)."""

    name: str
    config_from_dict: Callable[[dict], Any]
    build_model: Callable[[Any], Any]
    example_batch: Callable[[Any, Any, int], dict]
    model_inputs: Callable[[dict], tuple[tuple, dict]]
    outputs: Callable[[Any, dict], tuple[Any, Any, Any]]
    check_compatible: Callable[[Any, Any], None] = lambda model_config, source: None
    zigzag_refusal: Callable[[Any], str | None] = (
        lambda model_config: "the task's model is not a causal LM over its batch's token order")
    pretrained_config: Callable[[str, dict], Any] | None = None
    pretrained_params: Callable[[str, Any], Any] | None = None


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` available as ``config.task = task.name`` (re-registering replaces)."""
    _TASKS[task.name] = task
    return task


def names() -> tuple[str, ...]:
    return tuple(sorted(_TASKS))


def get(name: str) -> Task:
    """The task registered as ``name``; ``ValueError`` naming ``config.task`` otherwise."""
    if name not in _TASKS:
        raise ValueError(f"config.task={name!r} is not a registered task; known: {sorted(_TASKS)}")
    return _TASKS[name]


# --------------------------------------------------------------------------- lm
def _lm_config(d):
    from models.transformer import LMConfig

    return LMConfig.from_dict(d)


def _lm_model(cfg):
    from models.transformer import Transformer

    return Transformer(cfg)


def _lm_check(cfg, source) -> None:
    if cfg.vocab_size < source.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the vocab of "
            f"data.source={source.config.source!r} ({source.vocab_size})")


def _lm_zigzag_refusal(cfg) -> str | None:
    from attn import registry

    fixed = sorted({n for n in cfg.attn.replace("+", ",").split(",")
                    if not registry.get(n.strip()).order_free})
    if fixed:
        return f"mechanism(s) {fixed} mix tokens along T outside attention (convolutions/shifts)"
    return None


# What a run may change on top of a checkpoint's config: how the model computes, not
# what it is (its parameters fix everything else). Other keys must equal the checkpoint's.
PRETRAINED_RUNTIME_FIELDS = ("dtype", "remat", "impl")


def _lm_pretrained_config(name_or_path: str, model_dict: dict):
    """The checkpoint's ``LMConfig`` with the run-time fields of ``model_dict``.

    ``model.attention_bias=True`` (a key of this hook, not of ``LMConfig``) gives every
    attention layer q/k/v/o biases that the checkpoint lacks; they start at zero, so the
    model computes the same function (LoFiT's head offsets live in ``o_bias``).
    """
    import dataclasses

    from models import pretrained
    from models.pretrained.native import config_to_json
    from models.transformer import LMConfig

    model_dict = dict(model_dict)
    add_bias = bool(model_dict.pop("attention_bias", False))
    base = pretrained.load(name_or_path, config_only=True).config
    merged = LMConfig.from_dict({**config_to_json(base), **model_dict})
    for f in dataclasses.fields(LMConfig):
        if f.name in model_dict and f.name not in PRETRAINED_RUNTIME_FIELDS \
                and getattr(merged, f.name) != getattr(base, f.name):
            raise ValueError(f"model.{f.name}={model_dict[f.name]!r} differs from the checkpoint "
                             f"model.init_from={name_or_path!r} ({getattr(base, f.name)!r}); with "
                             f"init_from only {list(PRETRAINED_RUNTIME_FIELDS)} (and attention_bias) "
                             "may change")
    if add_bias:
        over = {k: dict(v) for k, v in merged.attn_overrides.items()}
        for name, layer in zip(merged.pattern, merged.layer_configs):
            if not hasattr(layer, "use_bias"):
                raise ValueError(f"model.attention_bias: attention {name!r} has no use_bias field")
            over.setdefault(name, {})["use_bias"] = True
        merged = dataclasses.replace(merged, attn_overrides=over)
    return merged


def _lm_pretrained_params(name_or_path: str, cfg):
    """The checkpoint's parameters; biases ``cfg`` has and the checkpoint lacks are zeros."""
    from flax import linen as nn

    from models import pretrained
    from models.transformer import Transformer

    params = pretrained.load(name_or_path, dtype=cfg.dtype).params
    want = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(
        jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"])
    have = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    if len(have) == len(jax.tree.leaves(want)):
        return params

    def fill(path, leaf):  # model.attention_bias: the added biases start at zero
        if path in have:
            return have[path]
        return jnp.zeros(leaf.shape, leaf.dtype) if str(path[-1].key).endswith("_bias") else None

    return jax.tree_util.tree_map_with_path(fill, want)


register_task(Task(
    name="lm",
    config_from_dict=_lm_config,
    build_model=_lm_model,
    example_batch=lambda cfg, data, B: {"inputs": jnp.zeros((B, data.seq_len), jnp.int32)},
    model_inputs=lambda b: ((b["inputs"],), dict(positions_BT=b.get("positions"),
                                                 segment_ids_BT=b.get("segment_ids"))),
    outputs=lambda out, b: (out[0], b["targets"], b["weights"]),
    check_compatible=_lm_check,
    zigzag_refusal=_lm_zigzag_refusal,
    pretrained_config=_lm_pretrained_config,
    pretrained_params=_lm_pretrained_params,
))


# --------------------------------------------------------------------------- classify
def _vit_config(d):
    from models.vit import ViTConfig

    return ViTConfig.from_dict(d)


def _vit_model(cfg):
    from models.vit import ViT

    return ViT(cfg)


def _classify_outputs(logits_BC, b):
    """Classification as a length-1 sequence, so the shared weighted CE applies."""
    labels_B = b["labels"]
    weights_B = b.get("weights", jnp.ones(labels_B.shape, jnp.float32))
    return logits_BC[:, None], labels_B[:, None], weights_B[:, None]


def _classify_check(cfg, source) -> None:
    if cfg.num_classes < source.num_classes:
        raise ValueError(f"model.num_classes={cfg.num_classes} is smaller than the "
                         f"{source.num_classes} classes of data.source={source.config.source!r}")
    if tuple(cfg.image_size) + (cfg.channels,) != tuple(source.image_shape):
        raise ValueError(f"model.image_size={cfg.image_size}, channels={cfg.channels} do not match "
                         f"data.source={source.config.source!r} images of shape {source.image_shape}")


register_task(Task(
    name="classify",
    config_from_dict=_vit_config,
    build_model=_vit_model,
    example_batch=lambda cfg, data, B: {
        "images": jnp.zeros((B, *cfg.image_size, cfg.channels), jnp.float32),
        "labels": jnp.zeros((B,), jnp.int32)},
    model_inputs=lambda b: ((b["images"],), {}),
    outputs=_classify_outputs,
    check_compatible=_classify_check,
))


# --------------------------------------------------------------------------- vlm
def _vlm_config(d):
    from models.vlm import VLMConfig

    return VLMConfig.from_dict(d)


def _vlm_model(cfg):
    from models.vlm import VLM

    return VLM(cfg)


def _vlm_example(cfg, data, B):
    I = getattr(data, "options", {}).get("num_images", 1)
    v = cfg.vision
    return {"inputs": jnp.zeros((B, data.seq_len), jnp.int32),
            "images": jnp.zeros((B, I, *v.image_size, v.channels), jnp.float32)}


def _vlm_check(cfg, source) -> None:
    _lm_check(cfg.lm, source)
    if source.image_token_id != cfg.image_token_id:
        raise ValueError(f"model.image_token_id={cfg.image_token_id} differs from the placeholder "
                         f"id {source.image_token_id} of data.source={source.config.source!r}")
    if source.tokens_per_image != cfg.tokens_per_image:
        raise ValueError(f"the model makes {cfg.tokens_per_image} tokens per image, but "
                         f"data.source={source.config.source!r} leaves {source.tokens_per_image} "
                         f"placeholders per image")


register_task(Task(
    name="vlm",
    config_from_dict=_vlm_config,
    build_model=_vlm_model,
    example_batch=_vlm_example,
    model_inputs=lambda b: ((b["inputs"], b["images"]), {}),
    outputs=lambda out, b: (out[0], b["targets"], b["weights"]),
    check_compatible=_vlm_check,
))

