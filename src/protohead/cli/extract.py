"""``protohead extract``: compute (or find) the cached backbone features of every split."""

from __future__ import annotations

import argparse

from protohead.cli.common import add_config_arguments, config_from_args, guarded


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("extract", help=__doc__.split(":", 1)[1].strip().rstrip("."))
    add_config_arguments(parser)
    parser.set_defaults(handler=guarded(main))


def main(args: argparse.Namespace) -> int:
    from protohead.pipeline import prepare

    data = prepare(config_from_args(args))
    for name, split in data.splits.items():
        print(f"{name}: {split.size} images, feature dim {data.feature_dim}")
    return 0
