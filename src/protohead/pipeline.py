"""The main job: data → backbone → feature cache → train → select on val → evaluate on test → report."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from protohead.head import HeadOptimal
from protohead.posthoc import adjust_probabilities
from protohead.runconfig import RunConfig
from protohead.training.checkpoint import load_checkpoint
from protohead.training.loop import SplitInputs, Trainer, build_model, predict, write_json


def default_cache_dir() -> Path:
    """``$PROTOHEAD_CACHE`` or ``~/.cache/protohead`` (never inside the repository or the data folder)."""
    return Path(os.environ.get("PROTOHEAD_CACHE", Path.home() / ".cache" / "protohead"))


@dataclass
class PreparedData:
    class_names: tuple[str, ...]
    splits: dict[str, SplitInputs]
    ids: dict[str, tuple[str, ...]]
    feature_dim: int
    class_counts: list[int]
    backbone: nn.Module | None = None  # set when fine-tuning end to end


def load_data(config: RunConfig):  # -> ImageDataset
    from protohead.data import load_dataset

    dataset = load_dataset(config.data, split=config.split, seed=config.seed)
    if config.subset_per_class is not None:
        dataset = dataset.subset(config.subset_per_class, seed=config.seed)
    return dataset


def feature_inputs(features: Any) -> SplitInputs:
    """SplitInputs over a cached :class:`FeatureSet` (fp16 memmap → fp32 batches)."""
    def fetch(indices: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return features.torch_batch(indices.numpy())
    return SplitInputs(fetch, len(features), np.asarray(features.labels))


def image_inputs(backbone: nn.Module, split: Any) -> SplitInputs:
    """SplitInputs that run the (trainable) backbone on decoded images; gradients flow when ``train``."""
    labels = torch.as_tensor(split.labels, dtype=torch.long)

    def fetch(indices: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = backbone.preprocess([split.load(int(i)) for i in indices])
        backbone.train(train)
        with torch.set_grad_enabled(train and torch.is_grad_enabled()):
            tokens, pooled = backbone(images)
        return tokens, pooled, labels[indices]
    return SplitInputs(fetch, len(split), np.asarray(split.labels))


def prepare(config: RunConfig) -> PreparedData:
    """Load the dataset and make model inputs: cached frozen features, or images through a trainable backbone."""
    from protohead.backbones import build_backbone
    from protohead.features import extract_features

    dataset = load_data(config)
    names = ("train", "val", "test")
    counts = dataset.class_counts("train").tolist()
    if config.finetune:
        backbone = build_backbone(config.backbone, config.finetune_image_size)
        backbone.set_trainable(True)
        splits = {name: image_inputs(backbone, dataset.splits[name]) for name in names}
        return PreparedData(dataset.class_names, splits, {n: dataset.splits[n].ids for n in names},
                            backbone.feature_dim, counts, backbone)
    backbone = build_backbone(config.backbone, config.image_size)
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir() / "features"
    features = {name: extract_features(backbone, dataset.splits[name], cache, progress=config.progress)
                for name in names}
    return PreparedData(dataset.class_names, {n: feature_inputs(f) for n, f in features.items()},
                        {n: dataset.splits[n].ids for n in names}, backbone.feature_dim, counts)


class EndToEnd(nn.Module):
    """Backbone + head, so a fine-tuning checkpoint holds both."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.head(*args, **kwargs)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an existing run directory unless resuming or ``overwrite``."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if resume:
            return
        if not overwrite:
            raise ValueError(f"run directory {run_dir} already exists and is not empty; pass --overwrite to "
                             "replace it or --resume to continue it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def evaluate_model(model: nn.Module, data: PreparedData, split: str, out_dir: Path, batch_size: int = 256,
                   posthoc_tau: float = 0.0) -> dict[str, Any]:
    """Metrics (JSON) and plots (PNG) of ``model`` on ``split``, written into ``out_dir``.

    ``posthoc_tau``: the post-hoc prior shift chosen on validation (``best["posthoc_tau"]``), applied to the
    probabilities; a max-softmax uncertainty is recomputed from the shifted probabilities.
    """
    from protohead.evaluation import (
        compute_metrics,
        plot_confusion_matrix,
        plot_reliability_diagram,
        plot_risk_coverage,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    prediction = predict(model, data.splits[split], batch_size)
    probs, labels, uncertainty = prediction["probabilities"], prediction["labels"], prediction["uncertainty"]
    if posthoc_tau:
        probs = adjust_probabilities(probs, data.class_counts, posthoc_tau)
        head = getattr(model, "head", model)
        if not (isinstance(head, HeadOptimal) and head.config.use_abstention):
            uncertainty = 1.0 - probs.max(1)
    metrics = compute_metrics(probs, labels, uncertainty, data.class_names)
    metrics.update(split=split, posthoc_tau=posthoc_tau)
    correct = probs.argmax(1) == labels
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), data.class_names, out_dir / "confusion_matrix.png")
    plot_reliability_diagram(probs, labels, out_dir / "reliability.png")
    plot_risk_coverage(correct, uncertainty, out_dir / "risk_coverage.png", label=metrics["uncertainty_source"])
    np.savez(out_dir / f"predictions_{split}.npz", probabilities=probs, uncertainty=uncertainty, labels=labels,
             ids=np.asarray(data.ids[split]))
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def train(config: RunConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          data: PreparedData | None = None) -> dict[str, Any]:
    """Extract (cached) → train → select on val. Returns the history, best epoch and the model."""
    from protohead.training import distributed

    run_dir = Path(run_dir)
    distributed.init_from_env()  # under torchrun: join the process group (gloo on CPU, nccl on GPU)
    main_process = distributed.is_main()
    if main_process:
        prepare_run_dir(run_dir, resume, overwrite)
        import yaml

        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=True))
    started = time.perf_counter()
    if data is None:
        if not main_process:  # rank 0 fills the feature cache first; the others then read it
            distributed.barrier()
        data = prepare(config)
        if main_process:
            distributed.barrier()
    prepared = time.perf_counter()
    torch.manual_seed(config.seed)  # here, so a run is the same whether or not the data were prepared before
    model = build_model(config, len(data.class_names), data.feature_dim, data.class_counts)
    extra = None
    if data.backbone is not None:
        model = EndToEnd(data.backbone, model)
        extra = [p for p in data.backbone.parameters() if p.requires_grad]
    trainer = Trainer(config, model, data.splits["train"], data.splits["val"], run_dir, extra_parameters=extra)
    if resume:
        trainer.resume()
    result = trainer.fit()
    if main_process:
        write_json(run_dir / "history.json", result)
        write_json(run_dir / "train_ids.json", list(data.ids["train"]))
    result.update(model=model, data=data, best_path=trainer.best_path,
                  timing={"prepare_s": prepared - started, "train_s": time.perf_counter() - prepared})
    return result


def run(config: RunConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Extract (cached) → train → select on val → evaluate on test → report. Returns the test metrics."""
    run_dir = Path(run_dir)
    result = train(config, run_dir, resume, overwrite)
    model, data = result["model"], result["data"]
    load_checkpoint(result["best_path"], model)
    metrics = evaluate_model(model, data, "test", run_dir, config.eval_batch_size,
                             result["best"].get("posthoc_tau", 0.0))
    timing = result["timing"]
    timing["total_s"] = timing["prepare_s"] + timing["train_s"]
    write_json(run_dir / "timing.json", timing)
    write_report(run_dir, config, metrics, result, timing, data.class_names)
    return metrics


def evaluate_run(run_dir: str | Path, split: str = "test", out_dir: str | Path | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run's selected checkpoint on ``split``."""
    import yaml

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{run_dir} is not a protohead run directory (no config.yaml)")
    config = RunConfig.from_dict(yaml.safe_load(config_path.read_text()))
    data = prepare(config)
    model = build_model(config, len(data.class_names), data.feature_dim, data.class_counts)
    if data.backbone is not None:
        model = EndToEnd(data.backbone, model)
    best = run_dir / "checkpoints" / "best.safetensors"
    meta = load_checkpoint(best, model)
    return evaluate_model(model, data, split, Path(out_dir) if out_dir else run_dir / f"eval-{split}",
                          config.eval_batch_size, meta["best"].get("posthoc_tau", 0.0))


def write_report(run_dir: Path, config: RunConfig, metrics: dict[str, Any], result: dict[str, Any],
                 timing: dict[str, float], class_names: tuple[str, ...]) -> None:
    """A short markdown summary next to the metrics and plots."""
    recall = metrics["per_class_recall"]
    lines = [
        f"# protohead run: {config.model} on {Path(config.data).name} ({config.split} split, seed {config.seed})",
        "",
        f"Selected epoch {result['best']['epoch'] + 1} of {config.epochs} by validation balanced accuracy "
        f"({result['best']['val_balanced_accuracy']:.4f}), post-hoc logit adjustment τ = "
        f"{result['best'].get('posthoc_tau', 0.0):g} (chosen on validation). Test split:",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece", "nll", "aurc",
                "accuracy_at_80_coverage", "accuracy_at_90_coverage"):
        value = metrics.get(key)
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += ["", "Per-class recall: " + ", ".join(
        f"{name} {recall[name]:.3f}" if recall.get(name) is not None else f"{name} n/a" for name in class_names),
        "", f"Time: prepare {timing['prepare_s']:.0f} s, train {timing['train_s']:.0f} s, "
        f"total {timing['total_s']:.0f} s.", "",
        "Plots: confusion_matrix.png, reliability.png, risk_coverage.png."]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
