"""Tests for protohead.evaluation (metrics + plots)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from protohead.evaluation import (
    accuracy_at_coverage,
    aurc,
    compute_metrics,
    expected_calibration_error,
    plot_bar_with_errors,
    plot_confusion_matrix,
    plot_heatmap,
    plot_reliability_diagram,
    plot_risk_coverage,
    risk_coverage_curve,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _random_probs(rng: np.random.Generator, n: int, C: int, temp: float = 1.0) -> np.ndarray:
    logits = rng.normal(size=(n, C)) * temp
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- oracles


def ece_oracle(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Plain-loop top-label ECE with equal-width bins (lo, hi]."""
    n = len(labels)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = []
        for i in range(n):
            conf = max(probs[i])
            in_bin = (lo < conf <= hi) or (b == 0 and conf == 0.0)
            if in_bin:
                members.append(i)
        if not members:
            continue
        accs = [1.0 if int(np.argmax(probs[i])) == labels[i] else 0.0 for i in members]
        confs = [max(probs[i]) for i in members]
        total += len(members) / n * abs(sum(accs) / len(members) - sum(confs) / len(members))
    return total


def aurc_oracle(correct: np.ndarray, uncertainty: np.ndarray) -> float:
    """Plain-loop AURC: mean over k of the error rate of the k most confident (stable ties)."""
    n = len(correct)
    order = sorted(range(n), key=lambda i: uncertainty[i])  # Python sort is stable
    risks = []
    for k in range(1, n + 1):
        errs = sum(1 for i in order[:k] if not correct[i])
        risks.append(errs / k)
    return sum(risks) / n


# --------------------------------------------------------------------------- ECE


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_matches_loop_oracle(seed: int, n_bins: int) -> None:
    rng = np.random.default_rng(seed)
    n, C = 200, 5
    probs = _random_probs(rng, n, C, temp=2.0)
    labels = rng.integers(0, C, size=n)
    got = expected_calibration_error(probs, labels, n_bins=n_bins)
    assert got == pytest.approx(ece_oracle(probs, labels, n_bins), abs=1e-12)


def test_ece_bin_boundary_goes_to_lower_bin() -> None:
    # Confidence exactly 0.5 with 2 bins belongs to (0, 0.5] (correct: |1 - 0.5| / 2); the
    # confident wrong sample is alone in (0.5, 1] (|0 - 1| / 2). Total 0.75; pooling both into
    # one bin would give 0.25.
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    labels = np.array([0, 1])
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(ece_oracle(probs, labels, 2))
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.75)


def test_ece_zero_for_perfect_one_hot() -> None:
    labels = np.array([0, 1, 2, 1, 0, 2, 2])
    probs = np.eye(3)[labels]
    assert expected_calibration_error(probs, labels) == 0.0


def test_ece_overconfident_is_positive() -> None:
    labels = np.array([0, 1, 0, 1])
    probs = np.eye(2)[[0, 0, 0, 0]]  # confident, half wrong
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5)


# --------------------------------------------------------------------------- risk–coverage / AURC


@pytest.mark.parametrize("seed", range(10))
def test_aurc_matches_loop_oracle(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    correct = rng.random(n) < 0.7
    # Coarse values to force ties, exercising stable tie-breaking.
    uncertainty = np.round(rng.random(n), 1)
    assert aurc(correct, uncertainty) == pytest.approx(aurc_oracle(correct, uncertainty), abs=1e-12)


def test_risk_coverage_curve_values() -> None:
    correct = np.array([True, False, True, False])
    uncertainty = np.array([0.1, 0.2, 0.2, 0.05])
    cov, risk = risk_coverage_curve(correct, uncertainty)
    # Order: idx3 (wrong), idx0 (right), idx1 (wrong), idx2 (right) -- tie kept in original order.
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [1.0, 0.5, 2 / 3, 0.5])


@pytest.mark.parametrize(("n", "m"), [(10, 0), (10, 3), (50, 10), (7, 7), (1, 1)])
def test_aurc_perfect_ranking_closed_form(n: int, m: int) -> None:
    rng = np.random.default_rng(n * 100 + m)
    correct = np.ones(n, dtype=bool)
    correct[:m] = False
    # Errors get the highest uncertainty; shuffle the sample order.
    uncertainty = np.where(correct, rng.random(n), 1.0 + rng.random(n))
    perm = rng.permutation(n)
    # Optimal AURC: risk is 0 for the first n-m samples, then j / (n - m + j).
    expected = sum(j / (n - m + j) for j in range(1, m + 1)) / n
    assert aurc(correct[perm], uncertainty[perm]) == pytest.approx(expected, abs=1e-12)


def test_aurc_perfect_ranking_approaches_continuous_optimum() -> None:
    n, r = 100_000, 0.2
    m = int(n * r)
    correct = np.arange(n) >= m
    uncertainty = -np.arange(n, dtype=float)  # errors (first m) are least confident
    assert aurc(correct, uncertainty) == pytest.approx(r + (1 - r) * math.log(1 - r), abs=1e-4)


def test_accuracy_at_coverage_hand_made() -> None:
    correct = np.array([True, False, True, True, False, True, True, True, False, True])
    uncertainty = np.array([0.0, 0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 0.7])
    # Sorted by uncertainty: T T T F T T T T F F
    assert accuracy_at_coverage(correct, uncertainty, 0.3) == pytest.approx(1.0)
    assert accuracy_at_coverage(correct, uncertainty, 0.4) == pytest.approx(0.75)
    assert accuracy_at_coverage(correct, uncertainty, 0.7) == pytest.approx(6 / 7)
    assert accuracy_at_coverage(correct, uncertainty, 0.8) == pytest.approx(7 / 8)
    assert accuracy_at_coverage(correct, uncertainty, 0.75) == pytest.approx(7 / 8)  # ceil(7.5)=8
    assert accuracy_at_coverage(correct, uncertainty, 1.0) == pytest.approx(0.7)
    assert accuracy_at_coverage(correct, uncertainty, 0.01) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="coverage"):
        accuracy_at_coverage(correct, uncertainty, 0.0)


def test_accuracy_at_coverage_float_rounding() -> None:
    # 0.07 * 100 == 7.000000000000001 in floating point; must still select 7 samples, not 8.
    correct = np.array([True] * 7 + [False] * 93)
    uncertainty = np.arange(100, dtype=float)
    assert accuracy_at_coverage(correct, uncertainty, 0.07) == 1.0


def accuracy_at_coverage_oracle(correct: np.ndarray, uncertainty: np.ndarray, coverage: float) -> float:
    n = len(correct)
    k = math.ceil(round(coverage * n, 9))
    order = sorted(range(n), key=lambda i: uncertainty[i])  # stable
    return sum(bool(correct[i]) for i in order[:k]) / k


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_at_coverage_matches_oracle_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    correct = rng.random(n) < 0.6
    uncertainty = np.round(rng.random(n), 1)  # many ties -> exercises stable ordering
    for cov in (0.05, 0.25, 0.5, 0.8, 0.9, 1.0):
        got = accuracy_at_coverage(correct, uncertainty, cov)
        assert got == pytest.approx(accuracy_at_coverage_oracle(correct, uncertainty, cov), abs=1e-12)


# --------------------------------------------------------------------------- compute_metrics

EXPECTED_KEYS = {
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "per_class_recall",
    "macro_auroc",
    "auroc_classes",
    "ece",
    "nll",
    "aurc",
    "augrc",
    "accuracy_at_80_coverage",
    "accuracy_at_90_coverage",
    "confusion_matrix",
    "num_samples",
    "uncertainty_source",
}


@pytest.mark.parametrize("seed", range(3))
def test_compute_metrics_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, C = 300, 6
    labels = rng.integers(0, C, size=n)
    probs = _random_probs(rng, n, C)
    probs[np.arange(n), labels] += 0.3 * rng.random(n)  # make it better than chance
    probs /= probs.sum(axis=1, keepdims=True)
    pred = probs.argmax(axis=1)
    out = compute_metrics(probs, labels)
    assert set(out) == EXPECTED_KEYS
    assert out["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert out["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert out["num_samples"] == n
    assert out["uncertainty_source"] == "max_softmax"
    assert out["aurc"] == pytest.approx(aurc_oracle(pred == labels, 1 - probs.max(axis=1)))
    assert out["ece"] == pytest.approx(ece_oracle(probs, labels, 15))
    cm = np.array(out["confusion_matrix"])
    assert cm.shape == (C, C) and cm.sum() == n and np.trace(cm) == (pred == labels).sum()
    recalls = [out["per_class_recall"][str(c)] for c in range(C)]
    assert np.mean(recalls) == pytest.approx(out["balanced_accuracy"])
    assert 0.5 < out["macro_auroc"] <= 1.0
    json.dumps(out, allow_nan=False)


def test_compute_metrics_given_uncertainty_and_names_json() -> None:
    rng = np.random.default_rng(0)
    n, C = 40, 3
    labels = rng.integers(0, C, size=n)
    labels[:3] = [0, 1, 2]
    probs = _random_probs(rng, n, C)
    unc = rng.random(n)
    out = compute_metrics(probs, labels, uncertainty=unc, class_names=["nv", "mel", "bcc"])
    assert set(out) == EXPECTED_KEYS
    assert out["uncertainty_source"] == "given"
    assert set(out["per_class_recall"]) == {"nv", "mel", "bcc"}
    assert out["aurc"] == pytest.approx(aurc_oracle(probs.argmax(1) == labels, unc))
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text)["num_samples"] == n


def test_compute_metrics_absent_class_auroc() -> None:
    rng = np.random.default_rng(1)
    n, C = 60, 4
    labels = rng.choice([0, 1, 3], size=n)  # class 2 absent
    labels[:3] = [0, 1, 3]
    probs = _random_probs(rng, n, C)
    out = compute_metrics(probs, labels, class_names=["a", "b", "c", "d"])
    assert out["auroc_classes"] == ["a", "b", "d"]
    assert out["per_class_recall"]["c"] is None
    assert out["macro_auroc"] is not None and 0.0 <= out["macro_auroc"] <= 1.0
    json.dumps(out, allow_nan=False)


def test_compute_metrics_tolerates_small_row_sum_error() -> None:
    probs = np.array([[0.7, 0.3005], [0.2, 0.8]])
    out = compute_metrics(probs, np.array([0, 1]))
    assert out["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (np.array([[np.nan, 1.0], [0.5, 0.5]]), np.array([0, 1]), "non-finite"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([0, 2]), "out of range"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([-1, 0]), "out of range"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([0, 1, 1]), "length mismatch"),
        (np.array([[0.6, 0.6], [0.5, 0.5]]), np.array([0, 1]), "sum to 1"),
        (np.array([0.5, 0.5]), np.array([0]), "2-D"),
        (np.array([[1.2, -0.2], [0.5, 0.5]]), np.array([0, 1]), "negative"),
        (np.zeros((0, 3)), np.array([], dtype=int), "at least one"),
    ],
)
def test_compute_metrics_invalid_inputs(probs: np.ndarray, labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(probs, labels)


def test_compute_metrics_uncertainty_length_mismatch() -> None:
    probs = np.array([[0.5, 0.5], [0.2, 0.8]])
    with pytest.raises(ValueError, match="length mismatch"):
        compute_metrics(probs, np.array([0, 1]), uncertainty=np.array([0.1]))


# --------------------------------------------------------------------------- plots


def _assert_png(path: Path) -> None:
    assert path.exists()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert im.format == "PNG"
    assert 200 <= w <= 5000 and 200 <= h <= 5000
    # No leftover temp files from the atomic write.
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_plots_write_valid_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n, C = 100, 4
    labels = rng.integers(0, C, size=n)
    probs = _random_probs(rng, n, C, temp=2.0)
    correct = probs.argmax(1) == labels
    unc = 1 - probs.max(1)
    cm = np.array(compute_metrics(probs, labels)["confusion_matrix"])
    names = ["a", "b", "c", "d"]

    paths = [
        plot_confusion_matrix(cm, names, tmp_path / "cm.png"),
        plot_confusion_matrix(cm, names, tmp_path / "cm_raw.png", normalize=False),
        plot_reliability_diagram(probs, labels, tmp_path / "rel.png"),
        plot_risk_coverage(correct, unc, tmp_path / "rc.png", label="ce"),
        plot_risk_coverage({"ce": (correct, unc), "random": (correct, rng.random(n))}, tmp_path / "rc2.png"),
        plot_bar_with_errors(
            names,
            [0.1, 0.5, 0.7, 0.9],
            [0.01, None, 0.05, float("nan")],
            tmp_path / "sub" / "bar.png",
            ylabel="Balanced accuracy",
        ),
        plot_heatmap(rng.random((3, 4)), ["x", "y", "z"], names, tmp_path / "heat.png", title="Comparison"),
    ]
    for p in paths:
        assert isinstance(p, Path)
        _assert_png(p)


def test_plot_overwrites_existing_file(tmp_path: Path) -> None:
    dest = tmp_path / "hm.png"
    dest.write_bytes(b"not a png")
    out = plot_heatmap(np.eye(2), ["r0", "r1"], ["c0", "c1"], dest, title="t")
    assert out == dest
    _assert_png(dest)


def test_plots_do_not_change_pyplot_backend() -> None:
    import matplotlib

    before = matplotlib.get_backend()
    import protohead.evaluation.plots  # noqa: F401

    assert matplotlib.get_backend() == before
