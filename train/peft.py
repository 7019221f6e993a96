"""Parameter-efficient fine-tuning (``config.peft``): LoRA, Hydra, and LoFiT (``train/lofit.py``).

An adapter replaces a targeted kernel ``W`` (seen as the ``[fan_in, fan_out]`` matrix it
applies, the same reading Muon uses: ``train.optim.matrix_dims``) by a node
``{"base": W, "lora_a": A, "lora_b": B, ...}`` in the train state, and the model is
applied to the merged weight, so no model code changes:

* **LoRA** (Hu et al. 2021): ``W + s · A B`` with ``A [I, r]`` Gaussian (std 1/sqrt(I)),
  ``B [r, O]`` zero, ``s = alpha / r``.
* **Hydra** (Kim et al. 2023, "multi-head" LoRA): a parallel branch, as LoRA, plus a
  sequential one that recombines the pretrained layer's own output features,
  ``W + s · (A B + W C E)`` with ``C [O, r]`` Gaussian (std 1/sqrt(O)), ``E [r, O]`` zero.

Both start exactly at the pretrained model (the zero factor). LoFiT (``lofit_scale``,
``lofit``) adapts attention heads' outputs instead; its nodes live in ``train/lofit.py``,
each method being a ``Method`` in ``METHODS``. Only adapter factors are
trained (plus whatever ``optim.trainable`` also matches); the base weights get no
gradient (``lax.stop_gradient``) and no optimizer state. ``merge`` folds the adapters
back into plain kernels: ``train.restore.restore_trained`` returns merged parameters,
so ``generate``, ``perplexity`` and ``python -m models.export`` see an ordinary model.
A leading layers axis (``scan_layers``) gets one adapter per layer.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from train.peft import PeftConfig, attach, merge
  >>> p = {"attn": {"q_kernel": jnp.ones((8, 6)), "o_kernel": jnp.ones((6, 8))}, "norm": jnp.ones(8)}
  >>> cfg = PeftConfig(method="lora", rank=2, targets="attn/q_kernel")
  >>> a = attach(p, cfg, jax.random.key(0))
  >>> a["attn"]["q_kernel"]["lora_a"].shape, a["attn"]["q_kernel"]["lora_b"].shape
  ((8, 2), (2, 6))
  >>> bool(jnp.all(merge(a, cfg)["attn"]["q_kernel"] == p["attn"]["q_kernel"]))   # B = 0
  True
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from train.config_args import dataclass_from_dict


@dataclasses.dataclass(frozen=True)
class Method:
    """How one peft method adapts each targeted kernel ``W``.

    Attributes:
      factors: the node keys that are trained.
      targets: the default ``peft.targets``.
      make: ``(w, *, name, lead, I, O, cfg, key, names) -> {key: array}``: the node's
        entries besides ``"base"`` (``lead``: leading batch axes; ``I``/``O``: fan-in and
        fan-out sizes; ``names``: every parameter path, for methods that index layers).
      fold: ``(node, cfg) -> (kernel, bias delta or None)``: the merged kernel and what to
        add to the sibling bias (``*_kernel`` -> ``*_bias``).
      penalty: ``(node, cfg) -> scalar`` added to the training loss, or None.
      frozen: node keys that are state but not trained (e.g. a fixed mask).
    """

    factors: tuple
    targets: str
    make: Any
    fold: Any
    penalty: Any = None
    frozen: tuple = ()


def _make_lora(w, *, name, lead, I, O, cfg, key, names):
    batch = w.shape[:lead]
    ka, kc = jax.random.split(key)
    node = {"lora_a": jax.random.normal(ka, batch + (I, cfg.rank), w.dtype) / math.sqrt(I),
            "lora_b": jnp.zeros(batch + (cfg.rank, O), w.dtype)}
    if cfg.method == "hydra":
        node["seq_a"] = jax.random.normal(kc, batch + (O, cfg.rank), w.dtype) / math.sqrt(O)
        node["seq_b"] = jnp.zeros(batch + (cfg.rank, O), w.dtype)
    return node


def _fold_lora(node, cfg):
    w, a, b = node["base"], node["lora_a"], node["lora_b"]
    m = w.reshape(a.shape[:-1] + (b.shape[-1],))          # [batch..., I, O]
    delta = a @ b
    if "seq_a" in node:
        delta = delta + (m @ node["seq_a"]) @ node["seq_b"]
    return (m + cfg.scale * delta.astype(m.dtype)).reshape(w.shape), None


_QKVO = r"attn/(q|k|v|o)_kernel$"
METHODS: dict[str, Method] = {
    "lora": Method(("lora_a", "lora_b"), _QKVO, _make_lora, _fold_lora),
    "hydra": Method(("lora_a", "lora_b", "seq_a", "seq_b"), _QKVO, _make_lora, _fold_lora),
}


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """The ``config.peft`` section.

    Attributes:
      method: None (off), "lora", "hydra", "lofit_scale" or "lofit" (``train/lofit.py``).
      rank: r of every adapter (lora, hydra).
      alpha: the adapters' scale is ``alpha / rank``.
      targets: regular expression searched in the "/"-joined parameter paths; every
        matching kernel with a fan-in and a fan-out axis gets an adapter. None: the
        method's default (q/k/v/o kernels; LoFiT: the output kernels).
      l1: LoFiT's L1 weight on the head scales (``lofit_scale``).
      heads: the heads ``lofit`` tunes: "layer.head,..." or "@FILE" holding that list
        (``python -m train.lofit`` writes it).
    """

    method: str | None = None
    rank: int = 8
    alpha: float = 16.0
    targets: str | None = None
    l1: float = 1e-4
    heads: str = ""

    def __post_init__(self):
        if self.method == "":
            object.__setattr__(self, "method", None)
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"peft.method={self.method!r}; expected None or one of {sorted(METHODS)}")
        if self.targets in (None, ""):
            object.__setattr__(self, "targets", METHODS[self.method].targets if self.method else _QKVO)
        if not self.l1 >= 0:
            raise ValueError(f"peft.l1 must be >= 0, got {self.l1!r}")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"peft.rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"peft.alpha must be > 0, got {self.alpha!r}")
        try:
            re.compile(self.targets)
        except (re.error, TypeError) as e:
            raise ValueError(f"peft.targets={self.targets!r} is not a regular expression ({e})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, d: Any) -> "PeftConfig":
        return dataclass_from_dict(cls, d, "peft")


def _path(path) -> str:
    from train.optim import param_path

    return param_path(path)


def _io_split(w, dims, name: str) -> tuple[int, int, int]:
    """``(batch ndim, I, O)`` of kernel ``w`` whose axes are [batch..., fan-in..., fan-out...]."""
    as_tuple = lambda a: tuple(a) if isinstance(a, (tuple, list)) else (a,)
    red, out = as_tuple(dims.reduction_axis), as_tuple(dims.output_axis)
    lead = min(red + out)
    if red + out != tuple(range(lead, w.ndim)) or max(red) > min(out):
        raise ValueError(f"peft: {name} {tuple(w.shape)} does not keep its fan-in axes {red} "
                         f"before its fan-out axes {out}; it cannot take an adapter")
    I = math.prod(w.shape[a] for a in red)
    return lead, I, math.prod(w.shape[a] for a in out)


def attach(params, cfg: PeftConfig, rng, param_axes=None):
    """``params`` with every targeted kernel replaced by ``{"base": W, <adapter factors>}``.

    ``param_axes``: logical axis names per parameter (``nn.get_partition_spec(boxed)``) so
    that fan-in / fan-out are read as Muon reads them (``train.optim.matrix_dims``;
    without names only 2-D kernels qualify, as ``[in, out]``). ``ValueError`` when
    ``cfg.targets`` matches no kernel, or one that is not a matrix between feature spaces.
    """
    from train.optim import matrix_dims

    rx = re.compile(cfg.targets)
    method = METHODS[cfg.method]
    dims = matrix_dims(params, param_axes)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [_path(p) for p, _ in leaves]
    keys = iter(jax.random.split(rng, max(len(leaves), 1)))
    hits = []

    def one(path, w):
        name = _path(path)
        d = _get(dims, path)
        key = next(keys)
        if not rx.search(name):
            return w
        if d is None:
            raise ValueError(f"peft.targets={cfg.targets!r} matches {name} {tuple(w.shape)}, which is "
                             "not a matrix between feature spaces (no fan-in / fan-out axes)")
        lead, I, O = _io_split(w, d, name)
        node = {"base": w, **method.make(w, name=name, lead=lead, I=I, O=O, cfg=cfg, key=key,
                                         names=names)}
        hits.append(name)
        return node

    out = jax.tree_util.tree_map_with_path(one, params)
    if not hits:
        paths = [_path(p) for p, _ in leaves]
        raise ValueError(f"peft.targets={cfg.targets!r} matches no parameter; paths look like {paths[:3]}")
    return out


def _get(tree, path):
    for k in path:
        tree = tree[getattr(k, "key", getattr(k, "idx", k))]
    return tree


def _is_node(x) -> bool:
    return isinstance(x, dict) and "base" in x and len(x) > 1 and set(x) <= NODE_KEYS | {"base"}


def merge(params, cfg: PeftConfig):
    """Plain parameters: every adapter node folded into its kernel (identity without adapters).

    A method whose fold also returns a bias delta (LoFiT's head offsets) adds it to the
    sibling ``*_bias`` of the kernel; ``ValueError`` when the model has none.
    """
    if cfg.method is None:
        return params
    fold_node = METHODS[cfg.method].fold

    def fold(tree, where=""):
        if not isinstance(tree, dict):
            return tree
        out, deltas = {}, {}
        for k, v in tree.items():
            if _is_node(v):
                out[k], delta = fold_node(v, cfg)
                if delta is not None:
                    deltas[k.removesuffix("kernel") + "bias"] = (k, delta)
            else:
                out[k] = fold(v, f"{where}{k}/")
        for bias, (k, delta) in deltas.items():
            if bias not in out:
                raise ValueError(
                    f"peft.method={cfg.method!r} adds to {where}{bias}, which the model does not have "
                    f"(next to {where}{k}): start from a model with attention biases "
                    "(model.attention_bias=True; configs/finetune.py sets it for peft=lofit)")
            out[bias] = out[bias] + delta.astype(out[bias].dtype)
        return out

    return fold(params)


def penalty(params, cfg: PeftConfig):
    """The method's regularizer summed over its nodes (LoFiT's L1), or 0.0."""
    fn = METHODS[cfg.method].penalty if cfg.method else None
    if fn is None:
        return 0.0
    total = 0.0

    def walk(tree):
        nonlocal total
        if _is_node(tree):
            total = total + fn(tree, cfg)
        elif isinstance(tree, dict):
            for v in tree.values():
                walk(v)

    walk(params)
    return total


def is_adapter(path) -> bool:
    """True for an adapter factor's key path (what peft trains)."""
    last = path[-1] if path else None
    return str(getattr(last, "key", last)) in ADAPTER_KEYS


def trainable_mask(params, cfg: PeftConfig, also: str | None = None):
    """Python-bool tree: adapter factors, plus parameters whose path ``also`` (a regex) finds.

    Without a method this is ``train.optim.trainable_mask(params, also)``.
    """
    from train.optim import param_path, trainable_mask as plain_mask

    if cfg.method is None:
        return plain_mask(params, also)
    rx = re.compile(also) if also else None
    return jax.tree_util.tree_map_with_path(
        lambda path, _: is_adapter(path) or bool(rx and rx.search(param_path(path))), params)


def shardings(model_shardings, attached, replicated):
    """Shardings of an ``attach``-ed tree: bases keep the kernel's, factors are replicated."""

    def walk(s, a):
        if _is_node(a):
            return {k: (s if k == "base" else replicated) for k in a}
        if isinstance(a, dict):
            return {k: walk(s[k], v) for k, v in a.items()}
        return s

    return walk(model_shardings, attached)


def count(params) -> tuple[int, int]:
    """``(adapter parameters, all parameters)`` of an ``attach``-ed tree.

    A factor masked by a sibling ``head_mask`` (LoFiT's offsets of the chosen heads)
    counts only its unmasked entries, so the tree must hold values there, not shapes.
    """
    n_adapter = n_all = 0

    def walk(tree):
        nonlocal n_adapter, n_all
        if not isinstance(tree, dict):
            n_all += int(tree.size)
            return
        for k, v in tree.items():
            if k in ADAPTER_KEYS and _is_node(tree):
                n_adapter += int(jnp.sum(tree["head_mask"] != 0)) if "head_mask" in tree else int(v.size)
            walk(v)

    walk(params)
    return n_adapter, n_all


from train import lofit as _lofit  # noqa: E402  (registers its methods; it imports Method from here)

METHODS.update(_lofit.METHODS)
ADAPTER_KEYS = tuple(sorted({k for m in METHODS.values() for k in m.factors}))
NODE_KEYS = frozenset(ADAPTER_KEYS) | {k for m in METHODS.values() for k in m.frozen}
