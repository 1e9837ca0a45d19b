"""Post-hoc logit adjustment (Menon et al. 2021), its strength τ chosen on the validation split. numpy (+ scikit-learn).

A classifier trained on long-tailed data under-predicts the rare classes. Dividing its probabilities by
the training prior to the power τ — softmax(log p − τ·log π) — moves the decision boundaries towards the
frequent classes' side: τ = 0 changes nothing, τ = 1 is the balanced-error Bayes rule. The trade-off is
accuracy against balanced accuracy, so τ is chosen on validation: the largest validation balanced
accuracy among the τ that keep validation accuracy within ``tolerance`` of τ = 0's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TAU_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, …, 1


@dataclass(frozen=True)
class PriorShift:
    """The chosen strength and the validation scores it gives."""

    tau: float
    accuracy: float
    balanced_accuracy: float


def balanced_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``labels``: (n, C) scores, (n,) labels.

    scikit-learn's ``balanced_accuracy_score`` on the arg-max, the one implementation the metrics use too.
    """
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, np.asarray(probabilities).argmax(1)))


def log_prior(class_counts: np.ndarray | list[int]) -> np.ndarray:
    """(C,) log training prior by the one rule of :func:`protohead.objective.log_prior` (a class with no
    training sample counts as one)."""
    import torch

    from protohead.objective import log_prior as torch_log_prior

    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"class counts must be a (C,) array of finite non-negative counts, got {counts.tolist()}")
    return torch_log_prior(torch.from_numpy(counts)).numpy()


def adjust_probabilities(probabilities: np.ndarray, class_counts: np.ndarray | list[int], tau: float) -> np.ndarray:
    """softmax(log p − τ·log π): (n, C) probabilities → (n, C) adjusted probabilities."""
    if tau == 0:
        return probabilities
    logits = np.log(np.clip(probabilities, 1e-300, None)) - tau * log_prior(class_counts)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def real_prior_probabilities(probabilities: np.ndarray, class_counts: np.ndarray | list[int],
                             balanced_prior: bool) -> np.ndarray:
    """(n, C) class probabilities under the training (real) prior. A head trained for a balanced prior
    (class-balanced weights, logit adjustment, balanced softmax) estimates p(y | x) for uniform classes; under the
    real prior π they become p ⊙ π, renormalised (Saerens et al. 2002). Other heads' are returned as they are."""
    if not balanced_prior:
        return probabilities
    weighted = probabilities * np.exp(log_prior(class_counts))
    return weighted / weighted.sum(axis=1, keepdims=True)


def final_outputs(probabilities: np.ndarray, uncertainty: np.ndarray, class_counts: np.ndarray | list[int],
                  tau: float, uncertainty_from_abstention: bool, balanced_prior: bool = False,
                  temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The probabilities and uncertainty a run reports, used by evaluation and prediction alike.

    Returns (n, C) probabilities shifted by τ (see :func:`adjust_probabilities`: the decision), then
    temperature-scaled (``temperature``, fitted on validation; the arg-max never changes), and (n,)
    uncertainty: the head's abstention probability when it has one, else 1 − the real-prior probability of
    the class actually predicted (:func:`real_prior_probabilities`), the chance that this decision is wrong on
    data distributed as in training — a better selective-prediction score than 1 − max of the shifted
    probabilities, which are tilted towards rare classes by τ (BENCHMARKS §8).
    """
    shifted = adjust_probabilities(probabilities, class_counts, tau) if tau else probabilities
    if temperature != 1.0:
        from protohead.evaluation.calibration import apply_temperature

        shifted = apply_temperature(shifted, temperature)
    if uncertainty_from_abstention:
        return shifted, uncertainty
    real = real_prior_probabilities(probabilities, class_counts, balanced_prior)
    predicted = shifted.argmax(axis=1)
    return shifted, 1.0 - real[np.arange(len(real)), predicted]


def choose_prior_shift(probabilities: np.ndarray, labels: np.ndarray, class_counts: np.ndarray | list[int],
                       tolerance: float, grid: tuple[float, ...] = TAU_GRID) -> PriorShift:
    """The τ in ``grid`` with the best balanced accuracy whose accuracy is ≥ accuracy(τ = 0) − ``tolerance``.

    Args:
        probabilities: (n, C) validation probabilities; labels: (n,); class_counts: (C,) training counts.
        tolerance: accuracy (a fraction) one may give up for balanced accuracy; ties go to the smaller τ.
    """
    choices = []
    for tau in sorted({0.0, *grid}):
        adjusted = adjust_probabilities(probabilities, class_counts, tau)
        accuracy = float((adjusted.argmax(1) == labels).mean())
        choices.append(PriorShift(tau, accuracy, balanced_accuracy(adjusted, labels)))
    floor = choices[0].accuracy - tolerance
    allowed = [c for c in choices if c.accuracy >= floor - 1e-12]
    return max(allowed, key=lambda c: (c.balanced_accuracy, -c.tau))
