"""Arguments shared by the verbs, and turning errors into one-line messages with exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from protohead import runfolder
from protohead.runconfig import RunConfig, load_run_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="dataset: HAM10000 folder, MedMNIST .npz or class folders "
                                       "(default: ../shared/data/ham10000 beside the repository)")
    parser.add_argument("--preset", "--model", dest="preset",
                        help="head preset (default patch; basic, long_tail, uncertainty, protopnet, ...) or baseline "
                             "(linear, linear_la, balanced_softmax, cosine)")
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("--split", choices=["official", "lesion"],
                        help="HAM10000 split: official (DermaMNIST) or lesion-grouped (default official)")
    parser.add_argument("--seed", type=int, help="seed of the run (model initialisation, batch order; default 0)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=5 "
                                                                           "head.emb_dim=256")


def add_run_dir_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="run directory (default runs/<model>-<split>-seed<seed>)")
    parser.add_argument("--resume", action="store_true", help="continue a stopped run in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing protohead run in --out (only its own files; anything else "
                             "in the folder makes it refuse)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: continue with settings that differ from the stored run's")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config from the arguments. With ``--resume`` on an existing run, its stored config is the base,
    so ``--resume`` alone continues the run and only the settings given on the command line can differ."""
    def load(base: dict | None = None) -> RunConfig:
        return load_run_config(args.config, args.overrides, base=base, data=args.data, preset=args.preset,
                               split=args.split, seed=args.seed)

    config = load()
    if getattr(args, "resume", False):
        out = args.out or default_run_dir(config)
        if (Path(out) / runfolder.CONFIG_FILE).is_file():
            config = load(runfolder.read_config(out).to_dict())
    return config


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / f"{config.preset}-{config.split}-seed{config.seed}"


def guarded(verb: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``verb``; a ``ValueError`` (bad input, config or data) becomes one line on stderr and exit code 2."""
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return verb(args)
        except (ValueError, FileNotFoundError) as error:
            message = " ".join(str(error).split())  # one line, even for multi-line YAML errors
            print(f"protohead {args.verb}: error: {message}", file=sys.stderr)
            return 2
    return wrapper
