"""Labelled image sets named by a spec string.

* ``fashion-mnist:train``   55,000 of the 60,000 official training images (what the demo trains on);
* ``fashion-mnist:holdout`` the other 5,000: threshold calibration only, never trained on;
* ``fashion-mnist:test``    the official 10,000 test images: reporting only;
* ``han1000:train|holdout|test|ood``  1000 printed Han characters rendered from Debian's CJK fonts
  (``imagedata.glyphs`` says how); ``han1000:gallery`` a million more renders of the training
  families, never trained on, for retrieval galleries;
* ``/path/to/folder``       one subfolder per class, named by class index (``0/``) or exact name.

``dataset_info(spec)`` says what training needs to know of a spec's data set: its classes, its
normalisation and the augmentation that suits it (no horizontal flip for characters).

The holdout is a fixed random draw: ``numpy.random.default_rng(HOLDOUT_SEED).permutation(60000)``,
first 5,000 indices. Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``.
"""
from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from handler.preprocess import decode_image

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
HOLDOUT_SEED = 20221206  # MRL's NeurIPS 2022 presentation date; fixed forever, documented in docs/models.md
HOLDOUT_SIZE = 5000
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), as used by (Fashion-)MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic bytes {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def holdout_split(n: int = 60000, size: int = HOLDOUT_SIZE, seed: int = HOLDOUT_SEED
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(train_indices, holdout_indices), both sorted, disjoint, covering range(n)."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[size:]), np.sort(perm[:size])


class ArrayImages:
    """Images held as a uint8 array (N, H, W); items are (PIL image, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, source: str) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{source}: {len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.source = images, labels.astype(np.int64), source

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], "L"), int(self.labels[i])


class FolderImages:
    """Encoded image files under one subfolder per class; items are (PIL image, label)."""

    def __init__(self, root: str | Path, classes: Sequence[str]) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data folder {root} does not exist")
        by_name = {name: i for i, name in enumerate(classes)}
        files: list[tuple[Path, int]] = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            if sub.name in by_name:
                label = by_name[sub.name]
            elif sub.name.isdigit() and int(sub.name) < len(classes):
                label = int(sub.name)
            else:
                raise ValueError(f"subfolder {sub.name!r} of {root} is neither a class index "
                                 f"(0..{len(classes) - 1}) nor a class name")
            files += [(f, label) for f in sorted(sub.iterdir()) if f.is_file()]
        if not files:
            raise ValueError(f"no image files found under {root}/<class>/")
        self.files, self.source = files, str(root)
        self.labels = np.array([label for _, label in files], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.files[i]
        return decode_image(path.read_bytes()), label


def fashion_mnist(split: str) -> ArrayImages:
    """One split of Fashion-MNIST: 'train' (55k), 'holdout' (5k), 'test' (10k) or 'train60k'."""
    if split == "test":
        images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
        return ArrayImages(images, labels, "fashion-mnist:test")
    if split not in ("train", "holdout", "train60k"):
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use train, holdout or test")
    images = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
    if split != "train60k":
        train_idx, holdout_idx = holdout_split(len(images))
        idx = train_idx if split == "train" else holdout_idx
        images, labels = images[idx], labels[idx]
    return ArrayImages(images, labels, f"fashion-mnist:{split}")


def han1000(split: str, limit: int | None = None) -> ArrayImages:
    """One split of han1000 (see ``imagedata.glyphs``), rendered or read from its cache."""
    from imagedata import glyphs

    images, labels = glyphs.render_split(split, limit)
    return ArrayImages(images, labels, f"han1000:{split}")


@dataclass(frozen=True)
class DatasetInfo:
    """What training takes from a data set: classes, normalisation, augmentation, names."""

    name: str                 # the model card's name is mrl_resnet50_<name>
    classes: tuple[str, ...]
    mean: float               # grayscale mean and std of the training images, in [0, 1]
    std: float
    flip: bool                # random horizontal flips make sense (clothes yes, characters no)
    pad: int                  # random-crop zero padding in pixels (0: the renderer jitters already)


def dataset_info(spec: str) -> DatasetInfo:
    """The data set behind a ``fashion-mnist:*`` or ``han1000:*`` spec."""
    family = spec.split(":", 1)[0]
    if family == "fashion-mnist":
        return DatasetInfo("fashion_mnist", FASHION_MNIST_CLASSES, 0.2860, 0.3530, flip=True, pad=2)
    if family == "han1000":
        from imagedata import glyphs

        # mean/std measured on 3,000 training renders (every 97th image): 0.640, 0.224
        return DatasetInfo("han1000", tuple(glyphs.classes()), 0.640, 0.224, flip=False, pad=0)
    raise ValueError(f"no training recipe for data spec {spec!r}; use fashion-mnist:train or han1000:train")


def load_spec(spec: str, classes: Sequence[str] = FASHION_MNIST_CLASSES, limit: int | None = None
              ) -> ArrayImages | FolderImages:
    """Resolve a data spec string (see module docstring); ``limit`` keeps the first N images."""
    family, _, split = spec.partition(":")
    if family in ("fashion-mnist", "han1000") and split:
        info = dataset_info(spec)
        if tuple(classes) != info.classes:
            raise ValueError(f"{spec} has the {len(info.classes)} {family} classes but the model has "
                             f"{len(classes)} classes ({list(classes)[:3]}...)")
        if family == "han1000":
            return han1000(split, limit)
        data = fashion_mnist(split)
    else:
        data = FolderImages(spec, classes)
    if limit is not None and limit < len(data):
        if isinstance(data, ArrayImages):
            return ArrayImages(data.images[:limit], data.labels[:limit], data.source)
        data.files, data.labels = data.files[:limit], data.labels[:limit]
    return data
