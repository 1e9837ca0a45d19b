"""``protohead cache list|prune``: see what the feature cache holds and free disk (least recently used first).

Examples:

    protohead cache list                          # entries, sizes, last use; foreign files listed, never touched
    protohead cache prune --max-size 20G          # remove least recently used entries until 20 GiB remain
    protohead cache prune --older-than 30         # entries unused for 30 days
    protohead cache prune --key 3fa9c2 --dry-run  # one entry, by a key prefix: show what would go
    protohead cache prune --all                   # every entry (foreign files stay)
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING

from protohead.cli.common import guarded

if TYPE_CHECKING:
    from protohead.cache import CacheListing


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cache", help="list the feature cache or free disk by removing its entries",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="entries (least recently used first), sizes, leftovers, foreign paths")
    prune = actions.add_parser("prune", help="remove entries: by size, age, key or all; only what the cache wrote "
                                             "(every prune also removes what interrupted extractions left, unless "
                                             "a process is still writing it)")
    for sub in (listing, prune):
        sub.add_argument("--cache-dir", type=Path,
                         help="feature cache folder (default $PROTOHEAD_CACHE/features or ~/.cache/protohead/features, "
                              "as the runs use)")
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    prune.add_argument("--max-size", help="keep the cache under this size, e.g. 20G (K/M/G/T = powers of 1024): "
                                          "the least recently used entries go first")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="remove entries unused for DAYS days")
    prune.add_argument("--key", action="append", default=[], metavar="PREFIX",
                       help="remove the entry whose key starts with PREFIX (repeatable)")
    prune.add_argument("--all", action="store_true", help="remove every entry")
    prune.add_argument("--dry-run", action="store_true", help="show what would be removed, remove nothing")
    parser.set_defaults(handler=guarded(main))


def _cache_dir(args: argparse.Namespace) -> Path:
    from protohead.pipeline import default_cache_dir

    return args.cache_dir if args.cache_dir is not None else default_cache_dir() / "features"


def _row(entry_description: dict) -> str:
    from protohead.cache import format_size

    when = datetime.datetime.fromtimestamp(entry_description["last_used"]).strftime("%Y-%m-%d %H:%M")
    rows = entry_description["rows"]
    reused = entry_description["rows_reused"]
    rows_text = f"{rows}" + (f" ({reused} copied)" if reused else "")
    state = entry_description["problem"] or "ok"
    shape = entry_description["tokens_shape"]
    tokens = f"{shape[1]}×{shape[2]}" if shape else "?"  # N × F: multi-scale tokens are wider
    return (f"{entry_description['key'][:12]}  {format_size(entry_description['bytes']):>10}  {when}  "
            f"{entry_description['backbone']:<24} {tokens:<9} {entry_description['view']:<13} "
            f"{entry_description['split']:<6} {rows_text:<20} {state}")


def main(args: argparse.Namespace) -> int:
    from protohead.cache import list_cache, parse_size

    cache_dir = _cache_dir(args)
    if args.action == "list":
        return _list(cache_dir, list_cache(cache_dir), args.json)
    max_bytes = None if args.max_size is None else parse_size(args.max_size)  # a bad size fails before anything
    return _prune(cache_dir, list_cache(cache_dir), args, max_bytes)


def _list(cache_dir: Path, listing: CacheListing, as_json: bool) -> int:
    from protohead.cache import being_written, format_size

    if as_json:
        print(json.dumps({"cache_dir": str(cache_dir), "bytes": listing.bytes,
                          "entries": [entry.describe() for entry in listing.entries],
                          "leftovers": [{"path": str(path), "being_written": being_written(cache_dir, path)}
                                        for path in listing.leftovers],
                          "foreign": [str(path) for path in listing.foreign]}, indent=1))
        return 0
    print(f"{cache_dir}: {len(listing.entries)} entries, {format_size(listing.bytes)}")
    if listing.entries:
        print(f"{'key':<12}  {'size':>10}  {'last used':<16}  {'backbone':<24} {'tokens':<9} {'view':<13} {'split':<6} "
              f"{'rows':<20} state")
    for entry in listing.entries:
        print(_row(entry.describe()))
    for path in listing.leftovers:
        print(f"{'being written' if being_written(cache_dir, path) else 'left by an interrupted extraction'}: {path}")
    for path in listing.foreign:
        print(f"not written by the cache (left alone): {path}")
    return 0


def _prune(cache_dir: Path, listing: CacheListing, args: argparse.Namespace, max_bytes: int | None) -> int:
    from protohead.cache import being_written, format_size, remove_entries, remove_leftovers, select_for_removal

    chosen = select_for_removal(listing, max_bytes=max_bytes, older_than_days=args.older_than, keys=args.key,
                                everything=args.all)
    if args.dry_run:
        removed, skipped = chosen, []
        leftovers = [path for path in listing.leftovers if not being_written(cache_dir, path)]
    else:
        removed, skipped = remove_entries(cache_dir, chosen)
        leftovers, _ = remove_leftovers(cache_dir, listing.leftovers)
    freed = sum(entry.bytes for entry in removed)
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        print(json.dumps({"cache_dir": str(cache_dir), "dry_run": args.dry_run, "bytes_freed": freed,
                          "removed": [entry.describe() for entry in removed],
                          "skipped_in_use": [entry.key for entry in skipped],
                          "leftovers_removed": [str(path) for path in leftovers],
                          "bytes_left": listing.bytes - freed}, indent=1))
        return 0
    for entry in removed:
        print(f"{verb}: {_row(entry.describe())}")
    for entry in skipped:
        print(f"in use by another process, kept: {entry.key[:12]}")
    for path in leftovers:
        print(f"{verb} what an interrupted extraction left: {path}")
    print(f"{verb} {len(removed)} of {len(listing.entries)} entries, {format_size(freed)}; "
          f"{format_size(listing.bytes - freed)} left")
    return 0
