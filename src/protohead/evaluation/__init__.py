"""Evaluation: metrics (pure numpy/scikit-learn) and PNG plots."""

from protohead.evaluation.metrics import (
    accuracy_at_coverage,
    aurc,
    compute_metrics,
    expected_calibration_error,
    reliability_bins,
    risk_coverage_curve,
)
from protohead.evaluation.plots import (
    plot_bar_with_errors,
    plot_confusion_matrix,
    plot_heatmap,
    plot_reliability_diagram,
    plot_risk_coverage,
)

__all__ = [
    "accuracy_at_coverage",
    "aurc",
    "compute_metrics",
    "expected_calibration_error",
    "plot_bar_with_errors",
    "plot_confusion_matrix",
    "plot_heatmap",
    "plot_reliability_diagram",
    "plot_risk_coverage",
    "reliability_bins",
    "risk_coverage_curve",
]
