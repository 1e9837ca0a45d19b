"""Tests of the data loaders (``protohead.data``) on the real HAM10000 copy and on tiny tmp_path fixtures."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protohead.data import (
    DERMAMNIST_CLASSES,
    ImageDataset,
    load_class_folders,
    load_dataset,
    load_ham10000,
    load_medmnist_npz,
)

# Per-class counts (akiec, bcc, bkl, df, mel, nv, vasc) of the official split, from the data README.
OFFICIAL_COUNTS = {
    "train": [228, 359, 769, 80, 779, 4693, 99],
    "val": [33, 52, 110, 12, 111, 671, 14],
    "test": [66, 103, 220, 23, 223, 1341, 29],
}


@pytest.fixture(scope="module")
def official(ham10000_root: Path) -> ImageDataset:
    return load_ham10000(ham10000_root)


@pytest.fixture(scope="module")
def lesion0(ham10000_root: Path) -> ImageDataset:
    return load_ham10000(ham10000_root, split="lesion", seed=0)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- real data: official split


def test_official_sizes_and_class_counts(official: ImageDataset) -> None:
    assert official.class_names == DERMAMNIST_CLASSES
    assert {name: len(split) for name, split in official.splits.items()} == {
        "train": 7007, "val": 1003, "test": 2005}
    for name, counts in OFFICIAL_COUNTS.items():
        assert official.class_counts(name).tolist() == counts
        split = official.splits[name]
        assert split.labels.dtype == np.int64
        assert len(set(split.ids)) == len(split)
        assert split.groups is not None and split.sources is not None
        assert len(split.content_key) == 64


def test_every_split_of_the_same_files_gives_each_image_the_same_digest(official: ImageDataset,
                                                                        ham10000_root: Path) -> None:
    by_id = {i: d for split in official.splits.values()
             for i, d in zip(split.ids, split.image_digests or (), strict=True)}
    assert len(by_id) == 10015 and len(set(by_id.values())) > 10000
    lesion = load_ham10000(ham10000_root, split="lesion", seed=1)
    lesion_ids = [i for split in lesion.splits.values() for i in split.ids]
    assert sorted(lesion_ids) == sorted(by_id)  # the same images, split otherwise ...
    for split in lesion.splits.values():  # ... each with its digest, so the feature cache can reuse its rows
        assert split.image_digests is not None
        assert [by_id[i] for i in split.ids] == list(split.image_digests)
    first = official.splits["val"]
    assert first.image_digests[0] == hashlib.sha256(Path(first.sources[0]).read_bytes()).hexdigest()


def test_official_order_follows_split_file(official: ImageDataset, ham10000_root: Path) -> None:
    rows = _read_rows(ham10000_root / "dermamnist_split.csv")
    for name in ("val", "test"):
        expected = [r["image_id"] for r in sorted(
            (r for r in rows if r["split"] == name), key=lambda r: int(r["index_in_split"]))]
        assert list(official.splits[name].ids) == expected
    assert official.splits["val"].ids[0] == "ISIC_0027923"
    train_ids = list(official.splits["train"].ids)
    assert train_ids == sorted(train_ids)


def test_official_image_loads_as_uint8_rgb(official: ImageDataset) -> None:
    split = official.splits["val"]
    image = split.load(0)
    assert image.shape == (150, 200, 3)
    assert image.dtype == np.uint8
    assert split.sources is not None and split.sources[0].endswith("ISIC_0027923.jpg")


def test_official_lesion_leak_exists(official: ImageDataset) -> None:
    """The official split is image-level: many test lesions also appear in train (README: 693 images)."""
    train_lesions = set(official.splits["train"].groups or ())
    leaked = sum(g in train_lesions for g in official.splits["test"].groups or ())
    assert leaked == 693


# ---------------------------------------------------------------- real data: lesion split


def test_lesion_split_is_grouped_and_stratified(lesion0: ImageDataset) -> None:
    groups = {name: set(split.groups or ()) for name, split in lesion0.splits.items()}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    total = sum(len(s) for s in lesion0.splits.values())
    assert total == 10015
    for name, fraction in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs(len(lesion0.splits[name]) / total - fraction) < 0.02
        counts = lesion0.class_counts(name)
        assert (counts > 0).all(), (name, counts)


def test_lesion_split_deterministic_per_seed(lesion0: ImageDataset, ham10000_root: Path) -> None:
    again = load_ham10000(ham10000_root, split="lesion", seed=0)
    other = load_ham10000(ham10000_root, split="lesion", seed=1)
    for name in ("train", "val", "test"):
        assert again.splits[name].ids == lesion0.splits[name].ids
        assert again.splits[name].fingerprint() == lesion0.splits[name].fingerprint()
    assert other.splits["test"].ids != lesion0.splits["test"].ids


def test_load_dataset_detects_ham(ham10000_root: Path, official: ImageDataset) -> None:
    dataset = load_dataset(ham10000_root)
    assert dataset.splits["val"].ids == official.splits["val"].ids
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset(ham10000_root, split="random")


# ---------------------------------------------------------------- subset (base.py)


def test_subset_every_class_and_deterministic(official: ImageDataset) -> None:
    small = official.subset(5, seed=0)
    for name in ("train", "val", "test"):
        counts = small.class_counts(name)
        assert counts.tolist() == [5] * 7
    again = official.subset(5, seed=0)
    assert all(small.splits[n].ids == again.splits[n].ids for n in small.splits)
    other = official.subset(5, seed=1)
    assert other.splits["train"].ids != small.splits["train"].ids
    # the subset still loads the right image: compare with the full split
    sub = small.splits["val"]
    full = official.splits["val"]
    assert np.array_equal(sub.load(0), full.load(full.ids.index(sub.ids[0])))


def test_subset_per_split_limits(official: ImageDataset) -> None:
    small = official.subset({"train": 20, "val": 3, "test": 3}, seed=2)
    assert small.class_counts("train").tolist() == [20] * 7
    assert small.class_counts("val").tolist() == [3] * 7


# ---------------------------------------------------------------- HAM10000 error discipline (tmp copies)


@pytest.fixture
def mini_ham(ham10000_root: Path, tmp_path: Path) -> Path:
    """A tmp HAM10000 folder: 2 train + 1 val + 1 test real images per class (28 JPEGs, copied)."""
    rows = _read_rows(ham10000_root / "dermamnist_split.csv")
    per_split = {"train": 2, "val": 1, "test": 1}
    chosen: list[dict[str, str]] = []
    for dx in DERMAMNIST_CLASSES:
        for name, k in per_split.items():
            chosen.extend([r for r in rows if r["dx"] == dx and r["split"] == name][:k])
    ids = {r["image_id"] for r in chosen}
    root = tmp_path / "ham"
    (root / "images").mkdir(parents=True)
    for image_id in sorted(ids):
        shutil.copy(ham10000_root / "images" / f"{image_id}.jpg", root / "images" / f"{image_id}.jpg")
    meta = [r for r in _read_rows(ham10000_root / "HAM10000_metadata.csv") if r["image_id"] in ids]
    _write_rows(root / "HAM10000_metadata.csv", meta)
    for name in ("val", "test"):  # renumber index_in_split 0..k-1 within each split
        for i, r in enumerate(r for r in chosen if r["split"] == name):
            r["index_in_split"] = str(i)
    _write_rows(root / "dermamnist_split.csv", chosen)
    return root


def test_mini_ham_loads(mini_ham: Path) -> None:
    dataset = load_ham10000(mini_ham)
    assert [len(s) for s in dataset.splits.values()] == [14, 7, 7]
    assert dataset.class_counts("train").tolist() == [2] * 7
    assert dataset.splits["test"].load(3).shape == (150, 200, 3)


def test_images_directly_in_folder(mini_ham: Path) -> None:
    for path in (mini_ham / "images").iterdir():
        path.rename(mini_ham / path.name)
    (mini_ham / "images").rmdir()
    assert len(load_ham10000(mini_ham).splits["train"]) == 14


def test_content_key_follows_bytes_not_timestamps(mini_ham: Path, tmp_path: Path) -> None:
    before = load_ham10000(mini_ham).splits["train"]
    path = Path(before.sources[0]) if before.sources else None
    assert path is not None
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a copy or re-materialisation
    assert load_ham10000(mini_ham).splits["train"].content_key == before.content_key
    copy = tmp_path / "copy"
    shutil.copytree(mini_ham, copy)  # new mtimes, same bytes: the feature cache stays valid
    assert load_ham10000(copy).splits["train"].fingerprint() == before.fingerprint()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one changed byte
    path.write_bytes(bytes(data))
    after = load_ham10000(mini_ham).splits["train"]
    assert after.content_key != before.content_key
    assert after.fingerprint() != before.fingerprint()
    # each image's own digest (what lets the feature cache reuse rows across splits) follows its bytes too
    assert before.image_digests is not None and after.image_digests is not None
    assert after.image_digests[0] == hashlib.sha256(bytes(data)).hexdigest() != before.image_digests[0]
    assert after.image_digests[1:] == before.image_digests[1:]


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_ham10000(tmp_path / "nope")


def test_missing_metadata(mini_ham: Path) -> None:
    (mini_ham / "HAM10000_metadata.csv").unlink()
    with pytest.raises(ValueError, match=r"HAM10000_metadata\.csv"):
        load_ham10000(mini_ham)


def test_missing_split_file_for_official(mini_ham: Path) -> None:
    (mini_ham / "dermamnist_split.csv").unlink()
    with pytest.raises(ValueError, match=r"dermamnist_split\.csv"):
        load_ham10000(mini_ham, split="official")


def test_missing_image(mini_ham: Path) -> None:
    victim = sorted((mini_ham / "images").iterdir())[3]
    victim.unlink()
    with pytest.raises(ValueError, match=f"missing.*{victim.stem}"):
        load_ham10000(mini_ham)


def test_unknown_label(mini_ham: Path) -> None:
    meta = _read_rows(mini_ham / "HAM10000_metadata.csv")
    meta[0]["dx"] = "melanoma??"
    _write_rows(mini_ham / "HAM10000_metadata.csv", meta)
    with pytest.raises(ValueError, match=r"unknown dx label 'melanoma\?\?'"):
        load_ham10000(mini_ham)


def test_split_image_not_in_metadata(mini_ham: Path) -> None:
    meta = _read_rows(mini_ham / "HAM10000_metadata.csv")
    dropped = meta.pop(0)["image_id"]
    _write_rows(mini_ham / "HAM10000_metadata.csv", meta)
    with pytest.raises(ValueError, match=f"{dropped} is not in"):
        load_ham10000(mini_ham)


def test_split_dx_mismatch(mini_ham: Path) -> None:
    rows = _read_rows(mini_ham / "dermamnist_split.csv")
    rows[0]["dx"] = "vasc" if rows[0]["dx"] != "vasc" else "nv"
    _write_rows(mini_ham / "dermamnist_split.csv", rows)
    with pytest.raises(ValueError, match="differs from metadata dx"):
        load_ham10000(mini_ham)


def test_corrupt_image_raises_on_load(mini_ham: Path) -> None:
    dataset = load_ham10000(mini_ham)
    split = dataset.splits["train"]
    assert split.sources is not None
    Path(split.sources[1]).write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(ValueError, match=split.ids[1]):
        split.load(1)
    assert split.load(0).shape == (150, 200, 3)


def test_empty_split(mini_ham: Path) -> None:
    rows = _read_rows(mini_ham / "dermamnist_split.csv")
    for r in rows:
        if r["split"] == "val":
            r["split"] = "train"
    _write_rows(mini_ham / "dermamnist_split.csv", rows)
    with pytest.raises(ValueError, match="split 'val' is empty"):
        load_ham10000(mini_ham)


def test_class_absent_from_train(mini_ham: Path) -> None:
    rows = _read_rows(mini_ham / "dermamnist_split.csv")
    for r in rows:
        if r["dx"] == "df" and r["split"] == "train":
            r["split"] = "test"
    _write_rows(mini_ham / "dermamnist_split.csv", rows)
    with pytest.raises(ValueError, match=r"\['df'\] absent from train"):
        load_ham10000(mini_ham)


def test_unknown_split_mode(mini_ham: Path) -> None:
    with pytest.raises(ValueError, match="unknown split 'random'"):
        load_ham10000(mini_ham, split="random")


# ---------------------------------------------------------------- MedMNIST npz


def _write_npz(path: Path, rgb: bool, num_classes: int, n: int = 21, **override: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    shape = (28, 28, 3) if rgb else (28, 28)
    arrays: dict[str, np.ndarray] = {}
    for s, size in (("train", n), ("val", 7), ("test", 8)):
        arrays[f"{s}_images"] = rng.integers(0, 256, size=(size, *shape), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(size) % num_classes).reshape(-1, 1).astype(np.uint8)
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_medmnist_grayscale_dermamnist(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "dermamnist.npz", rgb=False, num_classes=7)
    dataset = load_medmnist_npz(path)
    assert dataset.class_names == DERMAMNIST_CLASSES
    assert [len(s) for s in dataset.splits.values()] == [21, 7, 8]
    assert dataset.splits["train"].ids[:2] == ("train_00000", "train_00001")
    assert dataset.splits["train"].labels.shape == (21,)
    image = dataset.splits["val"].load(2)
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 0], image[..., 2])
    with np.load(path) as npz:
        assert np.array_equal(image[..., 1], npz["val_images"][2])
    assert dataset.splits["train"].content_key
    assert load_dataset(path).splits["test"].ids == dataset.splits["test"].ids


def test_medmnist_rgb_generic_names(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "blood.npz", rgb=True, num_classes=3)
    dataset = load_medmnist_npz(path)
    assert dataset.class_names == ("class_0", "class_1", "class_2")
    assert dataset.splits["test"].load(0).shape == (28, 28, 3)
    named = load_medmnist_npz(path, class_names=["a", "b", "c"])
    assert named.class_names == ("a", "b", "c")


def test_medmnist_missing_key(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "x.npz", rgb=False, num_classes=3)
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "val_labels"}
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="val_labels"):
        load_medmnist_npz(path)


def test_medmnist_label_out_of_range(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "x.npz", rgb=False, num_classes=3)
    with pytest.raises(ValueError, match=r"out of range \[0, 2\)"):
        load_medmnist_npz(path, class_names=["a", "b"])
    bad = _write_npz(tmp_path / "neg.npz", rgb=False, num_classes=3,
                     test_labels=np.array([[0], [1], [-1], [2], [0], [1], [2], [0]]))
    with pytest.raises(ValueError, match=r"test_labels.*out of range"):
        load_medmnist_npz(bad)


def test_medmnist_mismatch_empty_and_absent_class(tmp_path: Path) -> None:
    mismatch = _write_npz(tmp_path / "m.npz", rgb=False, num_classes=3, val_labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="val_images has 7 images but val_labels has 3"):
        load_medmnist_npz(mismatch)
    empty = _write_npz(tmp_path / "e.npz", rgb=False, num_classes=3,
                       test_images=np.zeros((0, 28, 28), np.uint8), test_labels=np.zeros((0, 1), np.int64))
    with pytest.raises(ValueError, match="split 'test' is empty"):
        load_medmnist_npz(empty)
    path = _write_npz(tmp_path / "a.npz", rgb=False, num_classes=3)
    with pytest.raises(ValueError, match=r"\['d'\] absent from train"):
        load_medmnist_npz(path, class_names=["a", "b", "c", "d"])


def test_medmnist_lesion_split_rejected(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "x.npz", rgb=False, num_classes=3)
    with pytest.raises(ValueError, match="lesion"):
        load_dataset(path, split="lesion")


# ---------------------------------------------------------------- class folders


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8, 3), value, dtype=np.uint8)).save(path)


def test_class_folders_flat_layout(tmp_path: Path) -> None:
    for c in ("zebra", "ant", "cat"):
        for i in range(10):
            _png(tmp_path / c / f"{i:02d}.png", i)
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    dataset = load_class_folders(tmp_path, seed=0)
    assert dataset.class_names == ("ant", "cat", "zebra")
    assert dataset.class_counts("train").tolist() == [7, 7, 7]
    assert dataset.class_counts("val").tolist() == [1, 1, 1]
    assert dataset.class_counts("test").tolist() == [2, 2, 2]
    all_ids = [i for s in dataset.splits.values() for i in s.ids]
    assert len(all_ids) == len(set(all_ids)) == 30
    split = dataset.splits["train"]
    image = split.load(0)
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    assert image[0, 0, 0] == int(Path(split.ids[0]).stem)
    again = load_class_folders(tmp_path, seed=0)
    assert again.splits["test"].ids == dataset.splits["test"].ids
    other = load_class_folders(tmp_path, seed=3)
    assert other.splits["test"].ids != dataset.splits["test"].ids
    assert load_dataset(tmp_path).splits["val"].ids == dataset.splits["val"].ids
    with pytest.raises(ValueError, match="lesion"):
        load_dataset(tmp_path, split="lesion")


def test_class_folders_split_layout(tmp_path: Path) -> None:
    for s, n in (("train", 3), ("val", 1), ("test", 2)):
        for c in ("b", "a"):
            for i in range(n):
                _png(tmp_path / s / c / f"{i}.png", 10 * i)
    dataset = load_class_folders(tmp_path)
    assert dataset.class_names == ("a", "b")
    assert [len(s) for s in dataset.splits.values()] == [6, 2, 4]
    assert dataset.splits["train"].ids[0] == "train/a/0.png"
    assert dataset.splits["test"].labels.tolist() == [0, 0, 1, 1]


def test_class_folders_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_class_folders(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class folders"):
        load_class_folders(tmp_path)
    # split layout without a val folder
    _png(tmp_path / "s" / "train" / "a" / "0.png", 0)
    _png(tmp_path / "s" / "test" / "a" / "0.png", 0)
    with pytest.raises(ValueError, match=r"not \['val'\]"):
        load_class_folders(tmp_path / "s")
    # class present in val only -> absent from train
    _png(tmp_path / "s" / "val" / "a" / "0.png", 0)
    _png(tmp_path / "s" / "val" / "b" / "0.png", 0)
    with pytest.raises(ValueError, match=r"\['b'\] absent from train"):
        load_class_folders(tmp_path / "s")
    # corrupt image raises on load, naming the file
    for i in range(10):
        _png(tmp_path / "f" / "a" / f"{i}.png", i)
    (tmp_path / "f" / "a" / "0.png").write_bytes(b"garbage")
    dataset = load_class_folders(tmp_path / "f")
    all_splits = list(dataset.splits.values())
    split = next(s for s in all_splits if "a/0.png" in s.ids)
    with pytest.raises(ValueError, match=r"a/0\.png"):
        split.load(split.ids.index("a/0.png"))
