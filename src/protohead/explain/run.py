"""The explain verb's work: galleries, explanations, diagnostics and the HTML report of a finished run."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protohead.atomic import write_text_atomic
from protohead.explain.diagnostics import (
    dead_prototypes,
    near_duplicates,
    purity,
    push_records,
    shared_sources,
    win_counts,
)
from protohead.explain.explanations import (
    ImagePrediction,
    SourcePatch,
    plot_explanation,
    resolve_image_ids,
    select_images,
)
from protohead.explain.faithfulness import faithfulness_report
from protohead.explain.gallery import PrototypeSource, grid_shape, plot_gallery, safe_name
from protohead.explain.report import RUN_PLOTS, render_report, write_html


@dataclass
class ExplainResult:
    """Paths written by :func:`explain_run` and the diagnostics it computed."""

    out_dir: Path
    report: Path
    diagnostics_path: Path
    galleries: dict[str, Path] = field(default_factory=dict)  # class name → PNG
    explanations: dict[str, Path] = field(default_factory=dict)  # test image id → PNG
    diagnostics: dict[str, Any] = field(default_factory=dict)
    gallery_prototypes: dict[str, int] = field(default_factory=dict)  # class name → prototypes shown
    faithfulness_path: Path | None = None  # faithfulness.json
    faithfulness: dict[str, Any] = field(default_factory=dict)  # its content (deletion test, prototype statistics)


def read_run_config(run_dir: str | Path) -> Any:
    """The :class:`~protohead.runconfig.RunConfig` of a finished run folder; ``ValueError`` if it is not one."""
    from protohead import runfolder

    config = runfolder.read_config(run_dir)
    if not (Path(run_dir) / runfolder.BEST_CHECKPOINT).is_file():
        raise ValueError(f"run {run_dir} has no {runfolder.BEST_CHECKPOINT} (did it finish an epoch?)")
    return config


def load_model(run_dir: str | Path, config: Any) -> tuple[Any, torch.nn.Module, float]:
    """(prepared data, the run's selected model in eval mode, its selection record: post-hoc τ and calibration
    temperature), via the run-folder module."""
    from protohead import runfolder

    loaded = runfolder.load_model(run_dir)
    data = runfolder.prepare_run(loaded, config)
    return data, loaded.model, loaded.selection


@torch.no_grad()
def _outputs(model: torch.nn.Module, split: Any, indices: Sequence[int], batch_size: int, keep_maps: bool,
             class_counts: Sequence[int], selection: dict[str, Any]) -> dict[str, np.ndarray]:
    """Eval-mode head outputs for ``indices`` of a split: probabilities and uncertainty exactly as the run's
    metrics use them (post-hoc τ applied, :func:`protohead.posthoc.final_outputs`), winners (+ maps)."""
    from protohead.model import uncertainty_rule
    from protohead.posthoc import final_outputs

    keys = ["probabilities", "uncertainty", "winning_prototype"] + (["similarities", "evidence"] if keep_maps else [])
    parts: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    from protohead.training.loop import view_outputs

    order = torch.as_tensor(list(indices), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        info = view_outputs(model, split, order[start:start + batch_size])  # the views the metrics averaged
        for key in keys:
            if info.get(key) is not None:
                parts[key].append(info[key].float().numpy() if key != "winning_prototype" else info[key].numpy())
    result = {key: np.concatenate(values) for key, values in parts.items() if values}
    result["probabilities"], result["uncertainty"] = final_outputs(
        result["probabilities"].astype(np.float64), result["uncertainty"].astype(np.float64), class_counts,
        selection.get("posthoc_tau", 0.0), *uncertainty_rule(model, selection),
        temperature=selection.get("calibration_temperature", 1.0))
    return result


def _train_batches(split: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, split.size, batch_size):
        tokens, _, labels = split.fetch(torch.arange(start, min(split.size, start + batch_size)), False)
        yield tokens, labels


def explain_run(run_dir: str | Path, image_ids: Sequence[str] | None = None, k: int = 50, count: int = 6,
                duplicate_threshold: float = 0.95, faithfulness_images: int | None = None) -> ExplainResult:
    """Write galleries, explanations, diagnostics and ``report.html`` for a finished run.

    Args:
        run_dir: a run directory written by ``protohead run`` (read-only input).
        image_ids: test-split image ids to explain; default: ``count`` deterministic test images (first
            correct / incorrect of several classes). An unknown id is a ``ValueError`` naming it.
        k: neighbours for purity.
        count: number of default images.
        duplicate_threshold: cosine above which two prototypes are near-duplicates.
        faithfulness_images: test images for the deletion test of ``faithfulness.json`` (default: all; fewer:
            a seeded random subset of that size).

    Returns:
        the written paths and the diagnostics.
    """
    from protohead.baselines import BASELINES
    from protohead.head import HeadOptimal
    from protohead.pipeline import load_data
    from protohead.training.loop import write_json

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if config.preset in BASELINES:
        raise ValueError(f"run {run_dir} uses the baseline {config.preset!r}, which has no prototypes to explain")
    dataset = load_data(config)  # images, and the test ids to check --images against before the slow part
    chosen_ids = list(dict.fromkeys(image_ids)) if image_ids else None
    chosen = resolve_image_ids(dataset.splits["test"].ids, chosen_ids) if chosen_ids else None
    data, model, selection = load_model(run_dir, config)
    head = getattr(model, "head", model)
    if not isinstance(head, HeadOptimal):
        raise ValueError(f"run {run_dir} uses {config.preset!r}, which has no prototypes to explain")
    train_ids_path = run_dir / "train_ids.json"
    if train_ids_path.is_file() and tuple(json.loads(train_ids_path.read_text())) != tuple(data.ids["train"]):
        raise ValueError(f"the training split of {run_dir} no longer matches train_ids.json (data changed?); "
                         "push records cannot be resolved")
    names = data.class_names
    test_split, test_ids = data.splits["test"], data.ids["test"]
    if tuple(test_ids) != tuple(dataset.splits["test"].ids):
        raise ValueError("the test split's features and images disagree")
    out_dir = run_dir / "explain"
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("gallery_*.png"), *out_dir.glob("explain_*.png")]:  # from an earlier explain
        stale.unlink()
    image_size = config.input_size
    batch_size = config.eval_batch_size
    valid = head.bank.valid

    # diagnostics ------------------------------------------------------------------------------------
    train_split = dataset.splits["train"]
    records = push_records(head.push_image, head.push_token, head.push_similarity, valid, data.ids["train"],
                           data.splits["train"].labels, names)
    with torch.no_grad():
        purities = purity(head.bank.prototypes.detach(), valid, _train_batches(data.splits["train"], batch_size), k=k,
                          distance=head.config.distance, project=head.project, class_names=names)
    val_split = data.splits["val"]
    val = _outputs(model, val_split, range(val_split.size), batch_size, keep_maps=False,
                   class_counts=data.class_counts, selection=selection)
    dead = dead_prototypes(val["winning_prototype"], valid, val_split.labels, names)
    duplicates = near_duplicates(head.bank.prototypes.detach(), valid, duplicate_threshold, names)
    diagnostics = {"purity": purities, "near_duplicates": duplicates, "dead_prototypes": dead,
                   "shared_sources": shared_sources(records), "push_records": records}
    diagnostics_path = out_dir / "diagnostics.json"
    write_json(diagnostics_path, diagnostics)

    # faithfulness (deletion test on the test split, prototype statistics on the training split) ----------------
    faithful_indices = None
    if faithfulness_images is not None and faithfulness_images < test_split.size:
        rng = np.random.default_rng(config.seed)
        faithful_indices = sorted(rng.choice(test_split.size, max(0, faithfulness_images), replace=False).tolist())
    faithfulness = faithfulness_report(model, test_split, faithful_indices, batch_size, data.splits["train"],
                                       names, seed=config.seed)
    faithfulness_path = write_text_atomic(out_dir / "faithfulness.json",
                                          json.dumps(faithfulness, indent=2, allow_nan=False) + "\n")

    # token grid -------------------------------------------------------------------------------------
    tokens, _, _ = test_split.fetch(torch.zeros(1, dtype=torch.long), False)
    grid = grid_shape(tokens.shape[1])

    images: dict[int, np.ndarray] = {}

    def train_image(index: int) -> np.ndarray:
        if index not in images:
            images[index] = train_split.load(index)
        return images[index]

    sources = {(r["class"], r["slot"]): SourcePatch(train_image(r["image_index"]), r["image_id"], r["token"])
               if r["image_index"] is not None else SourcePatch(None, None, None) for r in records}

    # galleries --------------------------------------------------------------------------------------
    all_wins, own_wins = win_counts(val["winning_prototype"], valid, val_split.labels)
    result = ExplainResult(out_dir, out_dir / "report.html", diagnostics_path, diagnostics=diagnostics,
                           faithfulness_path=faithfulness_path, faithfulness=faithfulness)
    for c, name in enumerate(names):
        slots = valid[c].nonzero().flatten().tolist()
        entries = [PrototypeSource(s, sources[(c, s)].image, sources[(c, s)].image_id, sources[(c, s)].token,
                                   next(r["similarity"] for r in records if (r["class"], r["slot"]) == (c, s)),
                                   int(all_wins[c, s]), int(own_wins[c, s]), val_split.size) for s in slots]
        path = out_dir / f"gallery_{safe_name(name)}.png"
        result.galleries[name] = plot_gallery(name, entries, grid, image_size, path)
        result.gallery_prototypes[name] = len(entries)

    # explanations -----------------------------------------------------------------------------------
    if chosen is None:
        test = _outputs(model, test_split, range(test_split.size), batch_size, keep_maps=False,
                   class_counts=data.class_counts, selection=selection)
        chosen = select_images(test_split.labels, test["probabilities"].argmax(1), count)
    outputs = _outputs(model, test_split, chosen, batch_size, keep_maps=True,
                       class_counts=data.class_counts, selection=selection)
    image_split = dataset.splits["test"]
    for row, index in enumerate(chosen):
        prediction = ImagePrediction(outputs["probabilities"][row], float(outputs["uncertainty"][row]),
                                     outputs["similarities"][row],
                                     outputs["evidence"][row] if "evidence" in outputs else None,
                                     head.evidence_kind, head.config.distance)
        image_id = test_ids[index]
        result.explanations[image_id] = plot_explanation(
            image_split.load(index), image_id, int(test_split.labels[index]), names, prediction, sources, grid,
            image_size, out_dir / f"explain_{safe_name(image_id)}.png")

    # report -----------------------------------------------------------------------------------------
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    history_path = run_dir / "history.json"
    best = json.loads(history_path.read_text()).get("best", {}) if history_path.is_file() else {}
    summary = {"run directory": str(run_dir.resolve()), "preset": config.preset, "data": Path(config.data).name,
               "split": config.split, "seed": config.seed, "backbone": f"{config.backbone} @ {image_size} px",
               "token grid": f"{grid[0]}×{grid[1]}",
               "selected epoch": (best.get("epoch", -1) + 1) if best else "n/a",
               "val balanced accuracy": best.get("val_balanced_accuracy", "n/a"),
               "valid prototypes": int(valid.sum())}
    plots = [(run_dir / name, caption) for name, caption in RUN_PLOTS if (run_dir / name).is_file()]
    text = render_report(f"protohead explain: {config.preset} on {Path(config.data).name}", summary, metrics, plots,
                         list(result.galleries.items()), list(result.explanations.items()), diagnostics,
                         faithfulness=faithfulness)
    write_html(result.report, text)
    return result
