"""``protohead train``: extract (cached) → train → select on val; no test evaluation."""

from __future__ import annotations

import argparse
import json

from protohead.cli.common import add_config_arguments, add_run_dir_arguments, config_from_args, default_run_dir, guarded


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help=__doc__.split(":", 1)[1].strip().rstrip("."))
    add_config_arguments(parser)
    add_run_dir_arguments(parser)
    parser.set_defaults(handler=guarded(main))


def main(args: argparse.Namespace) -> int:
    from protohead.pipeline import train

    config = config_from_args(args)
    result = train(config, args.out or default_run_dir(config), resume=args.resume, overwrite=args.overwrite,
                  allow_config_change=args.allow_config_change)
    print(json.dumps(result["best"]))
    return 0
