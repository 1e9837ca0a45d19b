"""Backbone contract: shapes, pooling, preprocessing, freezing, registry, and the optional timm adapter."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protohead.backbones import Backbone, EfficientNetLite0Backbone, TimmBackbone, build_backbone


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0Backbone:
    return EfficientNetLite0Backbone()


def random_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_lite0_shapes_pooling_and_token_order(lite0: EfficientNetLite0Backbone) -> None:
    x = lite0.preprocess(random_images([(150, 200), (224, 224)]))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    with torch.inference_mode():
        tokens, pooled = lite0(x)
        fmap = lite0.feature_map(x)
        own_pool = lite0.model._avg_pooling(fmap).flatten(1)  # the model's own pooling path
    assert (lite0.num_tokens, lite0.feature_dim) == (49, 1280)
    assert tokens.shape == (2, 49, 1280) and pooled.shape == (2, 1280)
    torch.testing.assert_close(pooled, tokens.mean(dim=1))
    torch.testing.assert_close(pooled, own_pool, rtol=1e-5, atol=1e-5)
    # row-major: token r*7+c is feature-map cell (r, c)
    torch.testing.assert_close(tokens[:, 3 * 7 + 5], fmap[:, :, 3, 5])
    torch.testing.assert_close(tokens[:, 6], fmap[:, :, 0, 6])


def test_lite0_other_image_size() -> None:
    backbone = EfficientNetLite0Backbone(image_size=64)
    assert backbone.num_tokens == 4
    with torch.inference_mode():
        tokens, pooled = backbone(backbone.preprocess(random_images([(40, 90)])))
    assert tokens.shape == (1, 4, 1280) and pooled.shape == (1, 1280)


def test_preprocess_range_and_validation(lite0: EfficientNetLite0Backbone) -> None:
    black = np.zeros((30, 40, 3), dtype=np.uint8)
    white = np.full((224, 224, 3), 255, dtype=np.uint8)
    x = lite0.preprocess([black, white])
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full_like(x[0], -127 / 128))  # ≈ -0.992
    assert torch.allclose(x[1], torch.full_like(x[1], 1.0))
    with pytest.raises(ValueError, match="uint8"):
        lite0.preprocess([black.astype(np.float32)])
    with pytest.raises(ValueError, match="uint8"):
        lite0.preprocess([black[..., 0]])


def test_lite0_normalisation_gives_sensible_imagenet_predictions(lite0: EfficientNetLite0Backbone) -> None:
    """With (x-127)/128 the ImageNet head recognises two natural photos (ImageNet mean/std loses the daisy)."""
    import matplotlib
    import sklearn

    photos = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
              Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
    with torch.inference_mode():
        top1 = lite0.imagenet_logits(lite0.preprocess(images)).argmax(dim=1).tolist()
    assert top1 == [652, 985]  # military uniform, daisy


def test_frozen_by_default_and_set_trainable() -> None:
    backbone = EfficientNetLite0Backbone(image_size=64)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.training
    backbone.train()
    assert not backbone.training and not backbone.model._bn0.training  # frozen stays in eval
    backbone.set_trainable(True)
    assert all(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert backbone.model._bn0.training
    backbone.set_trainable(False)
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training


def test_cache_key_tracks_size_and_weights() -> None:
    a, b = EfficientNetLite0Backbone(image_size=64), EfficientNetLite0Backbone(image_size=64)
    assert a.cache_key() == b.cache_key()
    assert a.cache_key() != EfficientNetLite0Backbone(image_size=96).cache_key()
    with torch.no_grad():
        b.model._conv_head.weight[0, 0] += 1.0
    assert a.cache_key() != b.cache_key()


def test_rejects_wrong_weights(tmp_path: Path) -> None:
    path = tmp_path / "bad.pth"
    torch.save({"not_a_key": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"bad\.pth"):
        EfficientNetLite0Backbone(image_size=64, weights_path=path)


def test_build_backbone() -> None:
    backbone = build_backbone("efficientnet_lite0", image_size=64)
    assert isinstance(backbone, Backbone) and backbone.name == "efficientnet_lite0"
    for bad in ("resnet50", "timm:", "efficientnet-lite0"):
        with pytest.raises(ValueError, match=r"efficientnet_lite0.*timm:"):
            build_backbone(bad)


def test_timm_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[timm\]"):
        TimmBackbone("resnet18")
    with pytest.raises(ImportError, match=r"pip install -e \.\[timm\]"):
        build_backbone("timm:resnet18")


# ---------------------------------------------------------------------- timm (optional extra)
def require_timm() -> None:
    """CI installs the timm extra, so there a missing timm is a failure, not a skip."""
    if os.environ.get("CI"):
        import timm  # noqa: F401
    else:
        pytest.importorskip("timm")


def test_timm_vit_tokens_and_pooling() -> None:
    require_timm()
    torch.manual_seed(0)
    backbone = TimmBackbone("vit_tiny_patch16_224", image_size=64)
    assert backbone.num_tokens == 16 and backbone.feature_dim == 192 and backbone.pooled == "cls"
    x = backbone.preprocess(random_images([(50, 70), (64, 64)]))
    with torch.inference_mode():
        tokens, pooled = backbone(x)
        full = backbone.model.forward_features(x)
    prefix = backbone.model.num_prefix_tokens
    assert tokens.shape == (2, 16, 192) and pooled.shape == (2, 192)
    torch.testing.assert_close(tokens, full[:, prefix:])
    torch.testing.assert_close(pooled, full[:, 0])
    mean = tuple(255 * m for m in backbone.model.pretrained_cfg["mean"])
    assert backbone.pixel_mean == pytest.approx(mean)
    mean_backbone = TimmBackbone("vit_tiny_patch16_224", image_size=64, pooled="mean")
    with torch.inference_mode():
        tokens, pooled = mean_backbone(x)
    torch.testing.assert_close(pooled, tokens.mean(dim=1))


def test_timm_cnn_and_local_weights(tmp_path: Path) -> None:
    require_timm()
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = TimmBackbone("resnet18", image_size=64)
    assert source.num_tokens == 4 and source.feature_dim == 512 and source.pooled == "mean"
    with pytest.raises(ValueError, match="class token"):
        TimmBackbone("resnet18", image_size=64, pooled="cls")
    x = source.preprocess(random_images([(64, 64)]))
    with torch.inference_mode():
        tokens, pooled = source(x)
        fmap = source.model.forward_features(x)
    assert tokens.shape == (1, 4, 512)
    torch.testing.assert_close(tokens[:, 1], fmap[:, :, 0, 1])
    torch.testing.assert_close(pooled, tokens.mean(dim=1))

    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    torch.manual_seed(1)
    loaded = build_backbone("timm:resnet18", image_size=64, weights_path=path)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x)[0], tokens)
    assert loaded.cache_key() == source.cache_key()
