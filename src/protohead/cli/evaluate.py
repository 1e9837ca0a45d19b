"""``protohead evaluate RUN_DIR``: metrics and plots of a run's selected checkpoint on a split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from protohead.cli.common import guarded


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help=__doc__.split(":", 1)[1].strip().rstrip("."))
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="a run folder written by protohead run/train")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score")
    parser.add_argument("--out", type=Path, help="output folder (default RUN_DIR/eval-<split>)")
    parser.add_argument("--data", type=Path, help="where the run's dataset is now (default: the stored path)")
    parser.set_defaults(handler=guarded(main))


def main(args: argparse.Namespace) -> int:
    from protohead.pipeline import evaluate_run

    metrics = evaluate_run(args.run_dir, args.split, args.out, data_path=args.data)
    print(json.dumps({k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece")}, indent=2))
    return 0
