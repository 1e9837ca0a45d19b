"""Classification, calibration and selective-prediction metrics.

All functions are pure and operate on numpy arrays (anything ``np.asarray`` accepts).
Notation: ``n`` = number of samples, ``C`` = number of classes.

scikit-learn provides the standard classification metrics; only what it lacks is written
here by hand: expected calibration error (ECE), the (generalized) risk–coverage curve, AURC,
AUGRC and accuracy at a given coverage.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    recall_score,
    roc_auc_score,
)

__all__ = [
    "accuracy_at_coverage",
    "augrc",
    "aurc",
    "compute_metrics",
    "expected_calibration_error",
    "generalized_risk_coverage_curve",
    "reliability_bins",
    "risk_coverage_curve",
]

ROW_SUM_TOL = 1e-3


# --------------------------------------------------------------------------- validation


def _as_matrix(values: ArrayLike, name: str) -> NDArray[np.float64]:
    """(n, C) float64 with n ≥ 1, C ≥ 1 and finite values; ``ValueError`` naming ``name`` otherwise."""
    p = np.asarray(values, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, C), got shape {p.shape}")
    if p.shape[0] < 1:
        raise ValueError(f"{name} must contain at least one sample (n >= 1)")
    if p.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class column (C >= 1)")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return p


def _as_probs(probs: ArrayLike) -> NDArray[np.float64]:
    p = _as_matrix(probs, "probs")
    if np.any(p < 0):
        raise ValueError("probs contains negative values")
    row_sums = p.sum(axis=1)
    bad = np.abs(row_sums - 1.0) > ROW_SUM_TOL
    if np.any(bad):
        i = int(np.argmax(bad))
        raise ValueError(
            f"probs rows must sum to 1 (tolerance {ROW_SUM_TOL}); "
            f"{int(bad.sum())} rows do not, e.g. row {i} sums to {row_sums[i]:.6g}"
        )
    return p


def _as_labels(labels: ArrayLike, n: int, num_classes: int) -> NDArray[np.int64]:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (n,), got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"length mismatch: probs has {n} rows but labels has {y.shape[0]} entries")
    is_int = y.dtype.kind in "iub"
    is_integral_float = y.dtype.kind == "f" and bool(np.all(np.isfinite(y)) and np.all(y == np.round(y)))
    if not (is_int or is_integral_float):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"labels out of range: expected values in [0, {num_classes - 1}], "
            f"got min {int(y.min())}, max {int(y.max())}"
        )
    return y


def _as_correct_uncertainty(
    correct: ArrayLike, uncertainty: ArrayLike
) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    c = np.asarray(correct)
    u = np.asarray(uncertainty, dtype=np.float64)
    if c.ndim != 1 or u.ndim != 1:
        raise ValueError(f"correct and uncertainty must be 1-D, got shapes {c.shape} and {u.shape}")
    if c.shape[0] != u.shape[0]:
        raise ValueError(
            f"length mismatch: correct has {c.shape[0]} entries but uncertainty has {u.shape[0]}"
        )
    if c.shape[0] < 1:
        raise ValueError("need at least one sample (n >= 1)")
    if not np.all(np.isfinite(u)):
        raise ValueError("uncertainty contains non-finite values (NaN or inf)")
    return c.astype(bool), u


# --------------------------------------------------------------------------- calibration


def reliability_bins(
    probs: ArrayLike, labels: ArrayLike, n_bins: int = 15
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
    """Top-label reliability statistics over equal-width confidence bins.

    Bin ``b`` covers confidences in ``(b/n_bins, (b+1)/n_bins]`` (the first bin also includes 0).

    Args:
        probs: (n, C) predicted class probabilities.
        labels: (n,) integer true labels.
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        ``(edges, accuracy, confidence, counts)`` with ``edges`` of shape (n_bins + 1,) and
        the others of shape (n_bins,). ``accuracy``/``confidence`` are the mean accuracy and
        mean top-label confidence per bin (NaN for empty bins); ``counts`` the samples per bin.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = _as_probs(probs)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Number of interior edges strictly below conf -> bin index, i.e. bins are (lo, hi].
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    sum_acc = np.bincount(idx, weights=correct, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts > 0, sum_acc / np.maximum(counts, 1), np.nan)
        mean_conf = np.where(counts > 0, sum_conf / np.maximum(counts, 1), np.nan)
    return edges, acc, mean_conf, counts


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width bins.

    ``ECE = sum_b (|B_b| / n) * |acc(B_b) - conf(B_b)|`` where bin ``b`` holds the samples
    whose top-label confidence lies in ``(b/n_bins, (b+1)/n_bins]``.

    Args:
        probs: (n, C) predicted class probabilities (rows sum to 1).
        labels: (n,) integer true labels in ``[0, C)``.
        n_bins: number of bins.

    Returns:
        ECE in [0, 1].
    """
    _, acc, conf, counts = reliability_bins(probs, labels, n_bins)
    n = counts.sum()
    nonempty = counts > 0
    return float(np.sum(counts[nonempty] / n * np.abs(acc[nonempty] - conf[nonempty])))


# --------------------------------------------------------------------------- selective prediction


def risk_coverage_curve(
    correct: ArrayLike, uncertainty: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Risk–coverage curve for selective prediction.

    Samples are sorted by uncertainty ascending (most confident first, ties broken stably by
    original order). For ``k = 1..n``: coverage ``k/n`` and risk = error rate among the ``k``
    most confident samples.

    Args:
        correct: (n,) bool, whether each prediction is correct.
        uncertainty: (n,) float, higher = less confident.

    Returns:
        ``(coverage, risk)``, both of shape (n,).
    """
    errors = _errors_most_confident_first(correct, uncertainty)
    k = np.arange(1, errors.shape[0] + 1, dtype=np.float64)
    return k / errors.shape[0], np.cumsum(errors) / k


def _errors_most_confident_first(correct: ArrayLike, uncertainty: ArrayLike) -> NDArray[np.float64]:
    """(n,) 1.0 for each wrong prediction, ordered by uncertainty ascending (ties stably, original order)."""
    c, u = _as_correct_uncertainty(correct, uncertainty)
    return (~c[np.argsort(u, kind="stable")]).astype(np.float64)


def aurc(correct: ArrayLike, uncertainty: ArrayLike) -> float:
    """Area under the risk–coverage curve (Geifman et al.): mean risk over ``k = 1..n``.

    Args:
        correct: (n,) bool.
        uncertainty: (n,) float, higher = less confident.
    """
    _, risk = risk_coverage_curve(correct, uncertainty)
    return float(risk.mean())


def generalized_risk_coverage_curve(
    correct: ArrayLike, uncertainty: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Generalized risk–coverage curve (Traub et al., NeurIPS 2024).

    Same ordering as :func:`risk_coverage_curve` (uncertainty ascending, ties broken stably by original
    order). For ``k = 1..n``: coverage ``k/n`` and generalized risk = (number of wrong samples among the ``k``
    most confident) / ``n`` — the joint probability "accepted and wrong", not the selective risk
    "wrong given accepted" (which divides by ``k``).

    Args:
        correct: (n,) bool, whether each prediction is correct.
        uncertainty: (n,) float, higher = less confident.

    Returns:
        ``(coverage, generalized_risk)``, both of shape (n,).
    """
    errors = _errors_most_confident_first(correct, uncertainty)
    n = errors.shape[0]
    return np.arange(1, n + 1, dtype=np.float64) / n, np.cumsum(errors) / n


def augrc(correct: ArrayLike, uncertainty: ArrayLike) -> float:
    """Area under the generalized risk–coverage curve (AUGRC; Traub et al., NeurIPS 2024).

    With ``G_k`` = (errors among the ``k`` most confident samples) / ``n`` (see
    :func:`generalized_risk_coverage_curve`) and ``G_0 = 0``, the area is the trapezoid rule over the points
    ``(k/n, G_k)``, ``k = 0..n``, including the origin, as in the paper's reference implementation
    (fd-shifts ``RiskCoverageStats.augrc``: ``np.trapz`` over the RC points plus ``(0, 0)``)::

        AUGRC = (1/n) * sum_{k=1..n} (G_{k-1} + G_k) / 2 = mean_k G_k - G_n / (2n)

    This equals the continuous-coverage integral of the linearly interpolated curve, so: all correct → 0, all
    wrong → exactly 1/2, a perfect ranking (all errors least confident) → exactly ``err² / 2`` (the paper's
    optimal AUGRC), the reverse ranking → ``err − err² / 2``, and ``AUGRC <= AURC`` always.

    Ties in ``uncertainty`` are broken stably by original order, exactly as in :func:`aurc` and
    :func:`risk_coverage_curve`. (The reference implementation instead merges tied samples into one curve point,
    which equals the expectation over random tie orders; both coincide when there are no ties.)

    Args:
        correct: (n,) bool.
        uncertainty: (n,) float, higher = less confident.

    Returns:
        AUGRC in ``[0, 1/2]`` (lower is better).
    """
    _, g = generalized_risk_coverage_curve(correct, uncertainty)
    n = g.shape[0]
    return float(g.mean() - g[-1] / (2 * n))


def accuracy_at_coverage(correct: ArrayLike, uncertainty: ArrayLike, coverage: float) -> float:
    """Accuracy on the ``ceil(coverage * n)`` most confident samples.

    Args:
        correct: (n,) bool.
        uncertainty: (n,) float, higher = less confident (ties broken stably).
        coverage: fraction in (0, 1].
    """
    if not (0.0 < coverage <= 1.0):
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    c, u = _as_correct_uncertainty(correct, uncertainty)
    n = c.shape[0]
    # Small slack so that e.g. 0.7 * 10 = 7.000000000000001 gives 7, not 8.
    k = min(n, max(1, math.ceil(coverage * n - 1e-9)))
    order = np.argsort(u, kind="stable")
    return float(c[order[:k]].mean())


# --------------------------------------------------------------------------- summary


def _macro_auroc(
    y: NDArray[np.int64], p: NDArray[np.float64], num_classes: int
) -> tuple[float | None, list[int]]:
    """Macro one-vs-rest AUROC over the classes present in ``y`` (None if fewer than 2)."""
    present = [int(c) for c in np.unique(y)]
    if len(present) < 2:
        return None, present
    if len(present) == num_classes and num_classes >= 3:
        score = roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(num_classes)))
    else:
        # Binary problem or absent classes: macro average of per-class one-vs-rest AUROCs
        # over the present classes (identical to OvR macro when all classes are present).
        indicator = (y[:, None] == np.asarray(present)[None, :]).astype(np.int64)
        score = roc_auc_score(indicator, p[:, present], average="macro")
    return float(score), present


def compute_metrics(
    probs: ArrayLike,
    labels: ArrayLike,
    uncertainty: ArrayLike | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Compute a JSON-ready dictionary of classification, calibration and selective metrics.

    Args:
        probs: (n, C) predicted class probabilities; finite, non-negative, rows sum to 1 (±1e-3).
        labels: (n,) integer true labels in ``[0, C)``.
        uncertainty: optional (n,) per-sample uncertainty (higher = less confident). When None,
            ``1 - max softmax probability`` is used.
        class_names: optional C names (defaults to ``"0".."C-1"``).

    Returns:
        Dict with keys ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``per_class_recall``
        (name -> float, None for classes absent from ``labels``), ``macro_auroc`` (None if fewer
        than two classes are present), ``auroc_classes`` (names of the classes the AUROC is
        averaged over), ``ece``, ``nll``, ``aurc``, ``augrc``, ``accuracy_at_80_coverage``,
        ``accuracy_at_90_coverage``, ``confusion_matrix`` (C x C list of lists, rows = true),
        ``num_samples`` and ``uncertainty_source`` (``"given"`` or ``"max_softmax"``).

    Raises:
        ValueError: on malformed inputs, with a message naming the problem.
    """
    p = _as_probs(probs)
    n, C = p.shape
    y = _as_labels(labels, n, C)
    if class_names is None:
        names = [str(i) for i in range(C)]
    else:
        names = [str(s) for s in class_names]
        if len(names) != C:
            raise ValueError(f"class_names has {len(names)} entries but probs has {C} columns")
        if len(set(names)) != C:
            raise ValueError("class_names must be unique")
    # Remove the (tolerated) rounding slack so downstream sklearn checks see exact simplices.
    p = p / p.sum(axis=1, keepdims=True)

    if uncertainty is None:
        u = 1.0 - p.max(axis=1)
        source = "max_softmax"
    else:
        u = np.asarray(uncertainty, dtype=np.float64)
        if u.ndim != 1 or u.shape[0] != n:
            raise ValueError(f"length mismatch: uncertainty must have shape ({n},), got {u.shape}")
        if not np.all(np.isfinite(u)):
            raise ValueError("uncertainty contains non-finite values (NaN or inf)")
        source = "given"

    pred = p.argmax(axis=1)
    correct = pred == y
    all_labels = list(range(C))
    present = set(np.unique(y).tolist())

    with warnings.catch_warnings():
        # Absent classes trigger "y_pred contains classes not in y_true" etc.; handled explicitly.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        acc = accuracy_score(y, pred)
        bal_acc = balanced_accuracy_score(y, pred)
        macro_f1 = f1_score(y, pred, average="macro", zero_division=0)
        recalls = recall_score(y, pred, labels=all_labels, average=None, zero_division=0)
        nll = log_loss(y, p, labels=all_labels)
    auroc, auroc_cls = _macro_auroc(y, p, C)

    return {
        "accuracy": float(acc),
        "balanced_accuracy": float(bal_acc),
        "macro_f1": float(macro_f1),
        "per_class_recall": {names[c]: (float(recalls[c]) if c in present else None) for c in range(C)},
        "macro_auroc": auroc,
        "auroc_classes": [names[c] for c in auroc_cls],
        "ece": expected_calibration_error(p, y),
        "nll": float(nll),
        "aurc": aurc(correct, u),
        "augrc": augrc(correct, u),
        "accuracy_at_80_coverage": accuracy_at_coverage(correct, u, 0.8),
        "accuracy_at_90_coverage": accuracy_at_coverage(correct, u, 0.9),
        "confusion_matrix": confusion_matrix(y, pred, labels=all_labels).tolist(),
        "num_samples": int(n),
        "uncertainty_source": source,
    }
