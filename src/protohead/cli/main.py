"""``protohead`` command line: one module per verb."""

from __future__ import annotations

import argparse
import sys

from protohead.cli import cache, compare, evaluate, explain, export, extract, predict, run, train

VERBS = (run, train, evaluate, predict, export, extract, cache, compare, explain)


def build_parser() -> argparse.ArgumentParser:
    from protohead import __version__

    parser = argparse.ArgumentParser(prog="protohead", description="Multi-prototype heads on image backbones.")
    parser.add_argument("--version", action="version", version=f"protohead {__version__}")
    subparsers = parser.add_subparsers(dest="verb", required=True)
    for verb in VERBS:
        verb.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (``train --out x --resume lr=0.5``); argparse alone would
    # take only those before the first option
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
