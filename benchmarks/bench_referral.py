"""What a run's referral rule (:mod:`protohead.referral`) does on test, and what other uncertainty forms would do.

For each run folder: the validation predictions are recomputed (``evaluate_run(RUN, "val")`` into a temporary folder;
a frozen run reads its cached features), then three rules are set on validation at the run's ``refer_coverage`` and
applied to the run's stored test predictions (``predictions_test.npz``):

- ``run``: the run's own rule — its uncertainty above the validation threshold, or its OOD flag — exactly
  ``metrics.json``'s ``referral``;
- ``uncertain, real prior``: the uncertainty part alone (1 − the real-prior probability of the predicted class, or
  the abstention probability: what runs report);
- ``uncertain, balanced``: 1 − the max of the τ-shifted probabilities instead (the balanced-prior confidence).

Prints per rule mean ± std over the runs (ddof 0) of the share referred, accuracy and balanced accuracy of the
images decided, the error rate of those referred, and the share of each class referred::

    .venv/bin/python benchmarks/bench_referral.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from protohead.ood import choose_threshold
from protohead.pipeline import evaluate_run
from protohead.referral import referral_metrics
from protohead.runfolder import load_model

FIGURES = ("referred", "decided_accuracy", "decided_balanced_accuracy", "referred_error_rate")


def run_rules(run_dir: Path) -> dict[str, dict]:
    """Rule name → :func:`referral_metrics` on the run's test predictions."""
    selection = load_model(run_dir).selection
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = list(metrics["per_class_recall"])
    coverage = selection["refer_coverage"]
    with tempfile.TemporaryDirectory() as scratch:
        evaluate_run(run_dir, "val", scratch)
        val = dict(np.load(Path(scratch) / "predictions_val.npz"))
    test = np.load(run_dir / "predictions_test.npz")
    predicted, labels = test["probabilities"].argmax(1), test["labels"]
    rules = {"run": metrics["referral"]}
    for name, score in (("uncertain, real prior", lambda p: p["uncertainty"]),
                        ("uncertain, balanced", lambda p: 1 - p["probabilities"].max(1))):
        rule = {"uncertainty_threshold": choose_threshold(score(val), coverage), "refer_coverage": coverage}
        rules[name] = referral_metrics(predicted, labels, score(test), None, rule, names)
    return rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    results = [run_rules(run_dir) for run_dir in args.run_dirs]
    names = list(results[0]["run"]["referred_by_class"])
    print("| rule | " + " | ".join(FIGURES) + " | " + " | ".join(f"referred {n}" for n in names) + " |")
    print("|---" * (1 + len(FIGURES) + len(names)) + "|")
    for rule in results[0]:
        rows = np.array([[r[rule][key] for key in FIGURES] + [r[rule]["referred_by_class"][n] for n in names]
                         for r in results], dtype=float)
        print(f"| {rule} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(rows.mean(0), rows.std(0), strict=True))
              + " |")


if __name__ == "__main__":
    main()
