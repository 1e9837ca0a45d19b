"""Multi-scale tokens: EfficientNet-Lite0's sixth-stage output appended to every cell of its final map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protohead.backbones import build_backbone, train_backbone
from protohead.runconfig import load_run_config

SIZE = 64


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def test_tokens_are_the_final_map_then_block_14_cell_by_cell(images):
    plain, multi = build_backbone("efficientnet_lite0", SIZE), build_backbone("efficientnet_lite0", SIZE,
                                                                              multiscale=True)
    with torch.no_grad():
        final, _ = plain(images)
        block14 = plain.model._blocks[14]  # the block multiscale taps, run by hand on the front's map
        x = plain.front_map(images, 2)
        tap = block14(x, drop_connect_rate=plain.model._global_params.drop_connect_rate * 14 / 16)
        tokens, pooled = multi(images)
    assert multi.feature_dim == 1280 + 192 == tokens.shape[2] and tokens.shape[1] == plain.num_tokens
    torch.testing.assert_close(tokens[..., :1280], final)
    torch.testing.assert_close(tokens[..., 1280:], tap.permute(0, 2, 3, 1).flatten(1, 2))
    torch.testing.assert_close(pooled, tokens.mean(dim=1))
    assert multi.cache_key() != plain.cache_key()  # other features, other cache entry
    assert "multiscale" not in plain.cache_config()  # single-scale caches keep their keys
    assert multi.front(1).cache_key() == plain.front(1).cache_key()  # the cached front is shared


@pytest.mark.parametrize("blocks", [1, 3])
def test_the_trainable_tail_gives_the_same_multiscale_tokens(images, blocks):
    backbone = train_backbone(build_backbone("efficientnet_lite0", SIZE, multiscale=True), blocks).eval()
    with torch.no_grad():
        front_tokens, _ = backbone.front(blocks)(images)
        tail_tokens, tail_pooled = backbone.tail(front_tokens.half().float(), blocks)
        tokens, pooled = backbone(images)
    assert tail_tokens.shape[2] == 1472
    torch.testing.assert_close(tail_tokens, tokens)
    torch.testing.assert_close(tail_pooled, pooled)
    if blocks == 1:  # block 14 is the front's last block: its (rounded) map is what the tail appends
        torch.testing.assert_close(tail_tokens[..., 1280:], front_tokens.half().float())


def test_multiscale_is_refused_for_other_backbones():
    with pytest.raises(ValueError, match="multiscale features are built for efficientnet_lite0"):
        build_backbone("timm:resnet18", SIZE, multiscale=True)
    with pytest.raises(ValueError, match="'multiscale' = True is built for backbone efficientnet_lite0"):
        load_run_config(overrides=["multiscale=true", "backbone=timm:resnet18"])


def test_a_multiscale_run_predicts_from_images_as_it_was_scored(ham10000_root, feature_cache, tmp_path):
    from protohead import load_run
    from protohead.pipeline import load_data, run

    config = load_run_config(overrides=[
        f"data={ham10000_root}", f"cache_dir={feature_cache}", "subset_per_class=3", "progress=false",
        "batch_size=8", "head.emb_dim=32", "head.num_heads=4", "epochs=2", "push_every=1", "expand_every=0",
        f"image_size={SIZE}", "multiscale=true"])
    run(config, tmp_path / "run")
    predictor = load_run(tmp_path / "run")
    assert predictor.loaded.description["feature_dim"] == 1472
    stored = np.load(tmp_path / "run" / "predictions_test.npz")
    test = load_data(predictor.loaded.config).splits["test"]
    images = [test.load(i) for i in range(4)]
    np.testing.assert_allclose(predictor.outputs(images)["probabilities"], stored["probabilities"][:4], atol=1e-4)
    assert predictor.loaded.config.multiscale is True  # rebuilt from the run folder with its 1472-dim tokens


def test_whole_finetuning_trains_through_both_scales(images):
    backbone = train_backbone(build_backbone("efficientnet_lite0", SIZE, multiscale=True)).train()
    _, pooled = backbone(images)
    pooled[:, 1280:].sum().backward(retain_graph=True)  # block 14's part: reaches the stem, not block 15 or the head
    model = backbone.model
    assert model._conv_stem.weight.grad.abs().sum() > 0
    for untouched in (model._conv_head.weight, model._blocks[15]._project_conv.weight):
        assert untouched.grad is None or not untouched.grad.any()
    pooled[:, :1280].sum().backward()
    assert model._conv_head.weight.grad.abs().sum() > 0
