"""``protohead compare``: every scheme preset and baseline on identical features, seeds and budget."""

from __future__ import annotations

import argparse
from pathlib import Path

from protohead.cli.common import guarded


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", help=__doc__.split(":", 1)[1].strip().rstrip("."))
    parser.add_argument("--data", help="dataset folder (default: ../shared/data/ham10000)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per column (default 3)")
    parser.add_argument("--split", choices=["official", "lesion"], default="official",
                        help="HAM10000 split (default official)")
    parser.add_argument("--quick", action="store_true",
                        help="small subset (30 images per class and split), 1 seed, 10 epochs (≤ 5 minutes)")
    parser.add_argument("--columns", nargs="+", help="run only these columns")
    parser.add_argument("--out", type=Path, help="output folder (default runs/compare-<split>[-quick])")
    parser.add_argument("--config", type=Path, help="YAML config for the shared settings")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every cell")
    parser.set_defaults(handler=guarded(main))


COMPARE_DEFAULTS = ["epochs=4", "head.emb_dim=128", "push_every=2", "expand_every=2"]


def main(args: argparse.Namespace) -> int:
    from protohead.compare import QUICK, run_comparison
    from protohead.runconfig import load_run_config

    overrides = list(COMPARE_DEFAULTS)
    seeds = args.seeds
    if args.quick:
        overrides += [f"{k}={v}" for k, v in QUICK.items()]
        seeds = 1
    if seeds < 1:
        raise ValueError("--seeds must be at least 1")
    base = load_run_config(args.config, [*overrides, *args.overrides], data=args.data, split=args.split)
    out = args.out or Path("runs") / f"compare-{args.split}{'-quick' if args.quick else ''}"
    summary = run_comparison(base, out, seeds=seeds, only=args.columns, progress=base.progress)
    print("\n".join(summary["claims"]))
    print(f"table: {out / 'comparison.md'}")
    return 0
