"""Referral: the cases a run should not decide on its own, at an operating point chosen on validation. numpy only.

A safety-critical classifier is used with a rule for handing a case to a person. A run refers an image when

- its uncertainty (what the run reports, :func:`protohead.posthoc.final_outputs`: the abstention probability, or
  1 − the real-prior probability of the class it predicts) is above the threshold that ``refer_coverage`` of the
  validation images stay under (``"uncertain"``: a hard case), or
- its ``ood_score`` is above the run's out-of-distribution threshold (``"unlike_training"``: not like the
  training lesions — another kind of image, or an unfamiliar one).

Both thresholds are quantiles of the validation split's scores (:func:`protohead.ood.choose_threshold`), so on
validation at least ``refer_coverage`` of the images pass the first test and 95 % the second; what the pair does on
test — how many are referred, how accurate the decided ones are, which classes are referred — is
:func:`referral_metrics`, reported in every run's ``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

UNCERTAIN = "uncertain"
UNLIKE_TRAINING = "unlike_training"


def referral_reasons(uncertainty: float, ood_score: float | None, selection: dict[str, Any]) -> list[str] | None:
    """Why one image is referred (``[]``: the run decides it) under the thresholds of a run's ``selection`` record;
    ``None`` when the run has no uncertainty threshold (trained before referral existed)."""
    if selection.get("uncertainty_threshold") is None:
        return None
    uncertain, unlike = refer_mask(np.array([uncertainty]), None if ood_score is None else np.array([ood_score]),
                                   selection)
    return [reason for reason, flagged in ((UNCERTAIN, uncertain[0]), (UNLIKE_TRAINING, unlike[0])) if flagged]


def refer_mask(uncertainty: np.ndarray, ood_score: np.ndarray | None,
               selection: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(n,) uncertainties and OOD scores → (uncertain (n,) bool, unlike_training (n,) bool) under ``selection``'s
    thresholds (``KeyError`` without an uncertainty threshold; no OOD threshold or scores: nothing is unlike)."""
    uncertain = np.asarray(uncertainty, dtype=np.float64) > float(selection["uncertainty_threshold"])
    ood_threshold = selection.get("ood_threshold")
    if ood_threshold is None or ood_score is None:
        return uncertain, np.zeros_like(uncertain)
    return uncertain, np.asarray(ood_score, dtype=np.float64) > float(ood_threshold)


def referred_shares(uncertainty: np.ndarray, ood_score: np.ndarray | None,
                    selection: dict[str, Any]) -> dict[str, float]:
    """Share of (n,) images the rule refers (``referred``), and by each test (``referred_uncertain``,
    ``referred_unlike_training``; an image may be flagged by both) — no labels needed."""
    return _shares(*refer_mask(uncertainty, ood_score, selection))


def _shares(uncertain: np.ndarray, unlike: np.ndarray) -> dict[str, float]:
    return {"referred": float((uncertain | unlike).mean()), "referred_uncertain": float(uncertain.mean()),
            "referred_unlike_training": float(unlike.mean())}


def referral_metrics(predicted: np.ndarray, labels: np.ndarray, uncertainty: np.ndarray, ood_score: np.ndarray | None,
                     selection: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """What the run's referral rule does on a labelled split.

    Args:
        predicted, labels: (n,) class indices.
        uncertainty, ood_score: (n,) the run's scores (higher = less sure / less like training).
        selection: the run's selection record (``uncertainty_threshold``, ``refer_coverage``, ``ood_threshold``).
        class_names: C names.

    Returns:
        ``refer_coverage`` (the validation target), ``referred`` (share of images referred), ``referred_uncertain``
        and ``referred_unlike_training`` (share flagged by each test; an image may be flagged by both),
        ``decided_accuracy`` and ``decided_balanced_accuracy`` (on the images not referred; the latter over the
        classes present among them), ``referred_error_rate`` (how many referred images the run would have got
        wrong), ``all_accuracy`` (every image decided), and ``referred_by_class`` (class → share of its images
        referred; None for a class absent from ``labels``).
    """
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    uncertain, unlike = refer_mask(uncertainty, ood_score, selection)
    referred = uncertain | unlike
    decided = ~referred
    correct = predicted == labels
    return {
        "refer_coverage": selection.get("refer_coverage"),
        **_shares(uncertain, unlike),
        "decided_accuracy": float(correct[decided].mean()) if decided.any() else None,
        "decided_balanced_accuracy": (float(np.mean([correct[decided & (labels == c)].mean()
                                                     for c in np.unique(labels[decided])]))
                                      if decided.any() else None),
        "referred_error_rate": float(1 - correct[referred].mean()) if referred.any() else None,
        "all_accuracy": float(correct.mean()),
        "referred_by_class": {name: (float(referred[labels == c].mean()) if (labels == c).any() else None)
                              for c, name in enumerate(class_names)},
    }
