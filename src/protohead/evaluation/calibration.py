"""Post-hoc calibration: temperature scaling and real-prior (prior-aware) probabilities. Pure numpy/scipy.

Notation: ``n`` = number of samples, ``C`` = number of classes.

* Temperature scaling (Guo et al. 2017): one scalar ``T > 0`` fitted on validation data by minimising the
  negative log-likelihood of ``softmax(s / T)``. A run's probabilities are already post-hoc shifted (τ, see
  :mod:`protohead.posthoc`), so the scores ``s`` are their log-probabilities ``log p``: temperature scaling then
  applies after the shift, and ``softmax(log p / 1) = p`` makes ``T = 1`` the identity. Logits can be given
  instead (``from_logits=True``); softmax is shift-invariant, so both give the same result for ``p = softmax(z)``.
  Scaling by ``T`` never changes the arg-max, hence never accuracy or balanced accuracy.
* Prior-aware probabilities (Saerens et al. 2002): a class-balanced or logit-adjusted head estimates
  probabilities for a uniform class prior; for the real (training) prior ``π`` they become ``p ⊙ π``,
  renormalised. Selective prediction must rank by these.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from protohead.evaluation.metrics import _as_labels, _as_matrix, _as_probs

__all__ = [
    "apply_temperature",
    "fit_temperature",
    "prior_aware_confidence",
]

PROB_FLOOR = 1e-300  # log(0) guard; the same floor as protohead.posthoc.adjust_probabilities
T_BOUNDS = (1e-2, 1e2)
_GRID_POINTS = 49  # coarse log-spaced grid before the bounded Brent refinement


def _as_scores(scores: ArrayLike, from_logits: bool) -> NDArray[np.float64]:
    """(n, C) log-scores: validated logits as they are, or the log of validated probabilities."""
    if from_logits:
        return _as_matrix(scores, "logits")
    p = _as_probs(scores)
    return np.log(np.maximum(p, PROB_FLOOR))


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _nll(scores: NDArray[np.float64], labels: NDArray[np.int64], temperature: float) -> float:
    """Mean negative log-likelihood of ``softmax(scores / T)`` at the true labels."""
    z = scores / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(z.shape[0]), labels]))


def fit_temperature(
    probabilities: ArrayLike,
    labels: ArrayLike,
    *,
    from_logits: bool = False,
    bounds: tuple[float, float] = T_BOUNDS,
) -> float:
    """The temperature ``T`` minimising the validation NLL of ``softmax(log p / T)`` (Guo et al. 2017).

    The search is over ``log T`` in ``[log bounds[0], log bounds[1]]``: a 49-point log-spaced grid, then a
    bounded Brent refinement (``scipy.optimize.minimize_scalar``) in the grid cell around the best point. The NLL
    is convex in ``1/T`` so this finds the global optimum within the bounds (a bound when the optimum lies
    outside, e.g. ``bounds[0]`` for perfectly separated, all-correct data). Deterministic. ``T = 1`` is returned
    when no temperature fits the data better than it (e.g. constant rows, or ``C = 1``), so the NLL after is
    never above the NLL before on the fitting data.

    Args:
        probabilities: (n, C) probabilities (finite, non-negative, rows sum to 1 ± 1e-3; zeros are floored at
            1e-300 before the log), or (n, C) logits when ``from_logits``.
        labels: (n,) integer true labels in ``[0, C)``.
        from_logits: treat ``probabilities`` as logits.
        bounds: ``(T_min, T_max)`` with ``0 < T_min <= 1 <= T_max``.

    Returns:
        The fitted temperature ``T > 0`` (``T > 1`` softens over-confident outputs, ``T < 1`` sharpens).

    Raises:
        ValueError: on empty, non-finite or malformed input or bounds, naming the problem.
    """
    lo, hi = (float(b) for b in bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo <= 1.0 <= hi):
        raise ValueError(f"bounds must satisfy 0 < T_min <= 1 <= T_max, got {bounds!r}")
    s = _as_scores(probabilities, from_logits)
    y = _as_labels(labels, s.shape[0], s.shape[1])

    def objective(log_t: float) -> float:
        return _nll(s, y, math.exp(log_t))

    identity = objective(0.0)
    # A temperature must beat T = 1 by more than rounding noise (flat objectives, e.g. constant rows, keep T = 1).
    threshold = identity - 1e-12 * max(1.0, abs(identity))
    best_log_t, best = 0.0, threshold
    if lo < hi:
        grid = np.linspace(math.log(lo), math.log(hi), _GRID_POINTS)
        values = [objective(float(g)) for g in grid]
        i = int(np.argmin(values))
        if values[i] < best:
            best_log_t, best = float(grid[i]), values[i]
        res = minimize_scalar(
            objective,
            bounds=(float(grid[max(i - 1, 0)]), float(grid[min(i + 1, _GRID_POINTS - 1)])),
            method="bounded",
            options={"xatol": 1e-7},
        )
        if res.success and math.isfinite(float(res.fun)) and float(res.fun) < best:
            best_log_t, best = float(res.x), float(res.fun)
    return math.exp(best_log_t)


def apply_temperature(
    probabilities: ArrayLike, temperature: float, *, from_logits: bool = False
) -> NDArray[np.float64]:
    """``softmax(log p / T)``: (n, C) probabilities (or logits when ``from_logits``) → (n, C) probabilities.

    ``T = 1`` on probabilities returns them unchanged (an exact float64 copy). Rows of the result sum to 1.
    The arg-max of every row is unchanged for any ``T > 0``. Zeros in ``p`` are floored at 1e-300 before the log,
    as in :func:`fit_temperature`, so with ``T > 1`` they become tiny positive probabilities.

    Raises:
        ValueError: on malformed input or a temperature that is not a finite number > 0.
    """
    t = _check_temperature(temperature)
    if t == 1.0 and not from_logits:
        return np.array(_as_probs(probabilities), dtype=np.float64, copy=True)
    z = _as_scores(probabilities, from_logits) / t
    z = z - z.max(axis=1, keepdims=True)
    w = np.exp(z)
    return w / w.sum(axis=1, keepdims=True)


def prior_aware_confidence(
    probabilities: ArrayLike, class_counts: ArrayLike, balanced: bool = True
) -> NDArray[np.float64]:
    """Balanced-prior probabilities → real-prior probabilities: ``p̃ ∝ p ⊙ π`` (Saerens et al. 2002).

    A head trained for a balanced prior (class-balanced weights, logit adjustment, balanced softmax) estimates
    ``p(y | x)`` under uniform classes; the confidence used for selective prediction must be for the real prior
    ``π`` = training class frequencies (zero counts counted as one: the one rule of
    :func:`protohead.objective.log_prior`, via :func:`protohead.posthoc.real_prior_probabilities`). The selective
    confidence of a decision ``k`` is then ``p̃[:, k]`` (uncertainty ``1 − p̃[:, k]``, as
    :func:`protohead.posthoc.final_outputs` reports it).

    Args:
        probabilities: (n, C) probabilities (finite, non-negative, rows sum to 1 ± 1e-3).
        class_counts: (C,) training counts per class (finite, non-negative).
        balanced: whether ``probabilities`` are balanced-prior estimates; if False they are already for the
            real prior and are returned unchanged (as a float64 copy).

    Returns:
        (n, C) real-prior probabilities, rows summing to 1.

    Raises:
        ValueError: on malformed probabilities, or counts that are not a (C,) finite non-negative array.
    """
    from protohead.posthoc import real_prior_probabilities

    p = _as_probs(probabilities)
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.shape[0] != p.shape[1]:
        raise ValueError(f"class_counts must have shape ({p.shape[1]},) to match probs, got {counts.shape}")
    if not balanced:
        return np.array(p, dtype=np.float64, copy=True)
    return np.asarray(real_prior_probabilities(p, counts, balanced_prior=True), dtype=np.float64)
