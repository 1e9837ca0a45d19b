"""Post-hoc logit adjustment: the shift itself and the validation rule that picks τ."""

from __future__ import annotations

import numpy as np
import pytest

from protohead.posthoc import adjust_probabilities, balanced_accuracy, choose_prior_shift


def test_adjustment_is_the_prior_shift_of_the_log_probabilities():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=5)
    counts = [80, 15, 5]
    assert adjust_probabilities(probs, counts, 0.0) is probs
    shifted = adjust_probabilities(probs, counts, 0.5)
    prior = np.asarray(counts) / 100
    want = probs / prior**0.5
    np.testing.assert_allclose(shifted, want / want.sum(1, keepdims=True), rtol=1e-12)
    # the one prior rule: a class without training samples counts as one
    np.testing.assert_allclose(adjust_probabilities(probs, [80, 0, 5], 0.5), adjust_probabilities(probs, [80, 1, 5],
                                                                                                  0.5), rtol=1e-12)
    with pytest.raises(ValueError, match="non-negative counts"):
        adjust_probabilities(probs, [80, -1, 5], 0.5)


def test_tau_is_the_best_balanced_accuracy_within_the_accuracy_tolerance():
    # 90 majority samples sure of class 0; 10 minority samples whose class-1 probability grows with i:
    # shifting towards class 1 first recovers minority samples, then starts to lose majority ones.
    majority = np.tile([0.7, 0.3], (90, 1))
    majority[:5] = [0.55, 0.45]  # five majority samples flip at a moderate τ
    minority = np.stack([1 - np.linspace(0.05, 0.45, 10), np.linspace(0.05, 0.45, 10)], axis=1)
    probs, labels = np.concatenate([majority, minority]), np.array([0] * 90 + [1] * 10)
    counts = [900, 100]
    strict = choose_prior_shift(probs, labels, counts, tolerance=0.0)
    loose = choose_prior_shift(probs, labels, counts, tolerance=0.05)
    base = choose_prior_shift(probs, labels, counts, tolerance=0.0, grid=(0.0,))
    assert base.tau == 0.0 and base.accuracy == pytest.approx(0.9)
    assert strict.accuracy >= base.accuracy and strict.balanced_accuracy >= base.balanced_accuracy
    assert loose.accuracy >= base.accuracy - 0.05 and loose.balanced_accuracy > strict.balanced_accuracy
    assert loose.tau > strict.tau
    # reported scores are those of the shifted probabilities
    adjusted = adjust_probabilities(probs, counts, loose.tau)
    assert loose.balanced_accuracy == pytest.approx(balanced_accuracy(adjusted, labels))
