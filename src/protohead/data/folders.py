"""Generic class-folder loader.

Two layouts:

- ``root/{train,val,test}/<class>/*.{jpg,jpeg,png,bmp}``: the given split is used as is;
- ``root/<class>/*.{jpg,jpeg,png,bmp}``: a class-stratified split drawn with ``seed``.

Class names are the sorted folder names. Files with other extensions and hidden entries are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from protohead.data.base import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    FileLoader,
    ImageDataset,
    ImageSplit,
    check_max_pixels,
    file_digests,
    files_content_key,
)

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


def _class_dirs(folder: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _make_split(name: str, root: Path, files: list[tuple[Path, int]], max_image_pixels: int) -> ImageSplit:
    """An :class:`ImageSplit` over ``files`` = [(path, label)], ids = path relative to ``root``."""
    paths = tuple(str(p) for p, _ in files)
    ids = tuple(p.relative_to(root).as_posix() for p, _ in files)
    digests = file_digests(paths)
    return ImageSplit(
        name=name,
        ids=ids,
        labels=np.array([label for _, label in files], dtype=np.int64),
        loader=FileLoader(paths, max_image_pixels),
        sources=paths,
        content_key=files_content_key(ids, digests),
        image_digests=digests,
    )


def load_class_folders(root: str | os.PathLike[str], seed: int = 0, val_fraction: float = 0.1,
                       test_fraction: float = 0.2, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageDataset:
    """Load images organised in class folders as an :class:`ImageDataset`.

    Args:
        root: the dataset folder (either layout, see module docstring).
        seed: seed of the stratified split (flat layout only).
        val_fraction, test_fraction: fractions per class for the flat layout (rounded; train keeps at
            least one image per class).
        max_image_pixels: ``load(i)`` refuses an image whose header claims more pixels (see
            :func:`protohead.data.base.read_rgb`).

    Returns:
        Dataset named after ``root``; ids are paths relative to ``root`` (``train/cat/001.png`` or
        ``cat/001.png``), labels (n,) int64 in sorted class-name order, sources = file paths;
        ``load(i)`` gives (H, W, 3) uint8 RGB.

    Raises:
        ValueError: for a missing folder, an incomplete train/val/test layout, no classes, an empty split
            or a class absent from train; and on ``load`` for an unreadable image (naming the file).
    """
    check_max_pixels(max_image_pixels)
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"class-folder dataset {root} does not exist or is not a folder")
    present = [s for s in SPLIT_NAMES if (root / s).is_dir()]
    splits: dict[str, ImageSplit] = {}

    if present:
        if len(present) != len(SPLIT_NAMES):
            absent = [s for s in SPLIT_NAMES if s not in present]
            raise ValueError(
                f"{root}: has split folder(s) {present} but not {absent}; need train, val and test"
            )
        class_names = tuple(sorted({c for s in SPLIT_NAMES for c in _class_dirs(root / s)}))
        if not class_names:
            raise ValueError(f"{root}: no class folders under {root / 'train'}")
        for s in SPLIT_NAMES:
            files = [
                (p, label)
                for label, c in enumerate(class_names) if (root / s / c).is_dir()
                for p in _images_in(root / s / c)
            ]
            if not files:
                raise ValueError(f"{root}: split {s!r} is empty (no images in {root / s}/<class>/)")
            splits[s] = _make_split(s, root, files, max_image_pixels)
    else:
        if not (val_fraction >= 0.0 and test_fraction >= 0.0 and val_fraction + test_fraction < 1.0):
            raise ValueError(
                f"need val_fraction, test_fraction >= 0 and val+test < 1, got {val_fraction}, {test_fraction}"
            )
        class_names = tuple(_class_dirs(root))
        if not class_names:
            raise ValueError(f"{root}: no class folders (expected {root}/<class>/*.jpg or train/val/test)")
        rng = np.random.default_rng(seed)
        members: dict[str, list[tuple[Path, int]]] = {s: [] for s in SPLIT_NAMES}
        for label, c in enumerate(class_names):
            images = _images_in(root / c)
            order = rng.permutation(len(images))
            n_test = round(len(images) * test_fraction)
            n_val = round(len(images) * val_fraction)
            while n_val + n_test >= len(images) and n_val + n_test > 0:
                if n_test >= n_val:
                    n_test -= 1
                else:
                    n_val -= 1
            for rank, i in enumerate(order.tolist()):
                s = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
                members[s].append((images[i], label))
        for s in SPLIT_NAMES:
            files = sorted(members[s], key=lambda item: item[0])
            if not files:
                raise ValueError(f"{root}: split {s!r} is empty (too few images per class)")
            splits[s] = _make_split(s, root, files, max_image_pixels)

    dataset = ImageDataset(root.name, class_names, splits)
    absent_classes = [c for c, n in zip(class_names, dataset.class_counts("train"), strict=True) if n == 0]
    if absent_classes:
        raise ValueError(f"{root}: class(es) {absent_classes} absent from train (no images)")
    return dataset
