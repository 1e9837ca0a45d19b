"""HAM10000 loader: the official DermaMNIST split or a lesion-grouped, stratified split.

Layout: a folder holding ``HAM10000_metadata.csv`` (``lesion_id,image_id,dx,...``) and the images
``<image_id>.jpg`` in ``images/``, directly in the folder, or in the original
``HAM10000_images_part_1`` / ``HAM10000_images_part_2`` folders. The official split additionally needs
``dermamnist_split.csv`` (``image_id,lesion_id,dx,label,split,index_in_split``) in the same folder.
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
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
    read_utf8_text,
)

DERMAMNIST_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
METADATA_FILE = "HAM10000_metadata.csv"
SPLIT_FILE = "dermamnist_split.csv"
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
IMAGE_DIRS: tuple[str, ...] = ("images", ".", "HAM10000_images_part_1", "HAM10000_images_part_2")


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of ``path`` as dicts (values stripped).

    Read as UTF-8, with or without a byte-order mark (Excel writes one). Raises ``ValueError`` naming the
    file for missing columns, bytes that are not UTF-8 (naming the line and byte), or malformed CSV
    (e.g. a NUL byte).
    """
    text = read_utf8_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = set(reader.fieldnames or ())
        absent = [c for c in required if c not in columns]
        if absent:
            raise ValueError(f"{path}: missing column(s) {absent}; found {sorted(columns)}")
        return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as exc:
        raise ValueError(f"{path}, line {reader.line_num}: malformed CSV: {exc}") from None


def _read_metadata(path: Path) -> dict[str, tuple[str, str]]:
    """image_id -> (lesion_id, dx) from the HAM10000 metadata CSV, validated."""
    rows = _read_csv(path, ("lesion_id", "image_id", "dx"))
    meta: dict[str, tuple[str, str]] = {}
    for line, row in enumerate(rows, start=2):
        image_id, lesion_id, dx = row["image_id"], row["lesion_id"], row["dx"]
        if not image_id or not lesion_id:
            raise ValueError(f"{path}, line {line}: empty image_id or lesion_id")
        if dx not in DERMAMNIST_CLASSES:
            raise ValueError(
                f"{path}, line {line}: unknown dx label {dx!r} for {image_id}; expected one of "
                f"{list(DERMAMNIST_CLASSES)}"
            )
        if image_id in meta:
            raise ValueError(f"{path}, line {line}: duplicate image_id {image_id}")
        meta[image_id] = (lesion_id, dx)
    if not meta:
        raise ValueError(f"{path}: no images listed")
    return meta


def _index_images(root: Path) -> dict[str, str]:
    """image_id (file stem) -> path, over the known image folders (first folder wins)."""
    found: dict[str, str] = {}
    for sub in IMAGE_DIRS:
        folder = root / sub
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() in IMAGE_EXTENSIONS and stem not in found:
                    found[stem] = entry.path
    return found


def _official_membership(root: Path, meta: dict[str, tuple[str, str]]) -> dict[str, list[str]]:
    """split name -> ordered image ids, from ``dermamnist_split.csv`` (cross-checked with the metadata)."""
    path = root / SPLIT_FILE
    if not path.is_file():
        raise ValueError(
            f"split='official' needs {path} (DermaMNIST membership), which does not exist; "
            "use split='lesion' for a split computed from the metadata alone"
        )
    rows = _read_csv(path, ("image_id", "split", "index_in_split"))
    members: dict[str, list[tuple[int, str]]] = {name: [] for name in SPLIT_NAMES}
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        image_id, split = row["image_id"], row["split"]
        where = f"{path}, line {line}"
        if split not in members:
            raise ValueError(f"{where}: unknown split {split!r} for {image_id}; expected {list(SPLIT_NAMES)}")
        if image_id in seen:
            raise ValueError(f"{where}: duplicate image_id {image_id}")
        seen.add(image_id)
        if image_id not in meta:
            raise ValueError(f"{where}: image {image_id} is not in {root / METADATA_FILE}")
        lesion_id, dx = meta[image_id]
        if row.get("dx") and row["dx"] != dx:
            raise ValueError(f"{where}: dx {row['dx']!r} for {image_id} differs from metadata dx {dx!r}")
        if row.get("lesion_id") and row["lesion_id"] != lesion_id:
            raise ValueError(
                f"{where}: lesion_id {row['lesion_id']!r} for {image_id} differs from metadata {lesion_id!r}"
            )
        if row.get("label") and row["label"] != str(DERMAMNIST_CLASSES.index(dx)):
            raise ValueError(
                f"{where}: label {row['label']!r} for {image_id} does not match dx {dx!r} "
                f"(DermaMNIST index {DERMAMNIST_CLASSES.index(dx)})"
            )
        try:
            index = int(row["index_in_split"])
        except ValueError as exc:
            raise ValueError(f"{where}: bad index_in_split {row['index_in_split']!r}") from exc
        members[split].append((index, image_id))
    unlisted = sorted(set(meta) - seen)
    if unlisted:
        raise ValueError(
            f"{len(unlisted)} image(s) of {root / METADATA_FILE} are not in {path}, e.g. {unlisted[:5]}"
        )
    return {
        "train": sorted(i for _, i in members["train"]),
        "val": [i for _, i in sorted(members["val"])],
        "test": [i for _, i in sorted(members["test"])],
    }


def _lesion_membership(meta: dict[str, tuple[str, str]], seed: int, val_fraction: float,
                       test_fraction: float) -> dict[str, list[str]]:
    """split name -> image ids (sorted), assigning whole lesions per class by a seeded greedy.

    Within each class (a lesion's dx; majority if mixed), lesions are shuffled with ``seed``, ordered
    largest first (stable), and each goes to the split furthest below its target image count.
    """
    fractions = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    lesion_images: dict[str, list[str]] = defaultdict(list)
    lesion_dx: dict[str, list[str]] = defaultdict(list)
    for image_id in sorted(meta):
        lesion_id, dx = meta[image_id]
        lesion_images[lesion_id].append(image_id)
        lesion_dx[lesion_id].append(dx)
    by_class: dict[str, list[str]] = defaultdict(list)
    for lesion_id in sorted(lesion_images):
        dxs = lesion_dx[lesion_id]
        by_class[max(sorted(set(dxs)), key=dxs.count)].append(lesion_id)

    rng = np.random.default_rng(seed)
    members: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for dx in DERMAMNIST_CLASSES:
        lesions = by_class.get(dx, [])
        order = rng.permutation(len(lesions))
        shuffled = sorted((lesions[i] for i in order), key=lambda lid: -len(lesion_images[lid]))
        targets = fractions * sum(len(lesion_images[lid]) for lid in lesions)
        counts = np.zeros(3)
        for lesion_id in shuffled:
            s = int(np.argmax(targets - counts))
            counts[s] += len(lesion_images[lesion_id])
            members[SPLIT_NAMES[s]].extend(lesion_images[lesion_id])
    return {name: sorted(ids) for name, ids in members.items()}


def load_ham10000(root: str | os.PathLike[str], split: str = "official", seed: int = 0,
                  val_fraction: float = 0.1, test_fraction: float = 0.2,
                  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageDataset:
    """Load HAM10000 from ``root`` as an :class:`ImageDataset` with train/val/test splits.

    Args:
        root: folder with ``HAM10000_metadata.csv`` and the images (see module docstring).
        split: ``"official"`` (DermaMNIST membership from ``dermamnist_split.csv``: val/test in
            ``index_in_split`` order, train sorted by image_id) or ``"lesion"`` (lesion-grouped,
            class-stratified split from the metadata; no lesion_id in two splits; each split sorted by id).
        seed: seed of the lesion split (ignored for ``"official"``).
        val_fraction, test_fraction: target image fractions of the lesion split.
        max_image_pixels: ``load(i)`` refuses an image whose header claims more pixels (see
            :func:`protohead.data.base.read_rgb`).

    Returns:
        Dataset with ``class_names == DERMAMNIST_CLASSES``; per split ids = image_id, labels (n,) int64,
        groups = lesion_id, sources = file paths, image_digests = each file's sha256,
        content_key = sha256 of the (name, file sha256) pairs.
        ``load(i)`` gives (H, W, 3) uint8 RGB (150, 200, 3 for the shared copy).

    Raises:
        ValueError: naming the file/label for a missing folder, metadata, split file or image, an unknown
            dx label, a split-file image missing from / disagreeing with the metadata, an empty split, or
            a class absent from train.
    """
    check_max_pixels(max_image_pixels)
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"HAM10000 folder {root} does not exist")
    metadata_path = root / METADATA_FILE
    if not metadata_path.is_file():
        raise ValueError(f"HAM10000 metadata {metadata_path} does not exist")
    meta = _read_metadata(metadata_path)

    if split == "official":
        membership = _official_membership(root, meta)
    elif split == "lesion":
        if not (val_fraction > 0.0 and test_fraction > 0.0 and val_fraction + test_fraction < 1.0):
            raise ValueError(
                "need 0 < val_fraction, 0 < test_fraction and val+test < 1, "
                f"got {val_fraction}, {test_fraction}"
            )
        membership = _lesion_membership(meta, seed, val_fraction, test_fraction)
    else:
        raise ValueError(f"unknown split {split!r}; expected 'official' or 'lesion'")

    index = _index_images(root)
    wanted = [i for name in SPLIT_NAMES for i in membership[name]]
    missing = [i for i in wanted if i not in index]
    if missing:
        raise ValueError(
            f"{len(missing)} image file(s) listed in {metadata_path} are missing: no <image_id>.jpg under "
            f"{root} (looked in {', '.join(IMAGE_DIRS)}), e.g. {', '.join(missing[:5])}"
        )

    splits: dict[str, ImageSplit] = {}
    for name in SPLIT_NAMES:
        ids = tuple(membership[name])
        if not ids:
            raise ValueError(f"HAM10000 ({split} split) at {root}: split {name!r} is empty")
        paths = tuple(index[i] for i in ids)
        digests = file_digests(paths)
        splits[name] = ImageSplit(
            name=name,
            ids=ids,
            labels=np.array([DERMAMNIST_CLASSES.index(meta[i][1]) for i in ids], dtype=np.int64),
            loader=FileLoader(paths, max_image_pixels),
            groups=tuple(meta[i][0] for i in ids),
            sources=paths,
            content_key=files_content_key([os.path.basename(p) for p in paths], digests),
            image_digests=digests,
        )
    name = "ham10000" if split == "official" else f"ham10000-lesion-seed{seed}"
    dataset = ImageDataset(name, DERMAMNIST_CLASSES, splits)
    absent = [c for c, n in zip(DERMAMNIST_CLASSES, dataset.class_counts("train"), strict=True) if n == 0]
    if absent:
        raise ValueError(f"HAM10000 ({split} split) at {root}: class(es) {absent} absent from train")
    return dataset
