"""Views (flips and 90° rotations): exact symmetries, one cache entry per view, one view per image per epoch,
test-time averaging everywhere a prediction is made (metrics, explain, load_run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protohead.runconfig import load_run_config
from protohead.training.loop import SplitInputs, predict
from protohead.views import VIEWS, apply_view, average_view_outputs, sample_views, view_names


def test_views_are_the_eight_symmetries_of_the_square():
    image = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    array = image.numpy()
    expected = {"identity": array, "hflip": array[..., ::-1], "vflip": array[..., ::-1, :],
                "rot180": array[..., ::-1, ::-1], "rot90": np.rot90(array, 1, (2, 3)),
                "rot270": np.rot90(array, -1, (2, 3)), "transpose": array.transpose(0, 1, 3, 2),
                "antitranspose": array[..., ::-1, ::-1].transpose(0, 1, 3, 2)}  # the other diagonal
    assert set(expected) == set(VIEWS)
    for view, want in expected.items():
        np.testing.assert_array_equal(apply_view(image, view).numpy(), want, err_msg=view)
    assert len({apply_view(image, v).numpy().tobytes() for v in VIEWS}) == 8
    assert view_names(4) == ("identity", "hflip", "vflip", "rot180")
    with pytest.raises(ValueError, match="between 1 and 8"):
        view_names(9)
    with pytest.raises(ValueError, match="unknown view"):
        apply_view(image, "mirror")
    with pytest.raises(ValueError, match="square"):
        apply_view(torch.zeros(1, 3, 4, 5), "rot90")


def test_one_view_draws_nothing_and_several_are_seeded():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert torch.equal(sample_views(5, 1, generator), torch.zeros(5, dtype=torch.long))
    assert torch.equal(generator.get_state(), state)  # one-view runs keep their old order
    first = sample_views(1000, 4, torch.Generator().manual_seed(3))
    assert torch.equal(first, sample_views(1000, 4, torch.Generator().manual_seed(3)))
    assert set(first.tolist()) == {0, 1, 2, 3}


def test_feature_cache_keeps_one_entry_per_view(tmp_path):
    from test_features import TinyBackbone, jpeg_split

    from protohead.features import extract_features, feature_cache_key

    backbone, split = TinyBackbone(), jpeg_split(4)
    assert feature_cache_key(backbone, split, "identity") == feature_cache_key(backbone, split)
    assert feature_cache_key(backbone, split, "hflip") != feature_cache_key(backbone, split)
    plain = extract_features(backbone, split, tmp_path, progress=False)
    flipped = extract_features(backbone, split, tmp_path, progress=False, view="rot90")
    assert plain.path != flipped.path
    with torch.no_grad():
        tokens, _ = backbone(apply_view(backbone.preprocess([split.load(i) for i in range(4)]), "rot90"))
    np.testing.assert_allclose(np.asarray(flipped.tokens, dtype=np.float32), tokens.numpy(), atol=2e-3)
    assert not np.allclose(np.asarray(flipped.tokens, np.float32), np.asarray(plain.tokens, np.float32), atol=1e-2)
    with pytest.raises(ValueError, match="unknown view"):
        extract_features(backbone, split, tmp_path, progress=False, view="upside")


def _toy_split(views: int, size: int = 6, dim: int = 8) -> SplitInputs:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(views * size, 4, dim, generator=generator)
    labels = torch.arange(size) % 3

    def fetch(indices: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tokens[indices], tokens[indices].mean(1), labels[indices % size]
    return SplitInputs(fetch, size, labels.numpy(), views=views)


def test_predict_averages_the_views_and_explains_the_identity_view():
    from protohead.head import HeadOptimal

    head = HeadOptimal(num_classes=3, emb_dim=16, num_heads=4, img_feat_dim=8).eval()
    split = _toy_split(views=3)
    averaged = predict(head, split, batch_size=4)
    single = [predict(head, SplitInputs(lambda i, t, v=v: split.fetch(i + v * split.size, t), split.size,
                                        split.labels), 4) for v in range(3)]
    for key in ("probabilities", "uncertainty", "ood_score"):
        np.testing.assert_allclose(averaged[key], np.mean([s[key] for s in single], axis=0), atol=1e-6)
    assert not np.allclose(single[0]["probabilities"], single[1]["probabilities"])
    outputs = [{"probabilities": torch.ones(2, 3) * v, "evidence": torch.full((2,), float(v))} for v in range(3)]
    merged = average_view_outputs(outputs)
    assert torch.equal(merged["evidence"], outputs[0]["evidence"])  # pictures: the image as it is
    assert torch.allclose(merged["probabilities"], torch.ones(2, 3))


def test_multi_view_feature_inputs_fetch_the_view_of_each_row(tmp_path):
    from test_features import TinyBackbone, jpeg_split

    from protohead.features import extract_features
    from protohead.pipeline import feature_inputs

    backbone, split = TinyBackbone(), jpeg_split(5)
    sets = [extract_features(backbone, split, tmp_path, progress=False, view=v) for v in view_names(4)]
    inputs = feature_inputs(sets)
    assert inputs.size == 5 and inputs.views == 4
    rows = torch.tensor([0, 7, 13, 19, 4])  # image 0 view 0, image 2 view 1, image 3 view 2, image 4 view 3, ...
    tokens, _, labels = inputs.fetch(rows, True)
    for row, got in zip(rows.tolist(), tokens, strict=True):
        view, image = divmod(row, 5)
        np.testing.assert_array_equal(got.numpy(), np.asarray(sets[view].tokens[image], dtype=np.float32))
    np.testing.assert_array_equal(labels.numpy(), split.labels[rows.numpy() % 5])
    with pytest.raises(ValueError, match="different images"):
        feature_inputs([sets[0], extract_features(backbone, jpeg_split(5, offset=5), tmp_path, progress=False)])


@pytest.fixture(scope="module")
def view_run(ham10000_root, feature_cache, tmp_path_factory) -> Path:
    from protohead.pipeline import run

    run_dir = tmp_path_factory.mktemp("views") / "run"
    config = load_run_config(overrides=[
        f"data={ham10000_root}", f"cache_dir={feature_cache}", "subset_per_class=4", "progress=false",
        "batch_size=16", "head.emb_dim=32", "head.num_heads=4", "epochs=2", "push_every=1", "expand_every=0",
        "views=2", "preset=patch", "anchored_epochs=1"])
    run(config, run_dir)
    return run_dir


def test_a_view_run_trains_on_both_views_and_every_prediction_averages_them(view_run):
    """Metrics, explain and load_run give the same test probabilities: all three average the two views."""
    from protohead import load_run
    from protohead.explain.run import _outputs, load_model, read_run_config

    config = read_run_config(view_run)
    assert config.views == 2 and config.tta
    data, model, selection = load_model(view_run, config)
    assert data.splits["train"].views == data.splits["test"].views == 2
    test = data.splits["test"]
    counts = np.bincount(data.splits["train"].labels, minlength=len(data.class_names))
    stored = np.load(view_run / "predictions_test.npz")
    explained = _outputs(model, test, range(test.size), 64, False, counts, selection)
    np.testing.assert_allclose(explained["probabilities"], stored["probabilities"], atol=1e-5)
    predictor = load_run(view_run)
    assert predictor.views == ("identity", "hflip")
    images = [data.images["test"].load(i) for i in range(4)]
    np.testing.assert_allclose(predictor.outputs(images)["probabilities"], stored["probabilities"][:4], atol=1e-3)
    history = json.loads((view_run / "history.json").read_text())
    assert len(history["history"]) == 2


def test_views_out_of_range_are_refused():
    with pytest.raises(ValueError, match="views must be between 1 and 8"):
        load_run_config(overrides=["views=9"])
    with pytest.raises(ValueError, match="views must be between 1 and 8"):
        load_run_config(overrides=["views=0"])


def test_training_draws_one_view_per_image_per_epoch(tmp_path):
    from protohead.head import HeadOptimal
    from protohead.training.loop import Trainer

    split = _toy_split(views=4, size=32)
    seen: list[torch.Tensor] = []
    fetch = split.fetch
    split.fetch = lambda indices, train: (seen.append(indices.clone()) if train else None) or fetch(indices, train)
    head = HeadOptimal(num_classes=3, emb_dim=16, num_heads=4, img_feat_dim=8)
    config = load_run_config(overrides=["progress=false", "batch_size=8", "epochs=2"])
    trainer = Trainer(config, head, split, _toy_split(views=1), tmp_path)
    for epoch in range(2):
        seen.clear()
        trainer.train_epoch(epoch)
        rows = torch.cat(seen)
        assert sorted((rows % 32).tolist()) == list(range(32))  # every image once
        assert len(set((rows // 32).tolist())) > 1  # under more than one view


def test_device_choice_is_checked_and_cpu_runs_stay_float32():
    from protohead.device import autocast, resolve_device

    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="config key 'device'"):
        load_run_config(overrides=["device=gpu"])
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no usable GPU"):
            resolve_device("cuda")
    with autocast(torch.device("cpu"), True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast(torch.device("cpu"), False, cpu=True):  # amp_cpu=true: bfloat16 on the CPU, opted into
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
