"""Training objectives, built from a head's configuration apart from the head that scores (as timm builds its
criterion apart from the model).

A head's :meth:`score` returns :class:`HeadScores`: the per-sample tensors an objective needs (logits,
distances to prototypes, the abstain logit) plus the head state it reads (prototypes, valid mask, class
counts, temperature, log σ). An objective maps ``(scores, labels)`` to ``(loss, terms)`` with every term a
scalar. Under ``torchrun`` the trainer gathers the per-sample tensors of every rank between the two
(:meth:`HeadScores.gathered`), so the loss of the global batch is computed on each rank.

The one class-prior rule lives here too (:func:`log_prior`): the prior is the training counts normalised,
a class with no training sample counted as one, and no counts at all (all zero) meaning a uniform prior.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from protohead import losses
from protohead.config import HeadConfig

PER_SAMPLE = ("logits", "distances", "abstain_logit")


def log_prior(class_counts: torch.Tensor) -> torch.Tensor:
    """(C,) log prior from (C,) training counts: log(n_c / Σn) with zero counts taken as one (uniform when
    every count is zero). The one rule used for training (logit adjustment), baselines and post-hoc shifts."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64).clamp_min(1.0)
    return (counts / counts.sum()).log()


@dataclass
class HeadScores:
    """What a head computed for a batch, as an objective needs it.

    Attributes:
        logits: (B, C) class logits.
        distances: (B, C, M) distance of each sample to each (adapted) prototype, or None (baselines).
        abstain_logit: (B,) abstention logit, or None.
        state: head tensors the objective reads, not per sample: ``prototypes`` (C, M, D), ``valid``
            (C, M), ``class_counts`` (C,), ``temperature`` (), ``log_sigma`` (2,), ``logit_offset`` (C,).
    """

    logits: torch.Tensor
    distances: torch.Tensor | None = None
    abstain_logit: torch.Tensor | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def gathered(self, gather: Callable[[torch.Tensor], torch.Tensor] | None) -> HeadScores:
        """The same scores with every per-sample tensor passed through ``gather`` (e.g. an all-gather)."""
        if gather is None:
            return self
        changes = {name: gather(getattr(self, name)) for name in PER_SAMPLE if getattr(self, name) is not None}
        return dataclasses.replace(self, **changes)


Objective = Callable[[HeadScores, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class PrototypeObjective:
    """The design document's objective for :class:`~protohead.head.HeadOptimal` (SPEC §3): cross-entropy (or,
    with ``abstention_mode="coupled"``, the abstention NLL in its place) + cluster, separation, diversity,
    contrastive, orthogonality and prototype-usage terms, summed or weighted by learned log σ; class weights from
    the dataset counts. With ``abstention_mode="detached"`` (default) the abstention NLL + λ·penalty is a term of
    its own on the detached class logits: it trains only the abstain logit, never the classifier."""

    def __init__(self, config: HeadConfig) -> None:
        self.config = config

    def class_weights(self, class_counts: torch.Tensor) -> torch.Tensor:
        """(C,) class weights from the dataset counts: effective number if class-balanced, else 1/√n; uniform
        while the counts are unknown (all zero)."""
        scheme = "effective_number" if self.config.use_class_balanced else "inv_sqrt"
        if not bool((class_counts > 0).any()):
            scheme = "uniform"
        return losses.class_weights(class_counts, scheme, self.config.cb_beta).to(class_counts.device)

    def __call__(self, scores: HeadScores, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, terms)``: the scalar objective and each of its components (scalars)."""
        cfg, state = self.config, scores.state
        logits, dist, valid, labels = scores.logits, scores.distances, state["valid"], labels.long()
        weights = self.class_weights(state["class_counts"])
        ce_weights = weights if cfg.use_class_balanced else None
        train_logits = logits
        if cfg.logit_adjustment > 0:  # train on z + τ·log π, predict with z (Menon et al. 2021)
            train_logits = logits + cfg.logit_adjustment * log_prior(state["class_counts"]).to(logits)
        terms: dict[str, torch.Tensor] = {
            "ce": losses.cross_entropy_loss(train_logits, labels, ce_weights, cfg.focal_gamma),
        }
        classification = terms["ce"] if cfg.use_ce else logits.new_zeros(())
        abstention = logits.new_zeros(())
        if scores.abstain_logit is not None and cfg.abstention_mode == "coupled":  # the document's: NLL replaces CE
            terms["abstention"], terms["abstention_penalty"] = losses.abstention_loss(
                train_logits, scores.abstain_logit, labels, cfg.abstention_scale, ce_weights, cfg.abstention_payoff)
            classification = terms["abstention"]
        elif scores.abstain_logit is not None:  # learned beside the classifier, from its detached logits
            abstention, terms["abstention_penalty"] = losses.abstention_loss(
                logits.detach(), scores.abstain_logit, labels, cfg.abstention_scale, payoff=cfg.abstention_payoff)
            terms["abstention"] = abstention
        prototypes = state["prototypes"]
        weighted_terms = {
            "cluster": (cfg.clst_scale, lambda: losses.cluster_loss(dist, valid, labels, weights,
                                                                    cfg.cluster_reduction)),
            "separation": (cfg.sep_scale, lambda: losses.separation_loss(dist, valid, labels, cfg.margin,
                                                                         cfg.separation_form)),
            "diversity": (cfg.div_scale, lambda: losses.diversity_loss(prototypes, valid, cfg.div_threshold)),
            "contrastive": (cfg.contrastive_scale, lambda: losses.contrastive_loss(prototypes, valid,
                                                                                   cfg.contrastive_pairs)),
            "orthogonality": (cfg.orth_scale, lambda: losses.orthogonality_loss(prototypes, valid)),
            "usage": (cfg.usage_scale, lambda: losses.prototype_usage_loss(dist, valid, labels, cfg.usage_sharpness)),
        }
        prototype_total = logits.new_zeros(())
        for name, (scale, term) in weighted_terms.items():
            if scale != 0:
                terms[name] = term()
                prototype_total = prototype_total + scale * terms[name]
        terms["classification"] = classification
        terms["prototype"] = prototype_total
        if cfg.use_uncertainty_weighting and (cfg.use_ce or cfg.use_abstention):
            log_sigma = state["log_sigma"]
            total = losses.uncertainty_weighted_total(classification, prototype_total, log_sigma)
            terms["log_sigma_classification"] = log_sigma[0]
            terms["log_sigma_prototype"] = log_sigma[1]
        else:
            total = classification + prototype_total
        total = total + abstention  # detached abstention: its own term, outside the log-σ weighting
        terms["temperature"] = state["temperature"]
        terms["total"] = total
        return total, terms


class AdjustedCrossEntropy:
    """Cross-entropy on ``logits + logit_offset`` (the baselines: plain CE with a zero offset, logit
    adjustment with τ·log π, balanced softmax with log n_c)."""

    def __call__(self, scores: HeadScores, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = F.cross_entropy(scores.logits + scores.state["logit_offset"], labels.long())
        return loss, {"ce": loss.detach(), "total": loss.detach()}


def scalar_terms(terms: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The terms detached (each a 0-dim tensor), for logging: ``{k: v.item() for k, v in terms.items()}``."""
    return {name: value.detach() for name, value in terms.items()}
