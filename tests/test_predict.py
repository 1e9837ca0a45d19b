"""Using a trained run anywhere (issue 12): ``load_run(...).predict`` and ``protohead predict`` give the numbers
``evaluate`` gives, from any directory and without the training data; checkpoints describe themselves and
refuse a model of another configuration; ``explain`` reports exactly the metrics' probabilities."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_errors import FULL, TINY, one_line_exit_2, split_layout
from test_pipeline import config as ham_config

from protohead import runfolder
from protohead.cli.main import main as cli
from protohead.head import HeadOptimal
from protohead.pipeline import evaluate_run, load_data, run
from protohead.predict import load_run, read_image
from protohead.training.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def ham_run(ham10000_root, feature_cache, tmp_path_factory) -> tuple[Path, object]:
    """A short run of the default preset (patch) on 12 real HAM10000 images per class and split (pushed every
    epoch)."""
    out = tmp_path_factory.mktemp("ham-run") / "run"
    cfg = ham_config(ham10000_root, feature_cache, "epochs=3", "push_every=1", "expand_every=0", "lr=3e-3")
    run(cfg, out)
    return out, cfg


def test_load_run_predict_equals_the_evaluated_predictions(ham_run):
    out, cfg = ham_run
    saved = np.load(out / "predictions_test.npz")
    test = load_data(cfg).splits["test"]
    assert tuple(saved["ids"]) == test.ids
    predictor = load_run(out)
    predictions = predictor.predict(list(test.sources))
    probs = np.array([[p.probabilities[name] for name in predictor.class_names] for p in predictions])
    uncertainty = np.array([p.uncertainty for p in predictions])
    assert np.abs(probs - saved["probabilities"]).max() <= 1e-5
    assert np.abs(uncertainty - saved["uncertainty"]).max() <= 1e-5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["posthoc_tau"] == predictor.loaded.posthoc_tau
    # evidence: the cited prototypes were pushed onto training images the run names, with a map per prototype
    cited = predictions[0].prototypes
    train_ids = set(json.loads((out / "train_ids.json").read_text()))
    assert len(cited) == 3 and all(p.source_id in train_ids for p in cited)
    assert predictor.head.evidence_kind == "similarity"  # patch scoring: each token's similarity to the prototype
    assert all(p.evidence.shape == (7, 7) and np.abs(p.evidence).max() <= 1 + 1e-5 and p.evidence.std() > 0
               for p in cited)


def test_checkpoint_describes_the_run(ham_run):
    out, _ = ham_run
    _, meta = read_checkpoint(out / runfolder.BEST_CHECKPOINT)
    described = meta["user"]["run"]
    assert described["class_names"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert described["feature_dim"] == 1280 and described["backbone"]["name"] == "efficientnet_lite0"
    assert described["config"]["preset"] == "patch" and sum(described["class_counts"]) > 0
    assert meta["user"]["signature"]["config"]["num_classes"] == 7
    sources = runfolder.read_prototype_sources(out)
    head = runfolder.load_model(out).model
    pushed = {(c, s) for c, s in head.bank.valid.nonzero().tolist() if int(head.push_image[c, s]) >= 0}
    assert pushed and set(sources) == pushed
    assert all(record["image"].dtype == np.uint8 and record["image"].ndim == 3 for record in sources.values())


def test_explain_uses_the_metrics_probabilities(ham_run):
    from protohead.explain.run import _outputs, load_model

    out, cfg = ham_run
    data, model, selection = load_model(out, cfg)
    saved = np.load(out / "predictions_test.npz")
    test = data.splits["test"]
    outputs = _outputs(model, test, range(test.size), 64, keep_maps=False, class_counts=data.class_counts,
                       selection=selection)
    np.testing.assert_array_equal(outputs["probabilities"].argmax(1), saved["probabilities"].argmax(1))
    np.testing.assert_allclose(outputs["probabilities"], saved["probabilities"], atol=1e-6)


def test_predict_cli_from_elsewhere_without_the_data(tmp_path, monkeypatch, capsys):
    data = split_layout(tmp_path / "data", {"train": {"a": 3, "b": 3}, "val": FULL, "test": FULL})
    out = tmp_path / "run"
    assert cli(["run", "--data", str(data), "--out", str(out), f"cache_dir={tmp_path / 'cache'}", *TINY,
                "epochs=2", "push_every=1"]) == 0
    saved = np.load(out / "predictions_test.npz")
    images = tmp_path / "incoming"
    images.mkdir()
    for image_id in saved["ids"]:
        shutil.copy(data / image_id, images / image_id.replace("/", "_"))
    shutil.move(data, tmp_path / "data-moved-away")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli(["predict", str(out), *(str(images / i.replace("/", "_")) for i in saved["ids"]), "--json",
                "--explain", "figures"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(saved["ids"])
    for row, line in zip(saved["probabilities"], lines, strict=True):
        assert line["predicted"] == ["a", "b"][int(row.argmax())]
        np.testing.assert_allclose([line["probabilities"]["a"], line["probabilities"]["b"]], row, atol=1e-6)
    assert len(list((elsewhere / "figures").glob("explain_*.png"))) == len(lines)


def test_predict_explain_keeps_one_figure_per_image_and_refuses_a_baseline_first(tmp_path, capsys):
    data = split_layout(tmp_path / "data", {"train": FULL, "val": FULL, "test": FULL})
    (data / "test" / "b" / "0.png").rename(data / "test" / "b" / "1.jpg")  # stems 0, 1, 0, 1 in a/ and b/
    out = tmp_path / "run"
    assert cli(["train", "--data", str(data), "--out", str(out), f"cache_dir={tmp_path / 'cache'}", *TINY]) == 0
    capsys.readouterr()
    assert cli(["predict", str(out), str(data / "test"), "--json", "--explain", str(tmp_path / "figures")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "explain_0.png", "explain_a_1_png.png", "explain_b_1_jpg.png", "explain_b_1_png.png"]
    from protohead.cli.predict import explanation_names

    for names in (["a b.png", "a_b.png"], ["甲.jpg", "乙.jpg"], ["a/x.png", "b/x.png", "a_x_png.jpg"]):
        chosen = explanation_names([tmp_path / "in" / name for name in names])
        assert len(set(chosen.values())) == len(names), chosen  # distinct once file-safe, too
    linear = tmp_path / "linear"
    assert cli(["train", "--data", str(data), "--out", str(linear), "--preset", "linear",
                f"cache_dir={tmp_path / 'cache'}", *TINY]) == 0
    capsys.readouterr()
    one_line_exit_2(capsys, ["predict", str(linear), str(data / "test"), "--explain", str(tmp_path / "f2")],
                    "no prototypes to explain")
    assert not (tmp_path / "f2").exists()


def test_predict_cli_reports_bad_images_and_goes_on(tmp_path, capsys):
    data = split_layout(tmp_path / "data", {"train": FULL, "val": FULL, "test": FULL})
    out = tmp_path / "run"
    assert cli(["train", "--data", str(data), "--out", str(out), f"cache_dir={tmp_path / 'cache'}", *TINY]) == 0
    (tmp_path / "notes.png").write_text("not an image")
    good = data / "test" / "a" / "0.png"
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:30])
    capsys.readouterr()
    code = cli(["predict", str(out), str(tmp_path / "notes.png"), str(good), str(truncated),
                str(tmp_path / "missing.jpg"), "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert len(captured.out.splitlines()) == 1 and json.loads(captured.out)["source"] == str(good)
    errors = captured.err.splitlines()
    for name in ("notes.png", "truncated.png", "missing.jpg"):
        assert sum(name in line for line in errors) == 1, captured.err
    assert "3 of 4 image(s)" in errors[-1]


def test_a_checkpoint_refuses_a_head_of_another_configuration(tmp_path):
    basic = HeadOptimal(preset="basic", num_classes=3, img_feat_dim=8, emb_dim=16, num_heads=2)
    other = HeadOptimal(preset="head_v1", num_classes=3, img_feat_dim=8, emb_dim=16, num_heads=2)
    assert basic.state_dict().keys() == other.state_dict().keys()  # same tensors: load_state_dict alone succeeds
    from protohead.model import model_signature

    path = save_checkpoint(tmp_path / "c.safetensors", basic, metadata={"signature": model_signature(basic)})
    with pytest.raises(ValueError, match=r"another configuration.*→"):
        load_checkpoint(path, other)
    twin = HeadOptimal(preset="basic", num_classes=3, img_feat_dim=8, emb_dim=16, num_heads=2)
    load_checkpoint(path, twin)
    for key, value in basic.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[key], value, equal_nan=True)


@pytest.mark.parametrize(("fmt", "views"), [("onnx", 1), ("torchscript", 1), ("onnx", 8), ("torchscript", 4)])
def test_export_cli_matches_predict(tmp_path, capsys, fmt, views):
    """The exported model decides as predict does: the post-hoc shift, the temperature and, for a run with views
    and test-time averaging, the mean of its views' probabilities."""
    from protohead.export import read_export_metadata, run_exported

    data = split_layout(tmp_path / "data", {"train": {"a": 3, "b": 3}, "val": FULL, "test": FULL})
    rng = np.random.default_rng(0)
    for path in sorted(data.rglob("*.png")):  # images a flip changes (the layout's are uniform squares)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "run"
    assert cli(["train", "--data", str(data), "--out", str(out), f"cache_dir={tmp_path / 'cache'}", *TINY,
                "epochs=2", "posthoc_tau=0.5", f"views={views}"]) == 0
    assert cli(["export", str(out), "--format", fmt]) == 0
    exported = out / "export" / ("model.onnx" if fmt == "onnx" else "model.pt")
    assert str(exported) in capsys.readouterr().out
    meta = read_export_metadata(exported)
    assert meta["class_names"] == ["a", "b"] and meta["posthoc_tau"] == 0.5 and len(meta["views"]) == views
    predictor = load_run(out)
    paths = sorted((data / "test").rglob("*.png"))
    images = predictor.backbone.preprocess([read_image(p) for p in paths]).numpy()
    logits = run_exported(exported, images)
    probs = torch.as_tensor(logits).double().softmax(-1).numpy()  # the shift τ·log π is inside the export
    expected = np.array([[p.probabilities[c] for c in ("a", "b")] for p in predictor.predict(paths)])
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    assert runfolder.own_file(exported.relative_to(out).as_posix())


def test_predict_flags_what_is_not_like_the_training_images(ham_run):
    """The run stores an OOD threshold chosen on validation; noise images score above it, test lesions mostly not."""
    out, cfg = ham_run
    predictor = load_run(out)
    selection = predictor.loaded.selection
    assert selection["ood_method"] == "mahalanobis" and np.isfinite(selection["ood_threshold"])
    assert predictor.head.feature_density.fitted
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (150, 200, 3), dtype=np.uint8) for _ in range(4)]
    flagged = [p.ood for p in predictor.predict(noise)]
    lesions = predictor.predict(list(load_data(cfg).splits["test"].sources[:20]))
    assert all(isinstance(p.ood_score, float) for p in lesions)
    assert sum(flagged) >= 3 and sum(p.ood for p in lesions) <= 5, (flagged, [p.ood_score for p in lesions])


def test_referral_is_set_on_validation_and_predict_applies_it(ham_run, tmp_path):
    """The run refers the images more uncertain than 90 % of validation and those unlike its training images; the
    rule holds on validation, and predict refers exactly the test images metrics.json counts."""
    out, cfg = ham_run
    predictor = load_run(out)
    selection = predictor.loaded.selection
    assert selection["refer_coverage"] == 0.9 and np.isfinite(selection["uncertainty_threshold"])
    on_val = evaluate_run(out, split="val", out_dir=tmp_path / "val")["referral"]
    assert 0 < on_val["referred_uncertain"] <= 0.1  # 84 validation images: 8 above the threshold
    metrics = json.loads((out / "metrics.json").read_text())["referral"]
    assert f"{metrics['referred']:.1%} of test images referred" in (out / "report.md").read_text()
    test = predictor.predict(list(load_data(cfg).splits["test"].sources))
    assert np.mean([p.refer for p in test]) == pytest.approx(metrics["referred"])
    assert np.mean(["uncertain" in p.refer_reasons for p in test]) == pytest.approx(metrics["referred_uncertain"])
    assert all(("uncertain" in p.refer_reasons) == (p.uncertainty > selection["uncertainty_threshold"])
               and ("unlike_training" in p.refer_reasons) == p.ood and p.refer == bool(p.refer_reasons)
               for p in test)
    noise = predictor.predict([np.random.default_rng(1).integers(0, 256, (150, 200, 3), dtype=np.uint8)])
    assert noise[0].refer and "unlike_training" in noise[0].refer_reasons
