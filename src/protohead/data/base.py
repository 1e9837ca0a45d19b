"""The data contract every loader returns: named splits of labelled images, loaded lazily.

Downstream code (feature extraction, training, evaluation) depends only on this module.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImageSplit:
    """One split of a dataset.

    Attributes:
        name: "train", "val" or "test".
        ids: stable image identifiers, one per image (e.g. ``ISIC_0024306``), unique within the split.
        labels: (n,) int64 class indices in ``[0, num_classes)``.
        loader: ``loader(i) -> np.ndarray`` (H, W, 3) uint8 RGB for image ``i``; raises ``ValueError``
            naming the file when an image cannot be read.
        groups: optional grouping key per image (HAM10000 ``lesion_id``), for grouped splits.
        sources: optional human-readable source per image (file path), for explanations and errors.
        content_key: a string that changes whenever the underlying files change (e.g. sizes + mtimes);
            part of the feature-cache key.
        image_digests: optional sha256 hex of each image file's bytes (same order as ``ids``): lets the
            feature cache reuse rows it already computed for the same image in another split
            (:func:`protohead.features.extract_features`).
    """

    name: str
    ids: tuple[str, ...]
    labels: np.ndarray
    loader: Callable[[int], np.ndarray] = field(repr=False, compare=False)
    groups: tuple[str, ...] | None = None
    sources: tuple[str, ...] | None = None
    content_key: str = ""
    image_digests: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.image_digests is not None and len(self.image_digests) != len(self.ids):
            raise ValueError(f"split {self.name!r}: {len(self.image_digests)} image digests for {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> np.ndarray:
        return self.loader(index)

    def fingerprint(self) -> str:
        """sha256 over the exact ordered image list, labels and content key."""
        digest = hashlib.sha256()
        digest.update(self.name.encode())
        for image_id, label in zip(self.ids, self.labels.tolist(), strict=True):
            digest.update(f"{image_id}:{label};".encode())
        digest.update(self.content_key.encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class ImageDataset:
    """A dataset: class names plus its splits (at least train, val and test)."""

    name: str
    class_names: tuple[str, ...]
    splits: dict[str, ImageSplit]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self, split: str = "train") -> np.ndarray:
        """(C,) number of images per class in ``split``."""
        return np.bincount(self.splits[split].labels, minlength=self.num_classes)

    def subset(self, per_class: dict[str, int] | int, seed: int = 0,
               splits: Sequence[str] = ("train", "val", "test")) -> ImageDataset:
        """A stratified subset: at most ``per_class`` images of every class in each split (deterministic)."""
        rng = np.random.default_rng(seed)
        new_splits = dict(self.splits)
        for split_name in splits:
            split = self.splits[split_name]
            limit = per_class if isinstance(per_class, int) else per_class[split_name]
            keep: list[int] = []
            for c in range(self.num_classes):
                idx = np.flatnonzero(split.labels == c)
                if len(idx) > limit:
                    idx = np.sort(rng.choice(idx, size=limit, replace=False))
                keep.extend(idx.tolist())
            keep.sort()
            new_splits[split_name] = take(split, keep)
        return ImageDataset(self.name, self.class_names, new_splits)


def take(split: ImageSplit, indices: Sequence[int]) -> ImageSplit:
    """The images ``indices`` of ``split``, in that order."""
    indices = list(indices)
    loader = split.loader
    return ImageSplit(
        name=split.name,
        ids=tuple(split.ids[i] for i in indices),
        labels=split.labels[np.asarray(indices, dtype=np.int64)] if indices else split.labels[:0],
        loader=lambda j: loader(indices[j]),
        groups=None if split.groups is None else tuple(split.groups[i] for i in indices),
        sources=None if split.sources is None else tuple(split.sources[i] for i in indices),
        content_key=split.content_key,
        image_digests=None if split.image_digests is None else tuple(split.image_digests[i] for i in indices),
    )


# --- small helpers shared by the file-based loaders -------------------------------------------------

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")
IMAGE_FILE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""What ``predict`` and ``evaluate --ood`` take from a folder of new images (datasets: :data:`IMAGE_EXTENSIONS`)."""


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files under ``folder``, recursively, sorted (suffixes :data:`IMAGE_FILE_SUFFIXES`, any case;
    hidden files and folders skipped). ``ValueError`` when ``folder`` is not a folder."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a folder")
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found += [Path(directory) / name for name in names
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_FILE_SUFFIXES]
    return sorted(found)


DEFAULT_MAX_IMAGE_PIXELS: int = 6000 * 6000
"""Largest image (width × height, read from the file header before decoding) a loader accepts.

36 Mpx: full-resolution dermoscopy photographs (ISIC archive originals run up to about 6000×4000 = 24 Mpx;
HAM10000's originals are 600×450, the shared copy 200×150) pass with room to spare, while a forged or
decompression-bomb header (10000×10000 and up) is refused before any pixel is decoded: 36 Mpx decode to
108 MB of RGB. Raise it with ``max_image_pixels`` (run config key, or ``load_dataset(max_image_pixels=...)``).
"""

_RAISE_HINT = "if the image is genuine, raise the run config key max_image_pixels (load_dataset(max_image_pixels=N))"
_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings() is not thread-safe; loaders run in decode threads


def check_max_pixels(max_pixels: object, what: str = "max_image_pixels") -> int:
    """``max_pixels`` if it is an int ≥ 1 (not a bool), else ``ValueError`` naming ``what`` and the value."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"{what} must be an integer ≥ 1, got {max_pixels!r}")
    return max_pixels


def read_utf8_text(path: str | Path, label: str = "") -> str:
    """The text of ``path``, read as UTF-8 with or without a byte-order mark (Excel writes one).

    ``ValueError`` naming the file (prefixed with ``label``, e.g. ``"config file "``) when it cannot be read or
    is not UTF-8 (naming the line and the byte).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{label}{path} cannot be read: {error.strerror or error}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{label}{path} is not UTF-8 text (line {line}: byte 0x{data[error.start]:02x} at offset "
                         f"{error.start}); save it as UTF-8") from None


def read_rgb(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read the image at ``path`` as (H, W, 3) uint8 RGB.

    The size in the file header is checked against ``max_pixels`` before anything is decoded, so a
    forged header or a decompression bomb costs no memory. Pillow's own decompression-bomb checks
    (``PIL.Image.MAX_IMAGE_PIXELS``, a process-wide setting) are not relied on: its warning, which names no
    file, is silenced in favour of this check, and its error (header over twice that setting; not an
    ``OSError``) becomes the same ``ValueError``.

    Raises:
        ValueError: naming the file, for an unreadable or truncated image, or one with more than
            ``max_pixels`` pixels (the message gives its size, the limit and how to raise it).
    """
    from PIL import Image, UnidentifiedImageError

    max_pixels = check_max_pixels(max_pixels)
    try:
        # Pillow's warning (over PIL.Image.MAX_IMAGE_PIXELS) names no file and decides nothing: the size
        # check below turns such an image into the error whenever it is over max_pixels.
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # lazy: parses the header only
        with image:
            width, height = image.size
            if width * height <= max_pixels:
                return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(
            f"image {path} refused: {str(exc).rstrip('.')}; the limit is {max_pixels:,} pixels "
            f"(a forged header or a decompression bomb?); {_RAISE_HINT}, and beyond 2 × PIL.Image.MAX_IMAGE_PIXELS "
            "Pillow's own limit too"
        ) from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, MemoryError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    raise ValueError(
        f"image {path} is {width}×{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
        f"(a forged header or a decompression bomb?); {_RAISE_HINT}"
    )


class FileLoader:
    """A picklable ``loader(i) -> (H, W, 3) uint8`` over a tuple of image paths.

    ``max_pixels``: images whose header claims more pixels are refused (see :func:`read_rgb`).
    """

    def __init__(self, paths: Sequence[str], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.paths = tuple(paths)
        self.max_pixels = check_max_pixels(max_pixels)

    def __call__(self, index: int) -> np.ndarray:
        return read_rgb(self.paths[index], self.max_pixels)


def file_digests(paths: Sequence[str]) -> tuple[str, ...]:
    """sha256 hex of each file's bytes, in order. Raises ``ValueError`` listing the first few files that do
    not exist."""
    digests: list[str] = []
    missing: list[str] = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError:
            missing.append(str(path))
            continue
        digests.append(hashlib.sha256(data).hexdigest())
    if missing:
        raise ValueError(f"{len(missing)} image file(s) missing, e.g. {', '.join(missing[:5])}")
    return tuple(digests)


def files_content_key(names: Sequence[str], digests: Sequence[str]) -> str:
    """sha256 over the sorted (name, file sha256) pairs of a split's images (``digests`` from :func:`file_digests`).

    Content, not size + mtime: a copied or re-materialised dataset folder (new mtimes, same bytes) keeps
    its key and its feature cache, and any changed byte changes it. Hashing HAM10000's 10,015 JPEGs
    takes about a second, against minutes to re-extract features. ``names`` (not paths) are what enters
    the hash, so moving a dataset folder keeps the key.
    """
    digest = hashlib.sha256()
    for name, content in sorted(zip((str(n) for n in names), digests, strict=True)):
        digest.update(f"{name}:{content};".encode())
    return digest.hexdigest()
