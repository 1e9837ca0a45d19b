"""``protohead run``: extract (cached) → train → select on val → evaluate on test → report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from protohead.cli.common import add_config_arguments, add_run_dir_arguments, config_from_args, default_run_dir, guarded


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help=__doc__.split(":", 1)[1].strip().rstrip("."))
    add_config_arguments(parser)
    add_run_dir_arguments(parser)
    parser.set_defaults(handler=guarded(main))


def main(args: argparse.Namespace) -> int:
    from protohead.pipeline import run

    config = config_from_args(args)
    run_dir = args.out or default_run_dir(config)
    metrics = run(config, run_dir, resume=args.resume, overwrite=args.overwrite,
                  allow_config_change=args.allow_config_change)
    summary = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece", "aurc")}
    print(json.dumps(summary, indent=2))
    print(f"report: {Path(run_dir) / 'report.md'}")
    return 0
