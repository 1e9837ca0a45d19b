"""Training-time augmentation while fine-tuning: random symmetries, random resized crop + colour jitter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_resume_is_exact

from protohead.augment import (
    CROP_RATIO,
    CROP_SCALE,
    CropJitter,
    crop_jitter_image,
    draw_crop_jitter,
    random_symmetric_tokens,
    random_symmetries,
)
from protohead.runconfig import load_run_config
from protohead.views import VIEWS, apply_view


def _which_view(row: torch.Tensor, original: torch.Tensor) -> set[str]:
    return {view for view in VIEWS if torch.equal(apply_view(original.unsqueeze(0), view)[0], row)}


def test_random_symmetries_turn_each_row_by_one_of_the_eight_and_are_seeded():
    grid = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(1, 2, 5, 5)  # no symmetry of its own
    batch = grid.repeat(64, 1, 1, 1)
    torch.manual_seed(3)
    turned = random_symmetries(batch)
    seen = [_which_view(row, grid[0]) for row in turned]
    assert all(len(views) == 1 for views in seen)  # each row is exactly one symmetry of the original
    assert len(set.union(*seen)) >= 6  # drawn across the views, not one fixed view
    torch.manual_seed(3)
    torch.testing.assert_close(random_symmetries(batch), turned, rtol=0, atol=0)
    assert torch.equal(batch, grid.repeat(64, 1, 1, 1))  # the input is left as it was
    with pytest.raises(ValueError, match="square grids"):
        random_symmetries(torch.zeros(2, 3, 4, 5))


def test_random_symmetric_tokens_permute_each_images_cells_as_a_grid():
    grids = torch.randn(16, 3, 4, 4)  # (B, C, S, S) → row-major tokens (B, S·S, C)
    tokens = grids.permute(0, 2, 3, 1).reshape(16, 16, 3)
    turned = random_symmetric_tokens(tokens)
    back = turned.reshape(16, 4, 4, 3).permute(0, 3, 1, 2)
    seen = [_which_view(row, original) for row, original in zip(back, grids, strict=True)]
    assert all(len(views) == 1 for views in seen)  # the same cells, moved as one symmetry of the grid
    assert len(set.union(*seen)) > 2  # and not the same symmetry for every image
    with pytest.raises(ValueError, match="square grid"):
        random_symmetric_tokens(torch.zeros(2, 12, 3))


def test_crop_boxes_stay_inside_the_image_with_the_drawn_area_and_ratio():
    torch.manual_seed(0)
    draws = draw_crop_jitter(500)
    for params in draws:
        assert CROP_SCALE[0] <= params.area <= CROP_SCALE[1]
        assert math.log(CROP_RATIO[0]) <= params.log_ratio <= math.log(CROP_RATIO[1])
        assert 0.8 - 1e-9 <= params.brightness <= 1.2 + 1e-9 and abs(params.hue) <= 0.02
        top, left, height, width = params.box(150, 200)
        assert top >= 0 and left >= 0 and top + height <= 150 and left + width <= 200
        if width < 200 and height < 150:  # not clipped: the box keeps the drawn share of the area
            assert abs(height * width / (150 * 200) - params.area) < 0.02
    assert len({params.box(150, 200) for params in draws}) > 400  # places and sizes vary
    fixed = CropJitter(area=0.25, log_ratio=0.0, top=0.0, left=0.0, brightness=1, contrast=1, saturation=1, hue=0)
    tops = [CropJitter(**{**fixed.__dict__, "top": u}).box(150, 200)[0] for u in np.linspace(0, 1, 10_000,
                                                                                             endpoint=False)]
    counts = np.bincount(tops)  # a 87-pixel crop fits at 64 places in 150 rows: each as likely
    assert len(counts) == 150 - 87 + 1 and counts.max() - counts.min() <= 1
    torch.manual_seed(0)
    assert draw_crop_jitter(500) == draws  # torch's generator fixes them (checkpoints save its state)


def test_crop_jitter_image_is_a_resize_when_nothing_is_drawn_and_changes_the_image_otherwise():
    pytest.importorskip("torchvision")  # the `timm` extra; CI installs it
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    plain = CropJitter(area=1.0, log_ratio=math.log(200 / 150), top=0.5, left=0.5, brightness=1.0, contrast=1.0,
                       saturation=1.0, hue=0.0)
    assert plain.box(150, 200) == (0, 0, 150, 200)
    out = crop_jitter_image(image, plain, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    from PIL import Image

    resized = np.asarray(Image.fromarray(image).resize((64, 64), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(out.astype(int) - resized).mean() < 3  # antialiased bilinear, as PIL's
    darker = CropJitter(**{**plain.__dict__, "brightness": 0.8})
    assert crop_jitter_image(image, darker, 64).astype(int).sum() < out.astype(int).sum()
    corner = CropJitter(**{**plain.__dict__, "area": 0.36, "log_ratio": 0.0, "top": 0.0, "left": 0.0})
    assert corner.box(150, 200) == (0, 0, 104, 104)
    np.testing.assert_array_equal(crop_jitter_image(image, corner, 104), image[:104, :104])


def test_augment_is_checked_against_what_it_can_act_on():
    with pytest.raises(ValueError, match="frozen features take flips as cached views"):
        load_run_config(overrides=["augment=flips"])
    with pytest.raises(ValueError, match="use augment=flips there, or finetune_blocks=0"):
        load_run_config(overrides=["finetune=true", "finetune_blocks=1", "augment=strong"])
    with pytest.raises(ValueError, match="augment"):
        load_run_config(overrides=["finetune=true", "augment=colour"])
    with pytest.raises(ValueError, match="loader_threads must be ≥ 0"):
        load_run_config(overrides=["loader_threads=-1"])
    assert load_run_config(overrides=["finetune=true", "augment=strong"]).augment == "strong"


def test_image_inputs_augment_training_batches_only_and_reproducibly(ham10000_root):
    pytest.importorskip("torchvision")
    from protohead.backbones import build_backbone, train_backbone
    from protohead.pipeline import image_inputs, load_data

    config = load_run_config(overrides=[f"data={ham10000_root}", "subset_per_class=2"])
    split = load_data(config).splits["train"]
    backbone = train_backbone(build_backbone("efficientnet_lite0", 64))
    captured: list[torch.Tensor] = []
    backbone.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
    indices = torch.arange(4)
    batches = [indices, indices + 4, indices]
    for threads in (0, 2):
        inputs = image_inputs(backbone, split, augment="strong", threads=threads)
        torch.manual_seed(1)
        for step, rows in enumerate(batches):  # what the trainer does, with the head's dropout draws between
            inputs.fetch(rows, True)
            if step + 1 < len(batches):
                inputs.prefetch(batches[step + 1], True)
            torch.rand(7)  # the step's own random draws (dropout) come after the next batch's crops
        inputs.fetch(indices, False)
        inputs.fetch(indices, False)
        assert inputs.fetch(indices[:0], True)[0].shape[0] == 0  # an empty shard (torchrun) is an empty batch
    plain = backbone.preprocess([split.load(i) for i in range(4)])
    first, _, third, evaluated, again = captured[:5]
    assert not torch.allclose(first, third)  # a new crop, colour and symmetry at every step
    torch.testing.assert_close(evaluated, plain)  # validation / test / push see the images as they are
    torch.testing.assert_close(again, plain)
    for unthreaded, threaded in zip(captured[:5], captured[6:11], strict=True):  # threads change only the speed
        torch.testing.assert_close(threaded, unthreaded, rtol=0, atol=0)


def test_an_augmented_fine_tune_resumes_to_the_same_weights(ham10000_root, tmp_path, monkeypatch):
    """Crops, colours and symmetries come from torch's generator, which checkpoints restore, and the prefetching
    loader draws them in a fixed order: a stopped and resumed run ends bit-identical to an uninterrupted one."""
    pytest.importorskip("torchvision")
    from protohead.pipeline import train

    config = load_run_config(overrides=[
        f"data={ham10000_root}", "subset_per_class=2", "epochs=2", "batch_size=5", "finetune=true",
        "finetune_image_size=48", "augment=strong", "loader_threads=2", "progress=false", "push_every=0",
        "expand_every=0", "preset=basic", "head.emb_dim=16", "head.num_heads=2", "posthoc_tau=0", "calibrate=false"])
    assert_resume_is_exact(lambda run_dir, resume: train(config, run_dir, resume=resume), tmp_path, monkeypatch, 1)


@pytest.mark.parametrize("blocks", [0, 1])
def test_bfloat16_fine_tuning_runs_the_backbone_under_autocast(ham10000_root, tmp_path, monkeypatch, blocks):
    """``amp_cpu=true`` with fine-tuning: the trainable backbone's forward (whole, or its last block on cached
    maps) runs inside the step's autocast, so its features reach the head in bfloat16 and its backward is
    bfloat16 too; predictions stay float32."""
    from protohead.model import EndToEnd
    from protohead.pipeline import train

    seen = []
    original = EndToEnd.score

    def spy(self, tokens, *args, **kwargs):
        seen.append(tokens.dtype)
        return original(self, tokens, *args, **kwargs)

    monkeypatch.setattr(EndToEnd, "score", spy)
    config = load_run_config(overrides=[
        f"data={ham10000_root}", "subset_per_class=2", "epochs=1", "batch_size=5", "finetune=true",
        f"finetune_blocks={blocks}", "finetune_image_size=48", "image_size=64", "amp_cpu=true", "progress=false",
        "push_every=0", "expand_every=0", "preset=basic", "head.emb_dim=16", "head.num_heads=2", "posthoc_tau=0",
        "calibrate=false", f"cache_dir={tmp_path / 'cache'}"])
    train(config, tmp_path / "run")
    assert seen and set(seen) == {torch.bfloat16}
