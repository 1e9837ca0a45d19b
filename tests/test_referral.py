"""Referral (protohead.referral): the rule and its metrics against a plain loop."""

from __future__ import annotations

import numpy as np
import pytest

from protohead.ood import choose_threshold
from protohead.referral import refer_mask, referral_metrics, referral_reasons


def test_metrics_match_a_loop() -> None:
    rng = np.random.default_rng(0)
    n, names = 300, ["a", "b", "c", "d"]
    labels = rng.choice(3, size=n, p=[0.7, 0.2, 0.1])  # class d absent
    predicted = np.where(rng.random(n) < 0.7, labels, rng.integers(0, 4, n))
    uncertainty = rng.random(n) + 0.3 * (predicted != labels)
    ood_score = rng.normal(size=n)
    selection = {"uncertainty_threshold": choose_threshold(uncertainty[:150], 0.8), "refer_coverage": 0.8,
                 "ood_threshold": 1.5}
    got = referral_metrics(predicted, labels, uncertainty, ood_score, selection, names)
    referred = [u > selection["uncertainty_threshold"] or o > 1.5 for u, o in zip(uncertainty, ood_score, strict=True)]
    kept = [i for i in range(n) if not referred[i]]
    assert got["referred"] == pytest.approx(sum(referred) / n)
    assert got["referred_uncertain"] == pytest.approx(np.mean(uncertainty > selection["uncertainty_threshold"]))
    assert got["referred_unlike_training"] == pytest.approx(np.mean(ood_score > 1.5))
    assert got["decided_accuracy"] == pytest.approx(np.mean([predicted[i] == labels[i] for i in kept]))
    recalls = [np.mean([predicted[i] == c for i in kept if labels[i] == c]) for c in range(3)]
    assert got["decided_balanced_accuracy"] == pytest.approx(np.mean(recalls))
    wrong_referred = [predicted[i] != labels[i] for i in range(n) if referred[i]]
    assert got["referred_error_rate"] == pytest.approx(np.mean(wrong_referred))
    assert got["referred_error_rate"] > 1 - got["decided_accuracy"]  # the uncertain ones are the wrong ones more often
    for c, name in enumerate(names[:3]):
        assert got["referred_by_class"][name] == pytest.approx(np.mean([referred[i] for i in range(n)
                                                                         if labels[i] == c]))
    assert got["referred_by_class"]["d"] is None and got["refer_coverage"] == 0.8


def test_reasons_per_image_and_runs_without_a_rule() -> None:
    selection = {"uncertainty_threshold": 0.4, "ood_threshold": 10.0}
    assert referral_reasons(0.41, 3.0, selection) == ["uncertain"]
    assert referral_reasons(0.40, 10.5, selection) == ["unlike_training"]
    assert referral_reasons(0.9, 11.0, selection) == ["uncertain", "unlike_training"]
    assert referral_reasons(0.1, 1.0, selection) == []
    assert referral_reasons(0.9, 11.0, {"ood_threshold": 10.0}) is None  # a run from before referral
    assert referral_reasons(0.9, 11.0, {"uncertainty_threshold": 0.4}) == ["uncertain"]
    uncertain, unlike = refer_mask(np.array([0.1, 0.5]), None, {"uncertainty_threshold": 0.4, "ood_threshold": 1})
    assert uncertain.tolist() == [False, True] and unlike.tolist() == [False, False]


def test_everything_referred_or_nothing() -> None:
    labels = np.array([0, 1, 1])
    everything = referral_metrics(labels, labels, np.ones(3), None, {"uncertainty_threshold": 0.0}, ["x", "y"])
    assert everything["referred"] == 1 and everything["decided_accuracy"] is None
    assert everything["decided_balanced_accuracy"] is None and everything["referred_error_rate"] == 0
    nothing = referral_metrics(labels, labels, np.zeros(3), None, {"uncertainty_threshold": 0.5}, ["x", "y"])
    assert nothing["referred"] == 0 and nothing["referred_error_rate"] is None and nothing["decided_accuracy"] == 1
