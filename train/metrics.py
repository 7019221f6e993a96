"""Tensorboard scalars without TensorFlow, plus the weighted loss / accuracy math.

``flax.metrics.tensorboard`` needs TensorFlow, which this project does not depend on;
tensorboard's own ``EventFileWriter`` and protos write the same event files.

Example:
  >>> import tempfile
  >>> from train.metrics import ScalarWriter, read_scalars
  >>> d = tempfile.mkdtemp()
  >>> w = ScalarWriter(d); w.write(1, {"train/loss": 2.5}); w.close()
  >>> read_scalars(d)["train/loss"]
  [(1, 2.5)]
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)


class ScalarWriter:
    """Writes scalar summaries to ``logdir`` (only process 0 writes; others no-op)."""

    def __init__(self, logdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._writer = None
        if self.enabled:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._writer = EventFileWriter(logdir)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Append one event holding every scalar in ``scalars`` at ``step``."""
        if not self._writer:
            return
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        )
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()
            self._writer = None


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Read scalars back with tensorboard's ``EventAccumulator``: {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def moe_scalars(stats: Any, per_layer: tuple[str, ...] = ("max_load",)) -> dict[str, jax.Array]:
    """Scalars to log from a sown ``"moe_stats"`` collection (models/ffn/moe.py), under jit.

    ``moe/<name>``: the mean over every MoE layer (and every stacked layer of a scanned
    unit) of each statistic; ``moe/<name>/<module path>[/<i>]``: each layer's value, for
    the names in ``per_layer`` (a few scalars per layer, so cheap). Empty for a model
    without MoE layers.

    Args:
      stats: nested dicts of module names ending in ``{stat name: (value, ...)}`` (sow
        keeps a tuple per call); values are scalars or, under ``nn.scan``, ``[L]``.

    Example:
      >>> import jax.numpy as jnp
      >>> s = {"unit_0": {"mlp": {"max_load": (jnp.float32(1.5),)}},
      ...      "unit_1": {"mlp": {"max_load": (jnp.float32(2.5),)}}}
      >>> {k: float(v) for k, v in moe_scalars(s).items()}
      {'moe/max_load': 2.0, 'moe/max_load/unit_0/mlp': 1.5, 'moe/max_load/unit_1/mlp': 2.5}
    """
    by_name: dict[str, list] = {}
    by_layer: dict[str, list] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(stats)[0]:
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        if not keys:
            continue
        x = jnp.asarray(x, jnp.float32).reshape(-1)
        by_name.setdefault(keys[-1], []).append(x)
        if keys[-1] in per_layer:
            by_layer.setdefault(f"moe/{keys[-1]}/" + "/".join(keys[:-1]), []).append(x)
    out = {f"moe/{name}": jnp.mean(jnp.concatenate(xs)) for name, xs in by_name.items()}
    for tag, xs in by_layer.items():
        values = jnp.concatenate(xs)
        if values.size == 1:
            out[tag] = values[0]
        else:  # a scanned unit (or a module called more than once): one tag per layer
            out.update({f"{tag}/{i}": values[i] for i in range(values.size)})
    return out


def weighted_sums(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> dict:
    """Sums for weighted cross-entropy and accuracy, in float32.

    Args:
      logits_BTV: [B, T, V] logits (any float dtype; upcast to float32).
      targets_BT: [B, T] int32 target ids.
      weights_BT: [B, T] float32, 0 where a position does not count.

    Returns:
      {"loss_sum", "correct_sum", "weight_sum"}: scalars; mean loss = loss_sum / weight_sum.

    Example:
      >>> import jax.numpy as jnp
      >>> s = weighted_sums(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)))
      >>> round(float(s["loss_sum"] / s["weight_sum"]), 4)  # ln 4
      1.3863
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    nll_BT = logz_BT - target_logit_BT
    correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
    # where(): a zero weight must also silence a NaN/inf at that position.
    return {
        "loss_sum": jnp.sum(jnp.where(weights_BT != 0, weights_BT * nll_BT, 0.0)),
        "correct_sum": jnp.sum(weights_BT * correct_BT),
        "weight_sum": jnp.sum(weights_BT),
    }


def summarize_eval(sums: dict[str, float], token_unit: str | None) -> dict[str, float]:
    """Turn accumulated eval sums into eval/loss, eval/accuracy (and bits per byte).

    Example:
      >>> summarize_eval({"loss_sum": 2 * 0.6931471805599453, "correct_sum": 1.0,
      ...                 "weight_sum": 2.0}, "byte")["eval/bits_per_byte"]
      1.0
    """
    w = max(float(sums["weight_sum"]), 1e-9)
    loss = float(sums["loss_sum"]) / w
    out = {"eval/loss": loss, "eval/accuracy": float(sums["correct_sum"]) / w}
    if token_unit:
        out[f"eval/bits_per_{token_unit}"] = loss / LN2
    return out
