"""How well a run flags images that are not (its) lesions: AUROC / FPR95 per OOD set and score.

Far-OOD and covariate shift, on the sets of ``benchmarks/ood_sets.py``::

    .venv/bin/python benchmarks/ood_sets.py /tmp/ood-sets
    .venv/bin/python benchmarks/bench_ood.py score RUN_DIR /tmp/ood-sets [--data DIR] [--json J] [--save-outputs X.npz]
        [--fit-density]
    .venv/bin/python benchmarks/bench_ood.py table X.npz [--temperature T]      # the tables again, no backbone

The run's test split is the in-distribution (a frozen-backbone run reads its features from the feature cache),
every folder of images under the sets folder one OOD set; rows are grouped as in ``manifest.json`` (far-OOD
synthetic, far-OOD natural, covariate shift) with a pooled row per group. Columns: AUROC and FPR95 of each
score of :mod:`protohead.ood` (``mahalanobis`` = the head's feature distance, for runs that fitted it;
``max_similarity``, ``energy``, ``logit_energy``, ``max_probability`` = 1 − max probability), and the detection
rate of the run's own score at the threshold that accepts 95 % of validation.
A second table sweeps the prototype-energy temperature on the pooled far-OOD images.

Near-OOD (an unseen lesion class), :func:`near_ood`::

    .venv/bin/python benchmarks/bench_ood.py near-ood df /tmp/near-ood-df [key=value ...]

trains a run on HAM10000 *without* one class and scores that class's test images as OOD, and prints how many of
the held-out images and of the other test images the run refers (:mod:`protohead.referral`). The data loaders
cannot drop a class (HAM10000's class list is fixed and every class must have training images), so
:func:`holdout_layout` builds a class-folder dataset of symlinks to the original JPEGs (absolute paths, no
copies) without the class, plus a folder of the held-out images. The features of that layout are not those in
the cache of the official split (the cache key covers the file names and labels), so the first run per held-out
class extracts the backbone features of all its images again (up to ~9,900; at the ~0.15 s per 224² image
measured here on 2 shared CPU cores that is ~25 minutes, then ~40 s per epoch at head.emb_dim=128).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protohead.ood import (
    ACCEPTANCE,
    DEFAULT_ENERGY_TEMPERATURE,
    HeadOutputs,
    UnreadableImageWarning,
    choose_threshold,
    file_outputs,
    image_files,
    ood_metrics,
    run_scoring,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HAM = REPO.parent / "shared" / "data" / "ham10000"
SWEEP = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.2, 0.5, 1.0)


def set_folders(root: Path) -> dict[str, tuple[str, list[Path]]]:
    """OOD set name (path relative to ``root``) → (group, image files), for every folder holding images directly.

    The group comes from ``root/manifest.json`` when present (``ood_sets.py`` writes it), else the first path part.
    """
    manifest = json.loads((root / "manifest.json").read_text()) if (root / "manifest.json").is_file() else {}
    sets: dict[str, tuple[str, list[Path]]] = {}
    for path in image_files(root):
        name = path.parent.relative_to(root).as_posix()
        group = manifest.get(name, {}).get("group", name.split("/")[0])
        sets.setdefault(name, (group, []))[1].append(path)
    return sets


def _pooled(outputs: list[HeadOutputs]) -> HeadOutputs:
    sims = [o.similarities for o in outputs]
    distances = [o.feature_distances for o in outputs]
    return HeadOutputs(np.concatenate([o.logits for o in outputs]), np.concatenate([o.probabilities for o in outputs]),
                       None if any(s is None for s in sims) else np.concatenate(sims),
                       [s for o in outputs for s in o.sources],
                       None if any(d is None for d in distances) else np.concatenate(distances))


@dataclass
class Collected:
    """Head outputs of a run's validation and test images and of every OOD set (what the tables are made of).

    Attributes:
        run_dir, split: the run and its in-distribution split. val, ins: their :class:`HeadOutputs`.
        labels: (n_in,) class index of each in-distribution image; class_names: (C,).
        sets: set name → (group, outputs, number of unreadable files). seconds: time to collect.
    """

    run_dir: str
    split: str
    val: HeadOutputs
    ins: HeadOutputs
    labels: np.ndarray
    class_names: tuple[str, ...]
    sets: dict[str, tuple[str, HeadOutputs, int]]
    seconds: float = 0.0

    def save(self, path: Path) -> None:
        """Everything to one ``.npz`` (keys ``<part>/<field>``; parts ``val``, ``in`` and the set names)."""
        parts = {"val": self.val, "in": self.ins, **{name: o for name, (_, o, _) in self.sets.items()}}
        arrays = {f"{n}/{f}": getattr(o, f) for n, o in parts.items()
                  for f in ("logits", "probabilities", "similarities", "feature_distances")
                  if getattr(o, f) is not None}
        meta = {"run_dir": self.run_dir, "split": self.split, "class_names": list(self.class_names),
                "seconds": self.seconds, "sets": {n: [g, len(o.logits), k] for n, (g, o, k) in self.sets.items()}}
        np.savez_compressed(path, __meta__=np.array(json.dumps(meta)), __labels__=self.labels, **arrays)

    @classmethod
    def load(cls, path: Path) -> Collected:
        z = np.load(path)
        meta = json.loads(str(z["__meta__"]))

        def part(name: str) -> HeadOutputs:
            sims, distances = (z[f"{name}/{f}"] if f"{name}/{f}" in z.files else None
                               for f in ("similarities", "feature_distances"))
            return HeadOutputs(z[f"{name}/logits"], z[f"{name}/probabilities"], sims,
                               [f"{name}[{i}]" for i in range(len(z[f"{name}/logits"]))], distances)

        sets = {n: (g, part(n), k) for n, (g, _, k) in meta["sets"].items()}
        return cls(meta["run_dir"], meta["split"], part("val"), part("in"), z["__labels__"],
                   tuple(meta["class_names"]), sets, meta["seconds"])


def collect(run_dir: Path, sets_root: Path, data: Path | None = None, split: str = "test",
            fit_density: bool = False) -> Collected:
    """Score the run's validation and ``split`` images and every set folder under ``sets_root`` (backbone runs
    only on the OOD images of a frozen-backbone run; its own splits come from the feature cache).
    ``fit_density``: fit the feature density of a run trained before it existed (in memory; see
    :func:`protohead.ood.run_scoring`)."""
    import dataclasses

    from protohead import runfolder
    from protohead.pipeline import load_data

    started = time.perf_counter()
    predictor, val, ins = run_scoring(run_dir, split, data, fit_density=fit_density)
    config = runfolder.read_config(run_dir)
    if data is not None:
        config = dataclasses.replace(config, data=str(data))
    dataset = load_data(config)
    sets: dict[str, tuple[str, HeadOutputs, int]] = {}
    for name, (group, paths) in set_folders(sets_root).items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnreadableImageWarning)
            outs, bad = file_outputs(predictor, paths)
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
        if outs is not None:
            sets[name] = (group, outs, len(bad))
    return Collected(str(run_dir), split, val, ins, np.asarray(dataset.splits[split].labels),
                     tuple(dataset.class_names), sets, time.perf_counter() - started)


def tabulate(collected: Collected, temperature: float = DEFAULT_ENERGY_TEMPERATURE) -> dict[str, Any]:
    """Every method's metrics on every set and per group pooled, the in-distribution images each method flags
    per class, and a prototype-energy temperature sweep on the pooled far-OOD images."""
    val, ins = collected.val, collected.ins
    methods = ins.methods
    thresholds = {m: choose_threshold(val.scores(m, temperature), ACCEPTANCE) for m in methods}

    def metrics(outs: HeadOutputs) -> dict[str, dict[str, float]]:
        return {m: ood_metrics(ins.scores(m, temperature), outs.scores(m, temperature), thresholds[m])
                for m in methods}

    rows: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[HeadOutputs]] = {}
    for name, (group, outs, unreadable) in collected.sets.items():
        groups.setdefault(group, []).append(outs)
        rows[name] = {"group": group, "unreadable": unreadable, "metrics": metrics(outs)}
    pooled = {group: _pooled(parts) for group, parts in groups.items()}
    for group, outs in pooled.items():
        rows[f"all: {group}"] = {"group": group, "unreadable": 0, "metrics": metrics(outs)}
    flagged = {m: {c: int((ins.scores(m, temperature)[collected.labels == k] > thresholds[m]).sum())
                   for k, c in enumerate(collected.class_names)} for m in methods}
    sweep: dict[str, dict[str, float]] = {}
    far = [o for g, o in pooled.items() if not g.startswith("covariate")]
    if ins.similarities is not None and far:
        far_out = _pooled(far)
        for t in SWEEP:
            sweep[f"{t:g}"] = ood_metrics(ins.scores("energy", t), far_out.scores("energy", t))
        sweep["max_similarity"] = ood_metrics(ins.scores("max_similarity"), far_out.scores("max_similarity"))
    return {"run_dir": collected.run_dir, "split": collected.split, "n_in": len(ins.logits), "n_val": len(val.logits),
            "methods": list(methods), "headline": ins.default_method, "thresholds": thresholds,
            "energy_temperature": temperature, "rows": rows, "in_distribution_flagged": flagged,
            "in_distribution_counts": {c: int((collected.labels == k).sum())
                                       for k, c in enumerate(collected.class_names)},
            "energy_sweep_far_ood": sweep, "seconds": collected.seconds}


def markdown(result: dict[str, Any]) -> str:
    """The result of :func:`tabulate` as markdown tables."""
    methods = result["methods"]
    head = result["headline"]
    lines = [f"In-distribution: {result['n_in']} {result['split']} images of {result['run_dir']}; thresholds accept "
             f"{ACCEPTANCE:.0%} of {result['n_val']} validation images. AUROC ↑ / FPR95 ↓ per score; "
             f"'flagged' = OOD images above the {head} threshold ({result['thresholds'][head]:.4f}).", "",
             "| set | n | " + " | ".join(f"{m} AUROC / FPR95" for m in methods) + f" | flagged ({head}) |",
             "|---|---:|" + "---|" * len(methods) + "---:|"]
    ordered = sorted(result["rows"].items(), key=lambda kv: (kv[1]["group"], kv[0].startswith("all: "), kv[0]))
    for name, row in ordered:
        metrics = row["metrics"]
        cells = [f"{metrics[m]['auroc']:.3f} / {metrics[m]['fpr95']:.3f}" for m in methods]
        label = f"**{name}**" if name.startswith("all: ") else name
        lines.append(f"| {label} | {metrics[head]['n_out']} | " + " | ".join(cells)
                     + f" | {metrics[head]['detection_rate']:.3f} |")
    counts = result["in_distribution_counts"]
    lines += ["", f"In-distribution {result['split']} images flagged as OOD at each method's threshold, per class:", "",
              "| method | " + " | ".join(f"{c} (n={n})" for c, n in counts.items()) + " | all |",
              "|---|" + "---:|" * (len(counts) + 1)]
    for m, per_class in result["in_distribution_flagged"].items():
        lines.append(f"| {m} | " + " | ".join(str(per_class[c]) for c in counts)
                     + f" | {sum(per_class.values()) / sum(counts.values()):.3f} |")
    if result["energy_sweep_far_ood"]:
        lines += ["", "Prototype energy −T·logsumexp(s/T) by temperature T, all far-OOD images pooled:", "",
                  "| T | AUROC | FPR95 |", "|---|---:|---:|"]
        for t, metrics in result["energy_sweep_far_ood"].items():
            lines.append(f"| {t} | {metrics['auroc']:.3f} | {metrics['fpr95']:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- near-OOD
def holdout_layout(ham: Path, holdout: str, out: Path, split: str = "official",
                   ood_splits: tuple[str, ...] = ("test",), ood_limit: int | None = None, seed: int = 0
                   ) -> tuple[Path, Path]:
    """A class-folder HAM10000 without class ``holdout``, made of symlinks to the original images.

    Args:
        ham: the HAM10000 folder (read only; the symlinks point to its JPEGs by absolute path).
        holdout: the class to leave out (e.g. ``"df"``).
        out: a scratch folder outside the repository; gets ``out/data/{train,val,test}/<class>/<id>.jpg`` (the
            other six classes, same split membership) and ``out/ood/<holdout>/<id>.jpg``.
        split: HAM10000 split, ``"official"`` or ``"lesion"``.
        ood_splits: splits whose ``holdout`` images form the OOD set (default the test split only).
        ood_limit: at most this many OOD images (drawn with ``seed``), e.g. for a smoke test.

    Returns:
        (data folder for ``--data``, OOD folder for ``--ood``). An existing layout is reused as is.
    """
    from protohead.data import load_ham10000

    out = Path(out).resolve()
    if out.is_relative_to(REPO):
        raise ValueError(f"refusing to build a dataset layout inside the repository ({out}); use /tmp")
    data, ood = out / "data", out / "ood" / holdout
    if (out / "layout.json").is_file():
        return data, ood
    dataset = load_ham10000(ham, split=split, seed=seed)
    if holdout not in dataset.class_names:
        raise ValueError(f"unknown class {holdout!r}; expected one of {list(dataset.class_names)}")
    held: list[tuple[str, str]] = []
    for name, part in dataset.splits.items():
        for image_id, label, source in zip(part.ids, part.labels.tolist(), part.sources or (), strict=True):
            link = Path(source).name
            cls = dataset.class_names[label]
            if cls == holdout:
                if name in ood_splits:
                    held.append((image_id, os.path.abspath(source)))
                continue
            target = data / name / cls / link
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.path.abspath(source))
    if ood_limit is not None and len(held) > ood_limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(held), size=ood_limit, replace=False))
        held = [held[i] for i in keep]
    ood.mkdir(parents=True, exist_ok=True)
    for _, source in held:
        (ood / Path(source).name).symlink_to(source)
    (out / "layout.json").write_text(json.dumps({"ham": str(ham), "holdout": holdout, "split": split,
                                                 "ood_splits": list(ood_splits), "ood_images": len(held)}) + "\n")
    return data, ood


def near_ood(holdout: str, work: Path, overrides: list[str], ham: Path = DEFAULT_HAM, preset: str = "basic",
             ood_limit: int | None = None) -> dict[str, Any]:
    """Near-OOD protocol: train ``preset`` on HAM10000 without ``holdout`` and score that class's test images
    as OOD against the other classes' test images (:func:`protohead.ood.evaluate_ood`, every method).

    ``overrides``: run config ``key=value`` (e.g. ``epochs=15 head.emb_dim=128``); the run goes to
    ``work/run`` (reused when it has finished, resumed when it was stopped), the result to
    ``work/run/ood-<holdout>/ood.json``. ``ood_limit``: at most this many held-out images (smoke tests).
    """
    from protohead import runfolder
    from protohead.cli.main import main as cli
    from protohead.ood import evaluate_ood

    data, ood = holdout_layout(ham, holdout, work, ood_limit=ood_limit)
    run = Path(work).resolve() / "run"
    marker = run / runfolder.MARKER_FILE
    if not marker.is_file() or json.loads(marker.read_text()).get("status") != "finished":
        resume = ["--resume"] if marker.is_file() else []
        code = cli(["train", "--data", str(data), "--out", str(run), "--preset", preset, *resume, *overrides])
        if code != 0:
            raise SystemExit(f"training on {data} failed with exit code {code}")
    return evaluate_ood(run, ood, run / f"ood-{holdout}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    score = sub.add_parser("score", help="AUROC / FPR95 per OOD set and score")
    score.add_argument("run_dir", type=Path)
    score.add_argument("sets", type=Path, help="folder written by benchmarks/ood_sets.py")
    score.add_argument("--data", type=Path, help="where the run's dataset is now")
    score.add_argument("--temperature", type=float, default=DEFAULT_ENERGY_TEMPERATURE, help="prototype energy T")
    score.add_argument("--json", type=Path, help="also write the full result here")
    score.add_argument("--save-outputs", type=Path, help="also write every image's head outputs to this .npz "
                                                           "(re-tabulate it with the table mode)")
    score.add_argument("--fit-density", action="store_true",
                       help="fit the feature density (mahalanobis score) of a run trained before runs fitted it, in "
                            "memory (the run folder is not changed)")
    table = sub.add_parser("table", help="the tables again from a --save-outputs file (no backbone)")
    table.add_argument("outputs", type=Path)
    table.add_argument("--temperature", type=float, default=DEFAULT_ENERGY_TEMPERATURE, help="prototype energy T")
    table.add_argument("--json", type=Path, help="also write the full result here")
    near = sub.add_parser("near-ood", help="train without one class, score it as OOD")
    near.add_argument("holdout", help="class to leave out, e.g. df")
    near.add_argument("work", type=Path, help="scratch folder (outside the repository)")
    near.add_argument("overrides", nargs="*", help="run config key=value")
    near.add_argument("--ham", type=Path, default=DEFAULT_HAM)
    near.add_argument("--preset", default="basic")
    near.add_argument("--ood-limit", type=int, help="at most this many held-out images (smoke tests)")
    args, extra = parser.parse_known_args()  # near-ood: key=value overrides may also follow its options
    if extra and (args.mode != "near-ood" or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.mode in ("score", "table"):
        if args.mode == "score":
            collected = collect(args.run_dir, args.sets, args.data, fit_density=args.fit_density)
            if args.save_outputs:
                collected.save(args.save_outputs)
        else:
            collected = Collected.load(args.outputs)
        result = tabulate(collected, args.temperature)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(markdown(result))
        print(f"\n({result['seconds']:.0f} s)")
    else:
        result = near_ood(args.holdout, args.work, [*args.overrides, *extra], args.ham, args.preset, args.ood_limit)
        table = {m: {k: round(v, 4) for k, v in r.items() if k in ("auroc", "fpr95", "detection_rate")}
                 for m, r in result["methods"].items()}
        print(json.dumps({"holdout": args.holdout, "counts": result["counts"], "methods": table,
                          "referral": result["referral"]}, indent=2))


if __name__ == "__main__":
    main()
