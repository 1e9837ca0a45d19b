"""``protohead`` command line: one module per verb."""

from __future__ import annotations

import argparse
import sys

from protohead.cli import compare, evaluate, explain, extract, run, train

VERBS = (run, train, evaluate, extract, compare, explain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protohead", description="Multi-prototype heads on image backbones.")
    subparsers = parser.add_subparsers(dest="verb", required=True)
    for verb in VERBS:
        verb.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
