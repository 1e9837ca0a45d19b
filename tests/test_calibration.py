"""Tests for temperature scaling, prior-aware probabilities, AUGRC and the before/after reliability plot."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import log_loss

from protohead.evaluation import (
    apply_temperature,
    augrc,
    aurc,
    compute_metrics,
    fit_temperature,
    generalized_risk_coverage_curve,
    plot_reliability_before_after,
    prior_aware_confidence,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _synthetic(seed: int, n: int, C: int, t_true: float, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z, labels drawn from softmax(z / t_true): softmax(z) is over-confident by exactly t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, C)) * scale
    p_true = _softmax(z / t_true)
    u = rng.random(n)[:, None]
    labels = np.minimum((u > np.cumsum(p_true, axis=1)).sum(axis=1), C - 1)
    return z, labels


# --------------------------------------------------------------------------- temperature scaling


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_temperature_recovers_known_temperature(seed: int) -> None:
    z, labels = _synthetic(seed, n=20_000, C=5, t_true=2.0)
    probs = _softmax(z)
    t = fit_temperature(probs, labels)
    assert t == pytest.approx(2.0, rel=0.10)
    # Logits and probabilities give the same fit (softmax is shift-invariant).
    assert fit_temperature(z, labels, from_logits=True) == pytest.approx(t, rel=1e-4)


def test_fit_temperature_sharpens_under_confident_outputs() -> None:
    z, labels = _synthetic(2, n=20_000, C=4, t_true=0.5, scale=1.0)
    assert fit_temperature(_softmax(z), labels) == pytest.approx(0.5, rel=0.10)


def test_fit_temperature_lowers_nll_and_keeps_argmax() -> None:
    z, labels = _synthetic(3, n=3_000, C=6, t_true=1.7)
    probs = _softmax(z)
    t = fit_temperature(probs, labels)
    after = apply_temperature(probs, t)
    nll_before = log_loss(labels, probs, labels=list(range(6)))
    nll_after = log_loss(labels, after, labels=list(range(6)))
    assert nll_after <= nll_before
    np.testing.assert_array_equal(after.argmax(1), probs.argmax(1))
    np.testing.assert_allclose(after.sum(1), 1.0, atol=1e-12)
    # The fitted T is a minimum: nudging it either way does not lower the NLL.
    for factor in (0.95, 1.05):
        nudged = log_loss(labels, apply_temperature(probs, t * factor), labels=list(range(6)))
        assert nudged >= nll_after - 1e-12


def test_fit_temperature_is_deterministic() -> None:
    z, labels = _synthetic(4, n=500, C=3, t_true=1.3)
    probs = _softmax(z)
    assert fit_temperature(probs, labels) == fit_temperature(probs.copy(), labels.copy())


def test_fit_temperature_degenerate_inputs_return_one_or_a_bound() -> None:
    # Constant rows: the NLL does not depend on T -> the identity.
    assert fit_temperature(np.full((4, 3), 1 / 3), np.array([0, 1, 2, 0])) == 1.0
    # One class: every temperature gives NLL 0 -> the identity.
    assert fit_temperature(np.ones((3, 1)), np.zeros(3, dtype=int)) == 1.0
    # All correct with a margin: sharper is always better -> the lower bound.
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.9, 0.1]])
    assert fit_temperature(probs, np.array([0, 1, 0]), bounds=(0.05, 20.0)) == pytest.approx(0.05, rel=1e-3)


def test_fit_temperature_handles_zero_probabilities() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.4], [0.2, 0.8]])
    t = fit_temperature(probs, np.array([0, 1, 1, 1]))
    assert math.isfinite(t) and t > 0


def test_apply_temperature_identity_and_softening() -> None:
    rng = np.random.default_rng(5)
    probs = _softmax(rng.normal(size=(20, 4)) * 2)
    same = apply_temperature(probs, 1.0)
    assert np.array_equal(same, probs) and same is not probs
    soft = apply_temperature(probs, 3.0)
    assert np.all(soft.max(1) < probs.max(1))
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(soft, _softmax(np.log(probs) / 3.0), atol=1e-12)
    logits = rng.normal(size=(5, 3))
    np.testing.assert_allclose(apply_temperature(logits, 2.0, from_logits=True), _softmax(logits / 2.0), atol=1e-12)
    np.testing.assert_allclose(apply_temperature(logits, 1.0, from_logits=True), _softmax(logits), atol=1e-12)


@pytest.mark.parametrize(
    ("probs", "labels", "kwargs", "match"),
    [
        (np.zeros((0, 3)), np.array([], dtype=int), {}, "at least one"),
        (np.zeros((0, 3)), np.array([], dtype=int), {"from_logits": True}, "at least one"),
        (np.array([[np.nan, 1.0], [0.5, 0.5]]), np.array([0, 1]), {}, "non-finite"),
        (np.array([[np.inf, 1.0], [0.5, 0.5]]), np.array([0, 1]), {"from_logits": True}, "non-finite"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([0, 2]), {}, "out of range"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([0, 1, 1]), {}, "length mismatch"),
        (np.array([[0.6, 0.6], [0.5, 0.5]]), np.array([0, 1]), {}, "sum to 1"),
        (np.array([0.5, 0.5]), np.array([0]), {}, "2-D"),
        (np.array([[0.5, 0.5]]), np.array([0]), {"bounds": (2.0, 5.0)}, "bounds"),
        (np.array([[0.5, 0.5]]), np.array([0]), {"bounds": (0.0, 5.0)}, "bounds"),
    ],
)
def test_fit_temperature_bad_inputs_raise(probs: np.ndarray, labels: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_temperature(probs, labels, **kwargs)


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
def test_apply_temperature_bad_temperature_raises(t: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(np.array([[0.5, 0.5]]), t)


# --------------------------------------------------------------------------- prior-aware probabilities


def test_prior_aware_confidence_matches_hand_formula() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    counts = np.array([60, 30, 0])  # zero count is counted as one
    prior = np.array([60.0, 30.0, 1.0]) / 91.0
    expected = probs * prior / (probs * prior).sum(axis=1, keepdims=True)
    got = prior_aware_confidence(probs, counts)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-12)
    # The uniform row becomes the prior itself.
    np.testing.assert_allclose(got[2], prior, rtol=1e-12)


def test_prior_aware_confidence_not_balanced_and_uniform_counts_are_identity() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    np.testing.assert_array_equal(prior_aware_confidence(probs, [5, 1, 1], balanced=False), probs)
    np.testing.assert_allclose(prior_aware_confidence(probs, [7, 7, 7]), probs, rtol=1e-12)


@pytest.mark.parametrize(
    ("counts", "match"),
    [([1, 2], "shape"), ([1, -2, 3], "non-negative"), ([1, float("nan"), 3], "finite")],
)
def test_prior_aware_confidence_bad_counts_raise(counts: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        prior_aware_confidence(np.array([[0.5, 0.3, 0.2]]), counts)


# --------------------------------------------------------------------------- AUGRC


def augrc_oracle(correct: np.ndarray, uncertainty: np.ndarray) -> float:
    """Plain loop over the n + 1 acceptance thresholds (accept the k most confident, stable ties), trapezoid rule
    over the points (k/n, accepted-and-wrong / n), k = 0..n."""
    n = len(correct)
    order = sorted(range(n), key=lambda i: uncertainty[i])  # Python sort is stable
    points = []
    for k in range(n + 1):
        wrong = sum(1 for i in order[:k] if not correct[i])
        points.append((k / n, wrong / n))
    area = 0.0
    for (c0, g0), (c1, g1) in itertools.pairwise(points):
        area += (c1 - c0) * (g0 + g1) / 2
    return area


def augrc_threshold_oracle(correct: np.ndarray, uncertainty: np.ndarray) -> float:
    """Reference-style curve: one point per distinct threshold t (accept u <= t) plus the origin, trapezoid rule.
    Tied samples enter together; without ties this is the same curve as :func:`augrc_oracle`."""
    n = len(correct)
    cov, risk = [0.0], [0.0]
    for t in sorted(set(uncertainty.tolist())):
        accepted = uncertainty <= t
        cov.append(accepted.sum() / n)
        risk.append((accepted & ~correct).sum() / n)
    return float(np.trapezoid(risk, cov)) if hasattr(np, "trapezoid") else float(np.trapz(risk, cov))


@pytest.mark.parametrize("seed", range(10))
def test_augrc_matches_loop_oracle(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    correct = rng.random(n) < 0.7
    tied = np.round(rng.random(n), 1)  # coarse values force ties (stable tie-breaking, as aurc)
    assert augrc(correct, tied) == pytest.approx(augrc_oracle(correct, tied), abs=1e-12)
    distinct = rng.permutation(n).astype(float) + rng.random(n) * 0.5
    assert augrc(correct, distinct) == pytest.approx(augrc_oracle(correct, distinct), abs=1e-12)
    assert augrc(correct, distinct) == pytest.approx(augrc_threshold_oracle(correct, distinct), abs=1e-12)
    assert 0.0 <= augrc(correct, tied) <= aurc(correct, tied) + 1e-15


def test_generalized_risk_coverage_curve_values() -> None:
    correct = np.array([True, False, True, False])
    uncertainty = np.array([0.1, 0.2, 0.2, 0.05])
    cov, g = generalized_risk_coverage_curve(correct, uncertainty)
    # Order: idx3 (wrong), idx0 (right), idx1 (wrong), idx2 (right) -- tie kept in original order.
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(g, [0.25, 0.25, 0.5, 0.5])
    # Trapezoid over (0,0), (.25,.25), (.5,.25), (.75,.5), (1,.5).
    assert augrc(correct, uncertainty) == pytest.approx(0.25 * (0.125 + 0.25 + 0.375 + 0.5))


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_augrc_hand_cases(n: int) -> None:
    rng = np.random.default_rng(n)
    u = rng.random(n)
    assert augrc(np.ones(n, dtype=bool), u) == 0.0
    assert augrc(np.zeros(n, dtype=bool), u) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize(("n", "m"), [(10, 0), (10, 3), (50, 10), (7, 7), (1, 1)])
def test_augrc_perfect_and_reversed_ranking_closed_form(n: int, m: int) -> None:
    rng = np.random.default_rng(n * 100 + m)
    correct = np.ones(n, dtype=bool)
    correct[:m] = False
    err = m / n
    perm = rng.permutation(n)
    best = np.where(correct, rng.random(n), 1.0 + rng.random(n))  # errors least confident
    worst = -best  # errors most confident
    assert augrc(correct[perm], best[perm]) == pytest.approx(err**2 / 2, abs=1e-12)
    assert augrc(correct[perm], worst[perm]) == pytest.approx(err - err**2 / 2, abs=1e-12)


def test_compute_metrics_reports_augrc() -> None:
    rng = np.random.default_rng(0)
    n, C = 120, 4
    labels = rng.integers(0, C, size=n)
    probs = _softmax(rng.normal(size=(n, C)) * 2)
    out = compute_metrics(probs, labels)
    correct = probs.argmax(1) == labels
    assert out["augrc"] == pytest.approx(augrc_oracle(correct, 1 - probs.max(1)), abs=1e-12)
    unc = rng.random(n)
    assert compute_metrics(probs, labels, uncertainty=unc)["augrc"] == pytest.approx(augrc_oracle(correct, unc))


# --------------------------------------------------------------------------- plot


def test_plot_reliability_before_after_writes_png(tmp_path: Path) -> None:
    z, labels = _synthetic(6, n=600, C=4, t_true=2.0)
    before = _softmax(z)
    after = apply_temperature(before, fit_temperature(before, labels))
    out = plot_reliability_before_after(before, after, labels, tmp_path / "sub" / "rel_ba.png", n_bins=10)
    assert out == tmp_path / "sub" / "rel_ba.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        im.verify()
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(ValueError, match="length mismatch"):
        plot_reliability_before_after(before, after[:-1], labels, tmp_path / "bad.png")
