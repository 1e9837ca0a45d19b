"""Data loaders: every loader returns an :class:`ImageDataset` (see :mod:`protohead.data.base`)."""

from __future__ import annotations

import os
from pathlib import Path

from protohead.data.base import DEFAULT_MAX_IMAGE_PIXELS, ImageDataset, ImageSplit, check_max_pixels, take
from protohead.data.folders import load_class_folders
from protohead.data.ham10000 import DERMAMNIST_CLASSES, METADATA_FILE, load_ham10000
from protohead.data.medmnist import load_medmnist_npz

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DERMAMNIST_CLASSES",
    "ImageDataset",
    "ImageSplit",
    "load_class_folders",
    "load_dataset",
    "load_ham10000",
    "load_medmnist_npz",
    "take",
]


def load_dataset(path: str | os.PathLike[str], split: str = "official", seed: int = 0,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageDataset:
    """Load a dataset, detecting its layout.

    - a ``.npz`` file: MedMNIST (:func:`load_medmnist_npz`);
    - a folder with ``HAM10000_metadata.csv``: HAM10000 (:func:`load_ham10000`);
    - any other folder: class folders (:func:`load_class_folders`).

    ``split`` is ``"official"`` (the layout's own split; for flat class folders a seeded stratified one)
    or ``"lesion"`` (HAM10000 only: lesion-grouped). ``max_image_pixels`` (width × height, default
    :data:`DEFAULT_MAX_IMAGE_PIXELS`) is passed to every loader: an image whose file header claims more
    pixels is refused, naming the file, before it is decoded. Raises ``ValueError`` for a missing path, an
    unknown split, ``"lesion"`` on a layout without lesion groups, or a ``max_image_pixels`` below 1.
    """
    check_max_pixels(max_image_pixels)
    path = Path(path)
    if split not in ("official", "lesion"):
        raise ValueError(f"unknown split {split!r}; expected 'official' or 'lesion'")
    if not path.exists():
        raise ValueError(f"dataset path {path} does not exist")
    if path.is_dir() and (path / METADATA_FILE).is_file():
        return load_ham10000(path, split=split, seed=seed, max_image_pixels=max_image_pixels)
    layout = "MedMNIST .npz" if path.suffix.lower() == ".npz" else "class-folder"
    if split == "lesion":
        raise ValueError(
            f"split='lesion' needs lesion groups (HAM10000 metadata); {path} is a {layout} dataset without "
            "groups — use split='official'"
        )
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise ValueError(f"{path} is a file but not a .npz; expected a MedMNIST .npz or a folder")
        return load_medmnist_npz(path, max_image_pixels=max_image_pixels)
    return load_class_folders(path, seed=seed, max_image_pixels=max_image_pixels)
