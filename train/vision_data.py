"""Image data sources, deterministic in ``(seed, split, step)``; nothing is downloaded.

Classification batches (``task="classify"``)::

  images   [B, H, W, C] float32 in [0, 1]
  labels   [B] int32
  weights  [B] float32   0 on the rows that pad the last eval batch

  digits        scikit-learn's 8×8 digits (1797 images, 10 classes), a fixed stratified
                train/test split by ``split_seed``; eval batch i is test rows
                ``[i·B, (i+1)·B)`` (padding rows have weight 0), so eval covers the
                test set exactly once when ``eval_steps·eval_batch_size >= 359``.
  image_folder  ``root/<class>/*.png`` (one subfolder per class, sorted names =
                labels); read with ``matplotlib.image.imread`` (PNG needs no PIL);
                every image must have the configured size.

VLM batches (``task="vlm"``, see ``train.shapes``): ``inputs``/``targets``/``weights``
``[B, T]`` plus ``images [B, I, H, W, C]``.

Example:
  >>> from train.data import DataConfig, make_source
  >>> src = make_source(DataConfig(source="digits", batch_size=4))
  >>> b = src.batch("train", 0, 4)
  >>> b["images"].shape, b["labels"].dtype.name, src.num_classes
  ((4, 8, 8, 1), 'int32', 10)
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from train.data import Batch, DataConfig, DataSource, register_source


class ImageClassSource(DataSource):
    """Shared batching over in-memory ``(images [n, H, W, C], labels [n])`` per split."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    num_classes: int

    @property
    def vocab_size(self) -> int:  # no tokens; the trainer's task checks num_classes
        return 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.splits["train"][0].shape[1:])

    def batch(self, split: str, step: int, batch_size: int) -> Batch:
        images, labels = self.splits[split] if split in self.splits else (None, None)
        rng = self._rng(split, step)  # also validates the split name
        n = labels.shape[0]
        if split == "train":
            idx = rng.integers(0, n, size=batch_size)
            shift = getattr(self.options, "train_shift", 0)
            out = random_shift(images[idx], shift, rng) if shift else images[idx]
            return {"images": out, "labels": labels[idx].astype(np.int32),
                    "weights": np.ones(batch_size, np.float32)}
        else:
            # Sequential over the held-out set, so eval accuracy is over distinct images.
            idx = np.arange(step * batch_size, (step + 1) * batch_size)
            weights = (idx < n).astype(np.float32)
            idx = np.where(idx < n, idx, 0)
        return {"images": images[idx], "labels": labels[idx].astype(np.int32), "weights": weights}


def random_shift(images_BHWC: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Translate each image by up to ``shift`` pixels per axis, filling with zeros.

    Why: 1.4k training digits overfit a ViT within a few hundred steps; translations
    are the cheap augmentation that keeps the label.

    Example:
      >>> random_shift(np.ones((2, 4, 4, 1)), 1, np.random.default_rng(0)).shape
      (2, 4, 4, 1)
    """
    B, H, W, _ = images_BHWC.shape
    padded = np.pad(images_BHWC, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, B))
    return np.stack([padded[b, dy[b]:dy[b] + H, dx[b]:dx[b] + W] for b in range(B)])


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    """Indices ``(train, test)``: each class split in the same proportion, fixed by ``seed``.

    Example:
      >>> tr, te = stratified_split(np.array([0, 0, 1, 1]), 0.5, 0)
      >>> sorted(np.array([0, 0, 1, 1])[te].tolist())
      [0, 1]
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.options.test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(idx.size * test_fraction)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# --------------------------------------------------------------------------- digits
@dataclasses.dataclass(frozen=True)
class DigitsOptions:
    """Attributes: test_fraction: held-out share per class; split_seed: fixes the split;
    train_shift: random translation of training images by up to this many pixels."""

    test_fraction: float = 0.2
    split_seed: int = 0
    train_shift: int = 0


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships inside scikit-learn

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)


@register_source("digits")
class DigitsSource(ImageClassSource):
    """scikit-learn 8×8 digits, pixel values scaled to [0, 1]."""

    Options = DigitsOptions
    num_classes = 10

    def __init__(self, config: DataConfig):
        super().__init__(config)
        images, labels = _load_digits()
        tr, te = stratified_split(labels, self.options.test_fraction, self.options.split_seed)
        self.splits = {"train": (images[tr], labels[tr]), "eval": (images[te], labels[te])}


# --------------------------------------------------------------------------- folders
@dataclasses.dataclass(frozen=True)
class ImageFolderOptions:
    """User images: ``root/<class name>/<image>.png``.

    Attributes:
      root: training folder.
      eval_root: held-out folder with the same class names; None = a stratified
        ``test_fraction`` of ``root``.
      image_size: ``(H, W)`` every image must have.
      channels: 1 (grey), 3 (RGB) or 4; RGB(A) files are reduced/expanded to match.
      test_fraction, split_seed: used when ``eval_root`` is None.
    """

    root: str = ""
    eval_root: str | None = None
    image_size: tuple = (32, 32)
    channels: int = 3
    test_fraction: float = 0.2
    split_seed: int = 0


def load_image_folder(root: str, image_size, channels: int, classes=None):
    """``(images [n, H, W, C] float32, labels [n], class names)`` from ``root/<class>/*``.

    Example:
      >>> import tempfile, matplotlib.image as mpimg
      >>> d = tempfile.mkdtemp(); os.makedirs(f"{d}/cat")
      >>> mpimg.imsave(f"{d}/cat/a.png", np.zeros((4, 4, 3)))
      >>> load_image_folder(d, (4, 4), 3)[0].shape
      (1, 4, 4, 3)
    """
    import matplotlib.image as mpimg

    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist (data.options.root / eval_root)")
    classes = classes or sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
    if not classes:
        raise ValueError(f"image folder {root!r} has no class subfolders")
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            path = os.path.join(folder, f)
            img = np.asarray(mpimg.imread(path), np.float32)
            if img.dtype != np.float32 or img.max(initial=0) > 1.0:
                img = img / 255.0  # non-PNG readers return uint8
            img = img[..., None] if img.ndim == 2 else img
            img = _match_channels(img, channels, path)
            if img.shape[:2] != tuple(image_size):
                raise ValueError(f"image {path!r} has size {img.shape[:2]}, expected "
                                 f"data.options.image_size={tuple(image_size)}")
            images.append(img)
            labels.append(label)
    if not images:
        raise ValueError(f"image folder {root!r} holds no images")
    return np.stack(images).astype(np.float32), np.asarray(labels, np.int32), classes


def _match_channels(img: np.ndarray, channels: int, path: str) -> np.ndarray:
    have = img.shape[-1]
    if have == channels:
        return img
    if channels == 1:
        return img[..., :3].mean(-1, keepdims=True)
    if have == 1 and channels == 3:
        return np.repeat(img, 3, -1)
    if have == 4 and channels == 3:
        return img[..., :3]
    raise ValueError(f"image {path!r} has {have} channels, cannot convert to data.options.channels={channels}")


@register_source("image_folder")
class ImageFolderSource(ImageClassSource):
    """User image folders, one subfolder per class."""

    Options = ImageFolderOptions

    def __init__(self, config: DataConfig):
        super().__init__(config)
        o = self.options
        images, labels, classes = load_image_folder(o.root, o.image_size, o.channels)
        if o.eval_root:
            ev = load_image_folder(o.eval_root, o.image_size, o.channels, classes)
            self.splits = {"train": (images, labels), "eval": ev[:2]}
        else:
            tr, te = stratified_split(labels, o.test_fraction, o.split_seed)
            self.splits = {"train": (images[tr], labels[tr]), "eval": (images[te], labels[te])}
        self.classes = classes
        self.num_classes = len(classes)
