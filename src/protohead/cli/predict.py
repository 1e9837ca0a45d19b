"""``protohead predict RUN IMAGE|DIR ...``: classify new images with a trained run (no training data needed)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from protohead.cli.common import guarded


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help=__doc__.split(":", 1)[1].strip().rstrip("."))
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="a run folder written by protohead run/train")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE|DIR",
                        help="image files, or folders (their images, recursively, in name order)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    parser.add_argument("--explain", type=Path, metavar="OUT_DIR",
                        help="also write one explanation figure per image into OUT_DIR")
    parser.add_argument("--top", type=int, default=3, help="prototypes cited per image (default 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.set_defaults(handler=guarded(main))


def expand_inputs(items: list[Path]) -> list[Path]:
    """Files as given; folders replaced by their image files (:func:`protohead.data.base.image_files`). Missing
    paths are kept, so they are reported as errors in their place."""
    from protohead.data.base import image_files

    paths: list[Path] = []
    for item in items:
        paths += image_files(item) if item.is_dir() else [item]
    return paths


def explanation_names(paths: list[Path]) -> dict[Path, str]:
    """A distinct file-safe figure name per input: the file's stem; where stems repeat (``a/x.png``, ``b/x.png``,
    ``b/x.jpg``) its path below the inputs' common folder, suffix included (``b_x_jpg``); and where names still meet
    once made file-safe (``a b.png``, ``a_b.png``), a counter (``a_b_2``)."""
    from protohead.explain.gallery import safe_name

    common = Path(os.path.commonpath([path.absolute() for path in paths])) if paths else Path()

    def below_common(path: Path) -> str:
        relative = path.absolute().relative_to(common) if path.absolute() != common else Path(path.name)
        return relative.with_suffix("").as_posix() + path.suffix.replace(".", "_")  # b/1.jpg → b/1_jpg

    stems = Counter(safe_name(path.stem) for path in paths)
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for path in paths:
        name = safe_name(path.stem)
        if stems[name] > 1:
            name = safe_name(below_common(path))
        unique, count = name, 1
        while unique in taken:
            count += 1
            unique = f"{name}_{count}"
        taken.add(unique)
        names[path] = unique
    return names


def main(args: argparse.Namespace) -> int:
    from protohead.predict import load_run

    if args.top < 0 or args.batch_size < 1:
        raise ValueError("--top must be ≥ 0 and --batch-size ≥ 1")
    predictor = load_run(args.run_dir, batch_size=args.batch_size)
    paths = expand_inputs(args.images)
    if not paths:
        raise ValueError(f"no images found in {', '.join(map(str, args.images))}")
    if args.explain is not None:
        predictor.check_explainable()  # before any output, not after the first prediction
        figure_names = explanation_names(paths)
        args.explain.mkdir(parents=True, exist_ok=True)
    failures = 0
    if not args.json:
        print(f"{'image':40s} {'predicted':>10s} {'p':>6s} {'uncert.':>8s}  top prototype")
    for path, result in predictor.predict_each(paths, top=args.top):
        if isinstance(result, ValueError):
            failures += 1
            print(f"protohead predict: error: {' '.join(str(result).split())}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(result.to_dict()))
        else:
            top = result.prototypes[0] if result.prototypes else None
            cited = f"{top.class_name}/{top.slot} ({top.similarity:.3f}, from {top.source_id})" if top else "-"
            flag = ((" ABSTAIN" if result.abstain else "") + (" OUT-OF-DISTRIBUTION" if result.ood else "")
                    + (f" REFER ({', '.join(result.refer_reasons)})" if result.refer else ""))
            print(f"{str(path)[-40:]:40s} {result.predicted:>10s} {result.probabilities[result.predicted]:6.3f} "
                  f"{result.uncertainty:8.3f}{flag}  {cited}")
        if args.explain is not None:
            predictor.explain_figure(path, args.explain, figure_names[path])
    if failures:
        print(f"protohead predict: {failures} of {len(paths)} image(s) could not be read", file=sys.stderr)
        return 2
    return 0
