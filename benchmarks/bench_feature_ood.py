"""Alternatives to the runs' OOD score, on the same pooled features: shrinkage, k-NN, relative Mahalanobis.

The runs score OOD by the Mahalanobis distance of the pooled features to the nearest class mean
(:mod:`protohead.density`, shrinkage 1 %). This script checks that choice on one run: it takes the pooled features
of the run's training, validation and test images (the run's own inputs: cached features, or a fine-tuned run's
block over the cached front maps; identity view) and of every OOD set of ``benchmarks/ood_sets.py``, and prints
AUROC per OOD group (test images as in-distribution) and the share of each class's test images flagged at the
threshold accepting 95 % of validation, for

- ``mahalanobis a=…``: the runs' score at covariance shrinkage a;
- ``knn10``: −cosine similarity to the 10th nearest training image (Sun et al., ICML 2022);
- ``relative``: the Mahalanobis distance minus that to one class-agnostic Gaussian (Ren et al. 2021).

    .venv/bin/python benchmarks/bench_feature_ood.py RUN_DIR /tmp/ood-sets
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from bench_near_ood_features import knn_scorer, mahalanobis_scorer
from bench_ood import set_folders

from protohead import runfolder
from protohead.ood import choose_threshold, ood_metrics
from protohead.pipeline import batches_of, prepare
from protohead.predict import RunPredictor, read_image
from protohead.training.loop import SplitInputs

SHRINKAGES = (0.0, 0.01, 0.1, 0.3, 0.6)


def pooled_features(split: SplitInputs) -> np.ndarray:
    """(n, F) identity-view pooled features of a prepared split."""
    return np.concatenate([split.fetch(idx, False)[1].float().numpy() for idx in batches_of(torch.arange(split.size),
                                                                                             256)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("sets", type=Path, help="folder written by benchmarks/ood_sets.py")
    args = parser.parse_args()
    predictor = RunPredictor(runfolder.load_model(args.run_dir))
    model = predictor.loaded.model
    with torch.no_grad():
        data = prepare(predictor.loaded.config, backbone=predictor.backbone)  # the run's backbone, checked when loaded
        model.eval()
        feats = {name: pooled_features(data.splits[name]).astype(np.float64) for name in ("train", "val", "test")}
        groups: dict[str, list[np.ndarray]] = {}
        for _, (group, paths) in set_folders(args.sets).items():
            images = [read_image(p) for p in paths]
            groups.setdefault(group, []).extend(
                predictor.features(images[i:i + 64])[1].double().numpy() for i in range(0, len(images), 64))
    labels = {name: data.splits[name].labels for name in ("train", "test")}
    train = feats["train"]
    scorers = {f"mahalanobis a={a:g}": mahalanobis_scorer(train, labels["train"], a) for a in SHRINKAGES}
    scorers["knn10"] = knn_scorer(train, 10)
    agnostic = mahalanobis_scorer(train, np.zeros(len(train), dtype=np.int64), 0.01)
    scorers["relative"] = lambda x: scorers["mahalanobis a=0.01"](x) - agnostic(x)
    classes = ", ".join(data.class_names)
    print("| score | " + " | ".join(groups) + f" | test images flagged per class ({classes}) |")
    print("|---|" + "---|" * len(groups) + "---|")
    for name, score in scorers.items():
        ins = score(feats["test"])
        threshold = choose_threshold(score(feats["val"]), 0.95)
        aurocs = [ood_metrics(ins, score(np.concatenate(parts)))["auroc"] for parts in groups.values()]
        flagged = [float(np.mean(ins[labels["test"] == c] > threshold)) for c in range(len(data.class_names))]
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in aurocs) + " | "
              + " / ".join(f"{f:.2f}" for f in flagged) + " |", flush=True)


if __name__ == "__main__":
    main()
