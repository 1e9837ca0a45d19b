"""Use a trained run on new images: ``protohead.load_run(path).predict(images)``.

The numbers are those of ``protohead evaluate``: the same backbone and preprocessing, frozen features
rounded to float16 as the feature cache stores them, the same head, and the post-hoc prior shift τ chosen
on validation (:func:`protohead.posthoc.final_outputs`). Nothing of the training data is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protohead import runfolder
from protohead.model import EndToEnd, head_of, uncertainty_rule
from protohead.posthoc import final_outputs
from protohead.referral import referral_reasons
from protohead.views import apply_view, average_view_outputs, view_names

ImageInput = str | os.PathLike | np.ndarray | Any  # a path, an (H, W, 3) uint8 array, or a PIL image
TOP_PROTOTYPES = 3


@dataclass
class PrototypeEvidence:
    """One prototype cited for a prediction: "this region looks like that patch of a training image".

    Attributes:
        class_name, slot: the prototype. similarity: its score for this image (what the logit uses).
        source_id, source_token: the training image and token it was pushed onto (None if never pushed).
        evidence: (h, w) map of the prototype over this image's token grid (the head's ``evidence_kind``: each token's
            similarity for patch scoring, cross-attention weights summing to 1 for attention heads), or None.
    """

    class_name: str
    slot: int
    similarity: float
    source_id: str | None
    source_token: int | None
    evidence: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["evidence"] = None if self.evidence is None else np.round(self.evidence, 6).tolist()
        return data


@dataclass
class Prediction:
    """The run's decision for one image.

    Attributes:
        source: the path, or ``<array i>`` / ``<image i>`` for in-memory inputs.
        predicted: class name; class_index: its index.
        probabilities: class name → probability after the run's post-hoc prior shift (τ).
        uncertainty: the abstention probability (abstention heads), or 1 − the real-prior probability of the
            predicted class (:func:`protohead.posthoc.final_outputs`; 1 − max probability for a head trained on the
            real prior and used without τ).
        uncertainty_source: ``"abstention"`` or ``"max_probability"`` (the latter in the real-prior form above).
        abstain: abstention heads: whether abstaining is more likely than not (uncertainty ≥ 0.5); else None.
        ood_score: the head's ``ood_score``, higher = further from the training images: the feature distance
            (:mod:`protohead.density`), or the logit energy −logsumexp(logits) for runs without one.
        ood: whether ``ood_score`` is above the run's threshold (chosen so that 95 % of validation images stay
            below it): the image does not look like the training lesions. None for runs without a threshold.
        refer: whether the run hands this image to a person (:mod:`protohead.referral`): its uncertainty is above
            the threshold ``refer_coverage`` of the validation images stay under, or it is ``ood``. None for runs
            trained before referral existed.
        refer_reasons: ``"uncertain"`` and/or ``"unlike_training"`` (empty when the run decides).
        prototypes: the most similar prototypes with their evidence (prototype heads; empty for baselines).
    """

    source: str
    predicted: str
    class_index: int
    probabilities: dict[str, float]
    uncertainty: float
    uncertainty_source: str
    abstain: bool | None
    ood_score: float | None = None
    ood: bool | None = None
    refer: bool | None = None
    refer_reasons: list[str] = field(default_factory=list)
    prototypes: list[PrototypeEvidence] = field(default_factory=list)

    def to_dict(self, evidence: bool = False) -> dict[str, Any]:
        """JSON-able; the (h, w) evidence maps only with ``evidence``."""
        data = {k: v for k, v in asdict(self).items() if k != "prototypes"}
        data["prototypes"] = [p.to_dict() if evidence else {**p.to_dict(), "evidence": None}
                              for p in self.prototypes]
        return data


def read_image(item: ImageInput, max_pixels: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a path (``ValueError`` naming the file), a PIL image or a uint8 array."""
    from PIL import Image

    from protohead.data.base import read_rgb

    if isinstance(item, str | os.PathLike):
        path = Path(item)
        if not path.is_file():
            raise ValueError(f"cannot read image {path}: no such file")
        return read_rgb(str(path)) if max_pixels is None else read_rgb(str(path), max_pixels=max_pixels)
    if isinstance(item, Image.Image):
        return np.asarray(item.convert("RGB"), dtype=np.uint8)
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise ValueError(f"an image array must be (H, W, 3) uint8 RGB, got shape {item.shape} dtype {item.dtype}")
        return item
    raise ValueError(f"cannot use {type(item).__name__} as an image: pass a path, a PIL image or a uint8 array")


class RunPredictor:
    """A run's model, backbone and decision rule, ready for images (see :func:`load_run`)."""

    def __init__(self, loaded: runfolder.LoadedRun, batch_size: int = 32) -> None:
        self.loaded = loaded
        self.backbone = runfolder.load_backbone(loaded)
        self.batch_size = batch_size
        self.head = head_of(loaded.model)
        self.round_features = not isinstance(loaded.model, EndToEnd)  # the cache stores float16
        train_ids = loaded.run_dir / runfolder.TRAIN_IDS_FILE
        self.train_ids: list[str] | None = (json.loads(train_ids.read_text()) if train_ids.is_file() else None)
        self._sources: dict[tuple[int, int], Any] | None = None  # prototype source patches, read when explaining

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.loaded.class_names

    @property
    def uses_abstention(self) -> bool:
        """Whether the reported uncertainty is the head's abstention probability (see :func:`uncertainty_rule`)."""
        return uncertainty_rule(self.loaded.model, self.loaded.selection)[0]

    @property
    def views(self) -> tuple[str, ...]:
        """The views each prediction averages over (:mod:`protohead.views`): the run's ``views`` when it was
        evaluated with ``tta``, else the image as it is."""
        from protohead.pipeline import split_views

        return view_names(split_views(self.loaded.config, "test"))

    @torch.no_grad()
    def features(self, images: Sequence[np.ndarray], view: str = "identity") -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, F) tokens and (B, F) pooled features of uint8 images under ``view``, as the head saw them in
        training."""
        tokens, pooled = self.backbone(apply_view(self.backbone.preprocess(list(images)), view))
        if self.round_features:
            tokens, pooled = tokens.half().float(), pooled.half().float()
        return tokens, pooled

    @torch.no_grad()
    def outputs(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Batched head outputs: ``probabilities`` (n, C) and ``uncertainty`` (n,) after τ, plus the raw
        ``similarities`` (n, C, M) and ``evidence`` (n, C, M, N) of prototype heads."""
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            info = average_view_outputs([self.loaded.model(*self.features(batch, view))[2] for view in self.views])
            for key in ("probabilities", "uncertainty", "ood_score", "similarities", "evidence"):
                if info.get(key) is not None:
                    parts.setdefault(key, []).append(info[key].double().numpy())
        result = {key: np.concatenate(values) for key, values in parts.items()}
        result["probabilities"], result["uncertainty"] = final_outputs(
            result["probabilities"], result["uncertainty"], self.loaded.class_counts, self.loaded.posthoc_tau,
            *uncertainty_rule(self.loaded.model, self.loaded.selection), temperature=self.loaded.temperature)
        return result

    def predict(self, images: Sequence[ImageInput] | ImageInput, top: int = TOP_PROTOTYPES) -> list[Prediction]:
        """One :class:`Prediction` per image (paths, PIL images or (H, W, 3) uint8 arrays).

        A path that cannot be read is a ``ValueError`` naming it (use :meth:`predict_each` to go on past it).
        """
        if isinstance(images, str | os.PathLike | np.ndarray) or not isinstance(images, Sequence):
            images = [images]
        max_pixels = self.loaded.config.max_image_pixels
        arrays = [read_image(item, max_pixels) for item in images]
        return self._decide(arrays, [describe_source(item, i) for i, item in enumerate(images)], top)

    def predict_each(self, images: Sequence[ImageInput], top: int = TOP_PROTOTYPES
                     ) -> Iterator[tuple[ImageInput, Prediction | ValueError]]:
        """(input, prediction or the error that input gave), batch by batch; bad inputs do not stop the rest."""
        max_pixels = self.loaded.config.max_image_pixels
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            good: list[tuple[int, np.ndarray]] = []
            results: list[Prediction | ValueError | None] = [None] * len(chunk)
            for k, item in enumerate(chunk):
                try:
                    good.append((k, read_image(item, max_pixels)))
                except ValueError as error:
                    results[k] = error
            if good:
                decided = self._decide([array for _, array in good],
                                       [describe_source(chunk[k], start + k) for k, _ in good], top)
                for (k, _), prediction in zip(good, decided, strict=True):
                    results[k] = prediction
            yield from zip(chunk, results, strict=True)  # type: ignore[misc]

    def _decide(self, arrays: list[np.ndarray], sources: list[str], top: int) -> list[Prediction]:
        out = self.outputs(arrays)
        names = self.class_names
        predictions = []
        for i, source in enumerate(sources):
            probs = out["probabilities"][i]
            index = int(probs.argmax())
            uncertainty = float(out["uncertainty"][i])
            evidence = self._evidence(out, i, top) if "similarities" in out else []
            ood_score = float(out["ood_score"][i])
            threshold = self.loaded.selection.get("ood_threshold")
            reasons = referral_reasons(uncertainty, ood_score, self.loaded.selection)
            predictions.append(Prediction(
                source=source, predicted=names[index], class_index=index,
                probabilities={name: float(p) for name, p in zip(names, probs, strict=True)},
                uncertainty=uncertainty,
                uncertainty_source="abstention" if self.uses_abstention else "max_probability",
                abstain=(uncertainty >= 0.5) if self.uses_abstention else None, ood_score=ood_score,
                ood=None if threshold is None else ood_score > threshold,
                refer=None if reasons is None else bool(reasons), refer_reasons=reasons or [], prototypes=evidence))
        return predictions

    def _evidence(self, out: dict[str, np.ndarray], i: int, top: int) -> list[PrototypeEvidence]:
        from protohead.explain.explanations import top_prototypes
        from protohead.explain.gallery import grid_shape

        head = self.head
        cited = []
        for c, slot, similarity in top_prototypes(out["similarities"][i], top):
            image_index = int(head.push_image[c, slot])
            source_id = None
            if image_index >= 0 and self.train_ids is not None and image_index < len(self.train_ids):
                source_id = self.train_ids[image_index]
            evidence = None
            if "evidence" in out:
                weights = out["evidence"][i, c, slot]
                evidence = weights.reshape(grid_shape(weights.size))
            cited.append(PrototypeEvidence(self.class_names[c], slot, float(similarity), source_id,
                                           int(head.push_token[c, slot]) if image_index >= 0 else None, evidence))
        return cited

    def check_explainable(self) -> None:
        """``ValueError`` for a run without prototypes (a baseline head): nothing to explain."""
        if not hasattr(self.head, "bank"):
            raise ValueError(f"run {self.loaded.run_dir} uses {self.loaded.config.preset!r}, which has no prototypes "
                             "to explain")

    def explain_figure(self, item: ImageInput, out_dir: str | os.PathLike[str], name: str | None = None) -> Path:
        """Write ``out_dir/explain_<name>.png``: the image, its top-3 prototypes' evidence maps and their source
        patches (from the run folder's ``prototypes/``). ``name`` defaults to a path's stem, or ``image`` for an
        in-memory image (pass distinct names to keep several). ``ValueError`` for a run without prototypes."""
        from protohead.explain.explanations import ImagePrediction, SourcePatch, plot_explanation
        from protohead.explain.gallery import grid_shape, safe_name

        self.check_explainable()
        if self._sources is None:
            self._sources = {key: SourcePatch(record["image"], record["image_id"], record["token"])
                             for key, record in runfolder.read_prototype_sources(self.loaded.run_dir).items()}
        array = read_image(item, self.loaded.config.max_image_pixels)
        out = self.outputs([array])
        evidence = out.get("evidence")
        prediction = ImagePrediction(out["probabilities"][0], float(out["uncertainty"][0]), out["similarities"][0],
                                     None if evidence is None else evidence[0], self.head.evidence_kind,
                                     self.head.config.distance)
        grid = grid_shape(self.backbone.num_tokens)
        label = name or (Path(item).stem if isinstance(item, str | os.PathLike) else "image")
        return plot_explanation(array, label, None, self.class_names, prediction, self._sources, grid,
                                self.backbone.image_size, Path(out_dir) / f"explain_{safe_name(label)}.png")


def describe_source(item: ImageInput, index: int) -> str:
    if isinstance(item, str | os.PathLike):
        return str(item)
    return f"<{'array' if isinstance(item, np.ndarray) else 'image'} {index}>"


def load_run(path: str | os.PathLike[str], batch_size: int = 32) -> RunPredictor:
    """A trained run folder as a ready model: ``load_run("runs/basic").predict(["a.jpg", "b.jpg"])``.

    Needs only the run folder (and the backbone package), not the training data.
    """
    return RunPredictor(runfolder.load_model(path), batch_size=batch_size)
