"""Training: AdamW, warm-up + cosine schedule, push/expansion schedule, selection on validation balanced
accuracy only, atomic checkpoints every epoch, exact resume."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from protohead import runfolder
from protohead.atomic import write_text_atomic
from protohead.device import autocast, model_device, to_device
from protohead.head import HeadOptimal
from protohead.model import head_of
from protohead.objective import scalar_terms
from protohead.posthoc import adjust_probabilities, balanced_accuracy, choose_prior_shift
from protohead.runconfig import RunConfig
from protohead.training import distributed
from protohead.training.checkpoint import load_checkpoint, save_checkpoint
from protohead.training.prototypes import (
    expand_prototypes,
    final_push,
    projects_exactly,
    prune_dead_prototypes,
    push_prototypes,
    reseed_dead_prototypes,
)
from protohead.views import average_view_outputs, sample_views

Inputs = Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""inputs(indices (B,), train) → (tokens (B, N, F), pooled (B, F), labels (B,))."""


@dataclass
class SplitInputs:
    """A split as model inputs: ``fetch(indices, train)`` gives (tokens, pooled, labels) of ``size`` images.

    ``views`` > 1: the split also holds that many views of each image (:mod:`protohead.views`); row
    ``v · size + i`` is view ``v`` of image ``i`` (rows below ``size`` are the images as they are). Training
    draws one view per image per epoch; :func:`predict` averages over all of them (test-time augmentation).
    """

    fetch: Inputs
    size: int
    labels: np.ndarray
    views: int = 1
    prefetch: Callable[[torch.Tensor, bool], None] | None = None  # start loading rows a later fetch will ask for


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batches_of(order: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def view_outputs(model: nn.Module, split: SplitInputs, indices: torch.Tensor) -> dict[str, Any]:
    """The eval-mode head outputs (``info``) of images ``indices``, averaged over the split's views
    (:func:`protohead.views.average_view_outputs`: maps and winners are the identity view's)."""
    outputs, device = [], model_device(model)
    for view in range(split.views):
        tokens, pooled, _ = split.fetch(indices + view * split.size, False)
        outputs.append(model(*to_device((tokens, pooled), device))[2])
    return average_view_outputs(outputs)


@torch.no_grad()
def predict(model: nn.Module, split: SplitInputs, batch_size: int) -> dict[str, np.ndarray]:
    """Eval-mode predictions: probabilities (n, C), uncertainty (n,), ood_score (n,), labels (n,); averaged over
    the split's views when it has several (:func:`view_outputs`)."""
    was_training = model.training
    model.eval()
    mine = distributed.shard(torch.arange(split.size))  # under torchrun each rank predicts a shard
    keys = ("probabilities", "uncertainty", "ood_score")
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    for indices in batches_of(mine, batch_size):
        info = view_outputs(model, split, indices)
        for key in keys:
            parts[key].append(info[key].double())
    model.train(was_training)
    device = model_device(model)  # gathered where the process group communicates (NCCL: the GPU), then to NumPy
    restore = torch.argsort(distributed.gather_rows_nograd(mine.to(device))).cpu()
    result = {key: distributed.gather_rows_nograd(torch.cat(parts[key]))[restore.to(device)].cpu().numpy()
              for key in keys}
    return {**result, "labels": split.labels.astype(np.int64)}


SELECTION_KEYS = ("val_accuracy", "val_balanced_accuracy", "posthoc_tau")
"""The validation scores a selection records (τ chosen on validation, the scores after it)."""


class TrainingDivergedError(ValueError):
    """The loss or its gradient became NaN or infinite; training stopped before the step was applied."""


def check_finite_step(loss: torch.Tensor, info: dict[str, Any], epoch: int, step: int, lr: float,
                      last_checkpoint: Path) -> None:
    """Raise :class:`TrainingDivergedError` naming the non-finite loss terms when the loss or the gradient norm is
    NaN/Inf (one host sync per step; the optimiser step that would spread the NaN is not taken)."""
    if bool(torch.isfinite(loss.detach()) & torch.isfinite(info["grad_norm"])):
        return
    terms = {name: float(value) for name, value in info.items()
             if isinstance(value, torch.Tensor) and value.dim() == 0}
    bad = [f"{name}={value}" for name, value in terms.items() if not math.isfinite(value)]
    kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint.is_file()
            else "no epoch finished, so no checkpoint was written")
    raise TrainingDivergedError(f"training diverged at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}): loss "
                                f"{float(loss.detach()):.4g}, non-finite: {', '.join(bad) or 'none'}; {kept}. "
                                "Lower lr (or check the features) and start again")


class Trainer:
    """Trains ``model`` on ``train``, selects on ``val``; checkpoints go to ``run_dir/checkpoints``."""

    def __init__(self, config: RunConfig, model: nn.Module, train: SplitInputs, val: SplitInputs, run_dir: Path,
                 extra_parameters: list[nn.Parameter] | None = None, metadata: dict[str, Any] | None = None) -> None:
        """``metadata``: JSON written into every checkpoint beside the epoch and selection (the run's
        description, so a checkpoint is usable on its own; see :func:`protohead.runfolder.describe_run`)."""
        self.config = config
        self.model = model
        self.metadata = dict(metadata or {})
        inner = head_of(model)
        self.head = inner if isinstance(inner, HeadOptimal) else None
        self.gather = distributed.sample_gather()  # per-sample scores of every rank, before the objective
        self.train_split = train
        self.val_split = val
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / runfolder.CHECKPOINT_DIR
        extra_ids = {id(p) for p in extra_parameters or []}
        own = [p for p in model.parameters() if p.requires_grad and id(p) not in extra_ids]
        groups = [{"params": own, "lr": config.lr}]
        if extra_parameters:
            groups.append({"params": extra_parameters, "lr": config.backbone_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.parameters = [p for group in groups for p in group["params"]]
        for group in self.optimizer.param_groups:
            group["base_lr"] = group["lr"]
        self.steps_per_epoch = math.ceil(train.size / config.batch_size)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": -1, "val_balanced_accuracy": -1.0}
        self.start_epoch = 0
        self.device = model_device(model)

    @property
    def last_path(self) -> Path:
        return self.run_dir / runfolder.LAST_CHECKPOINT

    @property
    def log_path(self) -> Path:
        """``log.csv`` beside the checkpoints: one row per epoch (see :func:`history_csv`)."""
        return self.run_dir / runfolder.LOG_FILE

    @property
    def best_path(self) -> Path:
        return self.run_dir / runfolder.BEST_CHECKPOINT

    def resume(self) -> bool:
        """Continue from ``last.safetensors`` if present; returns whether a checkpoint was loaded."""
        if not self.last_path.exists():
            return False
        meta = load_checkpoint(self.last_path, self.model, self.optimizer, restore_rng=True)
        self.history, self.best = meta["history"], meta["best"]
        self.start_epoch = meta["epoch"] + 1
        return True

    def _push_batches(self) -> Callable[[], Iterator[tuple[torch.Tensor, ...]]]:
        def generate() -> Iterator[tuple[torch.Tensor, ...]]:
            mine = distributed.shard(torch.arange(self.train_split.size))  # gathered inside push / coverage
            for indices in batches_of(mine, self.config.eval_batch_size):
                yield to_device((indices, *self.train_split.fetch(indices, False)), self.device)
        return generate

    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer | None = None,
                    schedule: Callable[[int], float] | None = None) -> dict[str, float]:
        """One pass over the training split in a seeded order. ``optimizer`` (default the trainer's) and
        ``schedule`` (step → learning-rate factor; default warm-up + cosine over ``epochs``) serve the
        anchored phase after the final push."""
        config, model = self.config, self.model
        optimizer = optimizer or self.optimizer
        if schedule is None:
            total_steps = config.epochs * self.steps_per_epoch
            warmup = config.warmup_epochs * self.steps_per_epoch

            def schedule(step: int) -> float:
                return lr_factor(step, total_steps, warmup)
        model.train()
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        order = torch.randperm(self.train_split.size, generator=generator)
        if self.train_split.views > 1:  # one view per image, drawn after the order (one-view runs draw as before)
            order = order + self.train_split.size * sample_views(len(order), self.train_split.views, generator)
        sums: dict[str, torch.Tensor] = {}
        nonzero: dict[str, torch.Tensor] = {}
        largest_grad_norm = torch.zeros((), device=self.device)
        steps = 0
        from tqdm.auto import tqdm

        batches = list(batches_of(order, config.batch_size))
        prefetch = self.train_split.prefetch
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not config.progress, leave=False)
        for i, indices in enumerate(bar):
            step = epoch * self.steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * schedule(step)
            # autocast covers the fetch too: with fine-tuning it runs the trainable backbone (its forward, and so
            # its backward, in bfloat16 with the head's)
            with autocast(self.device, config.amp, cpu=config.amp_cpu):
                tokens, pooled, labels = to_device(self.train_split.fetch(distributed.shard(indices), True),
                                                   self.device)
                if prefetch is not None and i + 1 < len(batches):  # the next batch decodes while this one trains
                    prefetch(distributed.shard(batches[i + 1]), True)
                scores, _ = model.score(tokens, pooled, labels)
                global_labels = labels if self.gather is None else self.gather(labels)
                loss, terms = model.objective(scores.gathered(self.gather), global_labels)
            info = scalar_terms(terms)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(self.parameters)
            info = {**info, "grad_norm": torch.nn.utils.clip_grad_norm_(self.parameters, float("inf"))}
            check_finite_step(loss, info, epoch, i, optimizer.param_groups[0]["lr"], self.last_path)
            optimizer.step()
            for name, value in info.items():
                if isinstance(value, torch.Tensor) and value.dim() == 0:
                    sums[name] = sums.get(name, 0) + value
                    nonzero[name] = nonzero.get(name, 0) + (value != 0).float()
            largest_grad_norm = torch.maximum(largest_grad_norm, info["grad_norm"].detach())
            steps += 1
        stats = {f"loss/{k}": float(v) / steps for k, v in sums.items()}
        stats["max/grad_norm"] = float(largest_grad_norm)
        stats.update({f"nonzero/{k}": float(v) / steps for k, v in nonzero.items()})
        return stats

    def validate(self) -> dict[str, float]:
        """Validation scores of the current model, after the post-hoc prior shift (``posthoc_tau``).

        With ``posthoc_tau="auto"`` the shift is chosen on these validation predictions (see
        :mod:`protohead.posthoc`); the unshifted scores are kept as ``*_raw``.
        """
        config = self.config
        val = predict(self.model, self.val_split, config.eval_batch_size)
        probs, labels = val["probabilities"], val["labels"]
        counts = np.bincount(self.train_split.labels, minlength=probs.shape[1])
        if config.posthoc_tau == "auto":
            shift = choose_prior_shift(probs, labels, counts, config.posthoc_accuracy_tolerance)
            tau = shift.tau
        else:
            tau = float(config.posthoc_tau)
        adjusted = adjust_probabilities(probs, counts, tau)
        return {"val_balanced_accuracy": balanced_accuracy(adjusted, labels),
                "val_accuracy": float((adjusted.argmax(1) == labels).mean()), "posthoc_tau": tau,
                "val_balanced_accuracy_raw": balanced_accuracy(probs, labels),
                "val_accuracy_raw": float((probs.argmax(1) == labels).mean())}

    def fit(self) -> dict[str, Any]:
        config = self.config
        from tqdm.auto import tqdm

        for epoch in tqdm(range(self.start_epoch, config.epochs), desc="training", disable=not config.progress,
                          initial=self.start_epoch, total=config.epochs):
            started = time.perf_counter()
            record: dict[str, Any] = {"epoch": epoch, **self.train_epoch(epoch)}
            distributed.broadcast_buffers(self.model)  # per-shard BatchNorm statistics → rank 0's everywhere
            if self.head is not None:
                last_epoch = epoch + 1 == config.epochs
                if config.push_every and (epoch + 1) % config.push_every == 0:
                    record["pushed"] = push_prototypes(self.head, self._push_batches())
                    if config.reseed_dead and projects_exactly(self.head):
                        record["reseeded"] = reseed_dead_prototypes(self.head, self._push_batches(), self.optimizer)
                if config.expand_every and (epoch + 1) % config.expand_every == 0 and not last_epoch:
                    added = expand_prototypes(self.head, self._push_batches(), config.expand_min_fraction,
                                              self.optimizer)
                    record["expanded"] = added
                record["prototype_counts"] = self.head.bank.counts.tolist()
            record.update(self.validate())
            record["seconds"] = time.perf_counter() - started
            self.history.append(record)
            if distributed.is_main():
                write_text_atomic(self.log_path, history_csv(self.history))
                if config.progress:
                    tqdm_write(epoch_line(record, config.epochs))
            improved = record["val_balanced_accuracy"] > self.best["val_balanced_accuracy"]
            if improved:
                self.best = {"epoch": epoch, "val_balanced_accuracy": record["val_balanced_accuracy"],
                             "val_accuracy": record["val_accuracy"], "posthoc_tau": record["posthoc_tau"]}
            if distributed.is_main():  # one writer; every rank holds the same state
                if improved:
                    save_checkpoint(self.best_path, self.model,
                                    metadata={**self.metadata, "epoch": epoch, "best": self.best})
                save_checkpoint(self.last_path, self.model, self.optimizer,
                                metadata={**self.metadata, "epoch": epoch, "history": self.history, "best": self.best})
            distributed.barrier()
        rank, world = distributed.rank_and_world()
        if world > 1 and rank > 0:  # for verification: every other rank's state at the end of the loop beside rank 0's
            save_checkpoint(self.checkpoints / f"last.rank{rank}.safetensors", self.model)
        self.finish_prototypes()
        return {"history": self.history, "best": self.best}

    def finish_prototypes(self) -> None:
        """The final push (ProtoPNet / CaBRNet convention) on the *selected* checkpoint of a patch-scoring head: every
        prototype onto its source patch and anchored there (see :func:`~protohead.training.prototypes.final_push`),
        dead ones removed, the rest of the head trained ``anchored_epochs`` more, τ chosen again on validation and
        ``best.safetensors`` rewritten, so the selected model's logits come from exactly the pushed patches.
        Recorded in ``best["final_push"]`` with the validation scores before and after. Pooled scoring (the design
        document's block) keeps its selected checkpoint as trained: there a push moves the logits."""
        config = self.config
        if (self.head is None or not config.final_push or not projects_exactly(self.head) or self.best["epoch"] < 0
                or "final_push" in self.best):
            return
        load_checkpoint(self.best_path, self.model)
        before = {key: self.best[key] for key in SELECTION_KEYS}
        report = final_push(self.head, self._push_batches())
        scores = self.validate()
        report["after_push"] = {key: scores[key] for key in before}
        if self.head.bank.is_anchored and config.anchored_epochs:
            scores, report["anchored"] = self.train_anchored(scores)
            report["pruned"] += prune_dead_prototypes(self.head, self._push_batches())
        self.best = {**self.best, **{key: scores[key] for key in before},
                     "final_push": {**report, "before": before}}
        if distributed.is_main():
            save_checkpoint(self.best_path, self.model,
                            metadata={**self.metadata, "epoch": self.best["epoch"], "best": self.best})
            if config.progress:
                tqdm_write(f"final push: {report['pushed']} prototypes onto their source patches, "
                           f"{len(report['pruned'])} dead removed; val acc {before['val_accuracy']:.4f} → "
                           f"{scores['val_accuracy']:.4f}, val bal acc {before['val_balanced_accuracy']:.4f} → "
                           f"{scores['val_balanced_accuracy']:.4f}")
        distributed.barrier()

    def train_anchored(self, scores: dict[str, float]) -> tuple[dict[str, float], list[dict[str, float]]]:
        """ProtoPNet's last phase for this head: with every prototype anchored to its source patch, train the rest
        of the head (projection, temperature, …) for ``anchored_epochs`` at ``anchored_lr`` (cosine decay), keep
        the state with the best validation balanced accuracy (after τ; the pushed state itself included), and
        return its scores and the per-epoch validation record."""
        import copy

        config = self.config
        params = [p for name, p in self.model.named_parameters() if p.requires_grad and "bank.prototypes" not in name]
        optimizer = torch.optim.AdamW(params, lr=config.anchored_lr, weight_decay=config.weight_decay)
        for group in optimizer.param_groups:
            group["base_lr"] = group["lr"]
        total = config.anchored_epochs * self.steps_per_epoch
        best_scores, best_state = scores, copy.deepcopy(self.model.state_dict())
        records = []
        start = config.epochs * self.steps_per_epoch  # the anchored epochs are numbered after the training ones

        def schedule(step: int) -> float:
            return lr_factor(step - start, total, 0)

        for epoch in range(config.anchored_epochs):
            stats = self.train_epoch(config.epochs + epoch, optimizer, schedule)
            self.head.bank.sync_anchored(self.head.project_exactly)
            current = self.validate()
            records.append({"loss/total": stats.get("loss/total", float("nan")),
                            **{key: current[key] for key in SELECTION_KEYS}})
            if current["val_balanced_accuracy"] > best_scores["val_balanced_accuracy"]:
                best_scores, best_state = current, copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(best_state)
        return best_scores, records


def tqdm_write(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


LOG_COLUMNS = ("epoch", "loss/total", "val_accuracy", "val_balanced_accuracy", "posthoc_tau",
               "val_accuracy_raw", "val_balanced_accuracy_raw", "max/grad_norm", "seconds")


def history_csv(history: list[dict[str, Any]]) -> str:
    """The training history as CSV text: one row per epoch (1-based), the columns of :data:`LOG_COLUMNS`."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(LOG_COLUMNS)
    for record in history:
        writer.writerow([record["epoch"] + 1 if name == "epoch" else record.get(name, "") for name in LOG_COLUMNS])
    return out.getvalue()


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One console line per epoch: loss, validation accuracy / balanced accuracy (after τ), τ, time."""
    return (f"epoch {record['epoch'] + 1}/{epochs}  loss {record.get('loss/total', float('nan')):.4f}  "
            f"val acc {record['val_accuracy']:.4f}  val bal acc {record['val_balanced_accuracy']:.4f}  "
            f"tau {record['posthoc_tau']:g}  {record['seconds']:.1f} s")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=True))
