"""The main job: data → backbone → feature cache → train → select on val → evaluate on test → report."""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from protohead import runfolder
from protohead.atomic import write_text_atomic
from protohead.augment import (
    CropJitter,
    check_augment,
    crop_jitter_image,
    draw_crop_jitter,
    random_symmetric_tokens,
    random_symmetries,
)
from protohead.device import model_device
from protohead.head import HeadOptimal
from protohead.model import EndToEnd, build_model, head_of, model_signature, uncertainty_rule
from protohead.posthoc import final_outputs
from protohead.referral import referral_metrics
from protohead.runconfig import RunConfig
from protohead.training.checkpoint import load_checkpoint, save_checkpoint
from protohead.training.loop import SplitInputs, Trainer, batches_of, predict, write_json
from protohead.views import apply_views, view_names


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
    backbone_identity: dict[str, Any] | None = None  # name, image size, cache key (see runfolder.describe_run)
    images: dict[str, Any] | None = None  # the ImageSplits behind the inputs (lazy loaders), by split name
    trained: bool = False  # a run has trained ``backbone`` in place: these inputs serve no second run


def load_data(config: RunConfig):  # -> ImageDataset
    from protohead.data import load_dataset

    dataset = load_dataset(config.data, split=config.split, seed=config.seed,
                           max_image_pixels=config.max_image_pixels)
    if config.subset_per_class is not None:
        dataset = dataset.subset(config.subset_per_class, seed=config.seed)
    return dataset


def feature_inputs(features: Any | Sequence[Any]) -> SplitInputs:
    r"""SplitInputs over cached :class:`FeatureSet`\ s (fp16 memmap → fp32 batches): one, or one per view of the
    same images (identity first; row ``v · n + i`` is view ``v`` of image ``i``)."""
    views = list(features) if isinstance(features, list | tuple) else [features]
    size = len(views[0])
    if any(view.ids != views[0].ids for view in views):
        raise ValueError("the feature sets of the views hold different images")

    def fetch(indices: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = indices.numpy()
        if len(views) == 1:
            return views[0].torch_batch(rows)
        view, image = np.divmod(rows, size)
        tokens = torch.empty(len(rows), views[0].num_tokens, views[0].feature_dim)
        pooled = torch.empty(len(rows), views[0].feature_dim)
        for v in np.unique(view).tolist():
            where = np.flatnonzero(view == v)
            tokens[where], pooled[where], _ = views[v].torch_batch(image[where])
        return tokens, pooled, torch.from_numpy(np.asarray(views[0].labels[image], dtype=np.int64))
    return SplitInputs(fetch, size, np.asarray(views[0].labels), views=len(views))


def image_inputs(backbone: nn.Module, split: Any, views: int = 1, augment: str = "none",
                 threads: int = 0) -> SplitInputs:
    """SplitInputs that run the (trainable) backbone on decoded images; gradients flow when ``train``. With
    ``views`` > 1, row ``v · n + i`` is image ``i`` under view ``v`` (:mod:`protohead.views`). ``augment``
    (:mod:`protohead.augment`) acts on training batches only; ``threads`` > 0 decode (and crop / recolour) a
    batch's images in that many threads (PIL and torch release the GIL), 0 in the calling thread; with threads,
    :attr:`SplitInputs.prefetch` (which the trainer calls for the next batch) decodes it while the current one
    trains."""
    labels = torch.as_tensor(split.labels, dtype=torch.long)
    size = len(split)
    view_names(views)  # 1 ≤ views ≤ 8, else a ValueError
    check_augment(augment)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="protohead-load") if threads else None
    pending: dict[tuple[tuple[int, ...], bool], Callable[[], list[np.ndarray]]] = {}

    def pixels(index: int, params: CropJitter | None) -> np.ndarray:
        image = split.load(index)
        return backbone.resize(image) if params is None else crop_jitter_image(image, params, backbone.image_size)

    def start(indices: torch.Tensor, train: bool) -> Callable[[], list[np.ndarray]]:
        """Draw the batch's random crops and colours now, in this thread, and start decoding it in the pool (if
        any); the returned call waits for its (S, S, 3) uint8 images."""
        rows = (indices % size).tolist()
        draws = draw_crop_jitter(len(rows)) if train and augment == "strong" else [None] * len(rows)
        if pool is None:
            return lambda: list(map(pixels, rows, draws))
        futures = [pool.submit(pixels, row, params) for row, params in zip(rows, draws, strict=True)]
        return lambda: [future.result() for future in futures]

    def prefetch(indices: torch.Tensor, train: bool) -> None:
        """Start a batch that a later :func:`fetch` of the same rows will take. Its random draws happen here with
        or without threads, so ``threads`` changes the speed, never the draws."""
        key = (tuple(indices.tolist()), train)
        if key not in pending:
            pending[key] = start(indices, train)

    def fetch(indices: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        view, image = indices // size, indices % size
        loaded = (pending.pop((tuple(indices.tolist()), train), None) or start(indices, train))()
        side = backbone.image_size
        batch = np.stack(loaded) if loaded else np.empty((0, side, side, 3), dtype=np.uint8)  # an empty shard
        images = apply_views(backbone.normalize(torch.from_numpy(batch)), view)  # views and flips on the CPU
        if train and augment != "none":
            images = random_symmetries(images)
        images = images.to(backbone.device, non_blocking=True)
        backbone.train(train)
        with torch.set_grad_enabled(train and torch.is_grad_enabled()):
            tokens, pooled = backbone(images)
        return tokens, pooled, labels[image]
    return SplitInputs(fetch, size, np.asarray(split.labels), views=views, prefetch=prefetch)


def tail_inputs(backbone: Any, front: SplitInputs, blocks: int, augment: str = "none") -> SplitInputs:
    """SplitInputs that run the backbone's trainable last ``blocks`` blocks on cached front maps (partial
    fine-tuning); gradients flow when ``train``. Views are the cached ones; ``augment="flips"`` also turns each
    training map by a random symmetry of the square (:func:`protohead.augment.random_symmetric_tokens`)."""
    if check_augment(augment) == "strong":
        raise ValueError("augment='strong' crops and recolours images; cached front maps take augment='flips'")

    def fetch(indices: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maps, _, labels = front.fetch(indices, train)
        if train and augment == "flips":
            maps = random_symmetric_tokens(maps)
        maps = maps.to(backbone.device, non_blocking=True)
        backbone.train(train)
        with torch.set_grad_enabled(train and torch.is_grad_enabled()):
            tokens, pooled = backbone.tail(maps, blocks)
        return tokens, pooled, labels
    return SplitInputs(fetch, front.size, front.labels, views=front.views)


def split_views(config: RunConfig, name: str) -> int:
    """How many views split ``name`` holds: all ``config.views`` for training, and for validation and test when
    predictions are averaged over them (``tta``); else one."""
    return config.views if name == "train" or config.tta else 1


def prepare(config: RunConfig, backbone: Any = None) -> PreparedData:
    """Load the dataset and make model inputs: cached frozen features, or images through a trainable backbone
    (``backbone``: a fine-tuned run's own; default: :meth:`RunConfig.build_backbone`, a fresh pretrained one)."""
    from protohead.features import extract_features

    dataset = load_data(config)
    names = ("train", "val", "test")
    counts = dataset.class_counts("train").tolist()
    missing = [name for name, count in zip(dataset.class_names, counts, strict=True) if count == 0]
    if missing:  # one rule for the class prior everywhere: every class has training images
        raise ValueError(f"class(es) {', '.join(missing)} of {config.data} have no training images; a model "
                         "cannot learn or calibrate a class it never sees (drop the class or add images)")
    ids = {n: dataset.splits[n].ids for n in names}
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir() / "features"

    def cached(extractor: Any) -> dict[str, SplitInputs]:
        return {name: feature_inputs([extract_features(extractor, dataset.splits[name], cache, progress=config.progress,
                                                       view=view) for view in view_names(split_views(config, name))])
                for name in names}
    if backbone is None:
        backbone = config.build_backbone()
    if config.finetune and config.finetune_blocks:  # partial: the frozen front once (cached), its tail trained
        identity = backbone_identity(backbone)
        splits = {name: tail_inputs(backbone, inputs, config.finetune_blocks, config.augment)
                  for name, inputs in cached(backbone.front(config.finetune_blocks)).items()}
        return PreparedData(dataset.class_names, splits, ids, backbone.feature_dim, counts, backbone, identity,
                            dataset.splits)
    if config.finetune:
        identity = backbone_identity(backbone)  # the starting point; the trained weights live in the checkpoint
        splits = {name: image_inputs(backbone, dataset.splits[name], split_views(config, name), config.augment,
                                     config.loader_threads) for name in names}
        return PreparedData(dataset.class_names, splits, ids, backbone.feature_dim, counts, backbone, identity,
                            dataset.splits)
    return PreparedData(dataset.class_names, cached(backbone), ids, backbone.feature_dim, counts, None,
                        backbone_identity(backbone), dataset.splits)


def backbone_identity(backbone: Any) -> dict[str, Any]:
    """What identifies a backbone's features: name, input size, preprocessing, and its cache key (config +
    weights digest)."""
    return {"name": backbone.name, "image_size": backbone.image_size, "cache_key": backbone.cache_key(),
            "pixel_mean": list(backbone.pixel_mean), "pixel_std": list(backbone.pixel_std),
            "resize": "PIL bilinear to image_size × image_size (aspect ratio not kept)"}


def evaluate_model(model: nn.Module, data: PreparedData, split: str, out_dir: Path, batch_size: int = 256,
                   selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics (JSON) and plots (PNG) of ``model`` on ``split``, written into ``out_dir``.

    ``selection``: the checkpoint's selection record — ``posthoc_tau`` (the prior shift chosen on validation)
    and ``calibration_temperature`` (fitted on validation after the shift) are applied as
    :func:`protohead.posthoc.final_outputs` does for every prediction; ECE is reported before
    (``ece_uncalibrated``) and after calibration (``ece``).
    """
    from protohead.evaluation import (
        apply_temperature,
        compute_metrics,
        expected_calibration_error,
        plot_confusion_matrix,
        plot_reliability_before_after,
        plot_risk_coverage,
    )

    selection = selection or {}
    tau, temperature = selection.get("posthoc_tau", 0.0), selection.get("calibration_temperature", 1.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    prediction = predict(model, data.splits[split], batch_size)
    # the uncertainty does not depend on the temperature (it never changes the arg-max): shift once, then scale
    uncalibrated, uncertainty = final_outputs(prediction["probabilities"], prediction["uncertainty"],
                                              data.class_counts, tau, *uncertainty_rule(model, selection))
    probs = apply_temperature(uncalibrated, temperature) if temperature != 1.0 else uncalibrated
    labels = prediction["labels"]
    metrics = compute_metrics(probs, labels, uncertainty, data.class_names)
    metrics.update(split=split, posthoc_tau=tau, calibration_temperature=temperature,
                   ece_uncalibrated=expected_calibration_error(uncalibrated, labels))
    if "uncertainty_threshold" in selection:  # runs from before referral have none
        metrics["referral"] = referral_metrics(probs.argmax(1), labels, uncertainty, prediction["ood_score"],
                                               selection, data.class_names)
    correct = probs.argmax(1) == labels
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), data.class_names, out_dir / "confusion_matrix.png")
    plot_reliability_before_after(uncalibrated, probs, labels, out_dir / "reliability.png",
                                  names=("after τ", f"after τ and temperature {temperature:.2f}"))
    plot_risk_coverage(correct, uncertainty, out_dir / "risk_coverage.png", label=metrics["uncertainty_source"])
    np.savez(out_dir / f"predictions_{split}.npz", probabilities=probs, uncertainty=uncertainty, labels=labels,
             ids=np.asarray(data.ids[split]), probabilities_raw=prediction["probabilities"],
             head_uncertainty=prediction["uncertainty"])
    write_json(out_dir / "metrics.json", metrics)
    return metrics


@contextlib.contextmanager
def run_session(config: RunConfig, run_dir: Path, resume: bool, overwrite: bool, data: PreparedData | None,
                allow_config_change: bool) -> Iterator[tuple[PreparedData, bool, float]]:
    """Check the run folder (creating nothing), prepare the data, then open the folder for writing.

    Yields ``(data, resuming, prepare_seconds)``; the folder's ``run.json`` records how the body ended.
    A refused folder, a changed config on resume or bad data fail before the folder is created or touched.
    """
    from protohead.training import distributed

    distributed.init_from_env(config.device)  # under torchrun: join the process group (gloo on CPU, nccl on GPU)
    main_process = distributed.is_main()
    plan: runfolder.Plan = "resume" if resume else "create"
    if main_process:
        plan = runfolder.plan_run_dir(run_dir, config.data, resume, overwrite)
        if plan == "resume":
            changes = runfolder.config_changes(runfolder.read_config(run_dir), config)
            if changes and not allow_config_change:
                raise runfolder.RunFolderError(
                    f"--resume refused: the configuration differs from the run's ({'; '.join(changes)}); "
                    "resume with the same settings, or pass --allow-config-change to continue with these")
    started = time.perf_counter()
    if data is None:
        if not main_process:  # rank 0 fills the feature cache first; the others then read it
            distributed.barrier()
        data = prepare(config)
        if main_process:
            distributed.barrier()
    prepare_seconds = time.perf_counter() - started
    with runfolder.open_run_dir(run_dir, plan, config, config.data, write=main_process):
        yield data, plan == "resume", prepare_seconds


def fit(config: RunConfig, run_dir: Path, data: PreparedData, resuming: bool) -> dict[str, Any]:
    """Build the model, train it (continuing from ``last`` when ``resuming``) and select on val."""
    from protohead.device import cpu_has_fast_bfloat16, resolve_device
    from protohead.training import distributed

    torch.manual_seed(config.seed)  # here, so a run is the same whether or not the data were prepared before
    model = build_model(config, len(data.class_names), data.feature_dim, data.class_counts)
    extra = None
    if data.backbone is not None:
        if data.trained:
            raise ValueError("these prepared inputs' backbone was fine-tuned in place by an earlier run; a second "
                             "run would start from its weights, not the pretrained ones: prepare the data again")
        data.trained = True
        model = EndToEnd(data.backbone, model)
        extra = [p for p in data.backbone.parameters() if p.requires_grad]
    device = resolve_device(config.device)
    model.to(device)  # batches follow the model (protohead.device.to_device)
    if config.amp_cpu and device.type == "cpu" and not cpu_has_fast_bfloat16():
        warnings.warn("amp_cpu=true on a CPU without AVX512-BF16 or AMX: bfloat16 is emulated here, about 10x slower "
                      "than float32 (results stay correct); set amp_cpu=false", RuntimeWarning, stacklevel=2)
    trainer = Trainer(config, model, data.splits["train"], data.splits["val"], run_dir, extra_parameters=extra,
                      metadata={"run": runfolder.describe_run(config, data), "signature": model_signature(model)})
    started = time.perf_counter()
    if resuming:
        trainer.resume()
        if distributed.is_main():  # the checkpoint loaded into this configuration: record it
            runfolder.write_config(run_dir, config)
    result = trainer.fit()
    best_metadata = load_checkpoint(trainer.best_path, model)  # the selected model, from here on
    fit_feature_density(model, data.splits["train"], config.eval_batch_size, len(data.class_names))
    result["best"].update(calibrate(config, model, data, result["best"]))
    if distributed.is_main():  # the selection record (τ, temperature) travels with the checkpoint
        save_checkpoint(trainer.best_path, model, metadata={**best_metadata, "best": result["best"]})
        write_json(run_dir / runfolder.HISTORY_FILE, result)
        write_json(run_dir / runfolder.TRAIN_IDS_FILE, list(data.ids["train"]))
        head = head_of(model)
        if isinstance(head, HeadOptimal) and data.images is not None:
            image_size = config.input_size
            runfolder.write_prototype_sources(run_dir, head, data.images["train"], image_size)
    result.update(model=model, data=data, best_path=trainer.best_path, train_s=time.perf_counter() - started)
    return result


@torch.no_grad()
def fit_feature_density(model: nn.Module, split: SplitInputs, batch_size: int, num_classes: int) -> None:
    """Fit the head's class Gaussians (:mod:`protohead.density`) on ``split``'s pooled features: the identity
    view, the model in eval mode (a fine-tuned run: its trained backbone); the head's ``ood_score`` is their
    feature distance from then on."""
    was_training = model.training
    model.eval()
    pooled = [split.fetch(indices, False)[1].float().cpu() for indices in batches_of(torch.arange(split.size),
                                                                                       batch_size)]
    model.train(was_training)
    density = head_of(model).feature_density
    try:
        density.fit(torch.cat(pooled), torch.from_numpy(split.labels.astype(np.int64)), num_classes)
    except ValueError as error:  # e.g. every training image has the same features: keep the logit energy
        warnings.warn(f"no feature density fitted ({error}); the run's OOD score stays the logit energy",
                      RuntimeWarning, stacklevel=2)
        return
    density.to(model_device(model))


def calibrate(config: RunConfig, model: nn.Module, data: PreparedData, best: dict[str, Any]) -> dict[str, Any]:
    """What the selected model decides with beyond τ, fitted on the validation split: the calibration temperature
    (temperature scaling after the post-hoc shift; ``calibrate=false``: 1) and the out-of-distribution threshold
    (the head's ``ood_score`` that 95 % of validation images stay under: the feature distance once
    :func:`fit_feature_density` has run, else the logit energy).

    For an abstention head it also compares, on validation, the AURC of the abstention probability with that of
    the max-probability score and keeps the better as the run's ``uncertainty_source``.

    The referral threshold (:mod:`protohead.referral`) is the run's uncertainty that ``refer_coverage`` of the
    validation images stay under.

    Returns ``{"calibration_temperature", "ood_method", "ood_threshold", "ood_acceptance", "refer_coverage",
    "uncertainty_threshold"}`` (+ the uncertainty choice and its validation AURCs) for the selection record.
    """
    from protohead.evaluation import aurc, fit_temperature
    from protohead.ood import ACCEPTANCE, choose_threshold

    val = predict(model, data.splits["val"], config.eval_batch_size)
    tau = best.get("posthoc_tau", 0.0)
    abstention, balanced = uncertainty_rule(model)
    probs, given = final_outputs(val["probabilities"], val["uncertainty"], data.class_counts, tau, abstention,
                                 balanced)
    record = {"calibration_temperature": fit_temperature(probs, val["labels"]) if config.calibrate else 1.0,
              "ood_method": "mahalanobis" if head_of(model).feature_density.fitted else "logit_energy",
              "ood_threshold": choose_threshold(val["ood_score"], ACCEPTANCE),
              "ood_acceptance": ACCEPTANCE}
    if abstention:  # the abstention probability earns its place only if it ranks validation errors better
        correct = probs.argmax(1) == val["labels"]
        _, max_probability = final_outputs(val["probabilities"], val["uncertainty"], data.class_counts, tau, False,
                                           balanced)
        record["val_aurc_abstention"], record["val_aurc_max_probability"] = aurc(correct, given), aurc(correct,
                                                                                                    max_probability)
        better = record["val_aurc_abstention"] <= record["val_aurc_max_probability"]
        record["uncertainty_source"] = "abstention" if better else "max_probability"
        given = given if better else max_probability
    record["refer_coverage"] = config.refer_coverage  # (protohead.referral)
    record["uncertainty_threshold"] = choose_threshold(given, config.refer_coverage)
    return record


def train(config: RunConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          data: PreparedData | None = None, allow_config_change: bool = False) -> dict[str, Any]:
    """Extract (cached) → train → select on val. Returns the history, best epoch and the model."""
    run_dir = Path(run_dir)
    with run_session(config, run_dir, resume, overwrite, data, allow_config_change) as (data, resuming, prep_s):
        result = fit(config, run_dir, data, resuming)
    result["timing"] = {"prepare_s": prep_s, "train_s": result.pop("train_s")}
    return result


def run(config: RunConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
        allow_config_change: bool = False) -> dict[str, Any]:
    """Extract (cached) → train → select on val → evaluate on test → report. Returns the test metrics."""
    run_dir = Path(run_dir)
    with run_session(config, run_dir, resume, overwrite, None, allow_config_change) as (data, resuming, prep_s):
        result = fit(config, run_dir, data, resuming)
        model = result["model"]
        metrics = evaluate_model(model, data, "test", run_dir, config.eval_batch_size, result["best"])
        timing = {"prepare_s": prep_s, "train_s": result["train_s"], "total_s": prep_s + result["train_s"]}
        write_json(run_dir / runfolder.TIMING_FILE, timing)
        write_report(run_dir, config, metrics, result, timing, data.class_names)
    return metrics


def evaluate_run(run_dir: str | Path, split: str = "test", out_dir: str | Path | None = None,
                 data_path: str | Path | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run's selected checkpoint on ``split`` (``data_path``: where the data are now)."""
    import dataclasses

    run_dir = Path(run_dir)
    loaded = runfolder.load_model(run_dir)
    config = loaded.config if data_path is None else dataclasses.replace(loaded.config, data=str(data_path))
    data = runfolder.prepare_run(loaded, config)  # fine-tuned: the images run through the run's own backbone
    if loaded.class_names != tuple(data.class_names):
        raise ValueError(f"the data at {config.data} have classes {list(data.class_names)}, the run "
                         f"{run_dir} was trained on {list(loaded.class_names)}")
    return evaluate_model(loaded.model, data, split, Path(out_dir) if out_dir else run_dir / f"eval-{split}",
                          config.eval_batch_size, loaded.selection)


def write_report(run_dir: Path, config: RunConfig, metrics: dict[str, Any], result: dict[str, Any],
                 timing: dict[str, float], class_names: tuple[str, ...]) -> None:
    """A short markdown summary next to the metrics and plots."""
    recall = metrics["per_class_recall"]
    lines = [
        f"# protohead run: {config.preset} on {Path(config.data).name} ({config.split} split, seed {config.seed})",
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
    referral = metrics.get("referral")
    if referral is not None:
        decided = referral["decided_accuracy"]
        lines += ["", f"Referral (thresholds chosen on validation, {referral['refer_coverage']:.0%} coverage target): "
                  f"{referral['referred']:.1%} of test images referred ({referral['referred_uncertain']:.1%} "
                  f"uncertain, {referral['referred_unlike_training']:.1%} unlike the training images); accuracy on "
                  f"the rest " + ("n/a" if decided is None else f"{decided:.4f}") +
                  f" against {referral['all_accuracy']:.4f} on all."]
    lines += ["", "Per-class recall: " + ", ".join(
        f"{name} {recall[name]:.3f}" if recall.get(name) is not None else f"{name} n/a" for name in class_names),
        "", f"Time: prepare {timing['prepare_s']:.0f} s, train {timing['train_s']:.0f} s, "
        f"total {timing['total_s']:.0f} s.", "",
        "Plots: confusion_matrix.png, reliability.png, risk_coverage.png."]
    write_text_atomic(run_dir / runfolder.REPORT_FILE, "\n".join(lines) + "\n")
