"""The accuracy ↔ balanced-accuracy operating points a trained run offers, each chosen on validation only.

A run's post-hoc prior shift τ (README, "post-hoc logit adjustment") is the largest validation balanced accuracy
among the τ that keep validation accuracy within ``posthoc_accuracy_tolerance`` (default 0.01) of τ = 0's. The
tolerance is the user's operating point: how much accuracy one gives for recall of the rare classes. For each
tolerance given this script re-chooses τ on the run's validation predictions (the selected checkpoint, views
averaged as the run does) and scores test once with it: accuracy, balanced accuracy and tail recall (the mean
recall of the rarest third of the training classes, as ``protohead compare``).

    .venv/bin/python benchmarks/operating_points.py RUN_DIR [RUN_DIR ...] [--tolerances 0 0.01 0.02 0.03]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from protohead.compare import tail_classes
from protohead.evaluation import compute_metrics
from protohead.posthoc import adjust_probabilities, choose_prior_shift
from protohead.runfolder import load_model, prepare_run
from protohead.training.loop import predict


def operating_points(run_dir: str, tolerances: list[float]) -> list[dict]:
    loaded = load_model(run_dir)
    config = loaded.config
    data = prepare_run(loaded)
    outputs = {split: predict(loaded.model, data.splits[split], config.eval_batch_size) for split in ("val", "test")}
    counts = data.class_counts
    tail = tail_classes(data.class_names, counts)  # the rarest third, as compare's tail recall
    rows = []
    for tolerance in tolerances:
        shift = choose_prior_shift(outputs["val"]["probabilities"], outputs["val"]["labels"], counts, tolerance)
        row = {"run": run_dir, "tolerance": tolerance, "tau": shift.tau, "val_accuracy": shift.accuracy,
               "val_balanced_accuracy": shift.balanced_accuracy}
        adjusted = adjust_probabilities(outputs["test"]["probabilities"], counts, shift.tau)
        metrics = compute_metrics(adjusted, outputs["test"]["labels"], class_names=data.class_names)
        recall = metrics["per_class_recall"]
        row.update(test_accuracy=metrics["accuracy"], test_balanced_accuracy=metrics["balanced_accuracy"],
                   test_tail_recall=float(np.mean([recall[c] for c in tail if recall.get(c) is not None])))
        rows.append(row)
        print(f"{run_dir}  tolerance {tolerance:.2f}  τ {shift.tau:.2f}  val {shift.accuracy:.3f} / "
              f"{shift.balanced_accuracy:.3f}  test {row['test_accuracy']:.3f} / {row['test_balanced_accuracy']:.3f}"
              f"  tail recall {row['test_tail_recall']:.3f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.03])
    parser.add_argument("--json", help="also write every row to this file")
    args = parser.parse_args()
    rows = [row for run in args.runs for row in operating_points(run, args.tolerances)]
    print("\nmean over the runs")
    for tolerance in args.tolerances:
        mine = [r for r in rows if r["tolerance"] == tolerance]
        means = {key: np.mean([r[key] for r in mine]) for key in
                 ("test_accuracy", "test_balanced_accuracy", "test_tail_recall")}
        spread = np.std([r["test_balanced_accuracy"] for r in mine])
        print(f"tolerance {tolerance:.2f}: test accuracy {means['test_accuracy']:.3f}, balanced accuracy "
              f"{means['test_balanced_accuracy']:.3f} ± {spread:.3f}, tail recall {means['test_tail_recall']:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
