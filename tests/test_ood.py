"""protohead.ood: the pure scores and metrics on hand-computed cases; ``protohead evaluate --ood`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_curve
from test_cli_errors import FULL, TINY, split_layout

from protohead.cli.main import main as cli
from protohead.ood import (
    HeadOutputs,
    choose_threshold,
    energy_score,
    image_files,
    max_probability_score,
    ood_metrics,
    ood_scores,
)
from protohead.predict import load_run

NEG = -math.inf


def test_max_similarity_ignores_unused_slots():
    sims = np.array([[[0.9, NEG], [0.2, 0.1]],
                     [[NEG, NEG], [-0.3, 0.4]]])  # (n=2, C=2, M=2)
    np.testing.assert_allclose(ood_scores(sims, "max_similarity"), [0.1, 0.6])


def test_prototype_energy_is_a_soft_maximum():
    sims = np.array([[[0.5, NEG], [0.5, NEG]]])  # two valid slots of similarity 0.5
    t = 0.1
    np.testing.assert_allclose(ood_scores(sims, "energy", temperature=t), [-(0.5 + t * math.log(2))])
    # T → 0: −max similarity, the same ranking as max_similarity
    rng = np.random.default_rng(0)
    sims = rng.uniform(-1, 1, size=(50, 3, 4))
    sims[:, :, 3] = NEG
    np.testing.assert_allclose(ood_scores(sims, "energy", temperature=1e-4),
                               ood_scores(sims, "max_similarity") - 1.0, atol=1e-3)


def test_prototype_scores_refuse_bad_input():
    with pytest.raises(ValueError, match="no valid prototype"):
        ood_scores(np.full((1, 2, 2), NEG))
    with pytest.raises(ValueError, match=r"\(n, C, M\)"):
        ood_scores(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        ood_scores(np.full((1, 1, 1), np.nan))
    with pytest.raises(ValueError, match="unknown prototype OOD method"):
        ood_scores(np.zeros((1, 1, 1)), "mahalanobis")
    with pytest.raises(ValueError, match="temperature"):
        ood_scores(np.zeros((1, 1, 1)), "energy", temperature=0)


def test_logit_energy_and_max_probability():
    logits = np.array([[0.0, 0.0], [10.0, -10.0]])
    np.testing.assert_allclose(energy_score(logits), [-math.log(2), -(10 + math.log1p(math.exp(-20)))])
    np.testing.assert_allclose(energy_score(logits, temperature=2.0), -2 * np.log(np.exp(logits / 2).sum(1)))
    np.testing.assert_allclose(max_probability_score(np.array([[0.5, 0.5], [0.9, 0.1]])), [0.5, 0.1])


def test_threshold_accepts_the_requested_fraction():
    scores = np.arange(1, 21, dtype=float)  # 1 … 20
    assert choose_threshold(scores, 0.95) == 19.0  # 19 of 20 ≤ 19
    assert choose_threshold(scores, 0.5) == 10.0
    assert choose_threshold(scores, 1.0) == 20.0
    assert choose_threshold(scores[::-1], 0.96) == 20.0  # ⌈19.2⌉ = 20 images needed; order does not matter
    rng = np.random.default_rng(1)
    many = rng.normal(size=1001)
    t = choose_threshold(many, 0.95)
    assert np.mean(many <= t) >= 0.95 and np.mean(many < t) < 0.95
    with pytest.raises(ValueError, match="acceptance"):
        choose_threshold(scores, 0.0)
    with pytest.raises(ValueError, match="no in-distribution"):
        choose_threshold([], 0.95)


def test_metrics_of_separated_and_identical_distributions():
    perfect = ood_metrics([0.1, 0.2, 0.3], [0.7, 0.8])
    assert perfect["auroc"] == 1.0 and perfect["fpr95"] == 0.0
    assert ood_metrics([0.7, 0.8], [0.1, 0.2, 0.3])["auroc"] == 0.0  # reversed: all OOD accepted
    assert ood_metrics([0.7, 0.8], [0.1, 0.2, 0.3])["fpr95"] == 1.0
    rng = np.random.default_rng(2)
    same = ood_metrics(rng.normal(size=20000), rng.normal(size=20000))
    assert abs(same["auroc"] - 0.5) < 0.02
    assert abs(same["fpr95"] - 0.95) < 0.01
    tied = ood_metrics(np.zeros(10), np.zeros(10))  # ties: AUROC ½, every OOD accepted
    assert tied["auroc"] == 0.5 and tied["fpr95"] == 1.0


def test_fpr95_matches_the_roc_curve_convention():
    rng = np.random.default_rng(3)
    ins, outs = rng.normal(0, 1, 500), rng.normal(1.5, 1, 300)
    # in-distribution positive, score = −OOD score: FPR at the first threshold with TPR ≥ 95 %
    labels = np.concatenate([np.ones(500), np.zeros(300)])
    fpr, tpr, _ = roc_curve(labels, -np.concatenate([ins, outs]))
    expected = fpr[np.searchsorted(tpr, 0.95)]
    assert ood_metrics(ins, outs)["fpr95"] == pytest.approx(expected)


def test_metrics_at_a_threshold():
    result = ood_metrics([0.1, 0.2, 0.3, 0.4], [0.25, 0.5, 0.6], threshold=0.3)
    assert result["detection_rate"] == pytest.approx(2 / 3)
    assert result["in_acceptance"] == 0.75  # 0.1, 0.2, 0.3 ≤ 0.3; 0.4 > 0.3
    assert result["n_in"] == 4 and result["n_out"] == 3
    with pytest.raises(ValueError, match="finite"):
        ood_metrics([0.1, math.inf], [0.2])
    with pytest.raises(ValueError, match="no OOD"):
        ood_metrics([0.1], [])


def test_image_files_are_found_recursively(tmp_path):
    for name in ("a.JPG", "sub/b.png", "sub/deeper/c.tiff", "sub/d.bmp", "e.jpeg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    for name in ("notes.txt", ".hidden.png", ".cache/f.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path)]
    assert found == ["a.JPG", "e.jpeg", "sub/b.png", "sub/d.bmp", "sub/deeper/c.tiff"]
    with pytest.raises(ValueError, match="does not exist"):
        image_files(tmp_path / "nope")


def test_evaluate_ood_end_to_end(tmp_path, capsys, monkeypatch):
    data = split_layout(tmp_path / "data", {"train": FULL, "val": FULL, "test": FULL})
    run = tmp_path / "run"
    assert cli(["train", "--data", str(data), "--out", str(run), f"cache_dir={tmp_path / 'cache'}", *TINY]) == 0
    ood = tmp_path / "ood"
    rng = np.random.default_rng(0)
    for i in range(4):
        (ood / "noise").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(ood / "noise" / f"{i}.png")
    (ood / "broken.png").write_bytes(b"this is not a png")
    capsys.readouterr()

    assert cli(["evaluate", str(run), "--ood", str(ood)]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "warning" in captured.err
    printed = json.loads(captured.out)
    assert printed["method"] == "mahalanobis" and math.isfinite(printed["auroc"])  # the run fitted its density
    assert printed["counts"] == {"in_distribution": 4, "validation": 4, "ood": 4, "unreadable": 1}

    out = run / "ood-ood"
    result = json.loads((out / "ood.json").read_text())
    assert 0.0 <= result["auroc"] <= 1.0 and 0.0 <= result["fpr95"] <= 1.0
    assert set(result["methods"]) == {"mahalanobis", "max_similarity", "energy", "logit_energy", "max_probability"}
    assert [Path(item["path"]).name for item in result["unreadable"]] == ["broken.png"]
    assert (out / "ood_histogram.png").stat().st_size > 0 and (out / "ood_roc.png").stat().st_size > 0
    assert len((out / "ood_scores.csv").read_text().splitlines()) == 1 + 4 + 4
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # referral under the run's own thresholds: its OOD part is the headline flag, the uncertain part what predict says
    referral = printed["referral"]
    assert referral == result["referral"] and set(referral) == {"test", "ood"}
    assert referral["ood"]["referred_unlike_training"] == pytest.approx(result["detection_rate"])
    assert referral["test"]["referred_unlike_training"] == pytest.approx(1 - result["in_acceptance"])
    noise = sorted((ood / "noise").iterdir())
    predictions = load_run(run).predict(noise)
    assert referral["ood"]["referred"] == pytest.approx(np.mean([p.refer for p in predictions]))
    assert referral["ood"]["referred_uncertain"] == pytest.approx(np.mean(["uncertain" in p.refer_reasons
                                                                             for p in predictions]))

    # a run from before heads fitted their density: run_scoring(fit_density=True) fits it in memory, as training did
    from protohead import runfolder
    from protohead.ood import run_scoring

    _, _, stored = run_scoring(run)
    real_load = runfolder.load_model

    def load_unfitted(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        loaded.model.feature_density.means = loaded.model.feature_density.whitening = None
        return loaded

    monkeypatch.setattr(runfolder, "load_model", load_unfitted)
    _, _, unfitted = run_scoring(run)
    assert unfitted.feature_distances is None and "mahalanobis" not in unfitted.methods
    predictor, _, refitted = run_scoring(run, fit_density=True)
    assert predictor.head.feature_density.fitted and refitted.default_method == "mahalanobis"
    np.testing.assert_allclose(refitted.feature_distances, stored.feature_distances, rtol=1e-4)
    monkeypatch.undo()

    # a given threshold and method, another output folder
    assert cli(["evaluate", str(run), "--ood", str(ood), "--out", str(tmp_path / "o2"),
                "--ood-method", "max_similarity", "--ood-threshold", "0.5"]) == 0
    again = json.loads((tmp_path / "o2" / "ood.json").read_text())
    assert again["method"] == "max_similarity" and again["threshold"] == 0.5 and again["threshold_source"] == "given"

    # nothing readable, or nothing at all: exit 2 with one line
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"nope")
    capsys.readouterr()
    assert cli(["evaluate", str(run), "--ood", str(only_bad)]) == 2
    assert "none of the 1 image files" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli(["evaluate", str(run), "--ood", str(tmp_path / "empty")]) == 2
    assert "no image files" in capsys.readouterr().err


def test_ood_scoring_averages_the_views_as_predictions_do(tmp_path):
    """A run with views and test-time averaging: the scored split's probabilities, uncertainty and feature distance
    are those predict reports (averaged over the views), so evaluate --ood measures the run's own rule."""
    from protohead.ood import run_scoring

    data = split_layout(tmp_path / "data", {"train": FULL, "val": FULL, "test": FULL})
    rng = np.random.default_rng(0)
    for path in sorted(data.rglob("*.png")):  # images a flip changes
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    run = tmp_path / "run"
    assert cli(["train", "--data", str(data), "--out", str(run), f"cache_dir={tmp_path / 'cache'}", *TINY,
                "views=4"]) == 0
    predictor, _, scored = run_scoring(run)
    predictions = predictor.predict([str(data / source) for source in scored.sources])
    expected = np.array([[p.probabilities[c] for c in ("a", "b")] for p in predictions])
    # (predict also applies the calibration temperature; the arg-max and the uncertainty do not depend on it)
    assert (scored.probabilities.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(scored.uncertainty, [p.uncertainty for p in predictions], atol=1e-5)
    np.testing.assert_allclose(scored.feature_distances, [p.ood_score for p in predictions], rtol=1e-4)
    np.testing.assert_allclose(scored.ood_score, [p.ood_score for p in predictions], rtol=1e-4)
    assert predictor.views == ("identity", "hflip", "vflip", "rot180")
    arrays = [np.asarray(Image.open(data / source).convert("RGB")) for source in scored.sources]
    with torch.no_grad():
        identity = predictor.loaded.model(*predictor.features(arrays))[2]["feature_distance"].double().numpy()
    assert np.abs(identity - scored.feature_distances).max() > 1e-3 * np.abs(identity).max()  # the views matter here


def test_evaluate_without_ood_is_unchanged_and_ood_options_need_ood(tmp_path, capsys):
    data = split_layout(tmp_path / "data", {"train": FULL, "val": FULL, "test": FULL})
    run = tmp_path / "run"
    assert cli(["train", "--data", str(data), "--out", str(run), f"cache_dir={tmp_path / 'cache'}", *TINY,
                "--preset", "linear"]) == 0
    capsys.readouterr()
    assert cli(["evaluate", str(run)]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"accuracy", "balanced_accuracy", "macro_f1", "ece"}
    assert cli(["evaluate", str(run), "--ood-threshold", "0.5"]) == 2
    assert "need --ood" in capsys.readouterr().err

    # a baseline has no prototypes: the class-level scores only
    ood = tmp_path / "ood"
    ood.mkdir()
    for i in range(3):
        Image.fromarray(np.full((9, 9, 3), 50 * i, dtype=np.uint8)).save(ood / f"{i}.bmp")
    assert cli(["evaluate", str(run), "--ood", str(ood)]) == 0
    result = json.loads((run / "ood-ood" / "ood.json").read_text())
    assert result["method"] == "mahalanobis"
    assert set(result["methods"]) == {"mahalanobis", "logit_energy", "max_probability"}


def test_head_outputs_without_prototypes_refuse_prototype_scores():
    outputs = HeadOutputs(np.array([[2.0, 0.0]]), np.array([[0.8, 0.2]]), None, ["x"])
    assert outputs.methods == ("logit_energy", "max_probability") and outputs.default_method == "logit_energy"
    np.testing.assert_allclose(outputs.scores("max_probability"), [0.2])
    with pytest.raises(ValueError, match="needs the head's fitted feature density"):
        outputs.scores("mahalanobis")
    fitted = HeadOutputs(outputs.logits, outputs.probabilities, None, ["x"], np.array([7.0]))
    assert fitted.methods == ("mahalanobis", "logit_energy", "max_probability")
    assert fitted.default_method == "mahalanobis"
    np.testing.assert_allclose(fitted.scores("mahalanobis"), [7.0])
    with pytest.raises(ValueError, match="needs prototype similarities"):
        outputs.scores("energy")
    with pytest.raises(ValueError, match="unknown OOD method"):
        outputs.scores("odin")
