"""Explore head settings on cached Lite0 features, scored on the VALIDATION split only (never test).

    .venv/bin/python benchmarks/tune_on_val.py --epochs 10 --trial "name:key=value,key=value" ...

Each trial trains on train, keeps the epoch with the best val balanced accuracy and prints val accuracy and
balanced accuracy there. Used to choose defaults; the test split is not loaded.
"""

from __future__ import annotations

import argparse
import time

import torch

from protohead.model import build_model
from protohead.pipeline import feature_inputs
from protohead.posthoc import adjust_probabilities, balanced_accuracy
from protohead.runconfig import load_run_config
from protohead.training.loop import Trainer, predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trial", action="append", required=True, help="name:key=value,key=value")
    parser.add_argument("--out", default="/tmp/tune-on-val")
    args = parser.parse_args()
    from protohead.backbones import build_backbone
    from protohead.data import load_dataset
    from protohead.features import extract_features
    from protohead.pipeline import default_cache_dir

    base = load_run_config()
    dataset = load_dataset(base.data)
    backbone = build_backbone(base.backbone, base.image_size)
    splits = {name: feature_inputs(extract_features(backbone, dataset.splits[name], default_cache_dir() / "features",
                                                    progress=False)) for name in ("train", "val")}
    counts = dataset.class_counts("train").tolist()
    for trial in args.trial:
        name, _, spec = trial.partition(":")
        overrides = [item for item in spec.split(",") if item] + ["progress=false"]
        config = load_run_config(overrides=overrides)
        torch.manual_seed(config.seed)
        model = build_model(config, 7, 1280, counts)
        started = time.perf_counter()
        trainer = Trainer(config, model, splits["train"], splits["val"], f"{args.out}/{name}")
        result = trainer.fit()
        best = result["best"]["epoch"]
        record = result["history"][best]
        from protohead.training.checkpoint import load_checkpoint

        load_checkpoint(trainer.best_path, model)
        val = predict(model, splits["val"], 256)
        posthoc = []
        for tau in (0.0, 0.25, 0.5, 0.75, 1.0):
            adjusted = adjust_probabilities(val["probabilities"], counts, tau)
            acc = float((adjusted.argmax(1) == val["labels"]).mean())
            posthoc.append(f"τ={tau}: {acc:.3f}/{balanced_accuracy(adjusted, val['labels']):.3f}")
        print(f"{name:28s} val acc {record['val_accuracy']:.3f} bal {record['val_balanced_accuracy']:.3f} "
              f"(epoch {best + 1}) {time.perf_counter() - started:.0f}s | post-hoc " + "; ".join(posthoc), flush=True)


if __name__ == "__main__":
    main()
