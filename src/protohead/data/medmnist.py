"""MedMNIST ``.npz`` loader (e.g. ``dermamnist.npz``, ``dermamnist_224.npz``).

Keys: ``{train,val,test}_images`` of shape (n, H, W) grayscale, (n, H, W, 1) or (n, H, W, 3) RGB, and
``{train,val,test}_labels`` of shape (n,) or (n, 1). All arrays are held in memory (MedMNIST is small).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from protohead.data.base import DEFAULT_MAX_IMAGE_PIXELS, ImageDataset, ImageSplit, check_max_pixels
from protohead.data.ham10000 import DERMAMNIST_CLASSES

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


class ArrayLoader:
    """A picklable ``loader(i) -> (H, W, 3) uint8`` over an (n, H, W) or (n, H, W, 3) uint8 array."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __call__(self, index: int) -> np.ndarray:
        image = self.images[index]
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return np.array(image, dtype=np.uint8, copy=True)


def _as_uint8_images(images: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Validate ``images`` and return (n, H, W) or (n, H, W, 3) uint8."""
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ValueError(f"{path}: {key} has shape {images.shape}; expected (n, H, W) or (n, H, W, 3)")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer) or (
            images.size and (images.min() < 0 or images.max() > 255)
        ):
            raise ValueError(f"{path}: {key} has dtype {images.dtype}; expected uint8 pixel values 0..255")
        images = images.astype(np.uint8)
    return images


def load_medmnist_npz(path: str | os.PathLike[str], class_names: Sequence[str] | None = None,
                      max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageDataset:
    """Load a MedMNIST ``.npz`` file as an :class:`ImageDataset`.

    Args:
        path: the ``.npz`` file.
        class_names: names of the classes, in label order. Default: the DermaMNIST names when the file has
            7 classes, else ``class_0 .. class_{C-1}``.
        max_image_pixels: refuse the file when its images are larger (H × W), as the file loaders do.

    Returns:
        Dataset named after the file stem; ids ``train_00000`` ...; labels (n,) int64; ``load(i)`` gives
        (H, W, 3) uint8 RGB (grayscale repeated over channels); content_key from the file's size + mtime.

    Raises:
        ValueError: naming the file for a missing file or key, bad shapes, images over ``max_image_pixels``,
            mismatched lengths, labels out of range, an empty split, or a class absent from train.
    """
    check_max_pixels(max_image_pixels)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"MedMNIST file {path} does not exist")
    needed = [f"{s}_{kind}" for s in SPLIT_NAMES for kind in ("images", "labels")]
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"cannot read MedMNIST file {path}: {exc}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not an .npz archive (a single array of shape {np.shape(npz)})")
    try:
        with npz:
            keys = set(npz.files)
            arrays = {k: npz[k] for k in needed if k in keys}
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"cannot read MedMNIST file {path}: {exc}") from exc
    absent = [k for k in needed if k not in keys]
    if absent:
        raise ValueError(f"{path}: missing key(s) {absent}; found {sorted(keys)}")

    labels: dict[str, np.ndarray] = {}
    images: dict[str, np.ndarray] = {}
    for s in SPLIT_NAMES:
        lab = arrays[f"{s}_labels"]
        if lab.ndim == 2 and lab.shape[1] == 1:
            lab = lab[:, 0]
        if lab.ndim != 1:
            raise ValueError(f"{path}: {s}_labels has shape {lab.shape}; expected (n,) or (n, 1)")
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"{path}: {s}_labels has dtype {lab.dtype}; expected integers")
        img = _as_uint8_images(arrays[f"{s}_images"], f"{s}_images", path)
        if img.shape[1] * img.shape[2] > max_image_pixels:
            raise ValueError(
                f"{path}: {s}_images are {img.shape[2]}×{img.shape[1]} = {img.shape[1] * img.shape[2]:,} pixels, "
                f"over the limit of {max_image_pixels:,}; raise max_image_pixels if they are genuine"
            )
        if len(img) != len(lab):
            raise ValueError(f"{path}: {s}_images has {len(img)} images but {s}_labels has {len(lab)} labels")
        if len(lab) == 0:
            raise ValueError(f"{path}: split {s!r} is empty")
        labels[s] = lab.astype(np.int64)
        images[s] = img

    if class_names is None:
        num_classes = int(max(lab.max() for lab in labels.values())) + 1
        if num_classes == len(DERMAMNIST_CLASSES):
            names = DERMAMNIST_CLASSES
        else:
            names = tuple(f"class_{c}" for c in range(num_classes))
    else:
        names = tuple(class_names)
    for s in SPLIT_NAMES:
        bad = (labels[s] < 0) | (labels[s] >= len(names))
        if bad.any():
            raise ValueError(
                f"{path}: {s}_labels has {int(bad.sum())} label(s) out of range [0, {len(names)}), "
                f"e.g. {labels[s][bad][:5].tolist()}"
            )

    stat = path.stat()
    content_key = hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    splits = {
        s: ImageSplit(
            name=s,
            ids=tuple(f"{s}_{i:05d}" for i in range(len(labels[s]))),
            labels=labels[s],
            loader=ArrayLoader(images[s]),
            sources=None,
            content_key=content_key,
        )
        for s in SPLIT_NAMES
    }
    dataset = ImageDataset(path.stem, names, splits)
    absent_classes = [n for n, k in zip(names, dataset.class_counts("train"), strict=True) if k == 0]
    if absent_classes:
        raise ValueError(f"{path}: class(es) {absent_classes} absent from train")
    return dataset
