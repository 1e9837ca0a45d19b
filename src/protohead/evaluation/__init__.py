"""Evaluation: metrics (pure numpy/scikit-learn), post-hoc calibration and PNG plots."""

from protohead.evaluation.calibration import apply_temperature, fit_temperature, prior_aware_confidence
from protohead.evaluation.metrics import (
    accuracy_at_coverage,
    augrc,
    aurc,
    compute_metrics,
    expected_calibration_error,
    generalized_risk_coverage_curve,
    reliability_bins,
    risk_coverage_curve,
)
from protohead.evaluation.plots import (
    plot_bar_with_errors,
    plot_confusion_matrix,
    plot_heatmap,
    plot_reliability_before_after,
    plot_reliability_diagram,
    plot_risk_coverage,
)

__all__ = [
    "accuracy_at_coverage",
    "apply_temperature",
    "augrc",
    "aurc",
    "compute_metrics",
    "expected_calibration_error",
    "fit_temperature",
    "generalized_risk_coverage_curve",
    "plot_bar_with_errors",
    "plot_confusion_matrix",
    "plot_heatmap",
    "plot_reliability_before_after",
    "plot_reliability_diagram",
    "plot_risk_coverage",
    "prior_aware_confidence",
    "reliability_bins",
    "risk_coverage_curve",
]
