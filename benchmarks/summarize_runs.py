"""Mean ± std over run folders (e.g. the seeds of one configuration) of the test figures BENCHMARKS tables report.

Reads each run's ``metrics.json`` (test, scored once by the run) and prints accuracy, balanced accuracy, macro-F1,
macro AUROC, ECE, AURC and tail recall (the mean recall of the rarest third of the training classes, as
``protohead compare``; HAM10000: df, vasc, akiec), and the selected model's validation accuracy and balanced
accuracy (``history.json``'s ``best``: what a choice between configurations may look at), then one line per run.
Standard deviation over runs (ddof 0). Runs with a referral rule (:mod:`protohead.referral`) get a second table: the
share of test images referred (and why), accuracy and balanced accuracy of those decided, the error rate of those
referred, and the share of each class referred.

    .venv/bin/python benchmarks/summarize_runs.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from protohead.compare import tail_classes
from protohead.runfolder import load_model

COLUMNS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece", "aurc", "tail_recall", "val_accuracy",
           "val_balanced_accuracy")


def run_figures(run_dir: Path) -> list[float]:
    """The COLUMNS of one run: its test metrics and its selected model's validation scores."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = json.loads((run_dir / "history.json").read_text())["best"]
    metrics.update(val_accuracy=best["val_accuracy"], val_balanced_accuracy=best["val_balanced_accuracy"])
    description = load_model(run_dir).description
    tail = tail_classes(tuple(description["class_names"]), list(description["class_counts"]))
    metrics["tail_recall"] = float(np.mean([metrics["per_class_recall"][name] for name in tail]))
    return [float(metrics[column]) for column in COLUMNS]


REFERRAL = ("referred", "referred_uncertain", "referred_unlike_training", "all_accuracy", "decided_accuracy",
            "decided_balanced_accuracy", "referred_error_rate")


def print_referral(run_dirs: list[Path]) -> None:
    """Mean ± std of the REFERRAL figures and of each class's referred share, over the runs that have them."""
    referrals = [json.loads((run_dir / "metrics.json").read_text()).get("referral") for run_dir in run_dirs]
    referrals = [r for r in referrals if r is not None]
    if not referrals:
        return
    names = list(referrals[0]["referred_by_class"])
    columns = [*REFERRAL, *(f"referred {name}" for name in names)]
    rows = np.array([[r[key] for key in REFERRAL] + [r["referred_by_class"][name] for name in names]
                     for r in referrals], dtype=float)
    print(f"\nreferral at {referrals[0]['refer_coverage']:g} validation coverage ({len(referrals)} runs)")
    print(" | ".join(columns))
    print(" | ".join(f"{mean:.3f} ± {std:.3f}" for mean, std in zip(rows.mean(0), rows.std(0), strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    rows = np.array([run_figures(run_dir) for run_dir in args.run_dirs])
    print(" | ".join(COLUMNS))
    print(" | ".join(f"{mean:.3f} ± {std:.3f}" for mean, std in zip(rows.mean(0), rows.std(0), strict=True)))
    for run_dir, row in zip(args.run_dirs, rows, strict=True):
        print(f"{run_dir}: " + " ".join(f"{value:.3f}" for value in row))
    print_referral(args.run_dirs)


if __name__ == "__main__":
    main()
