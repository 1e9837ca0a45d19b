"""HeadOptimal / Head: projection → prototype bank → per-sample mixed attention → similarity → logits.

Composition only: the math lives in :mod:`protohead.similarity`, :mod:`protohead.losses` and
:mod:`protohead.attention`; prototype state in :mod:`protohead.bank`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from protohead import losses
from protohead.attention import MixedAttentionBlock
from protohead.bank import PrototypeBank
from protohead.config import HeadConfig, preset_config
from protohead.similarity import masked_max, prototype_similarity
from protohead.validation import check_head_inputs


class HeadOptimal(nn.Module):
    """Multi-prototype classification head (the design document's recommended head).

    Construct with keyword options (any :class:`HeadConfig` field), a ``config``, or a ``preset`` name::

        HeadOptimal(num_classes=7, emb_dim=384, num_heads=8, img_feat_dim=384)
        HeadOptimal(preset="long_tail", num_classes=7, img_feat_dim=1280, class_counts=(228, 359, ...))

    ``forward(pool_features (B, N, F), img_features (B, F) | (B, 1, F), labels (B,) | None)`` returns
    ``(logits (B, C), loss | None, info)``:

    - with labels: ``loss`` is the scalar training objective and ``info`` holds every loss component
      (detached), plus ``uncertainty``;
    - without labels (inference, eval mode only): ``loss`` is ``None`` and ``info`` holds ``uncertainty``
      (B,), ``probabilities`` (B, C), ``similarities`` (B, C, M) with unused slots at −inf,
      ``attention`` (B, C, M, N) head-averaged cross-attention weights (None without attention),
      ``winning_prototype`` (B, C).
    Without labels in training mode it raises ``ValueError`` (it never returns a silent zero loss).
    """

    def __init__(self, config: HeadConfig | None = None, *, preset: str | None = None, **options: Any) -> None:
        super().__init__()
        if config is not None and preset is not None:
            raise ValueError("pass either config or preset, not both")
        if preset is not None:
            config = preset_config(preset, **options)
        elif config is None:
            config = HeadConfig().replace(**options)
        elif options:
            config = config.replace(**options)
        self.config = config
        dim = config.emb_dim
        self.proj = nn.Sequential(nn.Linear(config.img_feat_dim, dim), nn.LayerNorm(dim), nn.Dropout(config.dropout))
        self.bank = PrototypeBank(config.num_classes, config.max_prototypes, dim, config.num_prototypes,
                                  normalized=config.distance == "cosine")
        self.attention = (MixedAttentionBlock(dim, config.num_heads, config.dropout, config.ffn_ratio, config.fusion)
                          if config.use_attention else None)
        log_temperature = torch.tensor(math.log(config.temperature))
        if config.learnable_temperature:
            self.log_temperature = nn.Parameter(log_temperature)
        else:
            self.register_buffer("log_temperature", log_temperature)
        if config.use_abstention:
            self.abstention_prototypes = nn.Parameter(torch.randn(config.num_abstention_prototypes, dim))
        if config.use_uncertainty_weighting:
            self.log_sigma = nn.Parameter(torch.zeros(2))
        counts = torch.zeros(config.num_classes) if config.class_counts is None else torch.tensor(
            config.class_counts, dtype=torch.float32)
        self.register_buffer("class_counts", counts)
        # push records (SPEC §5): training image index, token index and similarity of each prototype's source
        shape = (config.num_classes, config.max_prototypes)
        self.register_buffer("push_image", torch.full(shape, -1, dtype=torch.long))
        self.register_buffer("push_token", torch.full(shape, -1, dtype=torch.long))
        self.register_buffer("push_similarity", torch.full(shape, float("nan")))
        # set by the distributed trainer: maps this rank's per-sample tensors to the global batch before the loss
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------------- state
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> HeadOptimal:
        return cls(preset=name, **overrides)

    def set_class_counts(self, counts: torch.Tensor | list[int] | tuple[int, ...]) -> None:
        """Set the dataset-level class counts (C,) used for class weights."""
        counts = torch.as_tensor(counts, dtype=torch.float32)
        if counts.shape != (self.config.num_classes,):
            raise ValueError(f"class counts must have shape ({self.config.num_classes},), got {tuple(counts.shape)}")
        if (counts < 0).any() or not torch.isfinite(counts).all():
            raise ValueError("class counts must be finite and non-negative")
        self.class_counts.copy_(counts.to(self.class_counts.device))

    def class_weights(self) -> torch.Tensor:
        """(C,) class weights from the dataset counts: effective number if class-balanced, else 1/√n."""
        scheme = "effective_number" if self.config.use_class_balanced else "inv_sqrt"
        if not bool((self.class_counts > 0).any()):
            scheme = "uniform"  # counts unknown: every class weighs the same
        return losses.class_weights(self.class_counts, scheme, self.config.cb_beta).to(self.class_counts.device)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    @property
    def valid_mask(self) -> torch.Tensor:
        return self.bank.valid

    # ---------------------------------------------------------------------------------------- forward
    def embed(self, pool_features: torch.Tensor, img_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project tokens (B, N, F) and pooled vector (B, F) → ((B, N, D), (B, D))."""
        return self.proj(pool_features), self.proj(img_features)

    def _scores(self, prototypes: torch.Tensor, valid: torch.Tensor, tokens: torch.Tensor, embedding: torch.Tensor,
                scope: str, return_weights: bool, context: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(C', M, D) bank chunk → similarity, distance (B, C', M) and optional attention (B, C', M, N)."""
        if self.attention is None:
            sim, dist = prototype_similarity(embedding, prototypes, self.config.distance)
            return sim, dist, None
        if context is not None and self.config.distance == "cosine" and self.attention.fusion == "gate3":
            sim, weights = self.attention.gated_cosine(prototypes, tokens, embedding, context, return_weights)
            return sim, 1.0 - sim, weights
        adapted, weights = self.attention(prototypes, valid, tokens, scope, return_weights, context)
        sim, dist = prototype_similarity(embedding, adapted, self.config.distance)
        return sim, dist, weights

    def prototype_scores(self, tokens: torch.Tensor, embedding: torch.Tensor, return_weights: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Similarity and distance (B, C, M) of projected samples to their adapted prototypes.

        When the per-sample work can be split by class (``scope="class"`` or parallel mixing) and there
        are more than ``checkpoint_chunk_slots`` slots, classes are processed in chunks, activation-
        checkpointed when training, so memory stays bounded at large C.
        """
        prototypes, valid = self.bank.prototypes, self.bank.valid
        scope = self.config.resolved_attention_scope()
        context = None
        if self.attention is not None and self.config.resolved_mixing() == "parallel":
            context = self.attention.bank_context(prototypes, valid, scope)
        num_classes, max_slots, _ = prototypes.shape
        chunk = max(1, self.config.checkpoint_chunk_slots // max_slots)
        splittable = context is not None or scope == "class"
        if self.attention is None or not splittable or num_classes <= chunk:
            return self._scores(prototypes, valid, tokens, embedding, scope, return_weights, context)
        use_checkpoint = torch.is_grad_enabled() and self.training
        parts = []
        for start in range(0, num_classes, chunk):
            part = slice(start, start + chunk)
            args = (prototypes[part], valid[part], tokens, embedding, scope, return_weights,
                    None if context is None else (context[0][part], context[1][part]))
            parts.append(checkpoint(self._scores, *args, use_reentrant=False) if use_checkpoint
                         else self._scores(*args))
        sims, dists, weights = zip(*parts, strict=True)
        attention = torch.cat(weights, dim=1) if return_weights else None
        return torch.cat(sims, dim=1), torch.cat(dists, dim=1), attention

    def forward(self, pool_features: torch.Tensor, img_features: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        if labels is None and self.training:
            raise ValueError("labels are required in training mode (call .eval() for inference); "
                             "refusing to return a zero loss")
        img_features = check_head_inputs(pool_features, img_features, labels, self.config.img_feat_dim,
                                         self.config.num_classes, dtype=self.proj[0].weight.dtype)
        tokens, embedding = self.embed(pool_features, img_features)
        want_attention = labels is None
        sim, dist, attention = self.prototype_scores(tokens, embedding, return_weights=want_attention)
        valid = self.bank.valid
        best_sim, winner = masked_max(sim, valid)
        temperature = self.temperature
        logits = temperature * best_sim
        abstain_logit = None
        if self.config.use_abstention:
            abstain_sim, _ = prototype_similarity(embedding, self.abstention_prototypes[None], self.config.distance)
            abstain_logit = temperature * abstain_sim.amax(dim=(1, 2))
            uncertainty = losses.abstention_probability(logits, abstain_logit)
        else:
            uncertainty = 1.0 - logits.softmax(dim=-1).amax(dim=-1)
        info: dict[str, Any] = {"uncertainty": uncertainty.detach()}
        if labels is None:
            info.update(probabilities=logits.softmax(dim=-1).detach(),
                        similarities=sim.detach().masked_fill(~valid, float("-inf")),
                        attention=None if attention is None else attention.detach(),
                        winning_prototype=winner)
            return logits, None, info
        labels = labels.long()
        if self.gather is not None:  # distributed: the loss sees the global batch (see training.distributed)
            logits, dist, labels = self.gather(logits), self.gather(dist), self.gather(labels)
            abstain_logit = None if abstain_logit is None else self.gather(abstain_logit)
        loss, terms = self._objective(logits, abstain_logit, dist, labels, valid)
        info.update({name: value.detach() for name, value in terms.items()})
        return logits, loss, info

    # ------------------------------------------------------------------------------------------ loss
    def _objective(self, logits: torch.Tensor, abstain_logit: torch.Tensor | None, dist: torch.Tensor,
                   labels: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training objective and its components (each a scalar)."""
        cfg = self.config
        weights = self.class_weights()
        ce_weights = weights if cfg.use_class_balanced else None
        train_logits = logits
        if cfg.logit_adjustment > 0:  # train on z + τ·log π, predict with z (Menon et al. 2021)
            prior = self.class_counts.clamp_min(1) / self.class_counts.clamp_min(1).sum()
            train_logits = logits + cfg.logit_adjustment * prior.log()
        terms: dict[str, torch.Tensor] = {
            "ce": losses.cross_entropy_loss(train_logits, labels, ce_weights, cfg.focal_gamma),
        }
        classification = terms["ce"] if cfg.use_ce else logits.new_zeros(())
        if abstain_logit is not None:
            terms["abstention"], terms["abstention_penalty"] = losses.abstention_loss(
                train_logits, abstain_logit, labels, cfg.abstention_scale, ce_weights)
            classification = terms["abstention"]
        prototypes = self.bank.prototypes
        weighted_terms = {
            "cluster": (cfg.clst_scale, lambda: losses.cluster_loss(dist, valid, labels, weights)),
            "separation": (cfg.sep_scale, lambda: losses.separation_loss(dist, valid, labels, cfg.margin,
                                                                         cfg.separation_form)),
            "diversity": (cfg.div_scale, lambda: losses.diversity_loss(prototypes, valid, cfg.div_threshold)),
            "contrastive": (cfg.contrastive_scale, lambda: losses.contrastive_loss(prototypes, valid,
                                                                                   cfg.contrastive_pairs)),
            "orthogonality": (cfg.orth_scale, lambda: losses.orthogonality_loss(prototypes, valid)),
        }
        prototype_total = logits.new_zeros(())
        for name, (scale, term) in weighted_terms.items():
            if scale != 0:
                terms[name] = term()
                prototype_total = prototype_total + scale * terms[name]
        terms["classification"] = classification
        terms["prototype"] = prototype_total
        if cfg.use_uncertainty_weighting and (cfg.use_ce or cfg.use_abstention):
            total = losses.uncertainty_weighted_total(classification, prototype_total, self.log_sigma)
            terms["log_sigma_classification"] = self.log_sigma[0]
            terms["log_sigma_prototype"] = self.log_sigma[1]
        else:
            total = classification + prototype_total
        terms["temperature"] = self.temperature
        terms["total"] = total
        return total, terms


class Head(HeadOptimal):
    """Compatibility head: ``forward`` returns ``(logits, loss)``; ``loss`` is ``None`` without labels."""

    def forward(self, pool_features: torch.Tensor, img_features: torch.Tensor,  # type: ignore[override]
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, loss, _ = super().forward(pool_features, img_features, labels)
        return logits, loss

