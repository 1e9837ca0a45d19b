"""``protohead evaluate RUN_DIR``: metrics and plots of a run's selected checkpoint on a split.

With ``--ood DIR`` it measures out-of-distribution detection instead (:func:`protohead.ood.evaluate_ood`): the
run's ``--split`` images (default test) are the in-distribution, every image file under DIR the OOD set; it
writes ``ood.json``, ``ood_scores.csv`` and two plots to ``--out`` (default RUN_DIR/ood-<name of DIR>) and prints
AUROC and FPR95 as JSON. The split's classification metrics are not recomputed then (run without ``--ood``).
Unreadable files under DIR are skipped, each named in a warning line on stderr; the exit code stays 0 as long
as one OOD image could be read.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from protohead.cli.common import guarded


def register(subparsers: argparse._SubParsersAction) -> None:
    from protohead.ood import METHODS

    parser = subparsers.add_parser("evaluate", help=__doc__.split(":", 1)[1].split("\n")[0].strip().rstrip("."))
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="a run folder written by protohead run/train")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score")
    parser.add_argument("--out", type=Path, help="output folder (default RUN_DIR/eval-<split>, with --ood "
                                                 "RUN_DIR/ood-<name of DIR>)")
    parser.add_argument("--data", type=Path, help="where the run's dataset is now (default: the stored path)")
    parser.add_argument("--ood", type=Path, metavar="DIR",
                        help="out-of-distribution images (searched recursively): measure how well the run flags "
                             "them against the split's images (AUROC, FPR at 95%% TPR) instead of the split metrics")
    parser.add_argument("--ood-method", choices=METHODS,
                        help="with --ood: the headline score (default: the run's own, mahalanobis, or logit_energy for "
                             "runs without a fitted feature density; every method the run supports "
                             "is measured in ood.json)")
    parser.add_argument("--ood-threshold", type=float,
                        help="with --ood: flag images scoring above this (default: accept 95%% of validation)")
    parser.set_defaults(handler=guarded(main))


def main(args: argparse.Namespace) -> int:
    if args.ood is not None:
        return main_ood(args)
    if args.ood_method is not None or args.ood_threshold is not None:
        raise ValueError("--ood-method and --ood-threshold need --ood DIR")
    from protohead.pipeline import evaluate_run

    metrics = evaluate_run(args.run_dir, args.split, args.out, data_path=args.data)
    print(json.dumps({k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece")}, indent=2))
    return 0


def main_ood(args: argparse.Namespace) -> int:
    from protohead.ood import UnreadableImageWarning, evaluate_ood

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)  # reported below, one line per file
        result = evaluate_ood(args.run_dir, args.ood, args.out, split=args.split, threshold=args.ood_threshold,
                              method=args.ood_method, data_path=args.data)
    for item in result["unreadable"]:
        print(f"protohead evaluate: warning: skipped unreadable image {item['path']}: {item['error']}",
              file=sys.stderr)
    keys = ("method", "auroc", "fpr95", "threshold", "detection_rate", "in_acceptance")
    summary = {k: result[k] for k in keys} | {"counts": result["counts"], "referral": result["referral"],
                                               "out_dir": result["out_dir"]}
    print(json.dumps(summary, indent=2))
    return 0
