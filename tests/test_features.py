"""Feature cache: miss/hit, keys, corruption handling, atomicity, correctness vs a direct forward."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from protohead.backbones import Backbone, EfficientNetLite0Backbone
from protohead.data.base import ImageSplit, file_digests, take
from protohead.features import (
    LOCK_DIR,
    MANIFEST_FILE,
    POOLED_FILE,
    TOKENS_FILE,
    FeatureSet,
    extract_features,
    feature_cache_key,
)

HAM_ROOT = Path(os.environ.get("PROTOHEAD_HAM10000",
                               Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"))


class TinyBackbone(Backbone):
    """A 4x4-patch linear 'backbone' that counts its forward calls: tokens (B, (S/4)^2, 8)."""

    def __init__(self, image_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.name = "tiny"
        self.image_size = image_size
        self.num_tokens = (image_size // 4) ** 2
        self.feature_dim = 8
        self.pixel_mean = (127.5, 127.5, 127.5)
        self.pixel_std = (127.5, 127.5, 127.5)
        generator = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.1)
            self.conv.bias.zero_()
        self.calls = 0
        self.set_trainable(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return tokens, tokens.mean(dim=1)


def jpeg_split(n: int = 8, offset: int = 0, digests: bool = False) -> ImageSplit:
    """``n`` real HAM10000 JPEGs (sorted names from ``offset``), labels 0..6 cycling; ``digests``: with each file's
    sha256 (what the dataset loaders give), so the cache can reuse its rows in other splits."""
    images = HAM_ROOT / "images"
    assert images.is_dir(), f"HAM10000 images not found at {images} (set PROTOHEAD_HAM10000)"
    paths = sorted(images.glob("*.jpg"))[offset:offset + n]
    assert len(paths) == n

    def load(i: int) -> np.ndarray:
        with Image.open(paths[i]) as image:
            return np.asarray(image.convert("RGB"))

    return ImageSplit(name="train", ids=tuple(p.stem for p in paths),
                      labels=np.arange(n, dtype=np.int64) % 7, loader=load, content_key=f"test{offset}",
                      image_digests=file_digests([str(p) for p in paths]) if digests else None)


@pytest.fixture(scope="module")
def split() -> ImageSplit:
    return jpeg_split()


def entries(cache_dir: Path) -> list[str]:
    """Cache entries and leftovers, apart from the per-entry lock files' folder."""
    return sorted(p.name for p in cache_dir.iterdir() if p.name != LOCK_DIR)


def test_miss_writes_cache_then_hit_skips_backbone(split: ImageSplit, tmp_path: Path) -> None:
    backbone = TinyBackbone()
    features = extract_features(backbone, split, tmp_path, batch_size=3, progress=False)
    key = feature_cache_key(backbone, split)
    assert entries(tmp_path) == [key]  # no temp dirs left behind
    assert sorted(os.listdir(tmp_path / key)) == sorted([TOKENS_FILE, POOLED_FILE, MANIFEST_FILE])
    assert backbone.calls == 3  # ceil(8 / 3) batches
    assert isinstance(features, FeatureSet) and len(features) == 8
    assert features.tokens.shape == (8, 16, 8) and features.tokens.dtype == np.float16
    assert features.pooled.shape == (8, 8) and features.pooled.dtype == np.float16
    assert features.ids == split.ids and features.labels.dtype == np.int64
    np.testing.assert_array_equal(features.labels, split.labels)
    manifest = json.loads((tmp_path / key / MANIFEST_FILE).read_text())
    assert manifest["tokens_shape"] == [8, 16, 8] and manifest["split_fingerprint"] == split.fingerprint()
    assert manifest["backbone_key"] == backbone.cache_key()

    again = extract_features(backbone, split, tmp_path, progress=False)
    assert backbone.calls == 3
    np.testing.assert_array_equal(again.tokens, features.tokens)
    np.testing.assert_array_equal(again.pooled, features.pooled)
    fast = extract_features(backbone, split, tmp_path, progress=False, verify="fast")
    assert backbone.calls == 3
    np.testing.assert_array_equal(fast.tokens, features.tokens)


def test_matches_direct_forward_and_worker_settings(split: ImageSplit, tmp_path: Path) -> None:
    backbone = TinyBackbone()
    features = extract_features(backbone, split, tmp_path / "a", batch_size=5, progress=False, num_workers=2)
    sync = extract_features(backbone, split, tmp_path / "b", batch_size=8, progress=False, num_workers=0)
    with torch.inference_mode():
        tokens, pooled = backbone(backbone.preprocess([split.load(i) for i in range(len(split))]))
    np.testing.assert_allclose(features.tokens, tokens.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(features.pooled, pooled.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(sync.tokens, features.tokens)


def test_real_lite0_features_match_direct_forward(tmp_path: Path) -> None:
    split = jpeg_split(n=4, offset=100)
    backbone = EfficientNetLite0Backbone()
    features = extract_features(backbone, split, tmp_path, batch_size=2, progress=False)
    assert features.tokens.shape == (4, 49, 1280)
    with torch.inference_mode():
        tokens, pooled = backbone(backbone.preprocess([split.load(i) for i in range(4)]))
    # float16 has an 11-bit mantissa: relative error <= 2**-11 (plus tiny batch-size effects)
    np.testing.assert_allclose(features.tokens.astype(np.float32), tokens.numpy(), rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(features.pooled.astype(np.float32), pooled.numpy(), rtol=2e-3, atol=1e-3)
    assert float(np.abs(features.tokens).max()) > 0.1  # not all zeros


def test_key_changes_with_images_labels_and_weights(split: ImageSplit, tmp_path: Path) -> None:
    backbone = TinyBackbone()
    key = feature_cache_key(backbone, split)
    assert feature_cache_key(TinyBackbone(), split) == key
    assert feature_cache_key(backbone, take(split, range(7))) != key
    assert feature_cache_key(backbone, take(split, [1, 0, 2, 3, 4, 5, 6, 7])) != key
    relabelled = ImageSplit(split.name, split.ids, split.labels[::-1].copy(), split.loader,
                            content_key=split.content_key)
    assert feature_cache_key(backbone, relabelled) != key
    assert feature_cache_key(TinyBackbone(seed=1), split) != key
    assert feature_cache_key(TinyBackbone(image_size=32), split) != key

    extract_features(backbone, split, tmp_path, progress=False)
    subset = extract_features(backbone, take(split, range(4)), tmp_path, progress=False)
    assert len(entries(tmp_path)) == 2 and len(subset) == 4
    assert backbone.calls == 2  # one batch each: a stale entry is a plain miss


def test_truncated_tokens_rebuilt_with_warning(split: ImageSplit, tmp_path: Path) -> None:
    backbone = TinyBackbone()
    reference = np.array(extract_features(backbone, split, tmp_path, progress=False).tokens)
    tokens_path = tmp_path / feature_cache_key(backbone, split) / TOKENS_FILE
    size = tokens_path.stat().st_size
    with open(tokens_path, "r+b") as handle:
        handle.truncate(size - 100)

    with pytest.raises(ValueError, match=re.escape(str(tokens_path))):
        extract_features(backbone, split, tmp_path, progress=False, on_corrupt="error")
    assert backbone.calls == 1

    with pytest.warns(RuntimeWarning, match=r"tokens\.f16.*truncated"):
        rebuilt = extract_features(backbone, split, tmp_path, progress=False)
    assert backbone.calls == 2 and tokens_path.stat().st_size == size
    np.testing.assert_array_equal(rebuilt.tokens, reference)
    assert entries(tmp_path) == [feature_cache_key(backbone, split)]


def test_flipped_bytes_and_bad_manifest_detected(split: ImageSplit, tmp_path: Path) -> None:
    backbone = TinyBackbone()
    extract_features(backbone, split, tmp_path, progress=False)
    entry = tmp_path / feature_cache_key(backbone, split)
    with open(entry / POOLED_FILE, "r+b") as handle:  # same size, different content
        handle.seek(10)
        handle.write(b"\x7b\x7b")
    with pytest.raises(ValueError, match=r"pooled\.f16.*checksum"):
        extract_features(backbone, split, tmp_path, progress=False, on_corrupt="error")

    (entry / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json"):
        extract_features(backbone, split, tmp_path, progress=False, on_corrupt="error")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        extract_features(backbone, split, tmp_path, progress=False)
    assert any("manifest.json" in str(w.message) for w in caught)
    extract_features(backbone, split, tmp_path, progress=False, on_corrupt="error")  # healthy again
    assert backbone.calls == 2


def test_interrupted_extraction_leaves_no_cache(split: ImageSplit, tmp_path: Path) -> None:
    def failing(i: int) -> np.ndarray:
        if i == 5:
            raise ValueError("cannot read broken.jpg")
        return split.load(i)

    broken = ImageSplit(split.name, split.ids, split.labels, failing, content_key=split.content_key)
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        extract_features(TinyBackbone(), broken, tmp_path, batch_size=2, progress=False)
    assert entries(tmp_path) == []


def test_feature_set_is_read_only_and_batches(split: ImageSplit, tmp_path: Path) -> None:
    features = extract_features(TinyBackbone(), split, tmp_path, progress=False)
    assert isinstance(features.tokens, np.memmap) and isinstance(features.pooled, np.memmap)
    with pytest.raises(ValueError, match="read-only"):
        features.tokens[0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        features.pooled[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        features.labels[0] = 3
    tokens, pooled, labels = features.torch_batch([5, 1, 5])
    assert tokens.dtype == torch.float32 and pooled.dtype == torch.float32 and labels.dtype == torch.int64
    assert tokens.shape == (3, 16, 8) and pooled.shape == (3, 8)
    np.testing.assert_array_equal(tokens[1].numpy(), features.tokens[1].astype(np.float32))
    np.testing.assert_array_equal(labels.numpy(), split.labels[[5, 1, 5]])


def test_trainable_backbone_extracted_in_eval_mode_and_restored(split: ImageSplit, tmp_path: Path) -> None:
    backbone = TinyBackbone().set_trainable(True)
    backbone.train()
    modes: list[bool] = []
    original = backbone.forward

    def spy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        modes.append(backbone.training)
        assert torch.is_inference_mode_enabled()
        return original(x)

    backbone.forward = spy  # type: ignore[method-assign]
    extract_features(backbone, split, tmp_path, progress=False)
    assert modes and not any(modes) and backbone.training


def test_argument_validation(split: ImageSplit, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_corrupt"):
        extract_features(TinyBackbone(), split, tmp_path, on_corrupt="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="verify"):
        extract_features(TinyBackbone(), split, tmp_path, verify="none")  # type: ignore[arg-type]


class CountingBackbone(TinyBackbone):
    """TinyBackbone that also counts the images it encodes."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.images = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.images += x.shape[0]
        return super().forward(x)


def manifest_of(cache_dir: Path, backbone: Backbone, split: ImageSplit, view: str = "identity") -> dict:
    return json.loads((cache_dir / feature_cache_key(backbone, split, view) / MANIFEST_FILE).read_text())


def test_rows_reused_across_splits_of_the_same_images(tmp_path: Path) -> None:
    first = jpeg_split(8, digests=True)
    backbone = CountingBackbone()
    cached = extract_features(backbone, first, tmp_path, batch_size=3, progress=False)
    assert backbone.images == 8 and cached.image_digests == first.image_digests
    # another split: five of those images in another order, with other labels, plus three new ones
    both = jpeg_split(11, digests=True)
    resplit = take(both, [9, 6, 0, 8, 2, 10, 4, 7])
    resplit = ImageSplit("test", resplit.ids, resplit.labels[::-1].copy(), resplit.loader,
                         content_key="other", image_digests=resplit.image_digests)
    features = extract_features(backbone, resplit, tmp_path, batch_size=3, progress=False)
    assert backbone.images == 8 + 3  # only the three images no entry held
    manifest = manifest_of(tmp_path, backbone, resplit)
    assert manifest["rows_reused"] == 5 and manifest["reused_from"] == [cached.key]
    np.testing.assert_array_equal(features.labels, resplit.labels)  # labels are the split's, not the source's
    reference = extract_features(CountingBackbone(), resplit, tmp_path / "fresh", batch_size=3, progress=False)
    np.testing.assert_allclose(np.asarray(features.tokens, np.float32), np.asarray(reference.tokens, np.float32),
                               atol=1e-2)
    np.testing.assert_allclose(np.asarray(features.pooled, np.float32), np.asarray(reference.pooled, np.float32),
                               atol=1e-2)
    for row, source_row in ((2, 0), (4, 2), (6, 4), (7, 7)):  # reused rows are the cached rows, bit for bit
        np.testing.assert_array_equal(features.tokens[row], cached.tokens[source_row])
    again = extract_features(backbone, resplit, tmp_path, progress=False, on_corrupt="error")  # a plain hit
    assert backbone.images == 11 and again.key == features.key


def test_reuse_needs_same_backbone_and_view_and_a_healthy_source(tmp_path: Path) -> None:
    split = jpeg_split(6, digests=True)
    subset = take(split, [5, 1, 3])
    backbone = CountingBackbone()
    extract_features(backbone, split, tmp_path, progress=False)
    other_weights = CountingBackbone(seed=1)
    extract_features(other_weights, subset, tmp_path, progress=False)
    assert other_weights.images == 3  # another backbone key: nothing to reuse
    extract_features(backbone, subset, tmp_path, progress=False, view="hflip")
    assert backbone.images == 6 + 3  # another view: nothing to reuse
    with open(tmp_path / feature_cache_key(backbone, split) / TOKENS_FILE, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x7b\x7b")  # the source no longer matches its checksum: passed over, rows computed
    features = extract_features(backbone, take(split, [4, 0]), tmp_path, progress=False)
    assert backbone.images == 6 + 3 + 2 and len(features) == 2
    assert manifest_of(tmp_path, backbone, take(split, [4, 0]))["rows_reused"] == 0


def test_entries_without_digests_get_them_on_their_next_hit(tmp_path: Path) -> None:
    plain = jpeg_split(6)  # a loader that does not know its files' digests (or an entry written before them)
    with_digests = jpeg_split(6, digests=True)
    assert feature_cache_key(TinyBackbone(), plain) == feature_cache_key(TinyBackbone(), with_digests)
    backbone = CountingBackbone()
    extract_features(backbone, plain, tmp_path, progress=False)
    assert "image_sha256" not in manifest_of(tmp_path, backbone, plain)
    extract_features(backbone, take(with_digests, [2, 3]), tmp_path, progress=False)
    assert backbone.images == 6 + 2  # the old entry lists no digests yet: nothing reused
    hit = extract_features(backbone, with_digests, tmp_path, progress=False)
    assert backbone.images == 8 and hit.image_digests is None
    assert manifest_of(tmp_path, backbone, plain)["image_sha256"] == list(with_digests.image_digests)
    reopened = extract_features(backbone, plain, tmp_path, progress=False, on_corrupt="error")  # still valid
    assert reopened.image_digests == with_digests.image_digests
    extract_features(backbone, take(with_digests, [5, 0, 1]), tmp_path, progress=False)
    assert backbone.images == 8  # now every row is reused


def test_split_digests_must_match_ids() -> None:
    split = jpeg_split(3)
    with pytest.raises(ValueError, match="2 image digests for 3 ids"):
        ImageSplit("train", split.ids, split.labels, split.loader, image_digests=("a", "b"))
