"""Refit a finished run's decision rule on validation (calibration temperature, OOD threshold) and score test.

    python benchmarks/calibrate_run.py RUN_DIR [--out DIR]

For runs trained before the selection record carried a temperature: prints test accuracy, balanced accuracy,
ECE before / after temperature scaling, AURC and AUGRC of the run's uncertainty and of 1 − max shifted
probability (the rule before prior-aware confidence), as JSON. Reads the cached features; writes only ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from protohead import runfolder
from protohead.evaluation import augrc, aurc
from protohead.pipeline import calibrate, evaluate_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="where metrics and plots go (default: a temporary folder)")
    args = parser.parse_args()
    loaded = runfolder.load_model(args.run_dir)
    config = runfolder.read_config(args.run_dir)
    data = runfolder.prepare_run(loaded, config)
    selection = {**loaded.selection, **calibrate(config, loaded.model, data, loaded.selection)}
    out = args.out or Path(tempfile.mkdtemp(prefix="protohead-calibrate-"))
    metrics = evaluate_model(loaded.model, data, "test", out, config.eval_batch_size, selection)
    saved = np.load(out / "predictions_test.npz")
    correct = saved["probabilities"].argmax(1) == saved["labels"]
    old_rule = 1.0 - saved["probabilities"].max(1)
    print(json.dumps({
        "run": str(args.run_dir), "selection": selection,
        **{key: metrics[key] for key in ("accuracy", "balanced_accuracy", "ece_uncalibrated", "ece", "nll", "aurc",
                                         "augrc", "uncertainty_source")},
        "aurc_one_minus_max_shifted": aurc(correct, old_rule), "augrc_one_minus_max_shifted": augrc(correct, old_rule),
        "out": str(out)}, indent=2))


if __name__ == "__main__":
    main()
