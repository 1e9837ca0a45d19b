"""Flag what is not a lesion: out-of-distribution (OOD) scores from a run's prototypes.

A prototype head compares every image with every prototype (cosine similarity to per-class prototypes that
were pushed onto training patches). An image that resembles no prototype at all — a photo of a face, a blank
frame, a ruler, noise — is far from every prototype, whatever class wins the soft-max. The scores here turn
that distance into one number per image, **higher = further from everything the run has seen**:

=======================  ===========================================================  ==============
method                   score (n,)                                                   needs
=======================  ===========================================================  ==============
``"mahalanobis"``        squared Mahalanobis distance of the pooled features to the     a fitted head
                         nearest class mean (:mod:`protohead.density`)
``"logit_energy"``       −logsumexp over classes of the logits (Liu et al. 2020)        any head
``"max_similarity"``     1 − max over valid (class, slot) of the similarity             prototype head
``"energy"``             −T · logsumexp over valid (class, slot) of similarity / T      prototype head
``"max_probability"``    1 − max class probability after the prior shift τ (no calib.)  any head
=======================  ===========================================================  ==============

For a prototype head the logits are (learned head temperature, 15.2 in the run below) × (best similarity per
class), so ``logit_energy`` is a prototype score too: the nearest prototype of each class, soft-maxed over the
classes at the head's own temperature.

Default: ``"mahalanobis"`` — every run fits its head's feature density after training and its ``ood_score`` and
threshold are that distance. The prototype scores below only see the directions the head learned to separate:
on the default ``patch`` preset the logit energy reached far-OOD natural AUROC 0.75–0.80 on frozen features and
0.64–0.86 after partial fine-tuning (3 seeds), the feature distance 0.999 and 0.977–0.996 (BENCHMARKS §8).
Runs trained before runs fitted the density fall back to ``"logit_energy"`` (:data:`DEFAULT_METHOD`;
:func:`ood_scores` on similarities alone defaults to ``"max_similarity"``). The rest of this docstring compares
the scores without the density, measured with ``benchmarks/bench_ood.py`` on the finished full-data ``basic``
run (official HAM10000 split, frozen EfficientNet-Lite0 features; in-distribution = the 2,005 test
images, thresholds accepting 95 % of the 1,003 validation images) against 930 offline OOD images
(``benchmarks/ood_sets.py``). AUROC / FPR95:

=======================================  ==============  ==============  ==============  ===============
OOD images                               logit_energy    max_similarity  energy T=0.05   max_probability
=======================================  ==============  ==============  ==============  ===============
far-OOD, synthetic + natural (530)       0.994 / 0.026   0.995 / 0.023   0.995 / 0.019   0.516 / 0.994
covariate: corrupted test images (400)   0.945 / 0.250   0.938 / 0.250   0.950 / 0.240   0.575 / 0.978
all 930                                  0.973 / 0.123   0.971 / 0.120   0.975 / 0.114   0.541 / 0.987
=======================================  ==============  ==============  ==============  ===============

Real lesions wrongly flagged at the validation threshold, of the 664 test images that are not ``nv``: logit
energy 11 (1.7 %), energy T = 0.05 13, max similarity 38 (5.7 %; 3 of the 29 ``vasc``), max probability 105.

Why logit energy: the three prototype scores separate OOD images equally well within the noise of these
sets (differences of a few images in 530), so the choice rests on the rest. Max similarity flags 3.5× more
real minority-class lesions: a rare-class lesion whose single nearest prototype is mediocre is "far" by the
maximum though it resembles its class's prototypes well enough, and a rejection rule must not hide the rare
lesions. The energy over all (class, slot) similarities does as well as logit energy only in a narrow window of
its temperature — T = 0.02 ≈ max similarity, 0.03–0.05 best, 0.07 already worse (far-OOD FPR95 0.049), 0.1
clearly (0.136): summing over the ~40 slots rewards resembling many prototypes a little, which noise does — and
that T was chosen on these same OOD sets (no separate OOD validation set exists). Logit energy has no constant
to tune (the head learned its temperature), and the same score serves the baselines, which have no
prototypes. The soft-max probability is useless as an OOD score here (AUROC ≈ 0.5 far-OOD: the head is as
confident on noise as on lesions). All numbers are one run; re-check other heads with ``bench_ood.py``.

Threshold and metrics (:func:`choose_threshold`, :func:`ood_metrics`): an image is *accepted* as
in-distribution when its score is ≤ the threshold and *flagged* as OOD when it is above. The threshold is
chosen on the validation split so that 95 % of validation images are accepted.

:func:`evaluate_ood` scores a run folder's test split and a folder of images; ``protohead evaluate RUN --ood
DIR`` is its command line. Pure functions first (numpy only), the run-folder glue after.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protohead.data.base import IMAGE_FILE_SUFFIXES as IMAGE_SUFFIXES
from protohead.data.base import image_files

METHODS: tuple[str, ...] = ("mahalanobis", "max_similarity", "energy", "logit_energy", "max_probability")
PROTOTYPE_METHODS: tuple[str, ...] = ("max_similarity", "energy")
DEFAULT_METHOD = "logit_energy"
DEFAULT_ENERGY_TEMPERATURE = 0.05
ACCEPTANCE = 0.95
OOD_FILE = "ood.json"
SCORES_FILE = "ood_scores.csv"
HISTOGRAM_FILE = "ood_histogram.png"
ROC_FILE = "ood_roc.png"
NO_IMAGES = "no images to score"
WARN_LIMIT = 20  # unreadable files warned about one by one; beyond, one summary warning (ood.json lists all)


class UnreadableImageWarning(UserWarning):
    """An image file under the OOD folder could not be read; it was skipped (the message names it)."""


# ------------------------------------------------------------------------------------------- scores
def _logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    """logsumexp along ``axis``; −inf entries count as absent (an all −inf row gives −inf)."""
    top = values.max(axis=axis, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    total = np.exp(values - safe).sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore"):
        return np.squeeze(np.log(total) + safe, axis=axis)


def ood_scores(similarities: np.ndarray, method: str = "max_similarity",
               temperature: float = DEFAULT_ENERGY_TEMPERATURE) -> np.ndarray:
    """OOD score per image from prototype similarities: higher = further from every prototype.

    Args:
        similarities: (n, C, M) similarity of each image to each prototype slot (cosine for the default
            head), with ``-inf`` in unused slots (as ``RunPredictor.outputs`` gives them).
        method: ``"max_similarity"`` (default: no constant to tune): 1 − max over the valid slots;
            ``"energy"``: −T · logsumexp(s / T) over the valid slots (a soft maximum; T → 0 gives −max s).
        temperature: T of ``"energy"`` (default 0.05, see the module docstring).

    Returns:
        (n,) float64 scores.

    Raises:
        ValueError: for a wrong shape, NaN similarities, an image with no valid prototype, an unknown method
            or a non-positive temperature.
    """
    sims = np.asarray(similarities, dtype=np.float64)
    if sims.ndim != 3:
        raise ValueError(f"similarities must be (n, C, M), got shape {sims.shape}")
    if np.isnan(sims).any():
        raise ValueError("similarities contain NaN")
    flat = sims.reshape(len(sims), -1)
    if flat.shape[1] == 0 or (len(flat) and not np.isfinite(flat.max(axis=1)).all()):
        raise ValueError("an image has no valid prototype (every slot is -inf)")
    if method == "max_similarity":
        return 1.0 - flat.max(axis=1)
    if method == "energy":
        if not 0 < temperature < np.inf:
            raise ValueError(f"the energy temperature must be positive and finite, got {temperature}")
        return -temperature * _logsumexp(flat / temperature, axis=1)
    raise ValueError(f"unknown prototype OOD method {method!r}; expected one of {list(PROTOTYPE_METHODS)}")


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Energy OOD score of class logits (Liu et al., NeurIPS 2020): (n, C) → (n,) −T · logsumexp(logits / T).

    Higher = less in-distribution. For the prototype heads the logits are (head temperature) × (best
    similarity per class), so this is a class-level soft maximum; it works for the baselines too.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (n, C), got shape {logits.shape}")
    if not 0 < temperature < np.inf:
        raise ValueError(f"the energy temperature must be positive and finite, got {temperature}")
    return -temperature * _logsumexp(logits / temperature, axis=1)


def max_probability_score(probabilities: np.ndarray) -> np.ndarray:
    """(n, C) class probabilities → (n,) 1 − max probability (Hendrycks & Gimpel 2017's baseline)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be (n, C), got shape {probabilities.shape}")
    return 1.0 - probabilities.max(axis=1)


# ------------------------------------------------------------------------------ threshold and metrics
def _finite_1d(scores: np.ndarray | Sequence[float], what: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError(f"no {what} scores")
    if not np.isfinite(values).all():
        raise ValueError(f"{what} scores must be finite")
    return values


def choose_threshold(in_distribution_scores: np.ndarray | Sequence[float], acceptance: float = ACCEPTANCE) -> float:
    """The smallest score t with at least ``acceptance`` of the in-distribution scores ≤ t.

    Images with score ≤ t are accepted as in-distribution, those above are flagged as OOD; on the scores
    given (normally the validation split's), at least ``acceptance`` are accepted — exactly
    ⌈acceptance · n⌉ of the n unless scores tie at t. (The ``inverted_cdf`` quantile.)

    Args:
        in_distribution_scores: (n,) finite scores of in-distribution images.
        acceptance: fraction in (0, 1] to accept.
    """
    if not 0 < acceptance <= 1:
        raise ValueError(f"acceptance must be in (0, 1], got {acceptance}")
    values = np.sort(_finite_1d(in_distribution_scores, "in-distribution"))
    k = int(np.ceil(acceptance * len(values) - 1e-9))  # the tolerance keeps 0.95 · 20 = 19, not 20
    return float(values[max(k, 1) - 1])


def ood_metrics(in_scores: np.ndarray | Sequence[float], out_scores: np.ndarray | Sequence[float],
                threshold: float | None = None) -> dict[str, float]:
    """How well scores separate in-distribution (ID) from OOD images (higher score = more OOD).

    Args:
        in_scores: (n_in,) scores of in-distribution images (e.g. the test split).
        out_scores: (n_out,) scores of OOD images.
        threshold: optional operating point (images with score > threshold are flagged as OOD), e.g. from
            :func:`choose_threshold` on validation.

    Returns:
        ``auroc``: area under the ROC curve with OOD as the positive class (1 = perfect separation, 0.5 =
            chance); scikit-learn's ``roc_auc_score`` (ties count one half).
        ``fpr95``: the usual FPR at 95 % TPR: with in-distribution as the positive class, take the threshold
            that accepts (score ≤ t) 95 % of the in-distribution images given here (:func:`choose_threshold`
            on ``in_scores``); ``fpr95`` is the fraction of OOD images accepted there (wrongly kept as
            in-distribution). 0 is perfect; identical distributions give ≈ 0.95.
        with ``threshold``: ``threshold``, ``detection_rate`` (fraction of OOD images flagged, score >
            threshold) and ``in_acceptance`` (fraction of these in-distribution images accepted, score ≤
            threshold — close to the intended acceptance when the threshold came from validation).
        ``n_in``, ``n_out``: the counts.
    """
    from sklearn.metrics import roc_auc_score

    ins = _finite_1d(in_scores, "in-distribution")
    outs = _finite_1d(out_scores, "OOD")
    labels = np.concatenate([np.zeros(len(ins)), np.ones(len(outs))])
    result: dict[str, float] = {
        "auroc": float(roc_auc_score(labels, np.concatenate([ins, outs]))),
        "fpr95": float(np.mean(outs <= choose_threshold(ins, 0.95))),
    }
    if threshold is not None:
        result.update(threshold=float(threshold), detection_rate=float(np.mean(outs > threshold)),
                      in_acceptance=float(np.mean(ins <= threshold)))
    result.update(n_in=len(ins), n_out=len(outs))
    return result


# ------------------------------------------------------------------------------------- head outputs
@dataclass
class HeadOutputs:
    """What the OOD scores read from a run's head, for n images.

    Attributes:
        logits: (n, C) raw class logits (before the prior shift) of the image as it is (identity view).
        probabilities: (n, C) class probabilities after the run's post-hoc prior shift τ (the decision), before
            any calibration temperature (which can reorder the maxima across images a little); for a run that
            averages views (``views`` with ``tta``), their mean over the views, as predictions are.
        similarities: (n, C, M) prototype similarities, −inf in unused slots (identity view); None for the
            baselines.
        sources: n names (file paths or image ids), for the per-image CSV.
        feature_distances: (n,) the head's feature distance (:mod:`protohead.density`), averaged over the views
            as predictions are; None for a run that has not fitted it (runs from before it existed).
        uncertainty: (n,) the uncertainty the run reports (:func:`protohead.posthoc.final_outputs`: the abstention
            probability or 1 − the real-prior probability of the predicted class); None when not computed.
        ood_score: (n,) the head's own ``ood_score`` averaged over the views, what ``predict`` compares with the
            run's threshold; None when not computed.
    """

    logits: np.ndarray
    probabilities: np.ndarray
    similarities: np.ndarray | None
    sources: list[str]
    feature_distances: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    ood_score: np.ndarray | None = None

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods these outputs support (prototype methods only with similarities, ``mahalanobis`` only
        with feature distances)."""
        return tuple(m for m in METHODS if not ((m in PROTOTYPE_METHODS and self.similarities is None)
                                                or (m == "mahalanobis" and self.feature_distances is None)))

    @property
    def default_method(self) -> str:
        """The run's own OOD score: ``mahalanobis`` when the head fitted its feature density, else
        :data:`DEFAULT_METHOD`."""
        return "mahalanobis" if self.feature_distances is not None else DEFAULT_METHOD

    def scores(self, method: str, temperature: float = DEFAULT_ENERGY_TEMPERATURE) -> np.ndarray:
        """(n,) scores of ``method`` (``temperature``: that of the prototype ``"energy"``)."""
        if method in PROTOTYPE_METHODS:
            if self.similarities is None:
                raise ValueError(f"OOD method {method!r} needs prototype similarities; this run has none "
                                 f"(use one of {list(self.methods)})")
            return ood_scores(self.similarities, method, temperature)
        if method == "mahalanobis":
            if self.feature_distances is None:
                raise ValueError("OOD method 'mahalanobis' needs the head's fitted feature density; this run has "
                                 f"none (use one of {list(self.methods)})")
            return np.asarray(self.feature_distances, dtype=np.float64)
        if method == "logit_energy":
            return energy_score(self.logits)
        if method == "max_probability":
            return max_probability_score(self.probabilities)
        raise ValueError(f"unknown OOD method {method!r}; expected one of {list(METHODS)}")


def head_outputs(predictor: Any, batches: Iterable[Sequence[tuple[Any, Any]]], sources: Sequence[str]) -> HeadOutputs:
    """Run ``predictor``'s head on feature batches, each under the run's views (``predictor.views``).

    What the run decides with is averaged over the views as :meth:`RunPredictor.outputs` averages it
    (:data:`protohead.views.AVERAGED_KEYS`: probabilities, uncertainty, feature distance), so the ``mahalanobis``
    and ``max_probability`` scores and the referral are the run's own; ``logits`` and ``similarities`` (and the
    scores made of them) are the image's as it is.

    Args:
        predictor: a :class:`protohead.predict.RunPredictor`.
        batches: per batch, one (tokens (B, N, F), pooled (B, F)) pair of float tensors per view of
            ``predictor.views``, as ``predictor.features(images, view)`` gives them.
        sources: one name per image over all batches (read after ``batches`` is exhausted).
    """
    import torch

    from protohead.model import uncertainty_rule
    from protohead.posthoc import final_outputs
    from protohead.views import average_view_outputs

    logits, probs, sims, distances, uncertainty, ood_score = [], [], [], [], [], []
    loaded = predictor.loaded
    with torch.no_grad():
        for views in batches:
            if len(views) != len(predictor.views):
                raise ValueError(f"{len(views)} views of a batch, the run averages {len(predictor.views)}")
            outputs = [loaded.model(tokens, pooled) for tokens, pooled in views]
            batch_logits, info = outputs[0][0], average_view_outputs([output[2] for output in outputs])
            logits.append(batch_logits.double().numpy())
            probs.append(info["probabilities"].double().numpy())
            uncertainty.append(info["uncertainty"].double().numpy())
            ood_score.append(info["ood_score"].double().numpy())
            if info.get("similarities") is not None:
                sims.append(info["similarities"].double().numpy())
            if info.get("feature_distance") is not None:
                distances.append(info["feature_distance"].double().numpy())
    if not logits:
        raise ValueError(NO_IMAGES)
    probabilities, run_uncertainty = final_outputs(np.concatenate(probs), np.concatenate(uncertainty),
                                                   loaded.class_counts, loaded.posthoc_tau,
                                                   *uncertainty_rule(loaded.model, loaded.selection))
    similarities = np.concatenate(sims) if sims else None
    out = HeadOutputs(np.concatenate(logits), probabilities, similarities, list(sources),
                      np.concatenate(distances) if distances else None, run_uncertainty, np.concatenate(ood_score))
    if len(out.sources) != len(out.logits):
        raise ValueError(f"{len(out.sources)} sources for {len(out.logits)} scored images")
    return out


def array_outputs(predictor: Any, arrays: Sequence[np.ndarray], sources: Sequence[str]) -> HeadOutputs:
    """Head outputs of (H, W, 3) uint8 images through the run's backbone, ``predictor.batch_size`` at a time."""
    size = predictor.batch_size
    return head_outputs(predictor, (_view_features(predictor, arrays[i:i + size]) for i in range(0, len(arrays), size)),
                        sources)


def _view_features(predictor: Any, arrays: Sequence[np.ndarray]) -> list[tuple[Any, Any]]:
    """(tokens, pooled) of uint8 images under each of the run's views."""
    return [predictor.features(arrays, view) for view in predictor.views]


def split_outputs(predictor: Any, split: Any, cache_dir: str | os.PathLike[str] | None = None) -> HeadOutputs:
    """Head outputs of a dataset split (:class:`protohead.data.ImageSplit`).

    A frozen-backbone run reads the split's features from the feature cache (``cache_dir``; computed and
    cached there if absent, as ``protohead evaluate`` does) — the same float16 features the predictor would
    compute. A fine-tuned run (or ``cache_dir=None``) runs the run's backbone on the images, batch by batch.
    """
    from protohead.model import EndToEnd

    size = predictor.batch_size
    starts = range(0, len(split), size)
    if isinstance(predictor.loaded.model, EndToEnd) or cache_dir is None:  # decode one batch at a time
        batches = (_view_features(predictor, [split.load(i) for i in range(start, min(start + size, len(split)))])
                   for start in starts)
        return head_outputs(predictor, batches, list(split.ids))
    from protohead.features import extract_features

    views = [extract_features(predictor.backbone, split, cache_dir, progress=False, view=view)
             for view in predictor.views]
    batches = ([features.torch_batch(np.arange(start, min(start + size, len(split))))[:2] for features in views]
               for start in starts)
    return head_outputs(predictor, batches, list(split.ids))


def file_outputs(predictor: Any, paths: Sequence[str | os.PathLike[str]]
                 ) -> tuple[HeadOutputs | None, list[tuple[str, str]]]:
    """Head outputs of image files, skipping those that cannot be read.

    Returns:
        (outputs of the readable files in order, or None if none was readable; [(path, error)] of the
        skipped ones). Each skipped file is also warned about (:class:`UnreadableImageWarning`, naming it; past
        :data:`WARN_LIMIT` files one summary warning).
    """
    from protohead.predict import read_image

    max_pixels = predictor.loaded.config.max_image_pixels
    good: list[str] = []
    bad: list[tuple[str, str]] = []

    def batches() -> Iterable[list[tuple[Any, Any]]]:  # read, encode and score one batch at a time
        arrays: list[np.ndarray] = []
        for path in paths:
            try:
                arrays.append(read_image(path, max_pixels))
            except ValueError as error:
                bad.append((str(path), " ".join(str(error).split())))
                if len(bad) <= WARN_LIMIT:
                    warnings.warn(f"skipped unreadable image {path}: {bad[-1][1]}", UnreadableImageWarning,
                                  stacklevel=4)
                continue
            good.append(str(path))
            if len(arrays) == predictor.batch_size:
                yield _view_features(predictor, arrays)
                arrays = []
        if arrays:
            yield _view_features(predictor, arrays)

    stream = batches()
    first = next(stream, None)  # reads until the first batch, or through every file when none is readable
    outputs = None if first is None else head_outputs(predictor, itertools.chain([first], stream), good)
    if len(bad) > WARN_LIMIT:
        warnings.warn(f"skipped {len(bad)} unreadable images in all ({len(bad) - WARN_LIMIT} not named above)",
                      UnreadableImageWarning, stacklevel=2)
    return outputs, bad


# -------------------------------------------------------------------------------------------- plots
def plot_histogram(in_scores: np.ndarray, out_scores: np.ndarray, threshold: float, method: str,
                   path: str | os.PathLike[str], labels: tuple[str, str] = ("in-distribution", "OOD")) -> Path:
    """Density histograms of (n_in,) and (n_out,) scores with the threshold marked; PNG written atomically."""
    from protohead.evaluation.plots import new_figure, save_png

    fig = new_figure((6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    both = np.concatenate([in_scores, out_scores])
    bins = np.linspace(float(both.min()), float(both.max()) + 1e-12, 41)
    ax.hist(in_scores, bins=bins, density=True, alpha=0.55, label=f"{labels[0]} (n={len(in_scores)})")
    ax.hist(out_scores, bins=bins, density=True, alpha=0.55, label=f"{labels[1]} (n={len(out_scores)})")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel(f"OOD score ({method}; higher = more likely out of distribution)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike[str]) -> Path:
    """ROC curves (OOD = positive) of method → ((n_in,) in-distribution, (n_out,) OOD scores); PNG, atomic."""
    from sklearn.metrics import roc_curve

    from protohead.evaluation.plots import new_figure, save_png

    fig = new_figure((4.8, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    for method, (ins, outs) in curves.items():
        labels = np.concatenate([np.zeros(len(ins)), np.ones(len(outs))])
        scores = np.concatenate([ins, outs])
        fpr, tpr, _ = roc_curve(labels, scores)
        auroc = ood_metrics(ins, outs)["auroc"]
        ax.plot(fpr, tpr, label=f"{method} (AUROC {auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("in-distribution flagged (FPR)")
    ax.set_ylabel("OOD flagged (TPR)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_png(fig, path)


# ----------------------------------------------------------------------------------------- run level
def referral_of_sets(selection: dict[str, Any], sets: dict[str, HeadOutputs]) -> dict[str, dict[str, float]] | None:
    """Share of each set's images the run refers (:mod:`protohead.referral`: its stored uncertainty and OOD
    thresholds), and why: set name → ``referred``, ``referred_uncertain``, ``referred_unlike_training``, ``n``.
    ``None`` for a run without a referral rule (trained before it existed)."""
    from protohead.referral import referred_shares

    if selection.get("uncertainty_threshold") is None:
        return None
    result = {}
    for name, outputs in sets.items():
        if outputs.uncertainty is None or outputs.ood_score is None:
            raise ValueError(f"the outputs of {name!r} carry no uncertainty or OOD score")
        result[name] = {"n": len(outputs.uncertainty),
                        **referred_shares(outputs.uncertainty, outputs.ood_score, selection)}
    return result


def run_scoring(run_dir: str | os.PathLike[str], split: str = "test", data_path: str | os.PathLike[str] | None = None,
                fit_density: bool = False) -> tuple[Any, HeadOutputs, HeadOutputs]:
    """Load a run and score its validation and ``split`` images: (predictor, val outputs, split outputs).

    The data are the run's own (its stored config; ``data_path``: where they are now), with its
    ``subset_per_class``; a frozen-backbone run reads the features from its feature cache. ``fit_density``: a
    run trained before heads fitted their feature density (:mod:`protohead.density`) gets it fitted here, in
    memory, on its training split as training does (:func:`protohead.pipeline.fit_feature_density`); the run
    folder is not changed.
    """
    import dataclasses

    from protohead import runfolder
    from protohead.pipeline import default_cache_dir, load_data
    from protohead.predict import RunPredictor

    predictor = RunPredictor(runfolder.load_model(run_dir))
    config = runfolder.read_config(run_dir)
    if data_path is not None:
        config = dataclasses.replace(config, data=str(data_path))
    dataset = load_data(config)
    if tuple(dataset.class_names) != tuple(predictor.class_names):
        raise ValueError(f"the data at {config.data} have classes {list(dataset.class_names)}, the run {run_dir} "
                         f"was trained on {list(predictor.class_names)}")
    if split not in ("val", "test", "train"):
        raise ValueError(f"unknown split {split!r}; expected train, val or test")
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir() / "features"
    if fit_density and not predictor.head.feature_density.fitted:
        from protohead.pipeline import fit_feature_density, prepare

        prepared = prepare(config, backbone=predictor.backbone)  # the run's backbone, checked when loaded
        fit_feature_density(predictor.loaded.model, prepared.splits["train"], config.eval_batch_size,
                            len(dataset.class_names))
    val = split_outputs(predictor, dataset.splits["val"], cache)
    scored = val if split == "val" else split_outputs(predictor, dataset.splits[split], cache)
    return predictor, val, scored


def _write_scores_csv(path: Path, parts: list[tuple[str, HeadOutputs]], methods: Sequence[str],
                      temperature: float) -> None:
    from protohead.atomic import write_text_atomic

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["kind", "source", *methods])
    for kind, outputs in parts:
        columns = [outputs.scores(m, temperature) for m in methods]
        for i, source in enumerate(outputs.sources):
            writer.writerow([kind, source, *(f"{c[i]:.6g}" for c in columns)])
    write_text_atomic(path, buffer.getvalue())


def evaluate_ood(run_dir: str | os.PathLike[str], ood_dir: str | os.PathLike[str],
                 out_dir: str | os.PathLike[str] | None = None, split: str = "test", threshold: float | None = None,
                 method: str | None = None, acceptance: float = ACCEPTANCE,
                 temperature: float = DEFAULT_ENERGY_TEMPERATURE,
                 data_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Score a run's ``split`` images (in-distribution) against every image file under ``ood_dir`` (OOD).

    Args:
        run_dir: a finished run folder (``protohead run``/``train``).
        ood_dir: folder searched recursively for :data:`IMAGE_SUFFIXES` files. Unreadable files are skipped,
            each warned about by name (:class:`UnreadableImageWarning`) and listed in ``ood.json``.
        out_dir: where to write (default ``RUN/ood-<name of ood_dir>``).
        split: the in-distribution split to score (default test).
        threshold: operating point of ``method`` (images scoring above are flagged); default: accept
            ``acceptance`` of the validation images (:func:`choose_threshold`).
        method: the headline method (default: the run's own, :attr:`HeadOutputs.default_method` —
            ``mahalanobis`` for a run that fitted its feature density, else logit energy). Every method the
            head supports is measured too.
        temperature: of the prototype ``"energy"`` score.
        data_path: where the run's dataset is now (default the stored path).

    Writes to ``out_dir`` (atomically): ``ood.json`` (headline metrics, threshold, counts, every method's
    metrics, skipped files), ``ood_scores.csv`` (per-image scores), ``ood_histogram.png`` (headline score,
    in-distribution vs OOD, threshold) and ``ood_roc.png`` (every method).

    Returns:
        The ``ood.json`` content: ``method``, ``auroc``, ``fpr95``, ``threshold``, ``detection_rate``,
        ``in_acceptance`` of the headline method; ``methods`` (method → :func:`ood_metrics` with its own
        validation threshold); ``counts``; ``unreadable``; ``out_dir``.

    Raises:
        ValueError: no image file under ``ood_dir``, none readable, an unknown or unsupported method, data
            that do not match the run.
    """
    from protohead.atomic import write_text_atomic

    ood_dir = Path(ood_dir)
    paths = image_files(ood_dir)
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {ood_dir}")
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown OOD method {method!r}; expected one of {list(METHODS)}")
    predictor, val, ins = run_scoring(run_dir, split, data_path)
    outs, unreadable = file_outputs(predictor, paths)
    if outs is None:
        raise ValueError(f"none of the {len(paths)} image files under {ood_dir} could be read, e.g. "
                         f"{unreadable[0][0]}: {unreadable[0][1]}")
    method = method or ins.default_method
    if method not in ins.methods:
        needs = "a fitted feature density" if method == "mahalanobis" else "prototype similarities"
        raise ValueError(f"OOD method {method!r} needs {needs}; run {run_dir} has none "
                         f"(use one of {list(ins.methods)})")
    per_method: dict[str, dict[str, float]] = {}
    for m in ins.methods:
        chosen = threshold if (m == method and threshold is not None) else choose_threshold(
            val.scores(m, temperature), acceptance)
        per_method[m] = ood_metrics(ins.scores(m, temperature), outs.scores(m, temperature), chosen)
    head = per_method[method]
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / f"ood-{ood_dir.resolve().name}"
    result: dict[str, Any] = {
        "method": method, "auroc": head["auroc"], "fpr95": head["fpr95"], "threshold": head["threshold"],
        "threshold_source": "given" if threshold is not None else f"validation, {acceptance:g} accepted",
        "detection_rate": head["detection_rate"], "in_acceptance": head["in_acceptance"],
        "acceptance": acceptance, "energy_temperature": temperature, "split": split,
        "run_dir": str(run_dir), "ood_dir": str(ood_dir),
        "counts": {"in_distribution": len(ins.sources), "validation": len(val.sources),
                   "ood": len(outs.sources), "unreadable": len(unreadable)},
        "methods": per_method,
        "referral": referral_of_sets(predictor.loaded.selection, {split: ins, "ood": outs}),
        "unreadable": [{"path": p, "error": e} for p, e in unreadable],
        "out_dir": str(out),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_histogram(ins.scores(method, temperature), outs.scores(method, temperature), head["threshold"], method,
                   out / HISTOGRAM_FILE, (f"{split} split", ood_dir.name or str(ood_dir)))
    plot_roc({m: (ins.scores(m, temperature), outs.scores(m, temperature)) for m in ins.methods}, out / ROC_FILE)
    _write_scores_csv(out / SCORES_FILE, [("in", ins), ("ood", outs)], ins.methods, temperature)
    write_text_atomic(out / OOD_FILE, json.dumps(result, indent=2) + "\n")
    return result
