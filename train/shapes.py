"""Synthetic shapes-and-captions images with one-word questions, for the VLM.

Each image (``image_size`` square, RGB, black background) is a 2×2 grid of cells; a
scene puts ``num_shapes`` shapes (distinct kinds, distinct colours, distinct cells)
into it: circles, squares and triangles in red, green, blue or yellow, with a
one-pixel random jitter. Everything is a pure function of ``(seed, split, step)``.

A row is ``BOS, IMG×M, question…, ?, PAD…`` (M = ``tokens_per_image``; the VLM
scatters the image features into the IMG placeholders). The answer is one token,
predicted at the ``?`` position (``weights`` = 1 there only):

  what colour is the square ?      -> red | green | blue | yellow
  what shape is the red one ?      -> circle | square | triangle
  where is the square ?            -> topleft | topright | bottomleft | bottomright

With ``caption_fraction > 0`` some training rows are captions instead
(``BOS, IMG×M, red circle topleft . blue square …``, next-token loss on the caption).
Eval rows are always questions, on images drawn from the eval stream (never trained on).

Example:
  >>> from train.data import DataConfig, make_source
  >>> src = make_source(DataConfig(source="shapes", seq_len=20, batch_size=2))
  >>> b = src.batch("eval", 0, 2)
  >>> b["images"].shape, b["inputs"].shape, b["weights"].sum(1).tolist()
  ((2, 1, 12, 12, 3), (2, 20), [1.0, 1.0])
  >>> src.decode(b["inputs"][0][10:])[:3]
  ['what', 'colour', 'is']
"""

from __future__ import annotations

import dataclasses

import numpy as np

from train.data import Batch, DataConfig, DataSource, register_source

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.2, 0.3, 1.0),
           "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("topleft", "topright", "bottomleft", "bottomright")
SPECIAL = ("<pad>", "<bos>", "<img>", "?", ".")
WORDS = ("what", "colour", "shape", "is", "the", "one", "where")
VOCAB = SPECIAL + WORDS + tuple(COLOURS) + SHAPES + CELLS
TOKEN = {w: i for i, w in enumerate(VOCAB)}
PAD, BOS, IMG = TOKEN["<pad>"], TOKEN["<bos>"], TOKEN["<img>"]
MAX_QUESTION = 7  # "what shape is the red one ?"


@dataclasses.dataclass(frozen=True)
class ShapesOptions:
    """Attributes:
      image_size: pixels per side (even; each cell is image_size/2).
      num_shapes: shapes per image, 1..3.
      tokens_per_image: M placeholders per image (must equal the VLM's).
      caption_fraction: share of training rows that are captions.
    """

    image_size: int = 12
    num_shapes: int = 2
    tokens_per_image: int = 9
    caption_fraction: float = 0.0


def render(scene, image_size: int) -> np.ndarray:
    """Draw ``[(shape, colour, cell, (dy, dx)), ...]`` into an ``[S, S, 3]`` float image.

    Example:
      >>> bool(render([("square", "red", "topleft", (0, 0))], 12).sum() > 0)
      True
    """
    img = np.zeros((image_size, image_size, 3), np.float32)
    half = image_size // 2
    size = half - 2  # one pixel of margin and one of jitter
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    masks = {
        "square": np.ones((size, size), bool),
        "circle": (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2,
        "triangle": np.abs(xx - c) <= (yy + 1) / 2,  # apex up, widening downwards
    }
    for shape, colour, cell, (dy, dx) in scene:
        r0 = (CELLS.index(cell) // 2) * half + 1 + dy
        c0 = (CELLS.index(cell) % 2) * half + 1 + dx
        region = img[r0:r0 + size, c0:c0 + size]
        region[masks[shape]] = COLOURS[colour]
    return img


def _question(scene, kind: int, rng) -> tuple[list[str], str]:
    """One of the three question kinds about a random shape of the scene."""
    shape, colour, cell, _ = scene[rng.integers(len(scene))]
    table = (
        (["what", "colour", "is", "the", shape, "?"], colour),
        (["what", "shape", "is", "the", colour, "one", "?"], shape),
        (["where", "is", "the", shape, "?"], cell),
    )
    return table[kind]


def caption(scene) -> list[str]:
    """``["red", "circle", "topleft", ".", ...]`` in cell order."""
    words = []
    for shape, colour, cell, _ in sorted(scene, key=lambda s: CELLS.index(s[2])):
        words += [colour, shape, cell, "."]
    return words


@register_source("shapes")
class ShapesSource(DataSource):
    """Shapes-and-questions VLM data; ``image_token_id`` is the ``<img>`` placeholder."""

    Options = ShapesOptions
    image_token_id = IMG

    def __init__(self, config: DataConfig):
        super().__init__(config)
        o = self.options
        if o.image_size % 2 or o.image_size < 8:
            raise ValueError(f"data.options.image_size must be even and >= 8, got {o.image_size}")
        if not 1 <= o.num_shapes <= len(SHAPES):
            raise ValueError(f"data.options.num_shapes must be in [1, {len(SHAPES)}], got {o.num_shapes}")
        need = 1 + o.tokens_per_image + max(MAX_QUESTION, 4 * o.num_shapes if o.caption_fraction else 0)
        if config.seq_len < need:
            raise ValueError(f"data.seq_len={config.seq_len} is too short: BOS + {o.tokens_per_image} "
                             f"image tokens + the longest text need {need}")

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    @property
    def tokens_per_image(self) -> int:
        return self.options.tokens_per_image

    @staticmethod
    def decode(ids) -> list[str]:
        return [VOCAB[int(i)] for i in ids]

    def scene(self, rng):
        o = self.options
        kinds = rng.permutation(len(SHAPES))[:o.num_shapes]
        colours = rng.permutation(len(COLOURS))[:o.num_shapes]
        cells = rng.permutation(len(CELLS))[:o.num_shapes]
        names = tuple(COLOURS)
        return [(SHAPES[k], names[c], CELLS[p], tuple(rng.integers(0, 2, size=2)))
                for k, c, p in zip(kinds, colours, cells)]

    def batch(self, split: str, step: int, batch_size: int) -> Batch:
        o, T, M = self.options, self.config.seq_len, self.options.tokens_per_image
        rng = self._rng(split, step)
        inputs = np.full((batch_size, T), PAD, np.int32)
        targets = np.full((batch_size, T), PAD, np.int32)
        weights = np.zeros((batch_size, T), np.float32)
        images = np.zeros((batch_size, 1, o.image_size, o.image_size, 3), np.float32)
        inputs[:, 0], inputs[:, 1:1 + M] = BOS, IMG
        start = 1 + M
        for b in range(batch_size):
            scene = self.scene(rng)
            images[b, 0] = render(scene, o.image_size)
            if split == "train" and rng.random() < o.caption_fraction:
                words = caption(scene)
                ids = [TOKEN[w] for w in words]
                inputs[b, start:start + len(ids) - 1] = ids[:-1]
                # The last placeholder predicts the first caption word.
                targets[b, start - 1:start - 1 + len(ids)] = ids
                weights[b, start - 1:start - 1 + len(ids)] = 1.0
                continue
            words, answer = _question(scene, int(rng.integers(3)), rng)
            inputs[b, start:start + len(words)] = [TOKEN[w] for w in words]
            targets[b, start + len(words) - 1] = TOKEN[answer]
            weights[b, start + len(words) - 1] = 1.0
        return {"inputs": inputs, "targets": targets, "weights": weights, "images": images}
