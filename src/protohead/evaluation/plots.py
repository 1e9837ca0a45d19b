"""PNG plots for evaluation results.

Uses ``matplotlib.figure.Figure`` with an explicit ``FigureCanvasAgg`` so that no pyplot global
state is touched and the caller's matplotlib backend is left unchanged. Every function writes
its PNG atomically (temp file in the destination directory, then ``os.replace``) and returns
the destination path as a ``pathlib.Path``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from protohead.atomic import atomic_open
from protohead.evaluation.metrics import aurc, expected_calibration_error, reliability_bins, risk_coverage_curve

__all__ = [
    "plot_bar_with_errors",
    "plot_confusion_matrix",
    "plot_heatmap",
    "plot_reliability_before_after",
    "plot_reliability_diagram",
    "plot_risk_coverage",
]

DPI = 120
PathLike = str | os.PathLike[str]


def new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: PathLike) -> Path:
    """Render ``fig`` to ``path`` as PNG atomically."""
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=DPI)
    return Path(path)


def _annotate_cells(ax: object, values: np.ndarray, fmt: str) -> None:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return
    lo, hi = float(finite.min()), float(finite.max())
    mid = (lo + hi) / 2.0
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            if not np.isfinite(v):
                continue
            color = "white" if (hi > lo and v > mid) else "black"
            ax.text(j, i, format(v, fmt), ha="center", va="center", color=color, fontsize=8)  # type: ignore[attr-defined]


def plot_confusion_matrix(
    cm: ArrayLike, class_names: Sequence[str], path: PathLike, normalize: bool = True
) -> Path:
    """Plot a confusion matrix (rows = true class, columns = predicted class).

    Args:
        cm: (C, C) counts.
        class_names: C names.
        path: destination PNG.
        normalize: if True, each row is divided by its total (rows with no samples stay 0).
    """
    m = np.asarray(cm, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"cm must be a square 2-D matrix, got shape {m.shape}")
    C = m.shape[0]
    if len(class_names) != C:
        raise ValueError(f"class_names has {len(class_names)} entries but cm is {C}x{C}")
    if normalize:
        totals = m.sum(axis=1, keepdims=True)
        m = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
    side = max(4.0, 0.6 * C + 2.0)
    fig = new_figure((side + 1.0, side))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(C), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(C), labels=list(class_names))
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
    if C <= 20:
        _annotate_cells(ax, m, ".2f" if normalize else ".0f")
    fig.tight_layout()
    return save_png(fig, path)


def plot_reliability_diagram(probs: ArrayLike, labels: ArrayLike, path: PathLike, n_bins: int = 15) -> Path:
    """Reliability diagram: per-bin accuracy bars vs the diagonal; ECE in the title.

    Args:
        probs: (n, C) predicted probabilities.
        labels: (n,) integer labels.
        path: destination PNG.
        n_bins: number of equal-width confidence bins.
    """
    edges, acc, conf, counts = reliability_bins(probs, labels, n_bins)
    n = counts.sum()
    nonempty = counts > 0
    ece = float(np.sum(counts[nonempty] / n * np.abs(acc[nonempty] - conf[nonempty])))
    width = edges[1] - edges[0]
    left = edges[:-1]
    fig = new_figure((5.0, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(
        left[nonempty],
        acc[nonempty],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        alpha=0.8,
        label="Accuracy",
    )
    gap_bottom = np.minimum(acc[nonempty], conf[nonempty])
    gap_height = np.abs(acc[nonempty] - conf[nonempty])
    ax.bar(
        left[nonempty],
        gap_height,
        bottom=gap_bottom,
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="Gap to confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="Perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("Confidence")
    ax.set_ylabel("Accuracy")
    ax.set_title(f"Reliability diagram (ECE = {ece:.4f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return save_png(fig, path)


def plot_reliability_before_after(
    probs_before: ArrayLike,
    probs_after: ArrayLike,
    labels: ArrayLike,
    path: PathLike,
    n_bins: int = 15,
    names: tuple[str, str] = ("before", "after"),
) -> Path:
    """Two reliability curves in one figure (e.g. before / after temperature scaling), ECE in the legend.

    Each curve joins the (mean confidence, accuracy) points of the non-empty equal-width confidence bins of
    :func:`protohead.evaluation.metrics.reliability_bins`; marker area grows with the bin's sample count.

    Args:
        probs_before: (n, C) predicted probabilities before calibration.
        probs_after: (n, C) predicted probabilities after calibration.
        labels: (n,) integer labels.
        path: destination PNG.
        n_bins: number of equal-width confidence bins.
        names: legend names of the two curves.
    """
    curves = (("tab:red", "o", names[0], probs_before), ("tab:blue", "s", names[1], probs_after))
    fig = new_figure((5.5, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="Perfect calibration")
    for color, marker, name, probs in curves:
        _, acc, conf, counts = reliability_bins(probs, labels, n_bins)
        ece = expected_calibration_error(probs, labels, n_bins)
        keep = counts > 0
        sizes = 12.0 + 150.0 * counts[keep] / counts.sum()
        ax.plot(conf[keep], acc[keep], color=color, label=f"{name} (ECE = {ece:.4f})")
        ax.scatter(conf[keep], acc[keep], s=sizes, color=color, marker=marker, edgecolors="black", zorder=3)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("Confidence (bin mean)")
    ax.set_ylabel("Accuracy")
    ax.set_title(f"Reliability ({n_bins} bins)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return save_png(fig, path)


def plot_risk_coverage(
    correct: ArrayLike | Mapping[str, tuple[ArrayLike, ArrayLike]],
    uncertainty: ArrayLike | PathLike | None = None,
    path: PathLike | None = None,
    label: str | None = None,
) -> Path:
    """Plot one or several risk–coverage curves, with AURC in the legend.

    Two call forms:

    * ``plot_risk_coverage(correct, uncertainty, path, label=None)`` — one curve;
      ``correct`` (n,) bool, ``uncertainty`` (n,) float.
    * ``plot_risk_coverage({label: (correct, uncertainty), ...}, path)`` (or ``path=path``) —
      overlay several curves.
    """
    if isinstance(correct, Mapping):
        curves = dict(correct)
        if path is None:
            if not isinstance(uncertainty, str | os.PathLike):
                raise ValueError("with a dict of curves, pass the destination path as 2nd argument or path=")
            path = uncertainty
        elif uncertainty is not None:
            raise ValueError("with a dict of curves, do not pass uncertainty")
        if not curves:
            raise ValueError("no curves given")
    else:
        if uncertainty is None or isinstance(uncertainty, str | os.PathLike):
            raise ValueError("uncertainty array is required when plotting a single curve")
        if path is None:
            raise ValueError("path is required")
        curves = {label if label is not None else "model": (correct, uncertainty)}

    fig = new_figure((6.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for name, (c, u) in curves.items():
        cov, risk = risk_coverage_curve(c, u)
        ax.plot(cov, risk, label=f"{name} (AURC = {aurc(c, u):.4f})")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("Coverage")
    ax.set_ylabel("Risk (error rate)")
    ax.set_title("Risk–coverage")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return save_png(fig, path)


def plot_bar_with_errors(
    names: Sequence[str],
    means: ArrayLike,
    stds: ArrayLike | None,
    path: PathLike,
    ylabel: str,
) -> Path:
    """Bar chart of ``means`` with ``stds`` as error bars (None/NaN std -> no error bar).

    Args:
        names: k bar labels.
        means: (k,) bar heights.
        stds: (k,) standard deviations, or None.
        path: destination PNG.
        ylabel: y-axis label.
    """
    k = len(names)
    mu = np.asarray(means, dtype=np.float64).reshape(-1)
    if mu.shape[0] != k:
        raise ValueError(f"length mismatch: {k} names but {mu.shape[0]} means")
    if stds is None:
        sd = np.zeros(k)
    else:
        sd = np.array(
            [np.nan if s is None else s for s in np.asarray(stds, dtype=object).reshape(-1)], dtype=np.float64
        )
        if sd.shape[0] != k:
            raise ValueError(f"length mismatch: {k} names but {sd.shape[0]} stds")
        sd = np.where(np.isfinite(sd), sd, 0.0)
    fig = new_figure((max(4.0, 0.7 * k + 2.0), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(k)
    ax.bar(x, mu, yerr=sd, capsize=4, color="tab:blue", edgecolor="black", alpha=0.85)
    ax.set_xticks(x, labels=list(names), rotation=30 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def plot_heatmap(
    matrix: ArrayLike,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: PathLike,
    title: str,
) -> Path:
    """Annotated heatmap of a (R, K) matrix (NaN cells are left blank).

    Args:
        matrix: (R, K) values.
        row_labels: R labels.
        col_labels: K labels.
        path: destination PNG.
        title: figure title.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {m.shape}")
    R, K = m.shape
    if len(row_labels) != R or len(col_labels) != K:
        raise ValueError(
            f"label mismatch: matrix is {R}x{K} but got {len(row_labels)} row labels "
            f"and {len(col_labels)} col labels"
        )
    fig = new_figure((max(4.0, 0.9 * K + 3.0), max(3.0, 0.5 * R + 2.0)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(K), labels=list(col_labels), rotation=30, ha="right")
    ax.set_yticks(range(R), labels=list(row_labels))
    ax.set_title(title)
    if R * K <= 400:
        _annotate_cells(ax, m, ".3g")
    fig.tight_layout()
    return save_png(fig, path)
