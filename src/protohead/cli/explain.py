"""``protohead explain``: prototype galleries, per-image explanations, diagnostics and a self-contained HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from protohead.cli.common import guarded


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("explain", help=__doc__.split(":", 1)[1].strip().rstrip("."))
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by protohead run")
    parser.add_argument("--images", nargs="+", metavar="ID", help="test image ids to explain (default: 6 test "
                                                                  "images, correct and incorrect, several classes)")
    parser.add_argument("--k", type=int, default=50, help="nearest training tokens for prototype purity")
    parser.set_defaults(handler=guarded(main))


def main(args: argparse.Namespace) -> int:
    from protohead.explain import explain_run

    result = explain_run(args.run_dir, image_ids=args.images, k=getattr(args, "k", 50))
    print(f"galleries: {len(result.galleries)}, explanations: {len(result.explanations)}, "
          f"dead prototypes: {result.diagnostics['dead_prototypes']['count']}, "
          f"near-duplicate pairs: {result.diagnostics['near_duplicates']['count']}")
    print(f"report: {result.report}")
    return 0
