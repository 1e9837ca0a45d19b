"""Near-OOD headroom of the frozen backbone features themselves: is an unseen lesion class far from the others?

For each held-out class X of HAM10000 (official split): fit on the training images of every *other* class, then
score the test images — X's as OOD, the rest as in-distribution — with two head-free feature-space scores:

- ``mahalanobis``: min over the seen classes of the Mahalanobis distance to the class mean (shared covariance,
  shrunk 0.1 % towards the mean variance; Lee et al. 2018) on the pooled (B, F) features — the runs' own OOD score
  (:mod:`protohead.density`), fitted on the seen classes;
- ``knn@k``: minus the cosine similarity to the k-th nearest training image (Sun et al. 2022), k = 10 and 50.

No head is trained, so this is what any head on these features can hope for; compare with the heads' own scores
in BENCHMARKS §8 (``bench_ood.py near-ood``). Reads the official split's cached Lite0 features (extracts them
first if the cache is empty, ≈ 5 min)::

    .venv/bin/python benchmarks/bench_near_ood_features.py mel vasc df [--cache DIR] [--multiscale]

``--multiscale`` scores the multi-scale features instead (``multiscale=true``: block 14's 192 channels appended,
F = 1472; their own cache entry, extracted first if absent).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from protohead.density import fit_class_gaussians, mahalanobis_distances
from protohead.features import extract_features
from protohead.pipeline import default_cache_dir, load_data
from protohead.runconfig import load_run_config

SHRINKAGE = 1e-3


def mahalanobis_scorer(train: np.ndarray, labels: np.ndarray,
                       shrinkage: float = SHRINKAGE) -> Callable[[np.ndarray], np.ndarray]:
    """Fit on (n, F) training features and their labels (any class ids) once → score(x (m, F)) = (m,) squared
    Mahalanobis distance to the nearest class mean (:mod:`protohead.density`)."""
    classes, index = np.unique(labels, return_inverse=True)
    means, whitening = fit_class_gaussians(torch.from_numpy(train), torch.from_numpy(index), len(classes), shrinkage)
    return lambda x: mahalanobis_distances(torch.from_numpy(x), means, whitening).amin(dim=1).numpy()


def knn_scorer(train: np.ndarray, k: int) -> Callable[[np.ndarray], np.ndarray]:
    """score(x (m, F)) = −cos(x, its k-th nearest training row) (m,): higher = further from everything seen."""
    def unit(x: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    bank = unit(train)
    return lambda x: -(unit(x) @ bank.T).topk(k, dim=1).values[:, -1].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("held_out", nargs="+", help="class names to hold out, one at a time (e.g. mel vasc df)")
    parser.add_argument("--cache", type=Path, help="feature cache folder (default: the user cache)")
    parser.add_argument("--multiscale", action="store_true", help="the multi-scale features (F = 1472)")
    args = parser.parse_args()
    config = load_run_config(overrides=["progress=false", f"multiscale={str(args.multiscale).lower()}"])
    dataset = load_data(config)
    backbone = config.build_backbone()
    cache = args.cache or default_cache_dir() / "features"
    features = {name: extract_features(backbone, dataset.splits[name], cache, progress=False)
                for name in ("train", "test")}
    pooled = {name: np.asarray(fs.pooled, dtype=np.float32) for name, fs in features.items()}
    labels = {name: np.asarray(fs.labels) for name, fs in features.items()}
    print("| held-out class | test images | mahalanobis | knn@10 | knn@50 |\n|---|---:|---|---|---|")
    for name in args.held_out:
        if name not in dataset.class_names:
            parser.error(f"unknown class {name!r}; choose from {', '.join(dataset.class_names)}")
        held = dataset.class_names.index(name)
        seen = labels["train"] != held
        train, train_labels = pooled["train"][seen], labels["train"][seen]
        is_ood = (labels["test"] == held).astype(int)
        scorers = [mahalanobis_scorer(train, train_labels), knn_scorer(train, 10), knn_scorer(train, 50)]
        scores = [score(pooled["test"]) for score in scorers]
        print(f"| {name} | {is_ood.sum()} | " + " | ".join(f"{roc_auc_score(is_ood, s):.3f}" for s in scores) + " |",
              flush=True)


if __name__ == "__main__":
    main()
