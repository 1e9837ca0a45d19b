"""The design document's comparison, measured: every scheme preset and baseline on identical cached
features, seeds and training budget; plus one controlled variant per claim of the document.

A cell is (column, seed); each finished cell is stored as ``cells/<column>-seed<k>/cell.json`` and never
recomputed when the command is re-run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protohead.baselines import BASELINES as BASELINE_HEADS
from protohead.config import PRESETS
from protohead.head import HeadOptimal
from protohead.losses import mean_same_class_cosine
from protohead.model import uncertainty_rule
from protohead.posthoc import final_outputs
from protohead.runconfig import RunConfig

SCHEMES = list(PRESETS)  # every head preset is one of the document's compared schemes
BASELINES = list(BASELINE_HEADS)  # as defined in the issue: no post-hoc shift
# the linear head with the validation-chosen post-hoc shift every scheme gets (``RunConfig.posthoc_tau``)
POSTHOC_BASELINES = {"linear+posthoc": "linear"}
# controlled variants of `basic`, one per claim of the document
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "basic+all_pairs": ("basic", {"contrastive_pairs": "all"}),  # §2.3
    "basic+unbounded_sep": ("basic", {"separation_form": "unbounded", "sep_scale": -0.08}),  # §2.2
    "basic+l2": ("basic", {"distance": "l2"}),  # §1.2 / §7.1
    "basic+orthogonality": ("basic", {"orth_scale": 0.01}),  # §4.3
    # the seed's abstention (NLL in place of CE, shared-embedding abstain logit, λ = 0.1), kept for §2.4 / §6.2
    "uncertainty+seed_abstention": ("uncertainty", {"abstention_mode": "coupled", "abstention_scale": 0.1}),
    "optimal+seed_abstention": ("optimal", {"abstention_mode": "coupled", "abstention_scale": 0.1}),
    # Deep Gamblers' payoff in place of ProtoASNet's penalty (o = 2.2, the FD-Shifts CIFAR-10 setting), issue 10
    "uncertainty+gamblers": ("uncertainty", {"abstention_payoff": 2.2, "abstention_scale": 0.0}),
    "optimal+gamblers": ("optimal", {"abstention_payoff": 2.2, "abstention_scale": 0.0}),
}


def tail_classes(class_names: tuple[str, ...], class_counts: list[int]) -> tuple[str, ...]:
    """The least frequent third of the classes in the training split (⌈C/3⌉ classes, rarest first; ties by
    name). HAM10000: df, vasc, akiec."""
    order = sorted(range(len(class_names)), key=lambda c: (class_counts[c], class_names[c]))
    return tuple(class_names[c] for c in order[:max(1, -(-len(class_names) // 3))])

QUICK = {"subset_per_class": 30, "epochs": 10}


def columns() -> list[str]:
    return [*SCHEMES, *BASELINES, *POSTHOC_BASELINES, *VARIANTS]


def cell_config(base: RunConfig, column: str, seed: int) -> RunConfig:
    run_overrides: dict[str, Any] = {}
    if column in VARIANTS:
        model, overrides = VARIANTS[column]
    elif column in SCHEMES:
        model, overrides = column, {}
    elif column in BASELINES:
        model, overrides, run_overrides = column, {}, {"posthoc_tau": 0.0}
    elif column in POSTHOC_BASELINES:
        model, overrides = POSTHOC_BASELINES[column], {}
    else:
        raise ValueError(f"unknown comparison column {column!r}; choose from {', '.join(columns())}")
    data = {**base.to_dict(), **run_overrides, "preset": model, "seed": seed, "head": {**base.head, **overrides}}
    return RunConfig.from_dict(data)


def summarise_history(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean magnitude and share of non-zero steps of every loss term over training, and the curves."""
    terms = sorted({k.split("/", 1)[1] for record in history for k in record if k.startswith("loss/")})
    return {
        "term_mean": {t: float(np.mean([r[f"loss/{t}"] for r in history if f"loss/{t}" in r])) for t in terms},
        "term_nonzero_share": {t: float(np.mean([r[f"nonzero/{t}"] for r in history if f"nonzero/{t}" in r]))
                               for t in terms},
        "loss_curve": [r.get("loss/total") for r in history],
        "grad_norm_mean": [r.get("loss/grad_norm") for r in history],
        "grad_norm_max": [r.get("max/grad_norm") for r in history],
        "val_balanced_accuracy": [r["val_balanced_accuracy"] for r in history],
    }


def run_cell(config: RunConfig, cell_dir: Path, data: Any) -> dict[str, Any]:
    """Train one cell, select on val, evaluate on test, and collect the claim diagnostics. Fine-tuning cells
    prepare their own inputs (each trains a fresh backbone; the front-map cache is shared)."""
    from protohead.evaluation import aurc
    from protohead.pipeline import evaluate_model, train

    started = time.perf_counter()
    result = train(config, cell_dir, overwrite=True, data=None if config.finetune else data)
    train_seconds = time.perf_counter() - started
    model, data = result["model"], result["data"]  # the selected (best) checkpoint's state, its inputs
    metrics = evaluate_model(model, data, "test", cell_dir, config.eval_batch_size, result["best"])
    cell: dict[str, Any] = {"config": config.to_dict(), "metrics": metrics, "train_s": train_seconds,
                            "best_epoch": result["best"]["epoch"], **summarise_history(result["history"])}
    recall = metrics["per_class_recall"]
    tail = tail_classes(data.class_names, data.class_counts)
    cell["tail_recall"] = float(np.mean([recall[c] for c in tail if recall.get(c) is not None]))
    if isinstance(model, HeadOptimal):
        with torch.no_grad():
            cell["same_class_cosine"] = float(mean_same_class_cosine(model.bank.prototypes, model.bank.valid))
        cell["prototype_counts"] = model.bank.counts.tolist()
    predictions = np.load(cell_dir / "predictions_test.npz")
    probs, labels = predictions["probabilities"], predictions["labels"]
    correct = probs.argmax(1) == labels
    # the same head's max-probability score (real prior, predicted class), whatever its own uncertainty is
    _, max_probability = final_outputs(predictions["probabilities_raw"], predictions["uncertainty"], data.class_counts,
                                       metrics["posthoc_tau"], False, uncertainty_rule(model)[1])
    cell["aurc_max_softmax"] = aurc(correct, max_probability)
    cell["aurc_head"] = aurc(correct, predictions["head_uncertainty"])  # the head's own (abstention α when it has one)
    (cell_dir / "cell.json").write_text(json.dumps(cell, indent=2))
    return cell


def run_comparison(base: RunConfig, out_dir: Path, seeds: int = 3, only: list[str] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the grid and write comparison.json, comparison.md and the plots into ``out_dir``."""
    from tqdm.auto import tqdm

    from protohead.pipeline import prepare

    selected = only or columns()
    for column in selected:
        cell_config(base, column, 0)  # validate every column name before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = prepare(base)
    cells: dict[str, list[dict[str, Any]]] = {c: [] for c in selected}
    grid = [(c, s) for s in range(seeds) for c in selected]  # seed-major: a stopped grid has whole columns
    for column, seed in tqdm(grid, desc="comparison grid", disable=not progress):
        cell_dir = out_dir / "cells" / f"{column}-seed{seed}"
        done = cell_dir / "cell.json"
        if done.is_file():
            cells[column].append(json.loads(done.read_text()))
            continue
        cells[column].append(run_cell(cell_config(base, column, seed), cell_dir, data))
    summary = aggregate(cells, data.class_names)
    summary["grid_wall_s"] = time.perf_counter() - started
    summary["settings"] = {"seeds": seeds, "split": base.split, "epochs": base.epochs, "head": base.head,
                           "subset_per_class": base.subset_per_class, "data": base.data}
    summary["tail_classes"] = list(tail_classes(data.class_names, data.class_counts))
    summary["claims"] = claims(summary)
    (out_dir / "comparison.json").write_text(json.dumps(summary, indent=2))
    write_markdown(summary, out_dir / "comparison.md")
    write_plots(summary, data.class_names, out_dir)
    return summary


def _mean_std(values: list[float]) -> dict[str, float]:
    array = np.asarray([v for v in values if v is not None], dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


def aggregate(cells: dict[str, list[dict[str, Any]]], class_names: tuple[str, ...]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for column, runs in cells.items():
        metrics = [r["metrics"] for r in runs]
        row = {key: _mean_std([m[key] for m in metrics]) for key in
               ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece", "aurc", "nll")}
        row["tail_recall"] = _mean_std([r["tail_recall"] for r in runs])
        row["train_s"] = _mean_std([r["train_s"] for r in runs])
        row["aurc_max_softmax"] = _mean_std([r["aurc_max_softmax"] for r in runs])
        row["aurc_head"] = _mean_std([r.get("aurc_head", r["metrics"]["aurc"]) for r in runs])
        row["per_class_recall"] = {c: _mean_std([m["per_class_recall"][c] for m in metrics]) for c in class_names}
        if "same_class_cosine" in runs[0]:
            row["same_class_cosine"] = _mean_std([r["same_class_cosine"] for r in runs])
        terms = runs[0]["term_mean"].keys()
        row["term_mean"] = {t: float(np.mean([r["term_mean"][t] for r in runs])) for t in terms}
        row["term_nonzero_share"] = {t: float(np.mean([r["term_nonzero_share"][t] for r in runs])) for t in terms}
        row["grad_norm_max"] = float(np.max([np.max(r["grad_norm_max"]) for r in runs]))
        row["grad_norm_mean"] = float(np.mean([np.mean(r["grad_norm_mean"]) for r in runs]))
        row["loss_curve"] = runs[0]["loss_curve"]
        row["seeds"] = len(runs)
        table[column] = row
    return {"columns": table}


def _get(summary: dict[str, Any], column: str, key: str) -> float | None:
    row = summary["columns"].get(column)
    return None if row is None or key not in row else row[key]["mean"]


def _stat(summary: dict[str, Any], column: str, key: str) -> tuple[float, float, int]:
    row = summary["columns"][column]
    return row[key]["mean"], row[key]["std"], row["seeds"]


def beyond_noise(a: tuple[float, float, int], b: tuple[float, float, int]) -> bool:
    """Whether mean a − mean b exceeds twice its standard error over seeds (needs ≥ 2 seeds on each side)."""
    (mean_a, std_a, n_a), (mean_b, std_b, n_b) = a, b
    return abs(mean_a - mean_b) > 2.0 * float(np.sqrt(std_a**2 / n_a + std_b**2 / n_b))


def verdict(expected: bool, a: tuple[float, float, int], b: tuple[float, float, int]) -> str:
    """``held`` / ``did not hold`` for a claim resting on the difference a − b, ``within seed noise``, or
    ``not answered`` with fewer than two seeds (one seed gives no noise estimate: never a verdict)."""
    if min(a[2], b[2]) < 2:
        return "not answered (one seed: no noise estimate; run --seeds 3)"
    if not beyond_noise(a, b):
        return "within seed noise (|difference| ≤ 2 standard errors)"
    return "held" if expected else "did not hold"


def goal_line(summary: dict[str, Any]) -> str:
    """The issue's goal: a protohead column beats every baseline on balanced accuracy, keeping linear's accuracy.

    Columns are ranked by their mean test balanced accuracy — a report of the grid, not a model selection.
    """
    cols = summary["columns"]
    baselines = [c for c in cols if c in BASELINES or c in POSTHOC_BASELINES]
    heads = [c for c in cols if c not in baselines]
    if not heads or not baselines:
        return "Goal: needs at least one protohead column and one baseline."
    best = max(heads, key=lambda c: _get(summary, c, "balanced_accuracy"))
    rival = max(baselines, key=lambda c: _get(summary, c, "balanced_accuracy"))
    bal, rival_bal = _get(summary, best, "balanced_accuracy"), _get(summary, rival, "balanced_accuracy")
    acc, linear_acc = _get(summary, best, "accuracy"), _get(summary, "linear", "accuracy")
    met = bal > rival_bal and acc >= linear_acc
    return (f"Goal (a protohead column beats every baseline on balanced accuracy without losing accuracy to the "
            f"linear head): {'met' if met else 'not met'} — best column `{best}` balanced accuracy {bal:.3f} vs "
            f"best baseline `{rival}` {rival_bal:.3f}; accuracy {acc:.3f} vs linear {linear_acc:.3f}.")


@dataclass(frozen=True)
class Claim:
    """One claim of the document, answered from the grid: it holds when ``(a_column, a_key)`` is lower
    (``expect="lower"``) or higher than ``(b_column, b_key)`` beyond seed noise.

    ``rule="ratio"``: a spike claim, held when a > ``ratio`` × b (no noise estimate exists for a maximum).
    ``noise_means``: what "within seed noise" answers for claims of no effect.
    """

    section: str
    statement: str
    a_column: str
    a_key: str
    b_column: str
    b_key: str
    expect: str  # "lower" or "higher"
    a_label: str
    b_label: str
    measure: str
    rule: str = "noise"
    ratio: float = 1.5
    noise_means: str | None = None
    digits: int = 3

    def answer(self, summary: dict[str, Any]) -> str | None:
        cols = summary["columns"]
        if self.a_column not in cols or self.b_column not in cols:
            return None
        a_row, b_row = cols[self.a_column], cols[self.b_column]
        if self.rule == "ratio":
            a, b = float(a_row[self.a_key]), float(b_row[self.b_key])
            result = "held" if a > self.ratio * b else "did not hold"
        else:
            a, b = _get(summary, self.a_column, self.a_key), _get(summary, self.b_column, self.b_key)
            expected = a < b if self.expect == "lower" else a > b
            result = verdict(expected, _stat(summary, self.a_column, self.a_key),
                             _stat(summary, self.b_column, self.b_key))
            if result.startswith("within") and self.noise_means:
                result = self.noise_means
        return (f"{self.section} {self.statement}: {result} — {self.measure} {a:.{self.digits}f} ({self.a_label}) "
                f"vs {b:.{self.digits}f} ({self.b_label}).")


CLAIMS = (
    Claim("§2.3", "all-pairs contrastive over-disperses same-class prototypes", "basic+all_pairs",
          "same_class_cosine", "basic", "same_class_cosine", "lower", "all pairs", "different-class only",
          "mean same-class prototype cosine"),
    Claim("§2.2", "margin separation is more stable than the unbounded form", "basic+unbounded_sep",
          "grad_norm_max", "basic", "grad_norm_max", "higher", "unbounded", "margin", "largest gradient norm",
          rule="ratio", digits=2),
    Claim("§2.1", "class-balanced weights (β = 0.9999) help the tail more than 1/√n", "long_tail", "tail_recall",
          "basic", "tail_recall", "higher", "class-balanced", "1/√n", "tail recall"),
    Claim("§1.2/§7.1", "cosine suits these features better than L2", "basic", "balanced_accuracy", "basic+l2",
          "balanced_accuracy", "higher", "cosine", "L2", "balanced accuracy"),
    Claim("§4.3", "orthogonality does not help", "basic+orthogonality", "balanced_accuracy", "basic",
          "balanced_accuracy", "lower", "on", "off", "balanced accuracy", noise_means="held (no measurable gain)"),
    Claim("§2.4", "abstention gives a better uncertainty than max-softmax of the same head", "uncertainty",
          "aurc_head", "uncertainty", "aurc_max_softmax", "lower", "abstention α", "1 − max probability",
          "AURC (lower is better)", digits=4),
    Claim("§2.4 (seed's form)", "the document's abstention gives a better uncertainty than max-softmax",
          "uncertainty+seed_abstention", "aurc_head", "uncertainty+seed_abstention", "aurc_max_softmax", "lower",
          "abstention α", "1 − max probability", "AURC (lower is better)", digits=4),
)


def claims(summary: dict[str, Any]) -> list[str]:
    """One line per claim of the document (:data:`CLAIMS`): held / did not hold / within seed noise / not
    answered, with the numbers; then the goal and the loss terms that never acted."""
    lines = [goal_line(summary)] if "linear" in summary["columns"] else []
    lines += [line for claim in CLAIMS if (line := claim.answer(summary)) is not None]
    disabled = {"classification"}  # optimalhead has no classification term by design
    silent = [f"{column}: {term}" for column, row in summary["columns"].items()
              for term, share in row["term_nonzero_share"].items()
              if share == 0.0 and term not in ("log_sigma_classification", "log_sigma_prototype", *disabled)]
    lines.append("Loss terms that never acted (zero in every step): " + (", ".join(silent) if silent else "none") + ".")
    return lines


METRIC_ROWS = [("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"),
               ("tail_recall", "tail recall"), ("macro_auroc", "macro AUROC"), ("ece", "ECE"),
               ("aurc", "AURC"), ("train_s", "train time (s)")]


def write_markdown(summary: dict[str, Any], path: Path) -> None:
    cols = summary["columns"]
    names = list(cols)
    settings = summary["settings"]
    lines = [f"# Comparison ({settings['split']} split, {settings['seeds']} seed(s), {settings['epochs']} epochs, "
             f"head {settings['head']})", "",
             "Mean ± std over seeds on the test split; every model selected on validation balanced accuracy.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in METRIC_ROWS:
        cells = []
        for name in names:
            value = cols[name][key]
            digits = 0 if key == "train_s" else 3
            cells.append(f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}")
        if key == "tail_recall" and summary.get("tail_classes"):
            label = f"tail recall ({', '.join(summary['tail_classes'])})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## The document's claims", ""] + [f"- {line}" for line in summary["claims"]]
    lines += ["", "## Loss terms: mean magnitude over training (share of steps non-zero)", "",
              "| column | terms |", "|---|---|"]
    for name, row in cols.items():
        terms = ", ".join(f"{t} {row['term_mean'][t]:.3g} ({row['term_nonzero_share'][t]:.0%})"
                          for t in row["term_mean"] if t not in ("total", "temperature", "grad_norm"))
        lines.append(f"| {name} | {terms} |")
    lines += ["", f"Grid wall time: {summary['grid_wall_s']:.0f} s."]
    path.write_text("\n".join(lines) + "\n")


def write_plots(summary: dict[str, Any], class_names: tuple[str, ...], out_dir: Path) -> None:
    from protohead.evaluation import plot_bar_with_errors, plot_heatmap

    cols = summary["columns"]
    names = list(cols)
    plot_bar_with_errors(names, [cols[n]["balanced_accuracy"]["mean"] for n in names],
                         [cols[n]["balanced_accuracy"]["std"] for n in names], out_dir / "balanced_accuracy.png",
                         "balanced accuracy (test)")
    matrix = np.array([[cols[n]["per_class_recall"][c]["mean"] for c in class_names] for n in names])
    plot_heatmap(matrix, names, list(class_names), out_dir / "per_class_recall.png", "per-class recall (test)")
