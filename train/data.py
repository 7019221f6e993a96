"""Embedded data sources, all deterministic in ``(seed, split, step)``.

Every batch is a pure function of the data seed, the split and the step index, so the
only "iterator state" a checkpoint needs is the step: a resumed run asks for the same
batches an uninterrupted run would have seen. Batches are dicts of numpy arrays:

  inputs   [B, T] int32    tokens fed to the model
  targets  [B, T] int32    the token to predict at each position
  weights  [B, T] float32  1 where the loss counts, 0 elsewhere

Sources register by name (``register_source``); ``make_source(DataConfig)`` builds one.
There is no central dispatch: a new source is one decorated class.

  mqar    Zoology's multi-query associative recall (synthetic, any vocab).
  text    bytes of Python's ``pydoc_data.topics`` (vocab 256, eval reports bits per byte).
  tokens  user token files through ``np.memmap`` (uint16 / uint32).
  tokenized_text  the pydoc text (or a UTF-8 file) through a pretrained model's
          tokenizer, for fine-tuning that model (``configs/finetune.py``).

Example:
  >>> from train.data import DataConfig, make_source
  >>> src = make_source(DataConfig(source="mqar", seq_len=64, batch_size=4,
  ...                              options={"vocab_size": 64, "num_kv_pairs": 8}))
  >>> b = src.batch("train", step=0, batch_size=4)
  >>> b["inputs"].shape, b["weights"].sum(axis=1).tolist()
  ((4, 64), [8.0, 8.0, 8.0, 8.0])
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, ClassVar

import numpy as np

from train.config_args import dataclass_from_dict

Batch = dict[str, np.ndarray]

# Distinct integers mixed into the seed so train and eval draw from disjoint streams.
SPLIT_IDS = {"train": 0, "eval": 1}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The ``config.data`` section.

    Attributes:
      source: registered source name ("mqar", "text", "tokens", ...).
      seq_len: T, tokens per example.
      batch_size: global training batch size B (all processes together).
      eval_batch_size: global eval batch size (None = batch_size).
      seed: data seed; batch = f(seed, split, step).
      options: source-specific keys, validated by the source's ``Options`` dataclass.
    """

    source: str = "mqar"
    seq_len: int = 64
    batch_size: int = 64
    eval_batch_size: int | None = None
    seed: int = 0
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("seq_len", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"data.eval_batch_size must be >= 1, got {self.eval_batch_size!r}")
        if self.source not in _SOURCES:
            raise ValueError(
                f"data.source={self.source!r} is not registered; known: {sorted(_SOURCES)}"
            )
        # dict(...) so that an ml_collections ConfigDict is accepted too.
        object.__setattr__(self, "options", dict(self.options or {}))

    @classmethod
    def from_dict(cls, d: Any) -> "DataConfig":
        """Build from a dict / ConfigDict; an unknown key raises ValueError naming it."""
        return dataclass_from_dict(cls, d, "data")


# --------------------------------------------------------------------------- registry
_SOURCES: dict[str, type["DataSource"]] = {}


def register_source(name: str) -> Callable[[type], type]:
    """Class decorator: make a ``DataSource`` subclass available as ``data.source=name``."""

    def deco(cls):
        _SOURCES[name] = cls
        cls.name = name
        return cls

    return deco


def registered_sources() -> tuple[str, ...]:
    return tuple(sorted(_SOURCES))


def make_source(config: DataConfig) -> "DataSource":
    """Build and validate the source named by ``config.source`` (raises before compiling)."""
    return _SOURCES[config.source](config)


class DataSource:
    """Base class: validated options, the vocab it needs, and ``batch(split, step, B)``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = None  # a frozen dataclass of source-specific options
    # "byte" makes the trainer report eval bits per byte (loss / ln 2).
    token_unit: ClassVar[str | None] = None

    def __init__(self, config: DataConfig):
        self.config = config
        self.options = dataclass_from_dict(self.Options, config.options, "data.options")

    @property
    def vocab_size(self) -> int:
        """Tokens lie in ``[0, vocab_size)``; the model's vocab must be at least this."""
        raise NotImplementedError

    def batch(self, split: str, step: int, batch_size: int) -> Batch:
        """The global batch number ``step`` of ``split``; a pure function of (seed, split, step)."""
        raise NotImplementedError

    def _rng(self, split: str, step: int) -> np.random.Generator:
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
        # A SeedSequence over the tuple gives independent, reproducible streams per step.
        return np.random.default_rng([self.config.seed, SPLIT_IDS[split], int(step)])


# --------------------------------------------------------------------------- MQAR
@dataclasses.dataclass(frozen=True)
class MQAROptions:
    """Zoology MQAR knobs.

    Attributes:
      vocab_size: V; keys come from [1, V/2), values from [V/2, V).
      num_kv_pairs: key-value pairs per example (each key queried once).
      power_a: gaps between queries follow p(x) ∝ x^(a-1); a=1 is uniform, Zoology's
        default 0.01 puts most queries early in the query region.
      random_non_queries: fill non-query slots with random tokens (Zoology's default)
        instead of 0.
    """

    vocab_size: int = 128
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = True


@register_source("mqar")
class MQARSource(DataSource):
    """Multi-query associative recall, following Zoology's ``multiquery_ar``.

    Sequence layout (length T+1 before the next-token shift):
      k1 v1 k2 v2 ... kn vn | query region of length T-2n+1
    Each key appears once more in the query region, at an even offset ``2*gap``; the
    model must predict its value right there (targets = value, weights = 1). Every
    other position has weight 0.
    """

    Options = MQAROptions

    def __init__(self, config: DataConfig):
        super().__init__(config)
        o, T = self.options, config.seq_len
        half = o.vocab_size // 2
        if o.num_kv_pairs < 1:
            raise ValueError(f"data.options.num_kv_pairs must be >= 1, got {o.num_kv_pairs}")
        if o.num_kv_pairs > half - 1 or o.num_kv_pairs > o.vocab_size - half:
            raise ValueError(
                f"data.options.vocab_size={o.vocab_size} is too small for "
                f"num_kv_pairs={o.num_kv_pairs} distinct keys in [1, V/2) and values in [V/2, V)"
            )
        if 4 * o.num_kv_pairs > T:
            # Zoology's condition: the query region must hold num_kv_pairs even slots.
            raise ValueError(
                f"data.seq_len={T} must be >= 4 * num_kv_pairs = {4 * o.num_kv_pairs} for MQAR"
            )
        if o.power_a <= 0:
            raise ValueError(f"data.options.power_a must be > 0, got {o.power_a}")
        space = (T - 2 * o.num_kv_pairs) // 2
        x = np.arange(1, space + 1, dtype=np.float64)
        self._log_p = np.log(o.power_a * x ** (o.power_a - 1))

    @property
    def vocab_size(self) -> int:
        return self.options.vocab_size

    def batch(self, split: str, step: int, batch_size: int) -> Batch:
        o, T, B = self.options, self.config.seq_len, batch_size
        n, V, half = o.num_kv_pairs, o.vocab_size, o.vocab_size // 2
        rng = self._rng(split, step)
        # Distinct draws per row: argsort of uniforms is a uniformly random permutation.
        keys_Bn = np.argsort(rng.random((B, half - 1)), axis=1)[:, :n] + 1
        values_Bn = np.argsort(rng.random((B, V - half)), axis=1)[:, :n] + half
        # Power-law gaps without replacement via Gumbel-top-k, the same distribution
        # as Zoology's sequential np.random.choice(p=..., replace=False).
        scores = self._log_p[None, :] + rng.gumbel(size=(B, self._log_p.size))
        gaps_Bn = np.argsort(-scores, axis=1)[:, :n]

        seq = np.zeros((B, T + 1), dtype=np.int64)
        seq[:, 0 : 2 * n : 2] = keys_Bn
        seq[:, 1 : 2 * n : 2] = values_Bn
        query_pos_Bn = 2 * n + 2 * gaps_Bn
        np.put_along_axis(seq, query_pos_Bn, keys_Bn, axis=1)
        if o.random_non_queries:
            fill = rng.integers(0, V, size=seq.shape)
            seq = np.where(seq == 0, fill, seq)
        inputs_BT = seq[:, :T]
        targets_BT = seq[:, 1:].copy()
        # The answer is predicted at the query key itself; the slot after it stays noise,
        # so the model cannot copy it.
        np.put_along_axis(targets_BT, query_pos_Bn, values_Bn, axis=1)
        weights_BT = np.zeros((B, T), dtype=np.float32)
        np.put_along_axis(weights_BT, query_pos_Bn, 1.0, axis=1)
        return {
            "inputs": inputs_BT.astype(np.int32),
            "targets": targets_BT.astype(np.int32),
            "weights": weights_BT,
        }


# --------------------------------------------------------------------------- windows
def _random_windows(data: np.ndarray, rng: np.random.Generator, B: int, T: int) -> Batch:
    """B random windows of T+1 tokens from ``data``: next-token inputs/targets, weight 1."""
    starts_B = rng.integers(0, data.shape[0] - T, size=B)
    windows = np.stack([np.asarray(data[s : s + T + 1]) for s in starts_B]).astype(np.int32)
    return {
        "inputs": windows[:, :-1],
        "targets": windows[:, 1:],
        "weights": np.ones((B, T), dtype=np.float32),
    }


def _split_tail(n: int, eval_fraction: float, what: str) -> int:
    """Index where the held-out tail starts."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"data.options.eval_fraction must be in (0, 1), got {eval_fraction} ({what})")
    return n - int(round(n * eval_fraction))


# --------------------------------------------------------------------------- text
@functools.lru_cache(maxsize=1)
def pydoc_corpus_bytes() -> np.ndarray:
    """The pydoc topics joined in sorted key order, as uint8 bytes (about 466k).

    Example:
      >>> pydoc_corpus_bytes().dtype
      dtype('uint8')
    """
    from pydoc_data.topics import topics  # ships with CPython; nothing is downloaded

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """Attributes: eval_fraction: the last fraction of the corpus held out for eval."""

    eval_fraction: float = 0.05


@register_source("text")
class TextSource(DataSource):
    """Byte-level LM on ``pydoc_data.topics``; the last ``eval_fraction`` is held out."""

    Options = TextOptions
    token_unit = "byte"

    def __init__(self, config: DataConfig):
        super().__init__(config)
        data = pydoc_corpus_bytes()
        cut = _split_tail(data.size, self.options.eval_fraction, "text")
        self.splits = {"train": data[:cut], "eval": data[cut:]}
        for split, arr in self.splits.items():
            if arr.size < config.seq_len + 1:
                raise ValueError(
                    f"data.seq_len={config.seq_len} is too long for the text {split} split "
                    f"({arr.size} bytes)"
                )

    @property
    def vocab_size(self) -> int:
        return 256

    def batch(self, split: str, step: int, batch_size: int) -> Batch:
        rng = self._rng(split, step)
        return _random_windows(self.splits[split], rng, batch_size, self.config.seq_len)


# --------------------------------------------------------------------------- token files
@dataclasses.dataclass(frozen=True)
class TokenFileOptions:
    """User token files (raw little-endian arrays, as written by ``arr.tofile(path)``).

    Attributes:
      path: training tokens.
      vocab_size: tokens must lie in [0, vocab_size); checked once over each file when it opens.
      dtype: "uint16" or "uint32".
      eval_path: held-out tokens; None = the last ``eval_fraction`` of ``path``.
      eval_fraction: used only when ``eval_path`` is None.
    """

    path: str = ""
    vocab_size: int = 0
    dtype: str = "uint16"
    eval_path: str | None = None
    eval_fraction: float = 0.05


def open_token_file(path: str, dtype: str, min_tokens: int) -> np.ndarray:
    """Memory-map a token file, raising a clear error naming ``path`` if it is unusable.

    Args:
      path: file of raw tokens.
      dtype: "uint16" or "uint32".
      min_tokens: the fewest tokens the caller needs (seq_len + 1 for one window).

    Returns:
      A read-only ``np.memmap`` of shape [num_tokens].

    Example:
      >>> import numpy as np, tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "t.bin"); np.arange(10, dtype=np.uint16).tofile(p)
      >>> open_token_file(p, "uint16", 5).shape
      (10,)
    """
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"data.options.dtype must be 'uint16' or 'uint32', got {dtype!r}")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"token file {path!r} does not exist (data.options.path / eval_path)")
    itemsize = np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if size % itemsize:
        raise ValueError(
            f"token file {path!r} looks corrupt: {size} bytes is not a multiple of "
            f"{itemsize} ({dtype}); check data.options.dtype"
        )
    n = size // itemsize
    if n < min_tokens:
        raise ValueError(
            f"token file {path!r} is too short: {n} tokens, need at least {min_tokens} "
            f"(seq_len + 1)"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: str,
                    chunk: int = 1 << 24) -> None:
    """Raise ValueError naming ``path`` if any id in ``tokens [n]`` is >= ``vocab_size``.

    A vectorised max over the memmap in chunks of ``chunk`` tokens (the file is never
    loaded whole); unsigned dtypes have no negative ids.

    Example:
      >>> check_token_ids(np.array([0, 3, 9], np.uint16), 10, "t.bin")
      >>> check_token_ids(np.array([0, 12], np.uint16), 10, "t.bin")
      Traceback (most recent call last):
      ...
      ValueError: token file 't.bin' holds token id 12 >= data.options.vocab_size=10 (at index 1)
    """
    for start in range(0, tokens.shape[0], chunk):
        part = np.asarray(tokens[start:start + chunk])
        if int(part.max(initial=0)) >= vocab_size:
            i = int(np.argmax(part >= vocab_size))  # the first bad id, to find it in the file
            raise ValueError(f"token file {path!r} holds token id {int(part[i])} >= "
                             f"data.options.vocab_size={vocab_size} (at index {start + i})")


@register_source("tokens")
class TokenFileSource(DataSource):
    """Random windows of user token files, memory-mapped (never loaded whole)."""

    Options = TokenFileOptions

    def __init__(self, config: DataConfig):
        super().__init__(config)
        o, need = self.options, config.seq_len + 1
        if o.vocab_size < 1:
            raise ValueError(f"data.options.vocab_size must be set (>= 1), got {o.vocab_size}")
        train = open_token_file(o.path, o.dtype, need)
        if o.eval_path:
            eval_ = open_token_file(o.eval_path, o.dtype, need)
            self.splits = {"train": train, "eval": eval_}
            check_token_ids(eval_, o.vocab_size, o.eval_path)
        else:
            cut = _split_tail(train.shape[0], o.eval_fraction, o.path)
            self.splits = {"train": train[:cut], "eval": train[cut:]}
            for split, arr in self.splits.items():
                if arr.shape[0] < need:
                    raise ValueError(
                        f"token file {o.path!r} is too short: its {split} split has "
                        f"{arr.shape[0]} tokens, need at least {need} (seq_len + 1)"
                    )
        # Once, over the whole file: an id that only ever appears as an input would
        # otherwise reach jnp.take unchecked (NaN, misread as a learning-rate problem).
        check_token_ids(train, o.vocab_size, o.path)

    @property
    def vocab_size(self) -> int:
        return self.options.vocab_size

    def batch(self, split: str, step: int, batch_size: int) -> Batch:
        # Ids were range-checked once when the files were opened (check_token_ids).
        return _random_windows(self.splits[split], self._rng(split, step), batch_size,
                               self.config.seq_len)


# --------------------------------------------------------------------------- tokenized text
@dataclasses.dataclass(frozen=True)
class TokenizedTextOptions:
    """Text through a pretrained model's tokenizer (no BOS, one stream).

    Attributes:
      tokenizer: a ``models.pretrained.load`` name or path (its tokenizer is used).
      text: "pydoc" (``pydoc_corpus_bytes``, embedded) or the path of a UTF-8 text file.
      eval_fraction: the last fraction of the tokens held out for eval.
    """

    tokenizer: str = ""
    text: str = "pydoc"
    eval_fraction: float = 0.05


@functools.lru_cache(maxsize=4)
def tokenized_text(tokenizer: str, text: str = "pydoc") -> np.ndarray:
    """``int32 [n]`` ids of ``text`` ("pydoc" or a file) under ``tokenizer``'s tokenizer.

    The same ids ``models.perplexity`` scores (``corpus_text`` through ``encode``).
    """
    from models import pretrained

    if not tokenizer:
        raise ValueError("data.options.tokenizer must name the model whose tokenizer to use "
                         "(e.g. 'smollm2-135m')")
    tok = pretrained.load(tokenizer, config_only=True).tokenizer
    if tok is None:
        raise ValueError(f"data.options.tokenizer={tokenizer!r}: that checkpoint has no tokenizer")
    if text == "pydoc":
        body = pydoc_corpus_bytes().tobytes().decode("utf-8", errors="replace")
    else:
        if not os.path.isfile(text):
            raise FileNotFoundError(f"data.options.text={text!r}: no such file (or use 'pydoc')")
        with open(text, encoding="utf-8", errors="replace") as f:
            body = f.read()
    return np.asarray(tok.encode(body, add_special_tokens=False), np.int32)


def tokenized_text_splits(tokenizer: str, text: str = "pydoc",
                          eval_fraction: float = TokenizedTextOptions.eval_fraction):
    """``(train ids, eval ids)`` of ``tokenized_text``: the last ``eval_fraction`` held out.

    The split ``data.source="tokenized_text"`` trains and evaluates on, so a model tuned
    on it can be scored on text it never saw (``models.conversion.common``).
    """
    ids = tokenized_text(tokenizer, text)
    cut = _split_tail(ids.size, eval_fraction, "tokenized_text")
    return ids[:cut], ids[cut:]


@register_source("tokenized_text")
class TokenizedTextSource(DataSource):
    """Random windows of a tokenized text; the last ``eval_fraction`` of the tokens is held out.

    Example:
      >>> src = make_source(DataConfig(source="tokenized_text", seq_len=32, batch_size=2,
      ...                              options={"tokenizer": "smollm2-135m"}))  # doctest: +SKIP
      >>> src.batch("train", 0, 2)["inputs"].shape                              # doctest: +SKIP
      (2, 32)
    """

    Options = TokenizedTextOptions

    def __init__(self, config: DataConfig):
        super().__init__(config)
        o = self.options
        train, eval_ = tokenized_text_splits(o.tokenizer, o.text, o.eval_fraction)
        self.splits = {"train": train, "eval": eval_}
        self._vocab = int(max(train.max(initial=0), eval_.max(initial=0))) + 1
        for split, arr in self.splits.items():
            if arr.size < config.seq_len + 1:
                raise ValueError(f"data.seq_len={config.seq_len} is too long for the tokenized "
                                 f"{split} split ({arr.size} tokens)")

    @property
    def vocab_size(self) -> int:
        # The largest id that occurs, + 1: the model's vocab must cover it (it usually
        # covers the whole tokenizer; the trainer checks model.vocab_size >= this).
        return self._vocab

    def batch(self, split: str, step: int, batch_size: int) -> Batch:
        return _random_windows(self.splits[split], self._rng(split, step), batch_size,
                               self.config.seq_len)


# Image sources register themselves on import (kept in their own module for size).
from train import shapes as _shapes  # noqa: E402,F401
from train import vision_data as _vision_data  # noqa: E402,F401
