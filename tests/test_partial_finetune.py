"""Partial fine-tuning: the backbone's last blocks train on cached maps of its frozen front."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protohead.backbones import build_backbone, train_backbone
from protohead.runconfig import load_run_config


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", 64)


@pytest.mark.parametrize("blocks", [1, 5])
def test_front_then_tail_is_the_whole_backbone(lite0, blocks):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    front = lite0.front(blocks)
    with torch.no_grad():
        tokens, pooled = lite0(x)
        front_tokens, _ = front(x)
        tail_tokens, tail_pooled = lite0.tail(front_tokens, blocks)
    assert front.feature_dim == front_tokens.shape[2] and front.num_tokens == front_tokens.shape[1]
    torch.testing.assert_close(tail_tokens, tokens)
    torch.testing.assert_close(tail_pooled, pooled)
    with pytest.raises(ValueError, match="finetune_blocks must be between 1 and 16"):
        lite0.front(17)


def test_training_the_tail_leaves_the_front_and_its_cache_key_alone():
    backbone = train_backbone(build_backbone("efficientnet_lite0", 64), 2)
    key = backbone.front(2).cache_key()
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("model._blocks.14.", "model._blocks.15.", "model._conv_head",
                                              "model._bn1")) for name in trainable)
    with torch.no_grad():
        for name, parameter in backbone.named_parameters():
            if name in trainable:
                parameter.add_(0.01)
    assert backbone.front(2).cache_key() == key  # the cached front stays valid while the tail trains
    plain = build_backbone("efficientnet_lite0", 64)
    assert "tail_blocks" not in plain.cache_config()  # every cache written before partial fine-tuning stays valid
    assert backbone.cache_key() != plain.cache_key()  # its forward rounds the front map: other features
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # forward rounds the front map to float16, as the cache the tail trained on
        front_tokens, _ = backbone.front(2)(x)
        expected, _ = backbone.tail(front_tokens.half().float(), 2)
        torch.testing.assert_close(backbone.eval()(x)[0], expected)


def test_partial_finetuning_needs_a_backbone_that_has_blocks():
    from test_features import TinyBackbone

    with pytest.raises(ValueError, match="partial fine-tuning is built for efficientnet_lite0"):
        train_backbone(TinyBackbone(), 1)
    with pytest.raises(ValueError, match="finetune_blocks must be ≥ 0"):
        load_run_config(overrides=["finetune_blocks=-1"])


@pytest.fixture(scope="module")
def partial_run(ham10000_root, feature_cache, tmp_path_factory) -> Path:
    from protohead.pipeline import run

    run_dir = tmp_path_factory.mktemp("partial") / "run"
    config = load_run_config(overrides=[
        f"data={ham10000_root}", f"cache_dir={feature_cache}", "subset_per_class=3", "progress=false",
        "batch_size=8", "head.emb_dim=32", "head.num_heads=4", "epochs=2", "push_every=1", "expand_every=0",
        "finetune=true", "finetune_blocks=1", "image_size=96", "backbone_lr=1e-2", "views=2", "augment=flips"])
    run(config, run_dir)
    return run_dir


def test_a_partial_run_trains_the_tail_only_and_predicts_from_images_as_it_was_scored(partial_run):
    from protohead import load_run
    from protohead.training.checkpoint import read_checkpoint

    tensors, _ = read_checkpoint(partial_run / "checkpoints" / "best.safetensors")
    pretrained = build_backbone("efficientnet_lite0", 96).state_dict()
    changed = {key.removeprefix("model/backbone.") for key, value in tensors.items()
               if key.startswith("model/backbone.") and value.is_floating_point()
               and not torch.equal(value, pretrained[key.removeprefix("model/backbone.")])}
    assert any(key.startswith("model._blocks.15.") for key in changed)
    assert not any(key.startswith(("model._conv_stem", "model._blocks.0.", "model._blocks.14.")) for key in changed)
    predictor = load_run(partial_run)
    assert predictor.views == ("identity", "hflip")
    stored = np.load(partial_run / "predictions_test.npz")
    from protohead.pipeline import load_data

    test = load_data(predictor.loaded.config).splits["test"]
    images = [test.load(i) for i in range(4)]
    np.testing.assert_allclose(predictor.outputs(images)["probabilities"], stored["probabilities"][:4], atol=1e-4)
    assert json.loads((partial_run / "metrics.json").read_text())["split"] == "test"
